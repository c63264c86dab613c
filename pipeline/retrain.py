"""Stage ``retrain``: fine-tune on every training pair with the exported hyperparameters.

Reads   paths.pairs (the ``train`` split), paths.best_params   (params: seed, model.*, train.*)
Writes  paths.model_dir: a Hugging Face model directory (weights, config, tokenizer) that
        ``AutoModelForSequenceClassification.from_pretrained`` loads, plus ``training.json``.
Logs    an MLflow run ``retrain`` in ``hpo.mlflow_experiment``, a child of the study's run
        (tags: study name, chosen trial, git_commit, dvc_exp_name, model_sha256), with the
        training info and, when the model differs from the latest registered version, the model
        (transformers flavour) registered as a new version of ``registry.model_name``.

Negatives are subsampled as in the CV folds (training only), with a seed of their own.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.common import derive_seed, run_stage
from pipeline.engine import encode_pairs, fine_tune, subsample_negatives
from pipeline.inputs import read_best_params, read_split
from pipeline.model import load_tokenizer, pick_device, resolve_model_path
from pipeline.params import Params, load_params
from pipeline.tracking import (
    FAILED,
    FINISHED,
    RunTree,
    active_run,
    dir_sha256,
    latest_version,
    study_link,
)


def _model_card(params: Params, info: dict[str, Any], link: dict[str, str]):
    """A model card for the registry: what the model does, where it came from, and the base
    model's license (from its own card when it ships one; MLflow warns when it knows none)."""
    from huggingface_hub import ModelCard

    license_ = "other"
    readme = Path(resolve_model_path(params.model.name)) / "README.md"
    if readme.is_file():
        with contextlib.suppress(Exception):  # a card without metadata: keep "other"
            license_ = ModelCard.load(readme).data.license or "other"
    study = link.get("optuna.study_name", "(no study found)")
    return ModelCard(
        f"---\nlicense: {license_}\npipeline_tag: text-classification\n---\n"
        f"# {params.registry.model_name}\n\n"
        "Cross-encoder for DSM-5 evidence binding: input `criterion text [SEP] sentence`, label 1 "
        "(LABEL_1) when the sentence is evidence for the criterion. The decision threshold is the "
        "version tag `threshold` (set by the evaluate stage).\n\n"
        f"Base model: `{params.model.name}`. Hyperparameters of trial {link.get('chosen_trial')} "
        f"of study `{study}`: `{json.dumps(info['hyperparameters'])}`; {info['train_pairs']} "
        f"training pairs, seed {info['seed']}.\n")


