"""Stage ``hpo``: an Optuna study whose every trial is a k-fold cross-validated fine-tune.

Reads   paths.pairs (the ``train`` split and its fixed folds)
        params: seed, model.*, train.*, hpo.*
Writes  paths.study_db      a snapshot of the study (persisted: see dvc.yaml); the study itself
                            runs in paths.study_store (or hpo.storage) and resumes there
        paths.trials        one row per trial: state, value, fold mean/std, hyperparameters
        paths.fold_metrics  one row per fold fit: seed, epochs, padding, the four metrics
        paths.study_summary study definition, counts, best trial (JSON)
        paths.importance    hyperparameter importances (evaluator named in params)
        paths.hpo_metrics   best value, its fold mean/std, trial counts, fold fits run/possible,
                            the precision and machine the trials ran on
Logs    MLflow: a parent run per study (reused on resume) > a run per trial > a run per fold
        with per-epoch metrics.

The study must hold ``hpo.n_trials`` finished (complete or pruned) trials; only the missing ones
run, and the outputs describe the first ``n_trials`` finished trials by index, so they depend on
params alone (pipeline/study_outputs.py).

One trial's path: :class:`Scheduler` takes the lowest index the schedule allows
(pipeline/study.py: what trial k sees is decided on a virtual clock with ``hpo.parallelism``
workers), suggests its hyperparameters from that view, and starts
:func:`pipeline.trial.run_trial` in a process on a free slot (pipeline/placement.py); the trial
fine-tunes its folds (pipeline/engine.py), prunes itself, and hands back one result, which
:meth:`Scheduler.record` tells Optuna and MLflow. Up to ``hpo.n_jobs`` trials run at once; the
study is the same at any n_jobs, timing or kill.

``python -m pipeline.hpo --worker`` joins the study that params.yaml defines (same storage, from
any machine) and runs trials by the same schedule until the study is complete; it writes nothing.
The stage does the same, then waits for trials still running elsewhere and writes the outputs.
"""

from __future__ import annotations

if __name__ == "__main__":  # the stage's process: its trials' fork server imports beside ours
    from pipeline.placement import start_fork_server_early

    start_fork_server_early()

import argparse
import contextlib
import datetime
import hashlib
import io
import os
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled
from optuna.trial import FrozenTrial, TrialState

from pipeline import faults, placement
from pipeline.common import run_stage
from pipeline.engine import ENCODE_STATS, encode_pairs
from pipeline.errors import StageError
from pipeline.inputs import read_split
from pipeline.machine import label as machine_label
from pipeline.model import load_tokenizer
from pipeline.params import Hyperparameters, Params, load_params
from pipeline.progress import progress
from pipeline.storage import StudyStorage, worker_identity
from pipeline.study import (
    COST,
    DUPLICATE,
    ERROR,
    INDEX,
    INTERRUPTED,
    PROGRESS,
    START,
    Ledger,
    make_pruner,
    study_definition,
    study_name,
    suggest_from_view,
    warm_start_points,
)
from pipeline.study_outputs import write_outputs
from pipeline.tracking import FAILED, FINISHED, KILLED, STATUS_OF_STATE, RunTree
from pipeline.trial import (
    CrossValidation,
    TrialProcess,
    TrialResult,
    TrialTask,
    probe,
    ready,
    run_trial,
)

POLL_SECONDS = 1.0  # how often the stage reports progress and looks for a trial to start
PROBE_SECONDS = 10.0  # measured training time of each round of the GPU probe (n_jobs: auto)
PROBE_BARRIER_SECONDS = 600.0  # how long probe processes wait for each other after warm-up


@dataclass
class Running:
    """A trial this process runs: its Optuna trial, MLflow run, process and heartbeat."""

    trial: optuna.Trial
    index: int
    run_id: str
    slot: placement.Slot
    hp: Hyperparameters
    seen: tuple  # the COMPLETE trials of its view, for its pruner
    done: Any = None  # the work done so far (a shared multiprocessing.Value)
    reported: int = 0  # what the study's ``progress`` attribute says of it
    process: TrialProcess | None = None
    result: TrialResult | None = None  # of a trial run in this process (no isolation)
    heartbeat: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)


