"""Pruning replay: Optuna's own pruners on the recorded learning curves, in seconds.

Reads ``bench/results/curves.csv`` (``bench/curves.py``: every epoch of every fold of a
random-search study validated) and replays random orders of its trials through each policy: an
in-memory Optuna study, one ``ask`` per trial, the recorded validation metric reported as the
trial would report it, ``should_prune`` answered by the real pruner, ``tell`` with the fold
aggregate or PRUNED. Nothing is trained, so hundreds of studies take seconds.

A policy is a pruner, what it is fed, and early stopping:

* per fold (``hpo.pruner.report: fold``): one report after each fold, step = folds done, value
  = the running mean of the fold scores. Without early stopping a fold validates its last epoch
  only (the engine skips the others), so the cost of a fold is its training seconds plus one
  validation;
* per epoch (``hpo.pruner.report: epoch``): one report after every epoch of every fold, step =
  epochs trained so far, value = the mean of the finished folds' scores and the current fold's
  score so far (its latest epoch; its best one with early stopping). Every epoch is validated,
  and every validation is paid;
* early stopping (``--patience``, default 1) stops a fold after that many epochs without a
  better metric; the fold scores its best epoch, and every epoch it ran was validated.

Compute = the recorded train + eval seconds of what a policy ran (loading the model is part of
each fold's first epoch). ``compute_saved_fraction`` is 1 - compute / compute of the study with
no pruning and no early stopping (same trials, last epoch validated). ``regret`` is the best
full-protocol value (mean over folds of the last epoch's metric) among the study's trials minus
the full-protocol value of the trial the policy picks (its best completed trial by the value it
saw), so an early-stopped fold's flattering best epoch cannot hide a worse model.
``fold_noise`` is the median over trials of the standard deviation of their fold scores (full
protocol).

``chosen``: among policies whose median regret is within fold noise, the one with the largest
median compute saved; ``chosen_available``: the same among the policies that params.yaml can
express (median or percentile pruner, per fold or per epoch, ``train.early_stopping_patience``).
Successive halving, Hyperband and Wilcoxon are replayed for comparison but not offered by the
stage: the first two compare with the rung values of RUNNING trials too, so with parallel trials
their decisions would depend on timing, which ``hpo.n_jobs`` promises they do not.

Studies of every trial of the table (in random orders) give ``policies``, ``chosen`` and
``chosen_available``; smaller studies drawn from it (``--sizes``: the CPU profile's 4 trials when
the table was recorded, make quick's 10) give the same under ``by_study_size``: with startup
trials that always run in full (``--startup``, default 2), a short study has little to prune, and
per-epoch validation is paid on every trial.

Usage: ``python bench/pruning_replay.py [--orders 50] [--sizes 4 10] [--patience 1]
[--warmup 0] [--startup 2]``; writes ``bench/results/pruning_replay.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# Trials that run every fold before the median/percentile pruners act (hpo.pruner default).
STARTUP = 2
PATIENCE = 1


@dataclass(frozen=True)
class Policy:
    name: str
    report: str  # "fold" | "epoch" | "none"
    make_pruner: Callable[[int], optuna.pruners.BasePruner]  # (steps per trial) -> pruner
    patience: int = 0  # early stopping, 0: off
    available: bool = False  # params.yaml can express it (hpo.pruner, early stopping)
    fold_values: bool = False  # report each fold's own score, not the running mean (Wilcoxon)


def policies(patience: int = PATIENCE, warmup: int = 0, startup: int = STARTUP) -> list[Policy]:
    """Every policy, with and without early stopping (``patience``); ``warmup`` and ``startup``:
    the median and percentile pruners' ``n_warmup_steps`` and ``n_startup_trials``
    (hpo.pruner.n_warmup_steps, hpo.pruner.n_startup_trials)."""
    p = optuna.pruners
    w = warmup
    # The stage reports a fold at step = fold index (0, 1, ...), the replay at folds done (1, 2,
    # ...: successive halving reads the step as its resource), so a fold policy's warmup is one
    # more here; per-epoch steps are the stage's (fold x epochs + epoch, from 1).
    wf = warmup + 1
    base = [
        Policy("none", "none", lambda n: p.NopPruner(), available=True),
        Policy("fold_median", "fold",
               lambda n: p.MedianPruner(n_startup_trials=startup, n_warmup_steps=wf),
               available=True),
        Policy("fold_percentile25", "fold",
               lambda n: p.PercentilePruner(25.0, n_startup_trials=startup, n_warmup_steps=wf),
               available=True),
        Policy("fold_wilcoxon", "fold",
               lambda n: p.WilcoxonPruner(p_threshold=0.1, n_startup_steps=1), fold_values=True),
        Policy("fold_successive_halving", "fold",
               lambda n: p.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)),
        Policy("epoch_median", "epoch",
               lambda n: p.MedianPruner(n_startup_trials=startup, n_warmup_steps=w),
               available=True),
        Policy("epoch_percentile25", "epoch",
               lambda n: p.PercentilePruner(25.0, n_startup_trials=startup, n_warmup_steps=w),
               available=True),
        Policy("epoch_successive_halving", "epoch",
               lambda n: p.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)),
        Policy("epoch_hyperband", "epoch",
               lambda n: p.HyperbandPruner(min_resource=1, max_resource=n, reduction_factor=3)),
    ]
    with_es = [Policy(f"{q.name}+es", q.report, q.make_pruner, patience, q.available,
                      q.fold_values) for q in base]
    return base + with_es


@dataclass
class Table:
    """The curves as arrays: trial x fold x epoch."""

    metric: np.ndarray
    train_s: np.ndarray
    eval_s: np.ndarray

    def unpruned_cost(self, trials) -> float:
        """Seconds of ``trials`` with no pruning and no early stopping (last epoch validated)."""
        return float(sum(self.fold(t, f, 0, False)[2][-1][1]
                         for t in trials for f in range(self.metric.shape[1])))

    @property
    def full_value(self) -> np.ndarray:
        """Each trial's value under the full protocol: mean over folds of the last epoch."""
        return self.metric[:, :, -1].mean(axis=1)

    def fold(self, t: int, f: int, patience: int, every_epoch: bool):
        """(epochs run, score, per-epoch (value, cost) of each epoch run) of one fold."""
        m, tr, ev = self.metric[t, f], self.train_s[t, f], self.eval_s[t, f]
        n = len(m)
        if not patience and not every_epoch:  # the engine validates the last epoch only
            cost = tr.cumsum()
            cost[-1] += ev[-1]
            return n, m[-1], list(zip(m, cost.tolist(), strict=True))
        out, best, since, cost = [], -np.inf, 0, 0.0
        for e in range(n):
            cost += tr[e] + ev[e]
            if m[e] > best:
                best, since = m[e], 0
            else:
                since += 1
            out.append((best if patience else m[e], cost))
            if patience and since >= patience:
                break
        return len(out), (best if patience else m[len(out) - 1]), out


