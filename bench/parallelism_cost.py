"""What ``hpo.parallelism`` costs in sample efficiency: best value after N trials, L = 1 vs more.

Trial k of a study with parallelism L is suggested from the trials that ended by its start on the
study's virtual clock (L virtual workers) and those still running then (the constant liar), by
the stage's own code (``pipeline.study.Ledger`` and ``suggest_from_view``, the TPE settings of
``profiles/full.yaml``); trials last 1 to 3 units, drawn per trial. Its value
comes from a surrogate of the recorded learning-curve table (``bench/results/curves.csv``, 30
trials of a random search, MiniLM on a CPU): a Gaussian process fitted to each trial's value under
the full protocol (mean over folds of the last epoch's PR-AUC) on the hyperparameters that
varied, plus noise of the table's fold noise / sqrt(folds), seeded by (seed, trial). Nothing is
trained.

For every seed, studies at every L see the same surrogate and noise; ``regret_vs_sequential``
is, paired by seed, the surrogate value of L=1's best-observed trial minus L's (positive: L
found worse), in units of fold noise too. Pruning is not simulated here (bench/gpu_projection.py
charges what the lag does to pruning in hours).

Writes ``bench/results/parallelism_cost.json``.
Usage: ``python bench/parallelism_cost.py [--seeds 20] [--trials 50] [--lags 1 2 4 8]``
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FEATURES = ["log_lr", "warmup_ratio", "weight_decay", "focal", "focal_gamma", "focal_alpha"]


def features(hp: dict) -> list[float]:
    focal = hp["loss_function"] == "focal"
    return [np.log10(hp["learning_rate"]), hp["warmup_ratio"], hp["weight_decay"], float(focal),
            hp.get("focal_gamma", 2.0) if focal else 2.0,
            hp.get("focal_alpha", 0.3) if focal else 0.3]


def surrogate(curves: Path):
    """A GP on the table's trials (value under the full protocol) and the table's fold noise."""
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

    df = pd.read_csv(curves)
    last = df[df["epoch"] == df["epoch"].max()]
    per_trial = last.groupby("trial")
    values = per_trial["val_pr_auc"].mean()
    fold_noise = float(np.median(per_trial["val_pr_auc"].std(ddof=1)))
    first = df.groupby("trial").first()
    x = np.array([features(row) for _, row in first.iterrows()])
    lo, hi = x.min(axis=0), x.max(axis=0)
    scale = np.where(hi > lo, hi - lo, 1.0)
    kernel = ConstantKernel() * RBF(length_scale=np.ones(len(FEATURES))) + WhiteKernel()
    gp = GaussianProcessRegressor(kernel, normalize_y=True, random_state=0)
    gp.fit((x - lo) / scale, values.to_numpy())
    n_folds = df["fold"].nunique()

    def predict(hp: dict) -> float:
        return float(gp.predict((np.array([features(hp)]) - lo) / scale)[0])

    space = {"learning_rate": (float(first["learning_rate"].min()),
                               float(first["learning_rate"].max()))}
    return predict, fold_noise, n_folds, space, len(first)


def study_params(space: dict):
    """params.yaml with profiles/full.yaml's sampler and the table's search space."""
    from pipeline.params import YamlLoader, parse_params

    raw = yaml.load((ROOT / "params.yaml").read_text(encoding="utf-8"), Loader=YamlLoader)
    full = yaml.load((ROOT / "profiles" / "full.yaml").read_text(encoding="utf-8"),
                     Loader=YamlLoader)
    raw["hpo"]["sampler"]["n_startup_trials"] = full["hpo.sampler.n_startup_trials"]
    low, high = space["learning_rate"]
    raw["hpo"]["search_space"].update(
        learning_rate={"type": "float", "low": low, "high": high, "log": True},
        warmup_ratio={"type": "float", "low": 0.0, "high": 0.1},
        weight_decay={"type": "float", "low": 0.0, "high": 0.05})
    raw["hpo"]["parallelism"] = 8
    return parse_params(raw)


def run_study(params, predict, noise: float, seed: int, lag: int, n_trials: int) -> list[float]:
    """Surrogate values of each trial of one study, and what the study observed. Each trial's
    view comes from the stage's own Ledger (pipeline/study.py) on ``lag`` virtual workers, the
    trials lasting 1 to 3 units (drawn per trial: lengths differ, as pruning makes them)."""
    from dataclasses import replace

    from pipeline.study import COST, INDEX, Ledger, suggest_from_view

    params = replace(params, seed=seed)
    attempts: dict[int, list[optuna.trial.FrozenTrial]] = {}
    true, observed = [], []
    rng = np.random.default_rng(seed)
    for k in range(n_trials):
        view = Ledger(attempts, max_retries=0, parallelism=lag).view(k)
        hp, values, distributions = suggest_from_view(params, k, view, ["maximize"])
        mean = predict(hp.as_dict())
        value = mean + noise * rng.standard_normal()
        true.append(mean)
        observed.append(value)
        attempts[k] = [optuna.trial.create_trial(
            params=values, distributions=distributions, value=value,
            user_attrs={INDEX: k, COST: float(rng.integers(1, 4))})]
    return true, observed


def main() -> None:
    from pipeline.machine import command, describe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--lags", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--curves", type=Path, default=RESULTS / "curves.csv")
    parser.add_argument("--out", type=Path, default=RESULTS / "parallelism_cost.json")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    start = time.perf_counter()
    predict, fold_noise, n_folds, space, n_table = surrogate(args.curves)
    noise = fold_noise / np.sqrt(n_folds)
    params = study_params(space)
    checkpoints = [n for n in (10, 20, 30, 50, args.trials) if n <= args.trials]
    checkpoints = sorted(set(checkpoints))
    picked: dict[int, np.ndarray] = {}  # lag -> seeds x checkpoints: true value of the pick
    for lag in args.lags:
        rows = []
        for seed in range(args.seeds):
            true, observed = run_study(params, predict, noise, 1000 + seed, lag, args.trials)
            rows.append([true[int(np.argmax(observed[:n]))] for n in checkpoints])
        picked[lag] = np.array(rows)
        print(f"parallelism {lag}: median value of the pick after "
              + ", ".join(f"{n}: {v:.4f}" for n, v in
                          zip(checkpoints, np.median(picked[lag], axis=0), strict=True)),
              flush=True)
    base = picked[args.lags[0]]
    out = {
        "machine": describe(), "command": command(),
        "setup": {"seeds": args.seeds, "trials": args.trials, "curves": args.curves.name,
                  "table_trials": n_table, "fold_noise": fold_noise, "noise": noise,
                  "sampler": "TPE, profiles/full.yaml's n_startup_trials, multivariate, group, "
                             "constant liar; suggested by pipeline.study.suggest_from_view",
                  "checkpoints": checkpoints, "baseline_parallelism": args.lags[0]},
        "parallelism": {},
        "seconds": time.perf_counter() - start,
    }
    for lag, values in picked.items():
        regret = base - values
        out["parallelism"][str(lag)] = {
            "value_median": dict(zip(map(str, checkpoints),
                                     np.median(values, axis=0).tolist(), strict=True)),
            "regret_vs_sequential_median": dict(zip(map(str, checkpoints),
                                                    np.median(regret, axis=0).tolist(),
                                                    strict=True)),
            "regret_vs_sequential_mean": dict(zip(map(str, checkpoints),
                                                  regret.mean(axis=0).tolist(), strict=True)),
            "regret_in_fold_noise_mean": dict(zip(map(str, checkpoints),
                                                  (regret.mean(axis=0) / fold_noise).tolist(),
                                                  strict=True)),
        }
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"fold noise {fold_noise:.4f}; wrote {args.out} "
          f"({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