class Scheduler:
    """Runs the study's missing trials on this process's slots, by the schedule of study.py."""

    def __init__(self, study: optuna.Study, storage: StudyStorage, params: Params,
                 runs: RunTree, parent: str, points: list[dict[str, Any]]) -> None:
        self.study, self.storage, self.params = study, storage, params
        self.runs, self.parent, self.points = runs, parent, points
        self.fault_spec = os.environ.get(faults.ENV, "")
        self.failures: list[str] = []

    def ledger(self) -> Ledger:
        hpo = self.params.hpo
        return Ledger.of(self.study, hpo.max_retries, hpo.parallelism)

    def run(self, cv: CrossValidation, slots: list[placement.Slot], context: Any) -> None:
        """Until the study holds hpo.n_trials finished trials (or too many failed here); each
        trial in a process of ``context`` (None: in this process)."""
        hpo = self.params.hpo
        free, running = list(slots), []
        bar = progress(desc="trials", total=hpo.n_trials, plain=True,
                       initial=self.ledger().finished(hpo.n_trials))
        stopped_by_user = False
        try:
            while True:
                self.close_dead_trials()
                self.report_progress(running)
                ledger = self.ledger()
                if ledger.done(hpo.n_trials) and not running:
                    break
                while free and len(self.failures) <= hpo.max_failures and \
                        (k := ledger.next_index(hpo.n_trials)) is not None:
                    started = self.claim(k, ledger, free[0], context)
                    if started is not None:
                        free.pop(0)
                        running.append(started)
                        self.start(started, cv, context)
                    ledger = self.ledger()
                if not running:
                    if len(self.failures) > hpo.max_failures:
                        break
                    time.sleep(POLL_SECONDS)  # waiting on trials elsewhere, or on a dead one
                    continue
                for r in self.wait(running):
                    try:
                        state = self.record(r, self.outcome(r))
                    finally:  # its heartbeat thread must not outlive it, whatever happened
                        r.heartbeat.close()
                    running.remove(r)
                    free.append(r.slot)
                    bar.update(int(state != "FAIL"), note=f"trial {r.index} {state}")
        except KeyboardInterrupt:
            stopped_by_user = True
            raise
        finally:
            for r in running:
                if r.process is not None:
                    r.process.close(wait=0)
            for r in running:  # the index is open again for the next run
                try:
                    self.abandon(r, "the stage stopped during the trial", stopped_by_user)
                except Exception as err:  # the error that stopped the stage comes first
                    print(f"hpo: could not close trial {r.index}: {err}", file=sys.stderr)
            bar.close()
        if len(self.failures) > hpo.max_failures:
            raise StageError(
                f"hpo: {len(self.failures)} trials failed in this run, more than "
                f"hpo.max_failures={hpo.max_failures}; last: {self.failures[-1]}")

    def claim(self, k: int, ledger: Ledger, slot: placement.Slot,
              context: Any) -> Running | None:
        """Create the trial at index ``k`` with the hyperparameters its view gives; None when
        another process claimed k first (this attempt is marked duplicate)."""
        view = ledger.view(k)
        point = self.points[k] if k < len(self.points) else None
        hp, values, distributions = suggest_from_view(self.params, k, view,
                                                      self.study.directions, point)
        attrs = {INDEX: k, START: ledger.starts[k], "hyperparameters": hp.as_dict(),
                 "slot": slot.describe(), **worker_identity(), **self.runs.identity}
        template = FrozenTrial(
            number=-1, trial_id=-1, state=TrialState.RUNNING, value=None,
            datetime_start=datetime.datetime.now(), datetime_complete=None,
            params=values, distributions=distributions, user_attrs=attrs, system_attrs={},
            intermediate_values={})
        storage = self.study._storage
        trial_id = storage.create_new_trial(self.study._study_id, template_trial=template)
        if is_heartbeat_enabled(storage):  # alive from the first moment it is visible
            storage.record_heartbeat(trial_id)
        trial = optuna.Trial(self.study, trial_id)
        if self.lost_race(k, trial.number):
            trial.set_user_attr(DUPLICATE, True)
            self.study.tell(trial, state=TrialState.FAIL)
            return None
        run_id = self.runs.child(self.parent, f"trial-{k}", {
            "optuna.study_name": self.study.study_name, "optuna.trial_number": trial.number,
            "trial_index": k, **worker_identity()})
        trial.set_user_attr("mlflow_run_id", run_id)
        self.runs.log(run_id, params=hp.as_dict())
        seen = tuple((t.values[0], dict(t.intermediate_values)) for t in view
                     if t.state == TrialState.COMPLETE)
        done = context.Value("q", 0, lock=False) if context is not None else \
            types.SimpleNamespace(value=0)
        running = Running(trial, k, run_id, slot, hp, seen, done)
        running.heartbeat.enter_context(get_heartbeat_thread(trial_id, storage))
        return running

    def lost_race(self, k: int, number: int) -> bool:
        """True when an earlier attempt at index k (another process's) is alive or ended."""
        return any(t.number < number and (t.state != TrialState.FAIL or ERROR in t.user_attrs)
                   for t in self.study.get_trials(deepcopy=False)
                   if t.user_attrs.get(INDEX) == k and not t.user_attrs.get(DUPLICATE))

    def start(self, r: Running, cv: CrossValidation, context: Any) -> None:
        """Start the trial in its own process (or, without hpo.isolate_trials, run it here)."""
        task = TrialTask(r.index, r.hp, r.seen, r.slot.threads, self.fault_spec)
        if context is None:
            r.slot.enter()
            r.result = run_trial(cv, task, r.done)
        else:
            r.process = TrialProcess(context, r.slot, run_trial, (cv, task, r.done),
                                     f"trial-{r.index}")

    def report_progress(self, running: list[Running]) -> None:
        """Write the work each running trial has done into the study: a lower bound of its
        duration, which lets later trials' virtual starts be decided (study.py)."""
        for r in running:
            if r.done.value != r.reported:
                r.reported = r.done.value
                r.trial.set_user_attr(PROGRESS, r.reported)

    def wait(self, running: list[Running]) -> list[Running]:
        """The trials that have ended (an in-process one at once), within POLL_SECONDS."""
        done = [r for r in running if r.process is None]
        if done:
            return done
        found = ready([r.process for r in running], POLL_SECONDS)
        return [r for r in running if r.process in found]

    def outcome(self, r: Running) -> TrialResult:
        """The trial's result; a process that died becomes a FAIL result with its exit code."""
        if r.process is None:
            return r.result
        try:
            return r.process.result()
        except ChildProcessError as err:  # the process died: a crash, the OOM killer, a kill
            return TrialResult(r.index, state="FAIL", reason=str(err), cost=r.done.value)

    def record(self, r: Running, result: TrialResult) -> str:
        """Tell Optuna and MLflow how the trial went: fold runs with per-epoch metrics, fold
        metrics as user attributes, the pruner's reports, the tuned threshold, the state."""
        trial, runs = r.trial, self.runs
        if result.precision:
            trial.set_user_attr("precision", result.precision)
            trial.set_user_attr("machine", result.machine)
            runs.log(r.run_id, tags={"precision": result.precision, "machine": result.machine})
        for f in result.folds:
            fold_run = runs.child(r.run_id, f"trial-{r.index}-fold-{f.fold}", {
                "optuna.trial_number": trial.number, "trial_index": r.index, "fold": f.fold,
                "seed": f.seed, "precision": result.precision}, start_time=f.started)
            for epoch, metrics in enumerate(f.epochs, 1):
                runs.log(fold_run, metrics, step=epoch, at=f.ended)
            if not f.failed:
                trial.set_user_attr(f"fold{f.fold}", f.summary)
                runs.log(fold_run, {k: v for k, v in f.summary.items() if k != "seed"},
                         at=f.ended)
                runs.log(r.run_id, {f"fold{f.fold}_{k}": f.summary[k]
                                    for k in ("macro_f1", "pos_f1", "roc_auc", "pr_auc")})
            last = f is result.folds[-1]
            runs.end(fold_run, FAILED if f.failed else
                     KILLED if last and result.state == "PRUNED" else FINISHED, at=f.ended)
        for step, value in sorted(result.reports.items()):
            trial.report(value, step)
        for key, value in {COST: result.cost, "peak_rss_mb": result.peak_rss_mb,
                           "peak_gpu_mb": result.peak_gpu_mb, **result.threshold}.items():
            if value is not None:
                trial.set_user_attr(key, value)
        if result.state == "COMPLETE":
            trial.set_user_attr("objectives", result.objectives)
            runs.log(r.run_id, {"value": result.value, **result.threshold, **result.objectives})
            self.study.tell(trial, [result.value, *result.objectives.values()])
        elif result.state == "PRUNED":
            runs.log(r.run_id, tags={"pruned_reason": result.reason})
            self.study.tell(trial, state=TrialState.PRUNED)
        else:
            trial.set_user_attr(ERROR, result.reason[:1000])
            trial.set_user_attr("fail_reason", result.reason[:1000])
            runs.log(r.run_id, tags={"fail_reason": result.reason})
            self.study.tell(trial, state=TrialState.FAIL)
            self.failures.append(f"trial {r.index}: {result.reason}")
        runs.log(r.run_id, tags={"optuna.folds_run": sum(not f.failed for f in result.folds)})
        runs.end(r.run_id, STATUS_OF_STATE[result.state], at=result.ended or None)
        return result.state

    def abandon(self, r: Running, reason: str, interrupted: bool) -> None:
        """End an attempt without a result: FAIL without ``error``, so its index runs again.
        ``interrupted`` (the user stopped the stage): not counted against hpo.max_retries; any
        other error that stopped the stage is, so that it cannot rerun an index forever."""
        r.heartbeat.close()
        try:
            r.trial.set_user_attr("fail_reason", reason)
            if interrupted:
                r.trial.set_user_attr(INTERRUPTED, True)
            self.study.tell(r.trial, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return  # it has its result (recording it failed after telling Optuna)
        self.runs.close_open_children(r.run_id, KILLED)
        self.runs.log(r.run_id, tags={"fail_reason": reason})
        self.runs.end(r.run_id, KILLED)

    def close_dead_trials(self) -> None:
        """Fail dead workers' trials (their indices run again); close their MLflow runs."""
        for trial in self.storage.fail_dead_trials(self.study):
            run_id = trial.user_attrs.get("mlflow_run_id")
            if run_id and ERROR not in trial.user_attrs:  # not one that ended meanwhile
                reason = trial.user_attrs.get("fail_reason") or "worker died (no heartbeat)"
                self.runs.close_open_children(run_id, KILLED)
                self.runs.log(run_id, tags={"fail_reason": reason})
                self.runs.end(run_id, FAILED)


def probe_point(params: Params) -> Hyperparameters:
    """The search space's most memory-hungry point for the GPU probe: its largest batch (and
    otherwise its first choices and lowest values)."""
    values = {}
    for name, p in params.hpo.search_space.items():
        if p.type == "fixed":
            values[name] = p.value
        elif p.type == "categorical":
            values[name] = max(p.choices) if name == "per_device_train_batch_size" \
                else p.choices[0]
        else:
            values[name] = type(p.low)(p.high if name == "per_device_train_batch_size"
                                       else p.low)
    return Hyperparameters(**values)


def plan(params: Params, study: optuna.Study, cv: CrossValidation,
         runs: RunTree, parent: str) -> list[placement.Slot]:
    """This process's slots: hpo.n_jobs resolved (auto: probed on a GPU, cores on a CPU) and
    checked against the memory this study's trials need; recorded on the study run."""
    hpo, train = params.hpo, params.train
    trials = study.get_trials(deepcopy=False)
    rss = [t.user_attrs["peak_rss_mb"] for t in trials if t.user_attrs.get("peak_rss_mb")]
    trial_mb = max(rss) if rss else placement.estimate_trial_mb(params.model.name)
    gpu_mb, n_jobs, info = None, hpo.n_jobs, {}
    if placement.use_cuda(train.device):
        import torch

        gpus = placement.cuda_devices(hpo.devices)
        probed = study.user_attrs.get("gpu_probe") or {}
        if probed.get("gpu") != torch.cuda.get_device_name(gpus[0]) or \
                (n_jobs == "auto" and "per_gpu" not in probed):
            probed = gpu_probe(params, cv, gpus[0], auto=n_jobs == "auto")
            study.set_user_attr("gpu_probe", probed)
        gpu_mb = probed["footprint_mb"]
        if n_jobs == "auto":
            n_jobs = min(hpo.parallelism, probed["per_gpu"] * len(gpus))
        info = {"gpu_footprint_mb": gpu_mb, "mps": placement.mps_running()}
    elif n_jobs == "auto":
        n_jobs = placement.cpu_jobs(hpo.parallelism, train.cpu_threads, trial_mb)
    slots = placement.plan_slots(n_jobs, hpo.parallelism, hpo.devices, train.device,
                                 train.cpu_threads, trial_mb, gpu_mb)
    # tags, not params: a resumed study may run at another n_jobs
    runs.log(parent, tags={"n_jobs": n_jobs, **info,
                           "slots": "; ".join(s.describe() for s in slots)})
    return slots


def probe_together(context: Any, cv: CrossValidation, hp: Hyperparameters,
                   slots: list[placement.Slot], seconds: float,
                   free_mb: float | None = None) -> list[dict[str, float]]:
    """One probe process per slot, measuring together (a barrier between warm-up and the
    measured ``seconds``): each one's samples/s and footprint (trial.probe; ``free_mb``: the
    device's free memory before they start). ChildProcessError when one of them fails, e.g. out
    of memory: the barrier is broken, so the others stop at once, and all are closed."""
    barrier = context.Barrier(len(slots), timeout=PROBE_BARRIER_SECONDS)
    processes = [TrialProcess(context, slot, probe, (cv, hp, seconds, barrier.wait, free_mb),
                              f"probe-{slot.index}") for slot in slots]
    results: dict[int, dict[str, float]] = {}
    try:
        while len(results) < len(processes):
            for p in ready([p for p in processes if p.slot.index not in results], 1.0):
                try:
                    results[p.slot.index] = p.result()
                except ChildProcessError:
                    barrier.abort()  # the others stop waiting for it at once
                    raise
        return [results[p.slot.index] for p in processes]
    finally:
        for p in processes:
            p.close(wait=0)


def gpu_probe(params: Params, cv: CrossValidation, gpu: int, auto: bool) -> dict[str, Any]:
    """One process's GPU footprint at the space's largest batch, and with ``auto`` how many
    processes the GPU runs best (placement.gpu_jobs), measured in probe processes."""
    import torch

    context = placement.fork_server(params.model.name)
    hp = probe_point(params)

    free = torch.cuda.mem_get_info(gpu)[0] / 2**20

    def measure(n: int) -> list[dict[str, float]]:
        return probe_together(context, cv, hp, [placement.Slot(i, cuda=gpu) for i in range(n)],
                              PROBE_SECONDS, free)

    if auto:
        per_gpu, trace = placement.gpu_jobs(measure, free, params.hpo.parallelism)
    else:
        (one,) = measure(1)
        per_gpu, trace = None, [{"processes": 1, **one}]
    found = {"gpu": torch.cuda.get_device_name(gpu), "footprint_mb": trace[0]["footprint_mb"],
             "batch": hp.per_device_train_batch_size, "mps": placement.mps_running(),
             "trace": trace}
    if per_gpu is not None:
        found["per_gpu"] = per_gpu
    print(f"hpo: GPU probe on {found['gpu']} (MPS {'on' if found['mps'] else 'off'}): "
          f"{found['footprint_mb']:,.0f} MB per process at batch {found['batch']}"
          + (f"; {per_gpu} processes per GPU" if per_gpu else ""), flush=True)
    return found


def run(params: Params, worker: bool = False, wait_seconds: float = 600.0) -> dict[str, Any]:
    """Run or resume the study until it holds hpo.n_trials finished trials.

    The stage (worker=False) creates the study if needed and writes the outputs; a worker joins
    an existing study (waiting up to ``wait_seconds`` for the stage to create it) and returns
    its own counts.
    """
    hpo = params.hpo
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pairs_bytes = Path(params.paths.pairs).read_bytes()
    storage = StudyStorage(params)
    points = warm_start_points(params, storage)
    definition = study_definition(params, hashlib.sha256(pairs_bytes).hexdigest(), points)
    name = study_name(hpo.study_prefix, definition)
    sampler = optuna.samplers.RandomSampler(0)  # never samples: trials come from their views
    if worker:
        # Wait for the stage first: it also creates the MLflow store (two processes creating
        # the same SQLite store at once collide).
        study, parent = _join(name, storage, params, wait_seconds)
        runs = RunTree(hpo.mlflow_experiment)
    else:
        runs = RunTree(hpo.mlflow_experiment)
        storage.seed(name, params.paths.study_db)  # the committed study, into a fresh store
        study = optuna.create_study(
            storage=storage.optuna, study_name=name, pruner=make_pruner(params),
            sampler=sampler, directions=["maximize"] + ["minimize"] * len(hpo.objectives),
            load_if_exists=True)
        if study.user_attrs.get("definition") != definition:
            study.set_user_attr("definition", definition)
        parent = runs.study_run(study.user_attrs.get("mlflow_run_id"), name,
                                {"optuna.study_name": name, "optuna.storage": storage.redacted})
        if study.user_attrs.get("mlflow_run_id") != parent:
            study.set_user_attr("mlflow_run_id", parent)
    study.sampler = sampler
    scheduler = Scheduler(study, storage, params, runs, parent, points)
    resumed = scheduler.ledger().finished(hpo.n_trials)
    parent_status = FAILED
    try:
        scheduler.close_dead_trials()
        if not scheduler.ledger().done(hpo.n_trials):
            # in a stage's process the server runs already: started before this module's imports
            context = placement.fork_server(params.model.name) if hpo.isolate_trials else None
            cv = _cross_validation(params, pairs_bytes, runs, parent)
            scheduler.run(cv, plan(params, study, cv, runs, parent), context)
        if worker:
            return {"study_name": name, "finished": scheduler.ledger().finished(hpo.n_trials),
                    "tokenize_calls": ENCODE_STATS["calls"]}
        storage.snapshot(study, params.paths.study_db)
        metrics = write_outputs(study, params, resumed, storage.redacted, runs, parent)
        parent_status = FINISHED
        return metrics
    finally:
        if not worker:
            runs.end(parent, parent_status)


def _cross_validation(params: Params, pairs_bytes: bytes, runs: RunTree,
                      parent: str) -> CrossValidation:
    """The training split tokenised once for the whole study, with its folds."""
    train = read_split(io.BytesIO(pairs_bytes), "train")
    tokenizer = load_tokenizer(params.model.name)
    start = time.perf_counter()
    enc = encode_pairs(tokenizer, train["criterion"], train["sentence"], train["label"],
                       params.model.max_length)
    runs.log(parent, {"tokenize_seconds": time.perf_counter() - start,
                      "tokenized_pairs": len(enc)},
             tags={"machine": machine_label()})
    return CrossValidation.build(params, enc, np.asarray(train["fold"]))


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
