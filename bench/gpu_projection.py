"""Projected hours of the full profile's study on one H200: one at a time, waves, the schedule.

Runs anywhere (nothing is trained): a discrete-event simulation of the study of
``profiles/full.yaml`` on the real-size corpus, from measured inputs, all written beside the
result:

* GPU throughput: ``bench/results/gpu_jobs.json`` (a DeBERTa-v3-base-shaped model, bf16, on an
  H200: aggregate training samples/s of N processes at batch 8/16/32, with and without MPS); a
  process's share when N run is the aggregate / N. Validation: ``gpu_check.json``'s inference
  pairs/s of one process, scaled by the same share.
* Corpus: the sample's ``metrics/data.json`` scaled to ReDSM5's 1,484 posts; the train split
  (1 - ``prepare.test_size``) in the profile's folds, 10 negatives per positive.
* Trials: the profile's 50 trials x 5 folds, batch and epochs drawn from its search space; each
  fold's validation curve is a recorded one (``curves.csv``: 30 trials x 2 folds x 8 epochs,
  MiniLM on a CPU), so early stopping (patience 2) and the per-epoch percentile-25 pruner (5
  startup trials) stop trials as they would. A pruning decision sees what its schedule lets it
  see: one at a time, all earlier trials; waves, the earlier waves; the schedule, the trials
  that ended on the study's virtual clock by the trial's virtual start (pipeline/study.py: a
  trial lasts its optimizer steps + validation units). Every trial also pays a process start
  and model load (``--trial-overhead``).
* Schedules: ``one_at_a_time`` (n_jobs 1, today's ``make full`` before parallel trials),
  ``waves`` (n_jobs N, a wave lasts its slowest trial, trials see earlier waves) and ``schedule``
  (n_jobs = parallelism = N: trial k starts, in index order, once a process is free and its
  virtual start is decided, i.e. the trial freeing its virtual worker has ended and the trials
  running on the others have done enough, read every ``--poll`` seconds), with and without MPS.

``projected_hours``: the median over ``--draws`` studies (curve and hyperparameter draws) of the
makespan; ``idle_fraction``: 1 - busy slot-seconds / (N x makespan).

Writes ``bench/results/gpu_projection.json``.
Usage: ``python bench/gpu_projection.py [--draws 20] [--jobs 8]``
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
REAL_POSTS = 1484  # ReDSM5 (shared/DATA.md)


@dataclass
class Trial:
    batch: int
    requested: int  # num_train_epochs
    epochs: list[int]  # epochs run per fold run (early stopping, pruning)
    pruned: bool
    cost: float = 0.0  # virtual duration: optimizer steps + validation units (study.py)


def profile() -> dict:
    from pipeline.params import YamlLoader

    return yaml.load((ROOT / "profiles" / "full.yaml").read_text(encoding="utf-8"),
                     Loader=YamlLoader)


def corpus(test_size: float, n_folds: int, negatives: int) -> dict:
    """Real-size pair counts, scaled from the sample's prepare metrics."""
    data = json.loads((ROOT / "metrics" / "data.json").read_text())
    scale = REAL_POSTS / data["posts"]
    pairs, positives = data["pairs"] * scale, data["positives"] * scale
    train_pairs, train_pos = pairs * (1 - test_size), positives * (1 - test_size)
    fold_train_pos = train_pos * (n_folds - 1) / n_folds
    return {"posts": REAL_POSTS, "scaled_from_sample_posts": data["posts"],
            "pairs": round(pairs), "train_pairs": round(train_pairs),
            "train_samples_per_epoch": round(fold_train_pos * (1 + negatives)),
            "validation_pairs_per_fold": round(train_pairs / n_folds)}