def evaluate(table: Table, orders: list[np.ndarray], fold_noise: float,
             patience: int = PATIENCE, warmup: int = 0, startup: int = STARTUP) -> dict:
    """Every policy on studies of the trials in ``orders``: compute saved against the same
    trials unpruned, and regret against the best of the trials each study saw."""
    full = table.full_value
    unpruned = np.array([table.unpruned_cost(order) for order in orders])  # same for all policies
    results = {}
    for policy in policies(patience, warmup, startup):
        runs = [replay(table, policy, order, seed=k) for k, order in enumerate(orders)]
        saved = 1 - np.array([r["cost"] for r in runs]) / unpruned
        regret = np.array([full[order].max() - full[r["pick"]]
                           for r, order in zip(runs, orders, strict=True)])
        results[policy.name] = {
            "report": policy.report, "early_stopping_patience": policy.patience,
            "available_in_params": policy.available,
            "compute_saved_fraction": float(np.median(saved)),
            "compute_saved_p10_p90": [float(np.percentile(saved, q)) for q in (10, 90)],
            "regret_median": float(np.median(regret)),
            "regret_p90": float(np.percentile(regret, 90)),
            "regret_mean": float(regret.mean()),
            "found_best_fraction": float(np.mean(regret == 0)),
            "pruned_trials_median": float(np.median([r["pruned"] for r in runs])),
        }
        r = results[policy.name]
        print(f"{policy.name:30s} saved {r['compute_saved_fraction']:6.1%} "
              f"[{r['compute_saved_p10_p90'][0]:6.1%}, {r['compute_saved_p10_p90'][1]:6.1%}]  "
              f"regret median {r['regret_median']:.4f} p90 {r['regret_p90']:.4f}  "
              f"pruned {r['pruned_trials_median']:.0f}/{len(orders[0])}", flush=True)

    def choose(names: list[str]) -> str:
        ok = [n for n in names if results[n]["regret_median"] <= fold_noise]
        return max(ok, key=lambda n: results[n]["compute_saved_fraction"])

    return {"policies": results, "chosen": choose(list(results)),
            "chosen_available": choose([n for n, r in results.items()
                                        if r["available_in_params"]])}


