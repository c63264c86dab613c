"""Stage ``hpo``: an Optuna study whose every trial is a k-fold cross-validated fine-tune.

Reads   paths.pairs (the ``train`` split and its fixed folds)
        params: seed, model.*, train.*, hpo.*
Writes  paths.study_db      the study (persisted: a rerun resumes it, see dvc.yaml); with another
                            storage (PostgreSQL, a journal file) a snapshot of it
        paths.trials        one row per trial: state, value, fold mean/std, hyperparameters
        paths.fold_metrics  one row per fold fit: seed, epochs, padding, the four metrics
        paths.study_summary study definition, counts, best trial (JSON)
        paths.importance    hyperparameter importances (evaluator named in params)
        paths.hpo_metrics   best value, its fold mean/std, trial counts, fold fits run/possible
Logs    MLflow: a parent run per study (reused on resume) > a run per trial > a run per fold
        with per-epoch metrics.

The study's name is a fingerprint of everything that defines the objective (data and folds,
search space, model, training settings, metric, aggregation, sampler, pruner, seed), so changing
any of them starts a new study, while raising ``hpo.n_trials`` extends the same one: the study
must hold ``n_trials`` finished (complete or pruned) trials and only the missing ones run. The
outputs describe the first ``n_trials`` finished trials, so they depend on params alone.

``python -m pipeline.hpo --worker`` joins the study that params.yaml defines (same storage, from
any machine) and runs trials until the study holds n_trials finished ones; it writes nothing. The
stage does the same, then waits for trials still running elsewhere and writes the outputs.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import socket
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import yaml
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from pipeline.common import StageError, run_stage
from pipeline.engine import ENCODE_STATS, derive_seed, encode_pairs
from pipeline.model import load_tokenizer
from pipeline.objective import CrossValidation, fold_indices
from pipeline.params import Params, YamlLoader, load_params
from pipeline.storage import StudyStorage
from pipeline.study_outputs import FINISHED_STATES, primary, write_outputs
from pipeline.tracking import FAILED, FINISHED, KILLED, RunTree

POLL_SECONDS = 2.0


def study_definition(params: Params, pairs_digest: str,
                     warm_start: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Everything that defines the objective; n_trials and storage are deliberately absent."""
    train = params.train
    return {
        "objectives": [params.hpo.metric, *params.hpo.objectives],
        "warm_start": warm_start or [],
        "pairs_sha256": pairs_digest,  # the prepared data, its split and its folds
        "n_folds": params.prepare.n_folds,
        "seed": params.seed,
        "model": asdict(params.model),
        "train": {"negatives_per_positive": train.negatives_per_positive,
                  "early_stopping_patience": train.early_stopping_patience},
        "metric": params.hpo.metric,
        "fold_aggregation": params.hpo.fold_aggregation,
        "sampler": asdict(params.hpo.sampler),
        "pruner": _pruner_definition(params),
        "search_space": {name: asdict(p) for name, p in params.hpo.search_space.items()},
    }


def _pruner_definition(params: Params) -> dict[str, Any]:
    """The pruner's settings that act: the percentile only defines a percentile pruner."""
    d = asdict(params.hpo.pruner)
    if d["name"] != "percentile":
        d.pop("percentile")
    return d


def study_name(prefix: str, definition: dict[str, Any]) -> str:
    blob = json.dumps(definition, sort_keys=True, default=list).encode()
    return f"{prefix}-{hashlib.sha256(blob).hexdigest()[:12]}"


def make_sampler(params: Params, n_existing: int, worker: bool) -> optuna.samplers.BaseSampler:
    """TPE (or random) with every setting we rely on written out (Optuna 5 changed defaults).

    The seed includes the number of trials already in the study, so a resumed study does not
    replay the startup points of the first run; an extra worker also mixes in its host and pid.
    """
    s = params.hpo.sampler
    keys = ("sampler", n_existing, socket.gethostname(), time.time_ns()) if worker else \
        ("sampler", n_existing)
    seed = derive_seed(params.seed, *keys)
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # `group` is marked experimental; we choose it knowingly (focal_* exist only for focal loss).
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna.samplers.TPESampler(
        n_startup_trials=s.n_startup_trials,
        n_ei_candidates=24,
        multivariate=s.multivariate,
        group=s.group,
        constant_liar=s.constant_liar,
        seed=seed,
    )


def make_pruner(params: Params) -> optuna.pruners.BasePruner:
    p = params.hpo.pruner
    if p.name == "none":
        return optuna.pruners.NopPruner()
    # One report per fold (step = fold index), so interval 1 and warmup counted in folds.
    if p.name == "percentile":  # median = percentile 50; a lower percentile prunes more
        return optuna.pruners.PercentilePruner(
            p.percentile, n_startup_trials=p.n_startup_trials,
            n_warmup_steps=p.n_warmup_steps, interval_steps=1)
    return optuna.pruners.MedianPruner(
        n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps, interval_steps=1)


