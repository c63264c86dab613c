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

The study (pipeline/study.py) must hold ``hpo.n_trials`` finished (complete or pruned) trials;
only the missing ones run, and the outputs describe the first ``n_trials`` finished trials, so
they depend on params alone.

Trials run in **waves** of up to ``hpo.n_jobs``, each in its own process on its own slot (CPU
cores or a GPU: pipeline/trial_process.py). A wave's trials are asked one after the other from a
sampler seeded by the study's history, and none of them is told to Optuna before the whole wave
has ended. So every suggestion and every pruning decision sees exactly the trials of the earlier
waves, finished, and the wave's earlier trials as RUNNING: the study is the same at any timing,
and the same after a kill and rerun (README, "Parallel trials").

``python -m pipeline.hpo --worker`` joins the study that params.yaml defines (same storage, from
any machine) and runs waves until the study holds n_trials finished trials; it writes nothing.
Trials of several processes interleave as their timing falls, so a study with extra workers is not
reproducible. The stage does the same, then waits for trials still running elsewhere and writes
the outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import TrialState

from pipeline import faults
from pipeline.common import run_stage
from pipeline.engine import ENCODE_STATS, encode_pairs
from pipeline.errors import StageError
from pipeline.model import load_tokenizer
from pipeline.objective import CrossValidation, TrialRun, fold_indices, open_places
from pipeline.params import Params, load_params
from pipeline.progress import progress
from pipeline.storage import StudyStorage
from pipeline.study import (
    make_pruner,
    make_sampler,
    study_definition,
    study_name,
    warm_start_points,
)
from pipeline.study_outputs import FINISHED_STATES, write_outputs
from pipeline.tracking import FAILED, FINISHED, KILLED, RunTree
from pipeline.trial_process import (
    EpochEnd,
    Failed,
    FoldEnd,
    Slot,
    TrialProcess,
    child_context,
    estimate_trial_mb,
    plan_slots,
    wait_any,
)

POLL_SECONDS = 2.0


@dataclass
class WaveStats:
    """What the waves of this process cost: slot-seconds spent waiting at the wave barrier."""

    waves: int = 0
    trials: int = 0
    slot_seconds: float = 0.0  # wave wall time x slots used, summed over waves
    idle_seconds: float = 0.0  # of which a slot's trial had ended and it waited for the wave

    @property
    def idle_fraction(self) -> float:
        return self.idle_seconds / self.slot_seconds if self.slot_seconds else 0.0


# The waves run by this process (for bench/study_speed.py and the MLflow study run).
WAVE_STATS = WaveStats()


def _counts(study: optuna.Study) -> dict[TrialState, int]:
    counts = dict.fromkeys(TrialState, 0)
    for t in study.get_trials(deepcopy=False):
        counts[t.state] += 1
    return counts


def _finished(study: optuna.Study) -> int:
    c = _counts(study)
    return c[TrialState.COMPLETE] + c[TrialState.PRUNED]


def close_dead_trials(study: optuna.Study, storage: StudyStorage, runs: RunTree) -> None:
    """Fail (and queue a retry of) dead workers' trials; close their MLflow runs."""
    for trial in storage.fail_dead_trials(study):
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            reason = trial.user_attrs.get("fail_reason") or "worker died (no heartbeat)"
            runs.close_open_children(run_id, KILLED)
            runs.log(run_id, tags={"fail_reason": reason})
            runs.end(run_id, FAILED)


