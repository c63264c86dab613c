"""The objective of the hpo stage: one trial = k-fold cross-validation of a fine-tune.

The data are tokenised once (by the caller) and the folds and their negative subsamples are fixed
for the whole study. A trial suggests hyperparameters, fine-tunes once per fold, reports the
running aggregate after every fold (step = fold index) or every epoch (``hpo.pruner.report``)
so that the pruner can stop a poor trial early, and ends with the aggregate. A trial that
raises is FAIL with its reason, never PRUNED.

The work is split so that several trials can run at once (pipeline/hpo.py schedules them):
:meth:`CrossValidation.start` asks Optuna for a trial and opens its MLflow run, the
:class:`FoldRunner` computes its folds (in a child process: pipeline/trial_process.py), its
:class:`TrialRun` turns the fold events into MLflow runs, user attributes and pruning answers,
and :meth:`CrossValidation.finish` gives Optuna the result.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import TrialState

from pipeline import faults
from pipeline.common import derive_seed
from pipeline.engine import Encoded, Hyperparameters, fine_tune, subsample_negatives
from pipeline.metrics import best_f1_threshold, classification_metrics, threshold_transfer_gains
from pipeline.model import pick_device
from pipeline.params import Params, SearchParam
from pipeline.progress import progress
from pipeline.storage import worker_identity
from pipeline.tracking import FAILED, FINISHED, KILLED, RunTree
from pipeline.trial_process import (
    EpochEnd,
    Event,
    Failed,
    Finished,
    FoldEnd,
    FoldStart,
    peak_memory,
)

# The scheduler (pipeline/hpo.py) keeps each trial's heartbeat itself while it runs trials with
# ask/tell, which Optuna warns about on every ask.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used",
                        category=UserWarning)
AGGREGATE = {"mean": statistics.fmean, "median": statistics.median, "min": min, "max": max}
# Trials that hold one of the study's n_trials places (FAIL ones give theirs up).
SLOT_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
# What a retried trial inherits from the dead one but must not keep.
PER_ATTEMPT_ATTRS = ("fail_reason", "mlflow_run_id", "surplus", "threshold", "oof_pos_f1",
                     "oof_pos_f1_tuned", "oof_pr_auc", "threshold_gain", "objectives",
                     "precision", "slot", "peak_rss_mb", "peak_gpu_mb")


def open_places(study: optuna.Study, n_trials: int) -> int:
    """How many trials may start now: the study's n_trials places less the finished and running
    trials (queued ones, e.g. retries of dead workers' trials, are started first)."""
    held = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                    TrialState.RUNNING))
    return n_trials - len(held)


def is_surplus(study: optuna.Study, trial: optuna.Trial, n_trials: int) -> bool:
    """True when the trials before this one already hold all n_trials places (another worker
    started one between this process's count and its ask)."""
    earlier = [t for t in study.get_trials(deepcopy=False, states=SLOT_STATES)
               if t.number < trial.number]
    return len(earlier) >= n_trials


def seed_index(study: optuna.Study, trial: optuna.Trial) -> int:
    """The number the trial's fold seeds derive from: its position in the study, not counting
    earlier attempts that died and were retried (or surplus trials). A retry inherits the dead
    attempt's index (user attribute ``seed_trial``, copied to the retry with the others). So a
    study resumed after a kill computes what the uninterrupted study computed, trial by trial."""
    inherited = trial.user_attrs.get("seed_trial")
    if isinstance(inherited, int):
        return inherited
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials}
    skipped = sum(t.number < trial.number and t.state == TrialState.FAIL
                  and (t.number in retried or bool(t.user_attrs.get("surplus"))) for t in trials)
    return trial.number - skipped


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


def reports_epochs(params: Params) -> bool:
    """True when the pruner hears every epoch (hpo.pruner.report: epoch), so every epoch is
    validated; a study without a pruner validates what early stopping needs, no more."""
    pruner = params.hpo.pruner
    return pruner.name != "none" and pruner.report == "epoch"


def epoch_stride(params: Params) -> int:
    """Steps per fold of per-epoch reports: the most epochs the search space allows, so that
    step ``fold * stride + epoch`` means the same fold and epoch in every trial."""
    p = params.hpo.search_space["num_train_epochs"]
    if p.type == "fixed":
        return int(p.value)
    return int(max(p.choices) if p.type == "categorical" else p.high)


def _finite(score: float, where: str, metric: str) -> float:
    """The score, or FloatingPointError naming the fold (and epoch) whose metric is NaN/inf."""
    if not np.isfinite(score):
        raise FloatingPointError(f"{where}: {metric} is not finite")
    return float(score)