def load_table(path: Path, metric: str) -> tuple[Table, pd.DataFrame]:
    df = pd.read_csv(path)
    trials = sorted(df["trial"].unique())
    folds = sorted(df["fold"].unique())
    epochs = sorted(df["epoch"].unique())
    shape = (len(trials), len(folds), len(epochs))
    if len(df) != np.prod(shape):
        raise SystemExit(f"ERROR: {path}: {len(df)} rows, expected {np.prod(shape)} "
                         f"(trials x folds x epochs): an incomplete trial?")
    df = df.sort_values(["trial", "fold", "epoch"])

    def grid(col: str) -> np.ndarray:
        return df[col].to_numpy(dtype=float).reshape(shape)

    return Table(grid(f"val_{metric}"), grid("train_seconds"), grid("eval_seconds")), df


def replay(table: Table, policy: Policy, order: np.ndarray, seed: int) -> dict:
    """One study: the trials of ``order`` through ``policy``; its cost, pick and pruned count."""
    n_trials, n_folds, n_epochs = table.metric.shape
    # named: Hyperband assigns brackets by hashing the study name (an unnamed study gets a
    # random one, and the replay would change from run to run)
    study = optuna.create_study(study_name=f"replay-{seed}", direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=seed),
                                pruner=policy.make_pruner(n_folds * n_epochs))
    every_epoch = policy.report == "epoch"
    cost, pruned, seen = 0.0, 0, []
    for t in order:
        trial = study.ask()
        scores, stop = [], False
        for f in range(n_folds):
            _, score, epochs = table.fold(t, f, policy.patience, every_epoch)
            if every_epoch:
                for e, (value, spent) in enumerate(epochs):
                    step = f * n_epochs + e + 1
                    trial.report(float(np.mean([*scores, value])), step=step)
                    # as the stage: no pruning at the last step, when nothing is left to save
                    if step < n_folds * n_epochs and trial.should_prune():
                        cost += spent
                        stop = True
                        break
                if stop:
                    break
            cost += epochs[-1][1]
            scores.append(score)
            if policy.report == "fold":
                value = score if policy.fold_values else float(np.mean(scores))
                trial.report(value, step=f + 1)  # step = folds done (SH reads it as resource)
                if f + 1 < n_folds and trial.should_prune():
                    stop = True
                    break
        if stop:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            pruned += 1
        else:
            study.tell(trial, float(np.mean(scores)))
            seen.append((float(np.mean(scores)), int(t)))
    pick = max(seen)[1]
    return {"cost": cost, "pick": pick, "pruned": pruned}


