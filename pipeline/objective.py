"""The objective of the hpo stage: one trial = k-fold cross-validation of a fine-tune.

The data are tokenised once (by the caller) and the folds and their negative subsamples are fixed
for the whole study; a trial suggests hyperparameters, fine-tunes once per fold, reports the
running aggregate after every fold (step = fold index) so that the pruner can stop a poor trial
early, and returns the aggregate. A trial that raises is FAIL with its reason, never PRUNED.

With ``hpo.isolate_trials`` the folds run in a child process. A CUDA out-of-memory error, a
segfault or the OOM killer then ends only that process, and the GPU memory PyTorch would not give
back is released with it, so the next trial starts clean. The child only computes; it sends
events (fold started, epoch done, fold done) to the parent, which does all the Optuna and MLflow
I/O and answers "prune?" after each fold. Children come from a fork server whose process has
imported the libraries but never run torch (a plain fork of a process whose OpenMP pool has run
deadlocks, and CUDA cannot be used in a forked child), so starting one costs milliseconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm
from transformers import AutoConfig

from pipeline import faults
from pipeline.engine import Encoded, Hyperparameters, derive_seed, fine_tune, subsample_negatives
from pipeline.metrics import best_f1_threshold, classification_metrics
from pipeline.model import pick_device, resolve_model_path
from pipeline.params import Params, SearchParam
from pipeline.storage import worker_identity
from pipeline.tracking import FAILED, FINISHED, KILLED, RunTree

AGGREGATE = {"mean": statistics.fmean, "median": statistics.median, "min": min, "max": max}
# Trials that hold one of the study's n_trials places (FAIL ones give theirs up).
SLOT_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
# What a retried trial inherits from the dead one but must not keep.
PER_ATTEMPT_ATTRS = ("fail_reason", "mlflow_run_id", "surplus", "threshold", "oof_pos_f1",
                     "oof_pos_f1_tuned", "oof_pr_auc", "objectives")


class SurplusTrial(RuntimeError):
    """The study already had its n_trials trials when this one started (a race of workers)."""


class TrialProcessError(RuntimeError):
    """The trial's child process failed; the message is the child's error or its exit."""


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


def fold_indices(folds: np.ndarray, n_folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, validation rows) of each fold, from the per-row fold column."""
    return [(np.flatnonzero(folds != k), np.flatnonzero(folds == k)) for k in range(n_folds)]


class _TrialEvents:
    """Parent side of a trial: turns fold events into MLflow runs, user attrs and reports."""

    def __init__(self, trial: optuna.Trial, params: Params, runs: RunTree, run_id: str,
                 folds: list[tuple[np.ndarray, np.ndarray]], labels: np.ndarray) -> None:
        self.trial, self.params, self.runs, self.run_id = trial, params, runs, run_id
        self.folds, self.labels = folds, labels
        self.n_folds = len(folds)
        self.oof = np.full(len(labels), np.nan)  # out-of-fold probabilities
        self.scores: list[float] = []
        self.epochs = 0
        self.fit_seconds: list[float] = []
        self.fold_run: str | None = None
        self.pruned: str | None = None

    def __call__(self, event: tuple) -> bool | None:
        kind = event[0]
        if kind == "fold_start":
            _, fold, seed = event
            self.fold_run = self.runs.child(
                self.run_id, f"trial-{self.trial.number}-fold-{fold}",
                {"optuna.trial_number": self.trial.number, "fold": fold, "seed": seed})
        elif kind == "epoch":
            _, _, epoch, record = event
            self.runs.log(self.fold_run, record, step=epoch)
        elif kind == "fold_end":
            return self._fold_end(*event[1:])
        return None

    def _fold_end(self, fold: int, summary: dict[str, Any], probs: np.ndarray) -> bool:
        hpo = self.params.hpo
        self.oof[self.folds[fold][1]] = probs
        self.epochs += summary["epochs_run"]
        self.fit_seconds.append(summary["train_seconds"] + summary["eval_seconds"])
        self.trial.set_user_attr(f"fold{fold}", summary)
        self.runs.log(self.fold_run, {k: v for k, v in summary.items() if k != "seed"})
        self.runs.end(self.fold_run, FINISHED)
        self.fold_run = None
        score = summary[hpo.metric]
        if not np.isfinite(score):
            raise FloatingPointError(f"fold {fold}: {hpo.metric} is not finite")
        self.scores.append(score)
        running = AGGREGATE[hpo.fold_aggregation](self.scores)
        self.runs.log(self.run_id, {f"fold{fold}_{k}": summary[k]
                                    for k in ("macro_f1", "pos_f1", "roc_auc", "pr_auc")})
        if len(self.trial.study.directions) > 1:
            return False  # Optuna cannot prune multi-objective trials
        self.trial.report(running, step=fold)
        if fold + 1 < self.n_folds and self.trial.should_prune():
            self.pruned = f"{hpo.fold_aggregation} {hpo.metric} {running:.4f} after fold {fold}"
            return True
        return False

    def objective(self, name: str) -> float:
        """An extra objective of a multi-objective study (both are costs: minimised)."""
        if name == "epochs":
            return float(self.epochs)
        return float(np.mean(self.fit_seconds))  # fold_fit_seconds

    def threshold(self) -> dict[str, float]:
        """The decision threshold tuned on the pooled out-of-fold predictions (best pos_f1)."""
        rows = np.concatenate([val for _, val in self.folds])
        labels, probs = self.labels[rows], self.oof[rows]
        threshold, f1 = best_f1_threshold(labels, probs)
        default = classification_metrics(labels, probs)
        return {"threshold": threshold, "oof_pos_f1_tuned": f1,
                "oof_pos_f1": default["pos_f1"], "oof_pr_auc": default["pr_auc"]}

    def close(self, status: str) -> None:
        if self.fold_run is not None:
            self.runs.end(self.fold_run, status)