class _Progress:
    """A trials progress bar and the failure budget of this process, as an Optuna callback."""

    def __init__(self, n_trials: int, done: int) -> None:
        self.bar = tqdm(total=n_trials, initial=min(done, n_trials), desc="trials")
        self.failures: list[str] = []

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state in FINISHED_STATES:
            self.bar.update(1)
        elif trial.state == TrialState.FAIL and not trial.user_attrs.get("surplus"):
            self.failures.append(f"trial {trial.number}: {trial.user_attrs.get('fail_reason')}")


def _counts(study: optuna.Study) -> dict[TrialState, int]:
    counts = dict.fromkeys(TrialState, 0)
    for t in study.get_trials(deepcopy=False):
        counts[t.state] += 1
    return counts


def run_trials(study: optuna.Study, objective: CrossValidation, storage: StudyStorage,
               params: Params) -> _Progress:
    """Run trials in this process until the study holds hpo.n_trials finished trials.

    Several processes may do this at once on one storage: each starts a trial only while the
    finished, running and queued trials leave room, and a trial that still finds the study full
    when it starts gives its place up (it ends FAIL, flagged surplus, without any work).
    """
    n, max_failures = params.hpo.n_trials, params.hpo.max_failures
    progress = _Progress(n, _counts(study)[TrialState.COMPLETE] + _counts(study)[
        TrialState.PRUNED])
    while len(progress.failures) <= max_failures:
        storage.fail_dead_trials(study)
        c = _counts(study)
        finished = c[TrialState.COMPLETE] + c[TrialState.PRUNED]
        if finished >= n:
            break
        if finished + c[TrialState.RUNNING] >= n and not c[TrialState.WAITING]:
            time.sleep(POLL_SECONDS)  # the last trials are running elsewhere
            continue
        study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[progress],
                       gc_after_trial=True)
    progress.bar.close()
    if len(progress.failures) > max_failures:
        raise StageError(
            f"hpo: {len(progress.failures)} trials failed in this run, more than "
            f"hpo.max_failures={max_failures}; last: {progress.failures[-1]}")
    return progress


def wait_for_running(study: optuna.Study, storage: StudyStorage) -> None:
    """Until no trial is RUNNING (other workers finishing, or dead ones going stale)."""
    while _counts(study)[TrialState.RUNNING]:
        storage.fail_dead_trials(study)
        time.sleep(POLL_SECONDS)


def _in_space(params: Params, point: dict[str, Any]) -> dict[str, Any]:
    """The part of ``point`` that is a valid value of a searched hyperparameter."""
    kept = {}
    for name, p in params.hpo.search_space.items():
        value = point.get(name)
        if value is None or not p.searched:
            continue
        if any(point.get(k, kept.get(k)) != v for k, v in p.when.items()):
            continue
        if p.type == "categorical":
            ok = value in p.choices
        else:
            ok = isinstance(value, (int, float)) and p.low <= value <= p.high
        if ok:
            kept[name] = int(value) if p.type == "int" else value
    return kept


def warm_start_points(params: Params, storage: StudyStorage) -> list[dict[str, Any]]:
    """hpo.warm_start resolved to the points to enqueue first (only valid values are kept)."""
    spec = params.hpo.warm_start
    if not spec:
        return []
    if spec.startswith("study:"):
        try:
            other = optuna.load_study(study_name=spec[len("study:"):], storage=storage.optuna)
        except KeyError as err:
            raise StageError(f"params.yaml: hpo.warm_start: no study '{spec[6:]}' in "
                             f"{storage.redacted}") from err
        complete = [t for t in other.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
        complete.sort(key=lambda t: (-primary(t), t.number))
        points = [t.params for t in complete[: params.hpo.warm_start_trials]]
    else:
        path = Path(spec)
        if not path.is_file():
            raise StageError(f"params.yaml: hpo.warm_start: {path} not found (a best-params "
                             "YAML written by export_best, or study:<name>)")
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=YamlLoader) or {}
        points = [doc.get("hyperparameters") or {}]
    unique: list[dict[str, Any]] = []
    for point in map(lambda p: _in_space(params, p), points):
        if point and point not in unique:
            unique.append(point)
    return unique


def _tokenised(params: Params) -> tuple[pd.DataFrame, bytes]:
    pairs_bytes = Path(params.paths.pairs).read_bytes()
    pairs = pd.read_csv(io.BytesIO(pairs_bytes), keep_default_na=False)
    return pairs[pairs["split"] == "train"].reset_index(drop=True), pairs_bytes