@contextlib.contextmanager
def _hub_offline():
    """Hugging Face Hub requests fail at once inside (the library's offline mode).

    MLflow's transformers flavour looks for a license file by listing the hub repository named by
    the model's ``name_or_path``, here the local model directory: an error at best, and without a
    network five retries (23 s measured) before MLflow writes its fallback note anyway.
    """
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def log_model_run(params: Params, model_dir: Path, info: dict[str, Any],
                  seconds: float) -> dict[str, str]:
    """Log the retrain run and register the model if it differs from the latest version.

    Returns the run id, the model hash, the registered version and whether it is new."""
    import mlflow
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    runs = RunTree(params.hpo.mlflow_experiment)
    link = study_link(runs, params.paths.study_summary,
                      read_best_params(params.paths.best_params).trial)
    sha = dir_sha256(model_dir)
    name = params.registry.model_name
    run_id = runs.start("retrain", link.get("study_run_id"),
                        {**link, "pipeline_stage": "retrain", "model_sha256": sha})
    status = FAILED
    try:
        runs.log(run_id, params={**info["hyperparameters"], "seed": info["seed"],
                                 "train_pairs": info["train_pairs"],
                                 "base_model": info["base_model"],
                                 "max_length": params.model.max_length,
                                 "precision": info["precision"]},
                 metrics={"train_seconds": seconds, "epochs": info["epochs"],
                          "final_train_loss": info["final_train_loss"],
                          "padding_fraction": info["padding_fraction"],
                          "train_samples_per_second":
                              info["train_pairs"] * info["epochs"] / max(seconds, 1e-9)})
        runs.artifact(run_id, model_dir / "training.json")
        latest = latest_version(runs.client, name)
        if latest is not None and latest.tags.get("model_sha256") == sha:
            version, new = latest.version, False
        else:
            # Logged from the saved directory, so the registered weights are these bytes.
            model = AutoModelForSequenceClassification.from_pretrained(model_dir)
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            # Pinned explicitly: MLflow's default list asks for torchvision, which is not needed.
            requirements = [f"transformers=={transformers.__version__}",
                            f"torch=={torch.__version__.split('+')[0]}"]
            with active_run(runs, run_id), _hub_offline():
                logged = mlflow.transformers.log_model(
                    {"model": model, "tokenizer": tokenizer}, name="model",
                    task="text-classification", pip_requirements=requirements,
                    model_card=_model_card(params, info, link))
                registered = mlflow.register_model(logged.model_uri, name, tags={
                    "model_sha256": sha, "max_length": str(params.model.max_length),
                    "base_model": info["base_model"], **link, **runs.identity})
            version, new = registered.version, True
        runs.log(run_id, tags={"registered_model": name, "registered_model_version": version,
                               "registered_model_new": str(new).lower()})
        status = FINISHED
    finally:
        runs.end(run_id, status)
    return {"run_id": run_id, "model_sha256": sha, "version": str(version),
            "new_version": str(new).lower()}


def run(params: Params) -> dict[str, Any]:
    hp = read_best_params(params.paths.best_params).hyperparameters_checked()
    pairs = read_split(params.paths.pairs, "train")
    tokenizer = load_tokenizer(params.model.name)
    enc = encode_pairs(tokenizer, pairs["criterion"], pairs["sentence"], pairs["label"],
                       params.model.max_length)
    seed = derive_seed(params.seed, "retrain")
    train_idx = subsample_negatives(enc.labels, pairs.index.to_numpy(),
                                    params.train.negatives_per_positive,
                                    derive_seed(params.seed, "negatives", "retrain"))
    device = pick_device(params.train.device, params.train.cpu_threads, params.train.precision)
    # compact vocabulary while training; the saved model has the full embedding matrix again
    start = time.perf_counter()
    result = fine_tune(params.model, params.train, hp, enc.compact(), train_idx, seed, device,
                       keep_model=True, desc="retrain")
    seconds = time.perf_counter() - start
    # No timings here: training.json is a DVC output and must not change on an identical rerun.
    info = {"hyperparameters": hp.as_dict(), "seed": seed, "train_pairs": len(train_idx),
            "epochs": result.epochs_run, "final_train_loss": result.history[-1]["train_loss"],
            "padding_fraction": result.padding_fraction, "base_model": params.model.name,
            "precision": device.precision}

    # Write next to the target and swap in, so a crash leaves no half-written model directory.
    out = Path(params.paths.model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        result.model.save_pretrained(tmp)
        # transformers records how the tokenizer was loaded (local_files_only: whether
        # HF_HUB_OFFLINE was set); the saved directory must not depend on the environment
        tokenizer.init_kwargs.pop("local_files_only", None)
        tokenizer.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info["seconds"] = seconds
    info["mlflow"] = log_model_run(params, out, info, seconds)
    return info


def main() -> None:
    info = run(load_params())
    registry = info["mlflow"]
    what = "registered as new version" if registry["new_version"] == "true" else \
        "unchanged: same as registered version"
    print(f"retrain: {info['train_pairs']} pairs x {info['epochs']} epochs, final loss "
          f"{info['final_train_loss']:.4f}, {info['seconds']:.1f} s; model {what} "
          f"{registry['version']} (sha256 {registry['model_sha256'][:12]})")


if __name__ == "__main__":
    run_stage(main)
