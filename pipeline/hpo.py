"""Stage ``hpo``: an Optuna study whose every trial is a k-fold cross-validated fine-tune.

Reads   paths.pairs (the ``train`` split and its fixed folds)
        params: seed, model.*, train.*, hpo.*
Writes  paths.study_db      the SQLite study (persisted: a rerun resumes it, see dvc.yaml)
        paths.trials        one row per trial: state, value, fold mean/std, hyperparameters
        paths.fold_metrics  one row per fold fit: seed, epochs, macro_f1, pos_f1, roc_auc, pr_auc
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
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import statistics
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from pipeline.common import StageError, round_floats, run_stage, write_json, write_text
from pipeline.engine import (
    Encoded,
    Hyperparameters,
    derive_seed,
    encode_pairs,
    fine_tune,
    subsample_negatives,
)
from pipeline.model import load_tokenizer, pick_device
from pipeline.params import HYPERPARAMETERS, METRICS, Params, SearchParam, load_params
from pipeline.tracking import FAILED, FINISHED, KILLED, RunTree, tracking_uri

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
AGGREGATE = {"mean": statistics.fmean, "median": statistics.median, "min": min, "max": max}


def suggest(trial: optuna.Trial, space: dict[str, SearchParam]) -> Hyperparameters:
    """The one place the search space becomes Optuna calls (conditional entries via ``when``)."""
    values: dict[str, Any] = {}
    for name, p in space.items():
        if any(values.get(other) != wanted for other, wanted in p.when.items()):
            continue
        if p.type == "fixed":
            values[name] = p.value
        elif p.type == "float":
            values[name] = trial.suggest_float(name, p.low, p.high, log=p.log)
        elif p.type == "int":
            values[name] = trial.suggest_int(name, int(p.low), int(p.high), log=p.log)
        else:
            values[name] = trial.suggest_categorical(name, list(p.choices))
    return Hyperparameters(**values)


def study_definition(params: Params, pairs_digest: str) -> dict[str, Any]:
    """Everything that defines the objective; n_trials and storage are deliberately absent."""
    train = params.train
    return {
        "pairs_sha256": pairs_digest,  # the prepared data, its split and its folds
        "n_folds": params.prepare.n_folds,
        "seed": params.seed,
        "model": asdict(params.model),
        "train": {"negatives_per_positive": train.negatives_per_positive,
                  "early_stopping_patience": train.early_stopping_patience},
        "metric": params.hpo.metric,
        "fold_aggregation": params.hpo.fold_aggregation,
        "sampler": asdict(params.hpo.sampler),
        "pruner": asdict(params.hpo.pruner),
        "search_space": {name: asdict(p) for name, p in params.hpo.search_space.items()},
    }


def study_name(prefix: str, definition: dict[str, Any]) -> str:
    blob = json.dumps(definition, sort_keys=True, default=list).encode()
    return f"{prefix}-{hashlib.sha256(blob).hexdigest()[:12]}"


def make_sampler(params: Params, n_existing: int) -> optuna.samplers.BaseSampler:
    """TPE (or random) with every setting we rely on written out (Optuna 5 changed defaults).

    The seed includes the number of trials already in the study, so a resumed study does not
    replay the startup points of the first run.
    """
    s = params.hpo.sampler
    seed = derive_seed(params.seed, "sampler", n_existing)
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
    return optuna.pruners.MedianPruner(
        n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps, interval_steps=1)


def fold_indices(pairs: pd.DataFrame, n_folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, validation rows) of each fold, as positions in the train-split table."""
    folds = pairs["fold"].to_numpy()
    return [(np.flatnonzero(folds != k), np.flatnonzero(folds == k)) for k in range(n_folds)]