class Views:
    """What trial k may see under each schedule: one at a time and the schedule ask the stage's
    own Ledger (pipeline/study.py: the virtual clock on 1 or n workers) over the trials drawn
    so far; waves see the earlier waves. Told each trial's outcome and virtual duration in
    turn."""

    def __init__(self, kind: str, n: int) -> None:
        self.kind, self.n = kind, n
        self.attempts: dict[int, list[optuna.trial.FrozenTrial]] = {}
        self.starts: list[float] = []  # each trial's virtual start (kind "schedule")

    def visible(self, k: int) -> list[optuna.trial.FrozenTrial]:
        """The COMPLETE trials trial k's pruner compares against."""
        from pipeline.study import Ledger

        if self.kind == "waves":  # the earlier waves
            seen = [self.attempts[j][0] for j in range(k - k % self.n)]
        else:
            ledger = Ledger(self.attempts, max_retries=0,
                            parallelism=self.n if self.kind == "schedule" else 1)
            seen = ledger.view(k)
            self.starts.append(ledger.starts[k])
        return [t for t in seen if t.state == optuna.trial.TrialState.COMPLETE]

    def ended(self, k: int, value: float | None, reports: dict[int, float],
              cost: float) -> None:
        """Trial k ended: COMPLETE with ``value``, or PRUNED (None), after ``cost`` units."""
        from pipeline.study import COST, INDEX

        state = optuna.trial.TrialState.PRUNED if value is None else \
            optuna.trial.TrialState.COMPLETE
        self.attempts[k] = [optuna.trial.create_trial(
            state=state, value=value, intermediate_values=reports,
            user_attrs={INDEX: k, COST: cost})]


def draw_trials(curves: np.ndarray, n_trials: int, n_folds: int, batches: list[int],
                epochs: tuple[int, int], patience: int, pruner: dict, views: Views,
                units_per_epoch, rng: np.random.Generator) -> list[Trial]:
    """Each trial's batch and epochs run per fold, with the pruner's decisions on what its view
    holds; ``units_per_epoch(batch)``: the virtual duration of one epoch."""
    n_table, n_recorded, stride = curves.shape
    order = rng.permutation(n_table)
    draws = [(int(rng.choice(batches)), int(rng.integers(epochs[0], epochs[1] + 1)),
              order[k % n_table]) for k in range(n_trials)]
    out = []
    for k, (batch, n_epochs, recorded) in enumerate(draws):
        study = optuna.create_study(direction="maximize", pruner=optuna.pruners.PercentilePruner(
            pruner["percentile"], n_startup_trials=pruner["n_startup_trials"],
            n_warmup_steps=0, interval_steps=1))
        study.add_trials(views.visible(k))
        trial = study.ask()
        scores, run, pruned, iv = [], [], False, {}
        for fold in range(n_folds):
            curve = curves[recorded, fold % n_recorded, :n_epochs]
            best, since, done = -np.inf, 0, 0
            for e, value in enumerate(curve, 1):
                done = e
                best, since = (value, 0) if value > best else (best, since + 1)
                step = fold * stride + e
                running = float(np.mean([*scores, best]))
                trial.report(running, step)
                iv[step] = running
                last = fold + 1 == n_folds and e == n_epochs
                if not last and trial.should_prune():
                    pruned = True
                    break
                if since >= patience:
                    break
            run.append(done)
            scores.append(best)
            if pruned:
                break
        t = Trial(batch, n_epochs, run, pruned, sum(run) * units_per_epoch(batch))
        views.ended(k, None if pruned else float(np.mean(scores)), iv, t.cost)
        out.append(t)
    return out


def seconds(trial: Trial, rate: dict[int, float], infer: float, data: dict,
            overhead: float) -> float:
    """One trial's wall time in one process at ``rate`` (samples/s per process, by batch)."""
    epochs = sum(trial.epochs)
    return overhead + epochs * (data["train_samples_per_epoch"] / rate[trial.batch]
                                + data["validation_pairs_per_fold"] / infer)


