"""One trial of the hpo stage: k-fold fine-tunes in a process of its own, pruned by itself.

The stage (pipeline/hpo.py) hands :func:`run_trial` a :class:`TrialTask` — the trial's index, its
hyperparameters and what its pruner may compare with (the COMPLETE trials of its view on the
study's virtual clock: pipeline/study.py) — and gets one :class:`TrialResult` back. In
between nothing crosses the process boundary: the trial fine-tunes fold after fold
(pipeline/engine.py), reports the running fold aggregate after every fold (step = fold index) or
every epoch (``hpo.pruner.report: epoch``) to an Optuna pruner over that frozen view, stops when
it says prune, and ends with the aggregate and the decision threshold tuned on its out-of-fold
predictions. A trial that raises ends FAIL with its reason, never PRUNED.

With ``hpo.isolate_trials`` each trial runs in a :class:`TrialProcess`: a CUDA out-of-memory
error, a segfault or the OOM killer then ends only that process, and the memory PyTorch would
not give back is released with it. Processes come from a fork server that has imported the
libraries but never run torch (a plain fork of a process whose OpenMP pool has run deadlocks,
and CUDA cannot be used in a forked child).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import multiprocessing.connection
import resource
import signal
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna

from pipeline import faults, machine
from pipeline.common import derive_seed
from pipeline.engine import Encoded, fine_tune, subsample_negatives, throughput
from pipeline.metrics import best_f1_threshold, classification_metrics, threshold_transfer_gains
from pipeline.model import pick_device
from pipeline.params import Hyperparameters, Params
from pipeline.placement import Slot
from pipeline.progress import progress
from pipeline.study import make_pruner

AGGREGATE = {"mean": statistics.fmean, "median": statistics.median, "min": min, "max": max}


@dataclass(frozen=True)
class TrialTask:
    """What one trial needs besides the data; all of it is fixed by the trial's index."""

    index: int
    hp: Hyperparameters
    # (value, intermediate values) of the COMPLETE trials the pruner may compare with
    seen: tuple[tuple[float, dict[int, float]], ...] = ()
    threads: int = 0  # torch's CPU threads (placement.Slot.threads; 0: train.cpu_threads)
    fault_spec: str = ""  # PIPELINE_FAULT of the stage (tests)


@dataclass
class FoldResult:
    fold: int
    seed: int
    summary: dict[str, Any]  # the scored epoch's metrics, epochs run, seconds, padding
    epochs: list[dict[str, float]]  # every epoch's record: train_loss (and val_* if validated)
    started: float  # time.time()
    ended: float
    failed: bool = False  # the trial failed during this fold (summary empty)


@dataclass
class TrialResult:
    """Everything the stage records about a trial: Optuna state and values, per-fold metrics,
    the pruner's reports, the tuned threshold, where it ran and what it cost."""

    index: int
    state: str = "COMPLETE"  # COMPLETE | PRUNED | FAIL
    value: float | None = None
    objectives: dict[str, float] = field(default_factory=dict)  # extra objectives (costs)
    threshold: dict[str, float] = field(default_factory=dict)
    folds: list[FoldResult] = field(default_factory=list)
    reports: dict[int, float] = field(default_factory=dict)  # step -> running aggregate
    reason: str | None = None  # why it was pruned, or why it failed
    cost: int = 0  # its virtual duration: optimizer steps + validation units (study.py)
    precision: str | None = None
    machine: str | None = None  # pipeline.machine.label() of where it ran
    peak_rss_mb: float | None = None
    peak_gpu_mb: float | None = None
    started: float = 0.0
    ended: float = 0.0