def main() -> None:
    from pipeline.common import write_json
    from pipeline.machine import command, describe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=50, help="random trial orders (>= 20)")
    parser.add_argument("--metric", default="pr_auc")
    parser.add_argument("--curves", type=Path, default=RESULTS / "curves.csv")
    parser.add_argument("--patience", type=int, default=PATIENCE,
                        help="early stopping patience of the +es policies")
    parser.add_argument("--startup", type=int, default=STARTUP,
                        help="n_startup_trials of the median and percentile pruners (default: "
                             "2, params.yaml's hpo.pruner.n_startup_trials)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="n_warmup_steps of the median and percentile pruners (steps: folds, "
                             "or epochs with per-epoch reports)")
    parser.add_argument("--out", type=Path, default=RESULTS / "pruning_replay.json")
    parser.add_argument("--sizes", type=int, nargs="*", default=[4, 10],
                        help="smaller studies to replay too (default: 4, the CPU profile's "
                             "hpo.n_trials when the table was recorded, and 10, make quick's)")
    args = parser.parse_args()
    for name, least in (("orders", 1), ("patience", 1), ("startup", 0), ("warmup", 0)):
        if getattr(args, name) < least:
            parser.error(f"--{name} must be at least {least}")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    start = time.perf_counter()
    table, df = load_table(args.curves, args.metric)
    n_trials, n_folds, n_epochs = table.metric.shape
    full = table.full_value
    best = float(full.max())
    fold_noise = float(np.median(table.metric[:, :, -1].std(axis=1, ddof=1)))
    baseline = table.unpruned_cost(range(n_trials))
    rng = np.random.default_rng(2025)
    orders = [rng.permutation(n_trials) for _ in range(args.orders)]
    sizes = sorted({n_trials, *(k for k in args.sizes if 0 < k < n_trials)}, reverse=True)
    by_size = {}
    for size in sizes:
        print(f"\n{size}-trial studies ({args.orders} random draws of the table's trials):")
        by_size[size] = evaluate(table, [order[:size] for order in orders], fold_noise,
                                 args.patience, args.warmup, args.startup)
    results = by_size[n_trials]["policies"]
    chosen, chosen_available = by_size[n_trials]["chosen"], by_size[n_trials]["chosen_available"]
    seconds = table.train_s.sum() + table.eval_s.sum()
    out = {
        "policies": results,
        "fold_noise": fold_noise,
        "chosen": chosen,
        "chosen_available": chosen_available,
        # smaller studies drawn from the same table (the CPU profile's n_trials, make quick's)
        "by_study_size": {str(k): v for k, v in by_size.items() if k != n_trials},
        "table": {"trials": n_trials, "folds": n_folds, "epochs": n_epochs,
                  "metric": args.metric, "best_value": best,
                  "best_trial": int(df["trial"].unique()[int(full.argmax())]),
                  "median_value": float(np.median(full)),
                  "baseline_seconds": baseline,
                  "recorded_seconds": float(seconds),
                  "train_epoch_seconds_median": float(np.median(table.train_s[:, :, 1:])),
                  "eval_seconds_median": float(np.median(table.eval_s)),
                  "precision": sorted(df["precision"].unique())},
        "setup": {"orders": args.orders, "study_sizes": sizes,
                  "pruner_startup_trials": args.startup,
                  "early_stopping_patience": args.patience, "pruner_warmup_steps": args.warmup,
                  "curves": str(args.curves.name)},
        "seconds": time.perf_counter() - start,
        # the replay's own machine; the seconds it replays are curves.csv's (curves.json)
        "machine": describe(),
        "command": command(),
    }
    write_json(args.out, out)
    print(f"\nfold noise {fold_noise:.4f}; table best {best:.4f} (median trial "
          f"{np.median(full):.4f}); chosen: {chosen}; chosen among what params.yaml can "
          f"express: {chosen_available} ({out['seconds']:.0f} s)")
    for k, v in out["by_study_size"].items():
        print(f"{k}-trial studies: chosen {v['chosen']}; among what params.yaml can express: "
              f"{v['chosen_available']}")


if __name__ == "__main__":
    main()