def _die_with_parent() -> None:
    """Linux: the kernel kills this child if its parent dies (a kill -9 of the stage)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class FoldRunner:
    """The compute of a trial: fine-tune and validate fold by fold. Picklable, so that it can
    run in a child process; it talks to the rest of the trial only through ``emit``."""

    params: Params
    enc: Encoded
    folds: list[tuple[np.ndarray, np.ndarray]]

    def run(self, hp: Hyperparameters, number: int, emit: Callable[[tuple], bool | None],
            fault_spec: str | None = None) -> bool:
        """True when every fold ran; False when ``emit`` answered "prune" after a fold."""
        device = pick_device(self.params.train.device, self.params.train.cpu_threads)
        for fold, (train_idx, val_idx) in enumerate(
                tqdm(self.folds, desc=f"trial {number} folds", leave=False)):
            seed = derive_seed(self.params.seed, "trial", number, "fold", fold)
            emit(("fold_start", fold, seed))
            result = fine_tune(
                self.params.model, self.params.train, hp, self.enc, train_idx, seed, device,
                val_idx=val_idx, monitor=self.params.hpo.metric,
                on_epoch=lambda epoch, record, fold=fold: emit(("epoch", fold, epoch, record)),
                desc=f"trial {number} fold {fold}",
                fault=faults.for_fold(number, fold, fault_spec),
            )
            summary = {
                **result.metrics, "seed": seed, "epochs_run": result.epochs_run,
                "best_epoch": result.best_epoch, "train_samples": result.train_samples,
                "train_seconds": round(result.train_seconds, 3),
                "eval_seconds": round(result.eval_seconds, 3),
                "padding_fraction": round(result.padding_fraction, 4),
            }
            if emit(("fold_end", fold, summary, result.val_probs)):
                return False
        return True


def _child_main(conn, runner: FoldRunner, hp: Hyperparameters, number: int,
                fault_spec: str) -> None:
    """Entry point of a trial's child process: run the folds, relay events over ``conn``."""
    _die_with_parent()

    def emit(event: tuple) -> bool | None:
        conn.send(event)
        return conn.recv() if event[0] == "fold_end" else None

    try:
        conn.send(("done", runner.run(hp, number, emit, fault_spec)))
    except BaseException as err:  # reported to the parent, which fails the trial
        conn.send(("error", f"{type(err).__name__}: {err}"[:5000]))
    finally:
        conn.close()