@dataclass
class CrossValidation:
    """The data every trial of the study sees: tokenised pairs and the folds, whose negatives are
    subsampled once per fold, identically for every trial."""

    params: Params
    enc: Encoded
    folds: list[tuple[np.ndarray, np.ndarray]]  # (training rows, validation rows)

    @classmethod
    def build(cls, params: Params, enc: Encoded, fold_of_row: np.ndarray) -> CrossValidation:
        folds = fold_indices(fold_of_row, params.prepare.n_folds)
        fixed = [(subsample_negatives(enc.labels, train, params.train.negatives_per_positive,
                                      derive_seed(params.seed, "negatives", k)), val)
                 for k, (train, val) in enumerate(folds)]
        # compact(): only the tokens of this table (see engine.shrink_embeddings)
        return cls(params, enc.compact(), fixed)


def fold_indices(fold_of_row: np.ndarray, n_folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(training rows, validation rows) of each fold, from the per-row fold column."""
    return [(np.flatnonzero(fold_of_row != k), np.flatnonzero(fold_of_row == k))
            for k in range(n_folds)]


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


class Pruner:
    """The pruner's decisions for one trial, over the COMPLETE trials it may see: an in-memory
    Optuna study holding them and this trial, and the pruner of params.yaml."""

    def __init__(self, params: Params, seen: tuple[tuple[float, dict[int, float]], ...]):
        self.study = optuna.create_study(direction="maximize", pruner=make_pruner(params),
                                         sampler=optuna.samplers.RandomSampler(0))
        self.study.add_trials([optuna.trial.create_trial(value=value, intermediate_values=iv)
                               for value, iv in seen])
        self.trial = self.study.ask()

    def prune(self, value: float, step: int) -> bool:
        self.trial.report(value, step)
        return self.trial.should_prune()


class _Run:
    """One trial's state while its folds run: what the pruner heard, the fold scores, the
    out-of-fold predictions, and the result being filled."""

    def __init__(self, cv: CrossValidation, task: TrialTask, result: TrialResult) -> None:
        self.cv, self.task, self.result = cv, task, result
        self.params, self.hpo = cv.params, cv.params.hpo
        self.aggregate = AGGREGATE[self.hpo.fold_aggregation]
        self.per_epoch = reports_epochs(self.params)
        # Optuna takes no reports from multi-objective trials; pruner none never prunes
        self.reporting = not self.hpo.objectives
        self.pruner = Pruner(self.params, task.seen) \
            if self.reporting and self.hpo.pruner.name != "none" else None
        self.scores: list[float] = []
        self.oof = np.full(len(cv.enc.labels), np.nan)
        self.epochs: list[dict[str, float]] = []  # the running fold's epoch records
        self.fold_best = -np.inf

    def report(self, value: float, step: int, last: bool, where: str) -> bool:
        """Report the running aggregate; True (and why) when the pruner stops the trial. Not
        asked at the trial's last step: nothing is left to save."""
        if not self.reporting:
            return False
        self.result.reports[step] = value
        if self.pruner is None or last or not self.pruner.prune(value, step):
            return False
        self.result.state = "PRUNED"
        self.result.reason = (f"{self.hpo.fold_aggregation} {self.hpo.metric} {value:.4f} "
                              f"after {where}")
        return True

    def on_epoch(self, fold: int, epoch: int, record: dict[str, float]) -> bool:
        """Per-epoch reports: the fold aggregate of the finished folds' scores and this fold's
        so far (its best epoch with early stopping, as the fold would score if it stopped here;
        else its latest). True: stop the fold (pruned)."""
        self.epochs.append(record)
        if not self.per_epoch:
            return False
        metric, where = self.hpo.metric, f"fold {fold} epoch {epoch}"
        score = _finite(record[f"val_{metric}"], where, metric)
        self.fold_best = max(self.fold_best, score) if epoch > 1 else score
        current = self.fold_best if self.params.train.early_stopping_patience else score
        last = fold + 1 == len(self.cv.folds) and epoch == self.task.hp.num_train_epochs
        return self.report(self.aggregate([*self.scores, current]),
                           fold * epoch_stride(self.params) + epoch, last, where)

    def fold(self, fold: int, seed: int, fit: Any, started: float) -> bool:
        """Record a fold's fit; True when the trial stops here (pruned)."""
        metric, val_idx = self.hpo.metric, self.cv.folds[fold][1]
        self.result.folds.append(FoldResult(fold, seed, {
            **fit.metrics, "seed": seed, "epochs_run": fit.epochs_run,
            "best_epoch": fit.best_epoch, "train_samples": fit.train_samples,
            "train_seconds": round(fit.train_seconds, 3),
            "eval_seconds": round(fit.eval_seconds, 3),
            "padding_fraction": round(fit.padding_fraction, 4)}, self.epochs, started,
            time.time()))
        self.epochs = []
        self.scores.append(_finite(fit.metrics[metric], f"fold {fold}", metric))
        self.oof[val_idx] = fit.val_probs
        if fit.stopped:  # pruned mid-fold (per-epoch reports)
            return True
        last = fold + 1 == len(self.cv.folds)
        return not self.per_epoch and self.report(self.aggregate(self.scores), fold, last,
                                                  f"fold {fold}")

    def finish(self) -> None:
        """A trial that ran every fold: its value, tuned threshold and costs."""
        result = self.result
        result.value = self.aggregate(self.scores)
        result.threshold = _threshold(self.cv.enc.labels, self.oof,
                                      [val for _, val in self.cv.folds])
        costs = {"epochs": float(sum(f.summary["epochs_run"] for f in result.folds)),
                 "fold_fit_seconds": float(np.mean([
                     f.summary["train_seconds"] + f.summary["eval_seconds"]
                     for f in result.folds]))}
        result.objectives = {name: costs[name] for name in self.hpo.objectives}


def run_trial(cv: CrossValidation, task: TrialTask, done: Any = None) -> TrialResult:
    """Fine-tune and validate fold by fold, pruning as the study allows; never raises.

    ``done`` (a shared ``multiprocessing.Value``, or None) follows the work done, which ends as
    ``TrialResult.cost``: the stage reads it while the trial runs."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a process of its own
    params, hp = cv.params, task.hp
    result = TrialResult(task.index, started=time.time())
    run = _Run(cv, task, result)

    def tick(n: int) -> None:
        result.cost += n
        if done is not None:
            done.value = result.cost

    fold = seed = started = None
    try:
        device = pick_device(params.train.device, task.threads or params.train.cpu_threads,
                             params.train.precision)
        result.precision, result.machine = device.precision, machine.label(device.type)
        for fold, (train_idx, val_idx) in enumerate(
                progress(cv.folds, f"trial {task.index} fold", plain=True, leave=False)):
            seed = derive_seed(params.seed, "trial", task.index, "fold", fold)
            started = time.time()
            fit = fine_tune(params.model, params.train, hp, cv.enc, train_idx, seed, device,
                            val_idx=val_idx, monitor=params.hpo.metric,
                            on_epoch=lambda epoch, record, fold=fold: run.on_epoch(fold, epoch,
                                                                                  record),
                            desc=f"trial {task.index} fold {fold}",
                            fault=faults.for_fold(task.index, fold, task.fault_spec),
                            validate_every_epoch=run.per_epoch, tick=tick)
            if run.fold(fold, seed, fit, started):
                break
        fold = None  # past the folds
        if result.state == "COMPLETE":
            run.finish()
    except Exception as err:  # the trial fails, and says why
        if fold is not None:  # during this fold: before its result, or at its score
            if len(result.folds) == fold:
                result.folds.append(FoldResult(fold, seed, {}, run.epochs, started,
                                               time.time()))
            result.folds[-1].failed = True
        result.state, result.value = "FAIL", None
        result.reason = f"{type(err).__name__}: {err}"[:5000]
    result.peak_rss_mb, result.peak_gpu_mb = peak_memory()
    result.ended = time.time()
    return result


def _threshold(labels: np.ndarray, oof: np.ndarray,
               val_folds: list[np.ndarray]) -> dict[str, float]:
    """The decision threshold tuned on the pooled out-of-fold predictions (best pos_f1), and
    ``threshold_gain``: the smallest pos_f1 gain over 0.5 of a threshold tuned on the other
    folds' predictions, on each fold (``metrics.threshold_transfer_gains``; export_best ships
    the tuned threshold only when it is positive)."""
    rows = np.concatenate(val_folds)
    threshold, f1 = best_f1_threshold(labels[rows], oof[rows])
    default = classification_metrics(labels[rows], oof[rows])
    gains = threshold_transfer_gains(labels, oof, val_folds)
    return {"threshold": threshold, "oof_pos_f1_tuned": f1, "oof_pos_f1": default["pos_f1"],
            "oof_pr_auc": default["pr_auc"], "threshold_gain": min(gains)}


def peak_memory() -> tuple[float, float | None]:
    """This process's peak resident memory and (on CUDA) peak reserved GPU memory, in MB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    import torch

    gpu = torch.cuda.max_memory_reserved() / 2**20 if torch.cuda.is_initialized() else None
    return round(rss, 1), None if gpu is None else round(gpu, 1)