def simulate(trials: list[Trial], durations: list[float], n_jobs: int, kind: str,
             views: Views, overhead: float, poll: float) -> tuple[float, float]:
    """Makespan and idle fraction of the trials on n_jobs processes.

    The schedule: trial k starts (in index order) once a process is free and its virtual start
    is decided (study.Ledger.starts): the trial that frees its virtual worker has ended, and
    every trial still running on another worker has done enough (its progress, read every
    ``poll`` seconds) to be sure it ends later."""
    if kind == "one_at_a_time":
        return sum(durations), 0.0
    if kind == "waves":
        end = sum(max(durations[w:w + n_jobs]) for w in range(0, len(durations), n_jobs))
        return end, 1 - sum(durations) / (n_jobs * end)
    n = views.n
    real_start: list[float] = []
    real_end: list[float] = []
    free = [0.0] * n
    last_on = [-1] * n  # the last trial on each virtual worker
    slots = [0.0] * n_jobs
    for k, trial in enumerate(trials):
        start_v = views.starts[k]
        w = min(range(n), key=lambda i: (free[i], i))
        decided = 0.0
        for i in range(n):
            j = last_on[i]
            if j < 0:
                continue
            if i == w:  # the trial that frees k's worker: it must have ended
                decided = max(decided, real_end[j])
                continue
            # when trial j's progress passes start_v (or it ends), read at the next poll
            need = (start_v - views.starts[j]) / max(trials[j].cost, 1e-9)
            passed = real_start[j] + overhead + max(0.0, need) * (real_end[j] - real_start[j]
                                                                  - overhead)
            decided = max(decided, min(real_end[j], passed + poll))
        slot = int(np.argmin(slots))
        begin = max(decided, slots[slot], real_start[-1] if real_start else 0.0)
        real_start.append(begin)
        real_end.append(begin + durations[k])
        slots[slot] = begin + durations[k]
        free[w] = start_v + trial.cost
        last_on[w] = k
    end = max(real_end)
    return end, 1 - sum(durations) / (n_jobs * end)