def _child_context(model_name: str) -> mp.context.BaseContext | None:
    """The fork server (Linux); None where there is none.

    Its process imports this module and the model's modeling code once, so that a trial's
    child starts with them loaded (transformers imports model code lazily, ~1 s per process).
    """
    if "forkserver" not in mp.get_all_start_methods():
        return None
    preload = [__name__]
    with contextlib.suppress(Exception):  # unknown model type: just no preload
        model_type = AutoConfig.from_pretrained(resolve_model_path(model_name)).model_type
        preload.append(f"transformers.models.{model_type.replace('-', '_')}."
                       f"modeling_{model_type.replace('-', '_')}")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(preload)
    return ctx


class CrossValidation:
    """The Optuna objective. Data, folds and negative subsamples are fixed at construction."""

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
        self.context = _child_context(params.model.name) if params.hpo.isolate_trials else None

    def __call__(self, trial: optuna.Trial) -> float:
        hpo = self.params.hpo
        earlier = [t for t in trial.study.get_trials(deepcopy=False, states=SLOT_STATES)
                   if t.number < trial.number]
        if len(earlier) >= hpo.n_trials:
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"the study already has its {hpo.n_trials} trials")
        for key in trial.user_attrs:  # a retry starts clean
            if key.startswith("fold") or key in PER_ATTEMPT_ATTRS:
                trial.set_user_attr(key, None)
        for key, value in {**worker_identity(), **self.runs.identity}.items():
            trial.set_user_attr(key, value)
        hp = suggest(trial, hpo.search_space)
        trial.set_user_attr("hyperparameters", hp.as_dict())
        run_id = self.runs.child(self.parent_run, f"trial-{trial.number}",
                                 {"optuna.study_name": trial.study.study_name,
                                  "optuna.trial_number": trial.number,
                                  **worker_identity()})
        trial.set_user_attr("mlflow_run_id", run_id)
        self.runs.log(run_id, params=hp.as_dict())
        events = _TrialEvents(trial, self.params, self.runs, run_id, self.runner.folds,
                              self.runner.enc.labels)
        status = FAILED
        try:
            if self.context is None:
                completed = self.runner.run(hp, trial.number, events)
            else:
                completed = self._run_in_child(hp, trial.number, events)
            if not completed:
                status = KILLED
                raise optuna.TrialPruned(events.pruned)
            value = AGGREGATE[hpo.fold_aggregation](events.scores)
            tuned = events.threshold()
            for key, v in tuned.items():
                trial.set_user_attr(key, v)
            extra = {name: events.objective(name) for name in hpo.objectives}
            trial.set_user_attr("objectives", extra)
            self.runs.log(run_id, {"value": value, **tuned, **extra})
            status = FINISHED
            return (value, *extra.values()) if extra else value
        except optuna.TrialPruned:
            raise
        except Exception as err:  # the trial FAILs (never PRUNED) and says why; the study goes on
            reason = str(err) if isinstance(err, TrialProcessError) else \
                f"{type(err).__name__}: {err}"
            trial.set_user_attr("fail_reason", reason[:1000])
            self.runs.log(run_id, tags={"fail_reason": reason[:5000]})
            raise
        finally:
            events.close(status)
            self.runs.log(run_id, tags={"optuna.folds_run": len(events.scores)})
            self.runs.end(run_id, status)

    def _run_in_child(self, hp: Hyperparameters, number: int, events: _TrialEvents) -> bool:
        """FoldRunner.run in a child process; this process answers its events."""
        here, there = self.context.Pipe()
        spec = os.environ.get(faults.ENV, "")
        child = self.context.Process(target=_child_main,
                                     args=(there, self.runner, hp, number, spec),
                                     daemon=True, name=f"trial-{number}")
        child.start()
        there.close()
        try:
            while True:
                if not here.poll(0.5):
                    if not child.is_alive():
                        break
                    continue
                try:
                    event = here.recv()
                except EOFError:
                    break
                if event[0] == "done":
                    return event[1]
                if event[0] == "error":
                    raise TrialProcessError(event[1])
                reply = events(event)
                if event[0] == "fold_end":
                    here.send(reply)
            child.join(5)
            code = child.exitcode
            hint = " (killed: out of host memory?)" if code == -signal.SIGKILL else ""
            raise TrialProcessError(f"the trial's process died with exit code {code}{hint}")
        finally:
            if child.is_alive():
                child.kill()
            child.join()
            here.close()