def probe(cv: CrossValidation, hp: Hyperparameters, seconds: float,
          start: Callable[[], None] | None = None,
          free_mb: float | None = None) -> dict[str, float]:
    """One process's share of a throughput probe (placement.gpu_jobs): samples/s of fold 0's
    training rows at ``hp``, and the process's footprint on the GPU: the device's free memory
    before the probe started (``free_mb``, measured by the stage) less what is free at the end,
    context included, exact when it probes alone; elsewhere ``throughput``'s peak memory."""
    import torch

    device = pick_device(cv.params.train.device, cv.params.train.cpu_threads,
                         cv.params.train.precision)
    out = throughput(cv.params.model, cv.params.train, hp, cv.enc, cv.folds[0][0], device,
                     seconds, start=start)
    on_gpu = device.type == "cuda" and free_mb is not None
    out["footprint_mb"] = (free_mb - torch.cuda.mem_get_info()[0] / 2**20 if on_gpu
                           else out["peak_memory_mb"])
    return out


# ---- the trial's own process ----

def _die_with_parent() -> None:
    """Linux: the kernel kills this process if its parent dies (a kill -9 of the stage)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _child(conn, slot: Slot, fn: Callable[..., Any], args: tuple) -> None:
    _die_with_parent()
    slot.enter()
    try:
        conn.send(fn(*args))
    finally:
        conn.close()


class TrialProcess:
    """``fn(*args)`` in a process of its own on ``slot``; its return value comes back once."""

    def __init__(self, context: mp.context.BaseContext, slot: Slot, fn: Callable[..., Any],
                 args: tuple, name: str) -> None:
        self.slot, self.closed = slot, False
        here, there = context.Pipe(duplex=False)
        self.conn = here
        self.process = context.Process(target=_child, args=(there, slot, fn, args),
                                       daemon=True, name=name)
        self.process.start()
        there.close()

    def result(self) -> Any:
        """The return value; a process that died without one raises ChildProcessError."""
        try:
            value = self.conn.recv()
        except (EOFError, OSError):
            self.process.join(5)
            code = self.process.exitcode
            hint = " (killed: out of host memory?)" if code == -signal.SIGKILL else ""
            raise ChildProcessError(
                f"the trial's process died with exit code {code}{hint}") from None
        finally:
            self.close()
        return value

    def close(self, wait: float = 30.0) -> None:
        """Let a process that has answered exit by itself; kill it after ``wait`` seconds, at
        once with ``wait=0`` (the stage is stopping)."""
        if self.closed:
            return
        self.closed = True
        self.process.join(wait)
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.process.close()
        self.conn.close()


def ready(processes: list[TrialProcess], timeout: float) -> list[TrialProcess]:
    """The processes with a result (or an exit) to read, waiting up to ``timeout`` seconds."""
    found = set(multiprocessing.connection.wait([p.conn for p in processes], timeout))
    return [p for p in processes if p.conn in found]