def fold_indices(folds: np.ndarray, n_folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, validation rows) of each fold, from the per-row fold column."""
    return [(np.flatnonzero(folds != k), np.flatnonzero(folds == k)) for k in range(n_folds)]


@dataclass
class FoldRunner:
    """The compute of a trial: fine-tune and validate fold by fold. Picklable, so that it can
    run in a child process; it talks to the rest of the trial only through ``emit``."""

    params: Params
    enc: Encoded
    folds: list[tuple[np.ndarray, np.ndarray]]

    def run(self, hp: Hyperparameters, number: int, seed_number: int,
            emit: Callable[[Event], bool | None], fault_spec: str | None = None) -> bool:
        """True when every fold ran; False when ``emit`` answered "prune" after a fold or (with
        ``hpo.pruner.report: epoch``) an epoch; a fold stopped mid-way still sends its FoldEnd.

        Fold seeds come from ``seed_number`` (:func:`seed_index`), faults from ``number``.
        """
        train = self.params.train
        device = pick_device(train.device, train.cpu_threads, train.precision)
        per_epoch = reports_epochs(self.params)
        for fold, (train_idx, val_idx) in enumerate(
                progress(self.folds, f"trial {number} fold", plain=True, leave=False)):
            seed = derive_seed(self.params.seed, "trial", seed_number, "fold", fold)
            emit(FoldStart(fold, seed, device.precision))
            result = fine_tune(
                self.params.model, train, hp, self.enc, train_idx, seed, device,
                val_idx=val_idx, monitor=self.params.hpo.metric,
                on_epoch=lambda epoch, record, fold=fold: emit(EpochEnd(fold, epoch, record)),
                desc=f"trial {number} fold {fold}",
                fault=faults.for_fold(number, fold, fault_spec),
                validate_every_epoch=per_epoch,
            )
            summary = {
                **result.metrics, "seed": seed, "epochs_run": result.epochs_run,
                "best_epoch": result.best_epoch, "train_samples": result.train_samples,
                "train_seconds": round(result.train_seconds, 3),
                "eval_seconds": round(result.eval_seconds, 3),
                "padding_fraction": round(result.padding_fraction, 4),
            }
            if emit(FoldEnd(fold, summary, result.val_probs)) or result.stopped:
                return False
        return True


@dataclass
class TrialRun:
    """One running trial, on the stage's side: its Optuna trial, MLflow runs and outcome.

    :meth:`handle` takes the trial's events in order. Nothing here calls ``study.tell``: the
    scheduler does, so that it decides when other trials can see this one finished.
    """

    trial: optuna.Trial
    hp: Hyperparameters
    seed_number: int
    params: Params
    runs: RunTree
    run_id: str
    folds: list[tuple[np.ndarray, np.ndarray]]
    labels: np.ndarray
    scores: list[float] = field(default_factory=list)
    fold_best: float = float("-inf")  # the running fold's best validation score so far
    epochs: int = 0
    fit_seconds: list[float] = field(default_factory=list)
    fold_run: str | None = None
    pruned: str | None = None  # why, once the pruner stopped the trial
    error: str | None = None  # why, once the trial failed
    completed: bool = False
    ended_at: float | None = None  # time.perf_counter() when its process finished

    def __post_init__(self) -> None:
        self.oof = np.full(len(self.labels), np.nan)  # out-of-fold probabilities

    @property
    def number(self) -> int:
        return self.trial.number

    def handle(self, event: Event) -> bool | None:
        """Record one event; for a FoldEnd or an EpochEnd, answer whether the trial must stop
        (prune)."""
        try:
            if isinstance(event, FoldStart):
                self._fold_start(event)
            elif isinstance(event, EpochEnd):
                return self._epoch_end(event)
            elif isinstance(event, FoldEnd):
                return self._fold_end(event)
            elif isinstance(event, Finished):
                self.completed = event.completed and self.pruned is None and self.error is None
                self._peaks(event.peak_rss_mb, event.peak_gpu_mb)
                self.ended_at = time.perf_counter()
            elif isinstance(event, Failed):
                self.error = self.error or event.message
                self.ended_at = time.perf_counter()
        except Exception as err:  # e.g. a non-finite fold score: the trial fails, and says why
            # (the first reason: a fold stopped at a non-finite epoch still sends its FoldEnd)
            self.error = self.error or f"{type(err).__name__}: {err}"
            return True
        return None

    def _fold_start(self, event: FoldStart) -> None:
        if event.fold == 0:
            self.trial.set_user_attr("precision", event.precision)
            self.runs.log(self.run_id, tags={"precision": event.precision})
        self.fold_run = self.runs.child(
            self.run_id, f"trial-{self.number}-fold-{event.fold}",
            {"optuna.trial_number": self.number, "fold": event.fold, "seed": event.seed,
             "precision": event.precision})

    def _epoch_end(self, event: EpochEnd) -> bool:
        """Log the epoch; with ``hpo.pruner.report: epoch`` report it and ask the pruner.

        Step = ``fold * epoch_stride + epoch`` (epochs trained so far when the trial's epochs
        are the space's most); value = the fold aggregate of the finished folds' scores and this
        fold's score so far (its best epoch with early stopping, as the fold would score if it
        stopped here; else its latest). No pruning at the trial's last epoch: nothing is left."""
        self.runs.log(self.fold_run, event.record, step=event.epoch)
        hpo = self.params.hpo
        if not reports_epochs(self.params) or len(self.trial.study.directions) > 1:
            return False
        where = f"fold {event.fold} epoch {event.epoch}"
        score = _finite(event.record[f"val_{hpo.metric}"], where, hpo.metric)
        if event.epoch == 1:
            self.fold_best = float("-inf")
        self.fold_best = max(self.fold_best, score)
        current = self.fold_best if self.params.train.early_stopping_patience else score
        running = AGGREGATE[hpo.fold_aggregation]([*self.scores, current])
        last = event.fold + 1 == len(self.folds) and event.epoch == self.hp.num_train_epochs
        return self._ask_pruner(running, event.fold * epoch_stride(self.params) + event.epoch,
                                last, where)

    def _fold_end(self, event: FoldEnd) -> bool:
        hpo, fold, summary = self.params.hpo, event.fold, event.summary
        self.oof[self.folds[fold][1]] = event.probs
        self.epochs += summary["epochs_run"]
        self.fit_seconds.append(summary["train_seconds"] + summary["eval_seconds"])
        self.trial.set_user_attr(f"fold{fold}", summary)
        self.runs.log(self.fold_run, {k: v for k, v in summary.items() if k != "seed"})
        # a non-finite score raises here, leaving the fold's run to finish(), which ends it FAILED
        score = _finite(summary[hpo.metric], f"fold {fold}", hpo.metric)
        self.runs.end(self.fold_run, FAILED if self.error is not None  # failed at an epoch
                      else FINISHED if self.pruned is None else KILLED)
        self.fold_run = None
        self.scores.append(score)
        running = AGGREGATE[hpo.fold_aggregation](self.scores)
        self.runs.log(self.run_id, {f"fold{fold}_{k}": summary[k]
                                    for k in ("macro_f1", "pos_f1", "roc_auc", "pr_auc")})
        if self.pruned is not None:  # pruned mid-fold (per-epoch reports)
            return True
        if len(self.trial.study.directions) > 1 or reports_epochs(self.params):
            return False  # Optuna cannot prune multi-objective trials; or pruned per epoch
        return self._ask_pruner(running, fold, fold + 1 == len(self.folds), f"fold {fold}")

    def _ask_pruner(self, running: float, step: int, last: bool, where: str) -> bool:
        """Report the running fold aggregate at ``step``; ask the pruner unless this is the
        trial's last step (nothing is left to save). On "prune" keep why (``where``: after which
        fold, or fold and epoch), which :meth:`CrossValidation.finish` tags on the MLflow run."""
        self.trial.report(running, step=step)
        if last or not self.trial.should_prune():
            return False
        hpo = self.params.hpo
        self.pruned = f"{hpo.fold_aggregation} {hpo.metric} {running:.4f} after {where}"
        return True

    def _peaks(self, rss_mb: float, gpu_mb: float | None) -> None:
        """Peak memory of the trial's process: what the next run's hpo.n_jobs check uses."""
        self.trial.set_user_attr("peak_rss_mb", rss_mb)
        if gpu_mb is not None:
            self.trial.set_user_attr("peak_gpu_mb", gpu_mb)

    def run_here(self, runner: FoldRunner, fault_spec: str | None) -> None:
        """Compute the folds in this process (hpo.isolate_trials: false)."""
        try:
            done = runner.run(self.hp, self.number, self.seed_number, self.handle, fault_spec)
            self.handle(Finished(done, *peak_memory()))
        except Exception as err:
            self.handle(Failed(f"{type(err).__name__}: {err}"[:5000]))

    def objective(self, name: str) -> float:
        """An extra objective of a multi-objective study (both are costs: minimised)."""
        if name == "epochs":
            return float(self.epochs)
        return float(np.mean(self.fit_seconds))  # fold_fit_seconds

    def threshold(self) -> dict[str, float]:
        """The decision threshold tuned on the pooled out-of-fold predictions (best pos_f1), and
        ``threshold_gain``: the smallest pos_f1 gain over 0.5 of a threshold tuned on the other
        folds' predictions, on each fold (``metrics.threshold_transfer_gains``; export_best
        ships the tuned threshold only when it is positive)."""
        rows = np.concatenate([val for _, val in self.folds])
        labels, probs = self.labels[rows], self.oof[rows]
        threshold, f1 = best_f1_threshold(labels, probs)
        default = classification_metrics(labels, probs)
        gains = threshold_transfer_gains(self.labels, self.oof, [val for _, val in self.folds])
        return {"threshold": threshold, "oof_pos_f1_tuned": f1,
                "oof_pos_f1": default["pos_f1"], "oof_pr_auc": default["pr_auc"],
                "threshold_gain": min(gains)}