def _close_dead_trial_runs(runs: RunTree, trial: FrozenTrial) -> None:
    """A dead worker's trial: its MLflow trial run FAILED, any fold run left open KILLED."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        reason = trial.user_attrs.get("fail_reason") or "worker died (no heartbeat)"
        runs.close_open_children(run_id, KILLED)
        runs.log(run_id, tags={"fail_reason": reason})
        runs.end(run_id, FAILED)


def run(params: Params, worker: bool = False, wait_seconds: float = 600.0) -> dict[str, Any]:
    """Run or resume the study until it holds hpo.n_trials finished trials.

    The stage (worker=False) creates the study if needed and writes the outputs; a worker joins
    an existing study (waiting up to ``wait_seconds`` for the stage to create it) and returns
    its own counts.
    """
    hpo = params.hpo
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pairs, pairs_bytes = _tokenised(params)
    runs: RunTree | None = None  # bound below; the storage calls back only during trials
    storage = StudyStorage(params, on_dead_trial=lambda t: _close_dead_trial_runs(runs, t))
    points = warm_start_points(params, storage)
    definition = study_definition(params, hashlib.sha256(pairs_bytes).hexdigest(), points)
    name = study_name(hpo.study_prefix, definition)
    if worker:
        # Wait for the stage first: it also creates the MLflow store (two processes creating
        # the same SQLite store at once collide).
        study, parent = _join(name, storage, params, wait_seconds)
        runs = RunTree(hpo.mlflow_experiment)
    else:
        runs = RunTree(hpo.mlflow_experiment)
        study = optuna.create_study(
            storage=storage.optuna, study_name=name, pruner=make_pruner(params),
            directions=["maximize"] + ["minimize"] * len(hpo.objectives), load_if_exists=True)
        if not study.trials:
            for point in points:  # warm start: earlier best points are the first trials
                study.enqueue_trial(point, skip_if_exists=True)
        study.set_user_attr("definition", definition)
        parent = runs.study_run(study.user_attrs.get("mlflow_run_id"), name,
                                {"optuna.study_name": name, "optuna.storage": storage.redacted})
        study.set_user_attr("mlflow_run_id", parent)
    study.sampler = make_sampler(params, len(study.trials), worker)
    c = _counts(study)
    resumed = c[TrialState.COMPLETE] + c[TrialState.PRUNED]
    parent_status = FAILED
    try:
        storage.fail_dead_trials(study)
        if resumed < hpo.n_trials:
            tokenizer = load_tokenizer(params.model.name)
            start = time.perf_counter()
            enc = encode_pairs(tokenizer, pairs["criterion"], pairs["sentence"],
                               pairs["label"], params.model.max_length)
            runs.log(parent, {"tokenize_seconds": time.perf_counter() - start,
                              "tokenized_pairs": len(enc)})
            folds = fold_indices(pairs["fold"].to_numpy(), params.prepare.n_folds)
            objective = CrossValidation(params, enc, folds, runs, parent)
            run_trials(study, objective, storage, params)
        if worker:
            c = _counts(study)
            return {"study_name": name, "finished": c[TrialState.COMPLETE] + c[
                TrialState.PRUNED], "tokenize_calls": ENCODE_STATS["calls"]}
        wait_for_running(study, storage)
        if storage.snapshot_needed():
            storage.snapshot(study, params.paths.study_db)
        metrics = write_outputs(study, params, resumed, storage.redacted, runs, parent)
        parent_status = FINISHED
        return metrics
    finally:
        if not worker:
            runs.end(parent, parent_status)


def _join(name: str, storage: StudyStorage, params: Params,
          wait_seconds: float) -> tuple[optuna.Study, str]:
    """A worker's study and MLflow parent run, once the stage has created them."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            study = optuna.load_study(study_name=name, storage=storage.optuna,
                                      pruner=make_pruner(params))
            parent = study.user_attrs.get("mlflow_run_id")
            if parent:
                return study, parent
        except KeyError:  # no such study yet
            pass
        if time.monotonic() > deadline:
            raise StageError(
                f"hpo --worker: no study '{name}' in {storage.redacted} after {wait_seconds:.0f}"
                "s. Start the stage (dvc repro) with the same params.yaml and prepared data, "
                "and point HPO_STORAGE at the same database.")
        time.sleep(POLL_SECONDS)


def main() -> None:
    parser = argparse.ArgumentParser(description="The hpo stage, or a worker joining its study.")
    parser.add_argument("--worker", action="store_true",
                        help="join the study params.yaml defines, run trials, write nothing")
    parser.add_argument("--wait", type=float, default=600.0,
                        help="seconds a worker waits for the stage to create the study")
    args = parser.parse_args()
    params = load_params()
    if args.worker:
        result = run(params, worker=True, wait_seconds=args.wait)
        print(f"hpo worker: study {result['study_name']} holds {result['finished']} finished "
              "trials")
        return
    metrics = run(params)
    print(f"hpo: best trial {metrics['best_trial']} value {metrics['best_value']:.4f}; "
          f"{metrics['n_complete']} complete, {metrics['n_pruned']} pruned, "
          f"{metrics['n_failed']} failed; fold fits {metrics['fold_fits_run']}/"
          f"{metrics['fold_fits_possible']}")


if __name__ == "__main__":
    run_stage(main)