class Scheduler:
    """Runs the study's missing trials in waves on this process's slots."""

    def __init__(self, study: optuna.Study, cv: CrossValidation, storage: StudyStorage,
                 params: Params, runs: RunTree, slots: list[Slot], worker: bool) -> None:
        self.study, self.cv, self.storage, self.params = study, cv, storage, params
        self.runs, self.slots, self.worker = runs, slots, worker
        self.context = child_context(params.model.name) if params.hpo.isolate_trials else None
        self.fault_spec = os.environ.get(faults.ENV, "")
        self.failures: list[str] = []

    def run(self) -> None:
        """Until the study holds hpo.n_trials finished trials (or too many failed here)."""
        n, max_failures = self.params.hpo.n_trials, self.params.hpo.max_failures
        bar = progress(desc="trials", total=n, initial=min(_finished(self.study), n), plain=True)
        while len(self.failures) <= max_failures:
            close_dead_trials(self.study, self.storage, self.runs)
            finished = _finished(self.study)
            if finished >= n:
                break
            free = open_places(self.study, n)
            if free <= 0:
                time.sleep(POLL_SECONDS)  # the last trials are running elsewhere
                continue
            # A fresh sampler per wave, seeded by the history it will see (pipeline/study.py).
            self.study.sampler = make_sampler(self.params, finished, self.worker)
            wave = [r for r in (self.cv.start(self.study)
                                for _ in range(min(len(self.slots), free))) if r is not None]
            if not wave:
                continue
            self.run_wave(wave)
            for r in sorted(wave, key=lambda r: r.number):  # tell in trial order
                state = self.cv.finish(self.study, r)
                if state in FINISHED_STATES:
                    bar.update(1, note=f"trial {r.number} {state.name}")
                elif state == TrialState.FAIL:
                    self.failures.append(f"trial {r.number}: {r.error}")
        bar.close()
        if len(self.failures) > max_failures:
            raise StageError(
                f"hpo: {len(self.failures)} trials failed in this run, more than "
                f"hpo.max_failures={max_failures}; last: {self.failures[-1]}")

    def run_wave(self, wave: list[TrialRun]) -> None:
        """Compute the wave's trials at once, one per slot, answering their events."""
        start = time.perf_counter()
        with contextlib.ExitStack() as stack:
            for r in wave:  # database storages: a dead stage's trials go stale
                stack.enter_context(get_heartbeat_thread(r.trial._trial_id, self.study._storage))
            if self.context is None:  # in this process (hpo.isolate_trials: false, n_jobs 1)
                for r in wave:
                    r.run_here(self.cv.runner, self.fault_spec)
            else:
                self._pump(wave)
        end = time.perf_counter()
        WAVE_STATS.waves += 1
        WAVE_STATS.trials += len(wave)
        WAVE_STATS.slot_seconds += (end - start) * len(wave)
        WAVE_STATS.idle_seconds += sum(end - (r.ended_at or end) for r in wave)

    def _pump(self, wave: list[TrialRun]) -> None:
        # A shorter wave (the study's last) shares all the cores among its trials.
        slots = self.slots if len(wave) == len(self.slots) else \
            _slots(self.params, self.study, len(wave))
        processes = {}
        for r, slot in zip(wave, slots, strict=True):
            r.trial.set_user_attr("slot", slot.describe())
            processes[TrialProcess(self.context, self.cv.runner, r.hp, r.number, r.seed_number,
                                   slot, self.fault_spec)] = r
        pending = list(processes)
        try:
            while pending:
                for process in wait_any(pending, timeout=1.0):
                    run = processes[process]
                    event = process.receive()
                    answer = run.handle(event)
                    if isinstance(event, (FoldEnd, EpochEnd)):
                        process.answer(bool(answer))
                    elif run.ended_at is not None:  # Finished or Failed
                        pending.remove(process)
                        process.close()
        finally:
            for process, run in processes.items():
                if process in pending:  # interrupted: the trial stays RUNNING for a retry
                    process.close(wait=0)
                    run.handle(Failed("the stage stopped during the trial"))


def wait_for_running(study: optuna.Study, storage: StudyStorage, runs: RunTree) -> None:
    """Until no trial is RUNNING (other workers finishing, or dead ones going stale)."""
    while _counts(study)[TrialState.RUNNING]:
        close_dead_trials(study, storage, runs)
        time.sleep(POLL_SECONDS)


def _tokenised(params: Params) -> tuple[pd.DataFrame, bytes]:
    pairs_bytes = Path(params.paths.pairs).read_bytes()
    pairs = pd.read_csv(io.BytesIO(pairs_bytes), keep_default_na=False)
    return pairs[pairs["split"] == "train"].reset_index(drop=True), pairs_bytes


def _slots(params: Params, study: optuna.Study, n_jobs: int) -> list[Slot]:
    """``n_jobs`` slots, checked against this machine and the memory trials of this study used."""
    trials = study.get_trials(deepcopy=False)
    rss = [t.user_attrs["peak_rss_mb"] for t in trials if t.user_attrs.get("peak_rss_mb")]
    gpu = [t.user_attrs["peak_gpu_mb"] for t in trials if t.user_attrs.get("peak_gpu_mb")]
    trial_mb = max(rss) if rss else estimate_trial_mb(params.model.name)
    return plan_slots(n_jobs, params.hpo.devices, params.train.device,
                      params.train.cpu_threads, trial_mb, max(gpu) if gpu else None)


def run(params: Params, worker: bool = False, wait_seconds: float = 600.0) -> dict[str, Any]:
    """Run or resume the study until it holds hpo.n_trials finished trials.

    The stage (worker=False) creates the study if needed and writes the outputs; a worker joins
    an existing study (waiting up to ``wait_seconds`` for the stage to create it) and returns
    its own counts.
    """
    hpo = params.hpo
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pairs, pairs_bytes = _tokenised(params)
    storage = StudyStorage(params)
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
        if study.user_attrs.get("definition") != definition:
            study.set_user_attr("definition", definition)
        parent = runs.study_run(study.user_attrs.get("mlflow_run_id"), name,
                                {"optuna.study_name": name, "optuna.storage": storage.redacted})
        if study.user_attrs.get("mlflow_run_id") != parent:
            study.set_user_attr("mlflow_run_id", parent)
    resumed = _finished(study)
    parent_status = FAILED
    try:
        close_dead_trials(study, storage, runs)
        if resumed < hpo.n_trials:
            slots = _slots(params, study, hpo.n_jobs)
            tokenizer = load_tokenizer(params.model.name)
            start = time.perf_counter()
            enc = encode_pairs(tokenizer, pairs["criterion"], pairs["sentence"],
                               pairs["label"], params.model.max_length)
            runs.log(parent, {"tokenize_seconds": time.perf_counter() - start,
                              "tokenized_pairs": len(enc)})
            folds = fold_indices(pairs["fold"].to_numpy(), params.prepare.n_folds)
            cv = CrossValidation(params, enc, folds, runs, parent)
            Scheduler(study, cv, storage, params, runs, slots, worker).run()
            runs.log(parent, {"wave_idle_fraction": WAVE_STATS.idle_fraction,
                              "waves": WAVE_STATS.waves})
        if worker:
            return {"study_name": name, "finished": _finished(study),
                    "tokenize_calls": ENCODE_STATS["calls"]}
        wait_for_running(study, storage, runs)
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