class CrossValidation:
    """The Optuna objective, in two halves. Data, folds and negative subsamples are fixed at
    construction, so every trial of the study sees the same ones."""

    def __init__(self, params: Params, enc: Encoded, folds: list[tuple[np.ndarray, np.ndarray]],
                 runs: RunTree, parent_run: str) -> None:
        self.params = params
        self.runs = runs
        self.parent_run = parent_run
        # Negatives are subsampled once per fold, identically for every trial.
        fixed = [(subsample_negatives(enc.labels, train, params.train.negatives_per_positive,
                                      derive_seed(params.seed, "negatives", k)), val)
                 for k, (train, val) in enumerate(folds)]
        # compact(): only the tokens of this table (see engine.shrink_embeddings)
        self.runner = FoldRunner(params, enc.compact(), fixed)

    def start(self, study: optuna.Study) -> TrialRun | None:
        """Ask for the next trial (a queued one first) and open its MLflow run.

        None when another worker filled the study's last place meanwhile: the trial is told
        FAIL, flagged ``surplus``, without any work.
        """
        hpo = self.params.hpo
        trial = study.ask()
        if is_heartbeat_enabled(study._storage):  # alive from the first moment it is visible
            study._storage.record_heartbeat(trial._trial_id)
        if is_surplus(study, trial, hpo.n_trials):
            trial.set_user_attr("surplus", True)
            trial.set_user_attr("fail_reason", f"the study already has its {hpo.n_trials} trials")
            study.tell(trial, state=TrialState.FAIL)
            return None
        for key in trial.user_attrs:  # a retry starts clean
            if key.startswith("fold") or key in PER_ATTEMPT_ATTRS:
                trial.set_user_attr(key, None)
        for key, value in {**worker_identity(), **self.runs.identity}.items():
            trial.set_user_attr(key, value)
        hp = suggest(trial, hpo.search_space)
        trial.set_user_attr("hyperparameters", hp.as_dict())
        seed_number = seed_index(study, trial)
        trial.set_user_attr("seed_trial", seed_number)
        run_id = self.runs.child(self.parent_run, f"trial-{trial.number}",
                                 {"optuna.study_name": study.study_name,
                                  "optuna.trial_number": trial.number, **worker_identity()})
        trial.set_user_attr("mlflow_run_id", run_id)
        self.runs.log(run_id, params=hp.as_dict())
        return TrialRun(trial, hp, seed_number, self.params, self.runs, run_id,
                        self.runner.folds, self.runner.enc.labels)

    def finish(self, study: optuna.Study, run: TrialRun) -> TrialState:
        """Tell Optuna how the trial ended, record why, close its MLflow runs."""
        hpo = self.params.hpo
        status, values = FAILED, None
        try:
            if run.error is None and run.pruned is None and run.completed:
                value = AGGREGATE[hpo.fold_aggregation](run.scores)
                tuned = run.threshold()
                for key, v in tuned.items():
                    run.trial.set_user_attr(key, v)
                extra = {name: run.objective(name) for name in hpo.objectives}
                run.trial.set_user_attr("objectives", extra)
                self.runs.log(run.run_id, {"value": value, **tuned, **extra})
                values, status = [value, *extra.values()], FINISHED
            elif run.error is None and run.pruned is not None:
                status = KILLED
            elif run.error is None:
                run.error = "the trial's process ended without finishing its folds"
        except Exception as err:  # the threshold or an objective could not be computed
            run.error, status = f"{type(err).__name__}: {err}", FAILED
        if status == FAILED:
            run.trial.set_user_attr("fail_reason", run.error[:1000])
            self.runs.log(run.run_id, tags={"fail_reason": run.error[:5000]})
        if run.fold_run is not None:
            self.runs.end(run.fold_run, status)
        self.runs.log(run.run_id, tags={"optuna.folds_run": len(run.scores),
                                        **({"pruned_reason": run.pruned} if status == KILLED
                                           else {})})
        self.runs.end(run.run_id, status)
        state = {FINISHED: TrialState.COMPLETE, KILLED: TrialState.PRUNED,
                 FAILED: TrialState.FAIL}[status]
        study.tell(run.trial, values if state == TrialState.COMPLETE else None, state=state)
        return state