def main() -> None:
    from pipeline.machine import command, describe
    from pipeline.params import YamlLoader

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=8, help="processes (= parallelism)")
    parser.add_argument("--trial-overhead", type=float, default=15.0,
                        help="seconds per trial: process start, model load, CUDA context")
    parser.add_argument("--poll", type=float, default=1.0,
                        help="seconds between the stage's reads of the trials' progress")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    full = profile()
    raw = yaml.load((ROOT / "params.yaml").read_text(encoding="utf-8"), Loader=YamlLoader)
    n_trials, n_folds = full["hpo.n_trials"], full["prepare.n_folds"]
    space = full["hpo.search_space.num_train_epochs"]
    batches = full["hpo.search_space.per_device_train_batch_size"]["choices"]
    pruner = {"name": full["hpo.pruner.name"], "report": full["hpo.pruner.report"],
              "percentile": raw["hpo"]["pruner"]["percentile"],
              "n_startup_trials": full["hpo.pruner.n_startup_trials"]}
    patience = full["train.early_stopping_patience"]
    data = corpus(raw["prepare"]["test_size"], n_folds, full["train.negatives_per_positive"])
    jobs = json.loads((RESULTS / "gpu_jobs.json").read_text())
    check = json.loads((RESULTS / "gpu_check.json").read_text())
    infer_one = check["runs"]["eager_batch32"]["infer_pairs_per_second"]
    df = pd.read_csv(RESULTS / "curves.csv").sort_values(["trial", "fold", "epoch"])
    shape = (df["trial"].nunique(), df["fold"].nunique(), df["epoch"].nunique())
    curves = df["val_pr_auc"].to_numpy().reshape(shape)

    def rates(run: str, n: int) -> tuple[dict[int, float], float]:
        cells = jobs["runs"][run]["batches"]
        per = {int(b): c["samples_per_second"] / n for b, c in cells.items()}
        share = per[32] / jobs["runs"]["jobs1"]["batches"]["32"]["samples_per_second"]
        return per, infer_one * share

    n = args.jobs
    arms = {"one_at_a_time": ("jobs1", 1, "one_at_a_time", batches),
            "waves": (f"mps_jobs{n}", n, "waves", batches),
            "schedule": (f"mps_jobs{n}", n, "schedule", batches),
            "waves_no_mps": (f"jobs{n}", n, "waves", batches),
            "schedule_no_mps": (f"jobs{n}", n, "schedule", batches),
            # the same with batch 8 left out of the search space: what bounds the study is its
            # longest complete trial, and batch 8 trains slowest
            "schedule_batch_16_32": (f"mps_jobs{n}", n, "schedule", [b for b in batches if b > 8])}
    from pipeline.params import VALIDATION_UNIT

    def units_per_epoch(batch: int) -> float:  # optimizer steps + validation units
        return (math.ceil(data["train_samples_per_epoch"] / batch)
                + math.ceil(data["validation_pairs_per_fold"] / VALIDATION_UNIT))
    result = {"projected_hours": {}, "idle_fraction": {}, "pruned_trials": {},
              "epochs_run_fraction": {}, "longest_trial_hours": {}}
    for name, (run, n_jobs, kind, arm_batches) in arms.items():
        per, infer = rates(run, n_jobs)
        hours, idle, pruned, frac, longest = [], [], [], [], []
        for d in range(args.draws):
            rng = np.random.default_rng(d)
            views = Views(kind, n_jobs)
            trials = draw_trials(curves, n_trials, n_folds, arm_batches, (space["low"],
                                 space["high"]), patience, pruner, views, units_per_epoch, rng)
            durations = [seconds(t, per, infer, data, args.trial_overhead) for t in trials]
            makespan, slack = simulate(trials, durations, n_jobs, kind, views,
                                       args.trial_overhead, args.poll)
            hours.append(makespan / 3600)
            longest.append(max(durations) / 3600)
            idle.append(slack)
            pruned.append(sum(t.pruned for t in trials))
            frac.append(sum(sum(t.epochs) for t in trials)
                        / sum(n_folds * t.requested for t in trials))
        result["projected_hours"][name] = float(np.median(hours))
        result["idle_fraction"][name] = float(np.median(idle))
        result["pruned_trials"][name] = float(np.median(pruned))
        result["epochs_run_fraction"][name] = float(np.median(frac))
        result["longest_trial_hours"][name] = float(np.median(longest))
        print(f"{name:16s} {np.median(hours):6.2f} h (p10-p90 {np.percentile(hours, 10):.2f}-"
              f"{np.percentile(hours, 90):.2f}), idle {np.median(idle):.1%}, longest trial "
              f"{np.median(longest):.2f} h, pruned "
              f"{np.median(pruned):.0f}/{n_trials}", flush=True)
    result.update({
        "machine": describe(), "command": command(),
        "inputs": {
            "gpu": jobs["device"], "gpu_table": "gpu_jobs.json", "gpu_torch": jobs["torch"],
            "gpu_table_machine": jobs.get("machine", jobs["setup"].get("machine")),
            "training_samples_per_second": {
                run: {b: c["samples_per_second"] for b, c in jobs["runs"][run]["batches"].items()}
                for run in sorted({a[0] for a in arms.values()})},
            "inference_pairs_per_second_one_process": infer_one,
            "corpus": data, "trials": n_trials, "folds": n_folds, "processes": n,
            "batches": batches, "epochs": [space["low"], space["high"]],
            "early_stopping_patience": patience, "pruner": pruner,
            "curves": "curves.csv (MiniLM on a CPU: the shape of learning curves, not DeBERTa's)",
            "trial_overhead_seconds": args.trial_overhead, "draws": args.draws,
            "poll_seconds": args.poll, "validation_unit_pairs": VALIDATION_UNIT,
        },
    })
    (RESULTS / "gpu_projection.json").write_text(json.dumps(result, indent=2) + "\n")
    hours = result["projected_hours"]
    print(f"wrote bench/results/gpu_projection.json; one at a time / schedule = "
          f"{hours['one_at_a_time'] / hours['schedule']:.1f}x")
    if not math.isfinite(result["projected_hours"]["schedule"]):
        raise SystemExit("ERROR: no projection")


if __name__ == "__main__":
    main()