class CrossValidation:
    """The objective: k-fold CV of a fine-tune on fixed folds, data tokenised once."""

    def __init__(self, params: Params, enc: Encoded, folds: list[tuple[np.ndarray, np.ndarray]],
                 runs: RunTree, parent_run: str) -> None:
        self.params = params
        self.enc = enc
        self.runs = runs
        self.parent_run = parent_run
        self.device = pick_device(params.train.device, params.train.cpu_threads)
        # Negatives are subsampled once per fold, identically for every trial.
        self.folds = [
            (subsample_negatives(enc.labels, train, params.train.negatives_per_positive,
                                 derive_seed(params.seed, "negatives", k)), val)
            for k, (train, val) in enumerate(folds)
        ]

    def __call__(self, trial: optuna.Trial) -> float:
        hpo = self.params.hpo
        hp = suggest(trial, hpo.search_space)
        trial.set_user_attr("hyperparameters", hp.as_dict())
        run_id = self.runs.child(self.parent_run, f"trial-{trial.number}",
                                 {"optuna.study_name": trial.study.study_name,
                                  "optuna.trial_number": trial.number})
        trial.set_user_attr("mlflow_run_id", run_id)
        self.runs.log(run_id, params=hp.as_dict())
        status, scores = FAILED, []
        try:
            for fold, (train_idx, val_idx) in enumerate(
                    tqdm(self.folds, desc=f"trial {trial.number} folds", leave=False)):
                seed = derive_seed(self.params.seed, "trial", trial.number, "fold", fold)
                result = self._fit_fold(trial, run_id, fold, seed, hp, train_idx, val_idx)
                trial.set_user_attr(f"fold{fold}", {
                    **result.metrics, "seed": seed, "epochs_run": result.epochs_run,
                    "best_epoch": result.best_epoch, "train_samples": result.train_samples,
                    "train_seconds": round(result.train_seconds, 3),
                })
                scores.append(result.metrics[hpo.metric])
                if not np.isfinite(scores[-1]):
                    raise FloatingPointError(f"fold {fold}: {hpo.metric} is not finite")
                running = AGGREGATE[hpo.fold_aggregation](scores)
                self.runs.log(run_id, {f"fold{fold}_{k}": v for k, v in result.metrics.items()})
                trial.report(running, step=fold)
                if fold + 1 < len(self.folds) and trial.should_prune():
                    status = KILLED
                    raise optuna.TrialPruned(
                        f"{hpo.fold_aggregation} {hpo.metric} {running:.4f} after fold {fold}")
            value = AGGREGATE[hpo.fold_aggregation](scores)
            self.runs.log(run_id, {"value": value})
            status = FINISHED
            return value
        except optuna.TrialPruned:
            raise
        except Exception as err:  # the trial FAILs (never PRUNED) and says why; the study goes on
            reason = f"{type(err).__name__}: {err}"[:1000]
            trial.set_user_attr("fail_reason", reason)
            self.runs.log(run_id, tags={"fail_reason": reason})
            raise
        finally:
            self.runs.log(run_id, tags={"optuna.folds_run": len(scores)})
            self.runs.end(run_id, status)

    def _fit_fold(self, trial, run_id, fold, seed, hp, train_idx, val_idx):
        fold_run = self.runs.child(run_id, f"trial-{trial.number}-fold-{fold}",
                                   {"optuna.trial_number": trial.number, "fold": fold,
                                    "seed": seed})
        try:
            result = fine_tune(
                self.params.model, self.params.train, hp, self.enc, train_idx, seed, self.device,
                val_idx=val_idx, monitor=self.params.hpo.metric,
                on_epoch=lambda epoch, record: self.runs.log(fold_run, record, step=epoch),
                desc=f"trial {trial.number} fold {fold}",
            )
        except BaseException:
            self.runs.end(fold_run, FAILED)
            raise
        self.runs.log(fold_run, {**result.metrics, "epochs_run": result.epochs_run,
                                 "best_epoch": result.best_epoch})
        self.runs.end(fold_run, FINISHED)
        return result


class _Progress:
    """A trials progress bar and a failure budget, as an Optuna callback."""

    def __init__(self, n_trials: int, done: int, max_failures: int) -> None:
        self.bar = tqdm(total=n_trials, initial=done, desc="trials")
        self.failures = 0
        self.max_failures = max_failures

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state in FINISHED_STATES:
            self.bar.update(1)
        elif trial.state == TrialState.FAIL:
            self.failures += 1
            if self.failures > self.max_failures:
                study.stop()


def considered_trials(study: optuna.Study, n_trials: int) -> list[FrozenTrial]:
    """All trials up to and including the n_trials-th finished one (failed ones included)."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    kept, finished = [], 0
    for t in trials:
        if finished >= n_trials:
            break
        if t.state in FINISHED_STATES or t.state == TrialState.FAIL:
            kept.append(t)
            finished += t.state in FINISHED_STATES
    return kept


def _fold_rows(trials: list[FrozenTrial], n_folds: int) -> list[dict[str, Any]]:
    rows = []
    for t in trials:
        for fold in range(n_folds):
            f = t.user_attrs.get(f"fold{fold}")
            if f is not None:
                rows.append({"trial": t.number, "fold": fold, "state": t.state.name,
                             **{k: f.get(k) for k in ("seed", "epochs_run", "best_epoch",
                                                      *METRICS)}})
    return rows


def _trial_rows(trials: list[FrozenTrial], metric: str, n_folds: int) -> list[dict[str, Any]]:
    rows = []
    for t in trials:
        folds = [t.user_attrs[f"fold{k}"][metric] for k in range(n_folds)
                 if f"fold{k}" in t.user_attrs]
        hps = t.user_attrs.get("hyperparameters", {})
        duration = t.duration.total_seconds() if t.duration else None
        rows.append({
            "number": t.number, "state": t.state.name, "value": t.value,
            "fold_mean": float(np.mean(folds)) if folds else None,
            "fold_std": float(np.std(folds, ddof=1)) if len(folds) > 1 else None,
            "folds_run": len(folds),
            **{f"params_{name}": hps.get(name) for name in HYPERPARAMETERS},
            "fail_reason": t.user_attrs.get("fail_reason"),
            "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
            "duration_seconds": round(duration, 1) if duration is not None else None,
        })
    return rows


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Rows as CSV; metrics rounded, hyperparameters (params_*) kept exact for export_best."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        row = {k: v if k.startswith("params_") else round_floats(v) for k, v in row.items()}
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()


def importances(trials: list[FrozenTrial], params: Params) -> dict[str, Any]:
    """Importances over the complete trials, with the evaluator chosen explicitly in params."""
    name = params.hpo.importance_evaluator
    seed = derive_seed(params.seed, "importance")
    evaluator = {
        "fanova": lambda: optuna.importance.FanovaImportanceEvaluator(seed=seed),
        "ped_anova": lambda: optuna.importance.PedAnovaImportanceEvaluator(),
        "mean_decrease_impurity":
            lambda: optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=seed),
    }[name]()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    result: dict[str, Any] = {"evaluator": name, "n_trials": len(complete), "importances": {}}
    study = optuna.create_study(direction="maximize")
    study.add_trials(complete)
    try:
        result["importances"] = optuna.importance.get_param_importances(
            study, evaluator=evaluator)
    except (RuntimeError, ValueError) as err:  # too few trials, or nothing varied
        result["error"] = str(err)
    return result


def _redact(url: str) -> str:
    """A storage URL without its password, for files that go into git and MLflow."""
    if "://" in url and "@" in url.split("://", 1)[1]:
        scheme, rest = url.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"
    return url


def storage_url(params: Params) -> str:
    """hpo.storage, or the SQLite file paths.study_db (its folder created) as an absolute URL."""
    if params.hpo.storage:
        return params.hpo.storage
    path = Path(params.paths.study_db).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def run(params: Params) -> dict[str, Any]:
    """Run or resume the study until it holds hpo.n_trials finished trials; write the outputs."""
    paths, hpo = params.paths, params.hpo
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pairs_bytes = Path(paths.pairs).read_bytes()
    pairs = pd.read_csv(io.BytesIO(pairs_bytes), keep_default_na=False)
    pairs = pairs[pairs["split"] == "train"].reset_index(drop=True)
    definition = study_definition(params, hashlib.sha256(pairs_bytes).hexdigest())
    name = study_name(hpo.study_prefix, definition)
    storage = storage_url(params)
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize",
                                pruner=make_pruner(params), load_if_exists=True)
    study.set_user_attr("definition", definition)
    study.sampler = make_sampler(params, len(study.trials))

    runs = RunTree(hpo.mlflow_experiment)
    parent = runs.study_run(study.user_attrs.get("mlflow_run_id"), name,
                            {"optuna.study_name": name, "optuna.storage": _redact(storage)})
    study.set_user_attr("mlflow_run_id", parent)
    finished = sum(t.state in FINISHED_STATES for t in study.trials)
    resumed = finished
    parent_status = FAILED
    try:
        if finished < hpo.n_trials:
            tokenizer = load_tokenizer(params.model.name)
            enc = encode_pairs(tokenizer, pairs["criterion"], pairs["sentence"],
                               pairs["label"], params.model.max_length)
            objective = CrossValidation(params, enc, fold_indices(pairs, params.prepare.n_folds),
                                        runs, parent)
            progress = _Progress(hpo.n_trials, finished, hpo.max_failures)
            while finished < hpo.n_trials and progress.failures <= hpo.max_failures:
                study.optimize(objective, n_trials=hpo.n_trials - finished, catch=(Exception,),
                               callbacks=[progress], gc_after_trial=True)
                finished = sum(t.state in FINISHED_STATES for t in study.trials)
            progress.bar.close()
            if progress.failures > hpo.max_failures:
                reasons = [t.user_attrs.get("fail_reason", "?") for t in study.trials
                           if t.state == TrialState.FAIL][-3:]
                raise StageError(f"hpo: {progress.failures} trials failed in this run, more than "
                                 f"hpo.max_failures={hpo.max_failures}; last reasons: {reasons}")
        metrics = write_outputs(study, params, resumed, storage, runs, parent)
        parent_status = FINISHED
        return metrics
    finally:
        runs.end(parent, parent_status)


def write_outputs(study: optuna.Study, params: Params, resumed: int, storage: str,
                  runs: RunTree, parent: str) -> dict[str, Any]:
    """Trials, fold metrics, summary, importances and metrics of the first n_trials trials."""
    paths, hpo, n_folds = params.paths, params.hpo, params.prepare.n_folds
    trials = considered_trials(study, hpo.n_trials)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise StageError(f"hpo: none of the {len(trials)} trials completed (all pruned or failed)")
    best = max(complete, key=lambda t: (t.value, -t.number))
    trial_rows = _trial_rows(trials, hpo.metric, n_folds)
    fold_rows = _fold_rows(trials, n_folds)
    best_row = next(r for r in trial_rows if r["number"] == best.number)
    counts = {state: sum(t.state.name == state for t in trials)
              for state in ("COMPLETE", "PRUNED", "FAIL")}
    finished = counts["COMPLETE"] + counts["PRUNED"]
    metrics = round_floats({
        "best_value": best.value,
        "best_trial": best.number,
        "best_fold_mean": best_row["fold_mean"],
        "best_fold_std": best_row["fold_std"],
        "n_complete": counts["COMPLETE"],
        "n_pruned": counts["PRUNED"],
        "n_failed": counts["FAIL"],
        "fold_fits_run": sum(r["folds_run"] for r in trial_rows
                             if r["state"] in ("COMPLETE", "PRUNED")),
        "fold_fits_possible": finished * n_folds,
        "epochs_run": sum(r["epochs_run"] or 0 for r in fold_rows),
    })
    importance = round_floats(importances(trials, params))
    summary = {
        "study_name": study.study_name,
        "storage": _redact(storage),
        "direction": "maximize",
        "objective": f"{hpo.fold_aggregation} over {n_folds} folds of {hpo.metric}",
        "n_trials": hpo.n_trials,
        "trials_in_storage": len(study.trials),
        "trials_reused": min(resumed, hpo.n_trials),
        "counts": counts,
        "best_trial": {"number": best.number, "value": round_floats(best.value),
                       "hyperparameters": best.user_attrs["hyperparameters"],
                       "fold_mean": best_row["fold_mean"], "fold_std": best_row["fold_std"]},
        "mlflow": {"tracking_uri": _redact(tracking_uri()), "study_run_id": parent},
        "definition": study.user_attrs["definition"],
    }
    write_text(paths.trials, _csv(trial_rows, list(trial_rows[0])))
    fold_columns = ["trial", "fold", "state", "seed", "epochs_run", "best_epoch", *METRICS]
    write_text(paths.fold_metrics, _csv(fold_rows, fold_columns))
    write_json(paths.study_summary, summary)
    write_json(paths.importance, importance)
    write_json(paths.hpo_metrics, metrics)

    runs.log(parent, {**{k: v for k, v in metrics.items() if v is not None},
                      **{f"importance_{k}": v for k, v in importance["importances"].items()}})
    for path in (paths.trials, paths.fold_metrics, paths.study_summary, paths.importance):
        runs.artifact(parent, path)
    return metrics


def main() -> None:
    metrics = run(load_params())
    print(f"hpo: best trial {metrics['best_trial']} value {metrics['best_value']:.4f}; "
          f"{metrics['n_complete']} complete, {metrics['n_pruned']} pruned, "
          f"{metrics['n_failed']} failed; fold fits {metrics['fold_fits_run']}/"
          f"{metrics['fold_fits_possible']}")


if __name__ == "__main__":
    run_stage(main)
