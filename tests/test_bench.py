"""The benchmarks' logic that decides defaults: the pruning replay (bench/pruning_replay.py,
which chooses hpo.pruner), the curves table's merge (bench/curves.py) and the end-to-end check's
arms and summary (bench/hpo_efficiency.py).

A constructed learning-curve table with known costs goes through the real Optuna pruners; the
cost, the pick and the refusals are checked against what the table implies.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    if str(ROOT / "bench") not in sys.path:  # as when run as a script: its folder is importable
        sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


replay_mod = _load("pruning_replay")
curves_mod = _load("curves")
efficiency_mod = _load("hpo_efficiency")

# trial x fold x epoch; 2 folds, 3 epochs. Trials 0 and 1 are good, 2..5 clearly worse on both
# folds from the first epoch; trial 1 peaks at epoch 2 (early stopping keeps that epoch).
VALUES = {0: [[0.5, 0.6, 0.7], [0.5, 0.6, 0.7]],
          1: [[0.4, 0.8, 0.6], [0.4, 0.8, 0.6]],
          **{t: [[0.1, 0.1, 0.1], [0.1, 0.1, 0.1]] for t in range(2, 6)}}
TRAIN_S, EVAL_S = 2.0, 3.0


def _table(path: Path, drop_last_row: bool = False) -> Path:
    rows = [{"trial": t, "fold": f, "epoch": e + 1, "val_pr_auc": v, "train_seconds": TRAIN_S,
             "eval_seconds": EVAL_S, "precision": "fp32"}
            for t, folds in VALUES.items() for f, curve in enumerate(folds)
            for e, v in enumerate(curve)]
    pd.DataFrame(rows[:-1] if drop_last_row else rows).to_csv(path, index=False)
    return path


def _policy(name: str):
    return next(p for p in replay_mod.policies() if p.name == name)


def test_replay_costs_and_picks_follow_the_table(tmp_path):
    table, _ = replay_mod.load_table(_table(tmp_path / "curves.csv"), "pr_auc")
    order = np.arange(len(VALUES))
    # no pruning, no early stopping: 3 training epochs + 1 validation per fold, every fold run
    full_fold = 3 * TRAIN_S + EVAL_S
    none = replay_mod.replay(table, _policy("none"), order, seed=0)
    assert none == {"cost": 12 * full_fold, "pick": 0, "pruned": 0}
    # median pruning per fold (2 startup trials): trials 2..5 stop after fold 0
    median = replay_mod.replay(table, _policy("fold_median"), order, seed=0)
    assert median["pruned"] == 4 and median["pick"] == 0
    assert median["cost"] == pytest.approx((4 + 4) * full_fold)
    # median pruning per epoch validates every epoch and stops trials 2..5 after their first
    median_epoch = replay_mod.replay(table, _policy("epoch_median"), order, seed=0)
    assert median_epoch["pruned"] == 4 and median_epoch["pick"] == 0
    assert median_epoch["cost"] == pytest.approx(2 * 2 * 3 * (TRAIN_S + EVAL_S)
                                                 + 4 * (TRAIN_S + EVAL_S))
    # early stopping (patience 1) validates every epoch; trial 1 stops after epoch 3 (no gain)
    # and scores its best epoch, 0.8, so the policy picks it
    es = replay_mod.replay(table, _policy("none+es"), order, seed=0)
    assert es["pick"] == 1 and es["pruned"] == 0
    stopped_early = 2 * (TRAIN_S + EVAL_S)  # trials 2..5: epoch 2 brings nothing
    assert es["cost"] == pytest.approx(4 * 3 * (TRAIN_S + EVAL_S) + 8 * stopped_early)
    # regret is measured on the full protocol: trial 1's last epoch (0.6) is worse than trial 0's
    assert table.full_value[0] - table.full_value[1] == pytest.approx(0.1)


def test_replay_warmup_steps_match_the_stage(tmp_path):
    table, _ = replay_mod.load_table(_table(tmp_path / "curves.csv"), "pr_auc")
    order = np.arange(len(VALUES))
    policy = {p.name: p for p in replay_mod.policies(warmup=2)}
    # per epoch, steps 1, 2, ...: 2 warmup steps let trials 2..5 run epochs 1 and 2 of fold 0
    median_epoch = replay_mod.replay(table, policy["epoch_median"], order, seed=0)
    assert median_epoch["pruned"] == 4
    assert median_epoch["cost"] == pytest.approx(2 * 2 * 3 * (TRAIN_S + EVAL_S)
                                                 + 4 * 2 * (TRAIN_S + EVAL_S))
    # per fold the stage's steps are fold indexes 0, 1: warmup 1 protects fold 0, and with 2
    # folds nothing is left to prune (the last fold never is)
    one = {p.name: p for p in replay_mod.policies(warmup=1)}
    none = replay_mod.replay(table, policy["none"], order, seed=0)
    assert replay_mod.replay(table, one["fold_median"], order, seed=0) == none


def test_replay_startup_trials_run_in_full(tmp_path):
    table, _ = replay_mod.load_table(_table(tmp_path / "curves.csv"), "pr_auc")
    order = np.arange(len(VALUES))
    full_fold = 3 * TRAIN_S + EVAL_S
    for startup, pruned in ((2, 4), (5, 1)):  # trials 0..startup-1 complete every fold
        policy = {p.name: p for p in replay_mod.policies(startup=startup)}["fold_percentile25"]
        run = replay_mod.replay(table, policy, order, seed=0)
        assert run["pruned"] == pruned
        assert run["cost"] == pytest.approx((12 - pruned) * full_fold)
    # per epoch: trials 0..4 validate all 6 epochs, trial 5 is pruned after its first
    policy = {p.name: p for p in replay_mod.policies(startup=5)}["epoch_percentile25"]
    run = replay_mod.replay(table, policy, order, seed=0)
    assert run["pruned"] == 1
    assert run["cost"] == pytest.approx((5 * 6 + 1) * (TRAIN_S + EVAL_S))


def test_replay_refuses_an_incomplete_table(tmp_path):
    path = _table(tmp_path / "curves.csv", drop_last_row=True)
    with pytest.raises(SystemExit, match="curves.csv: 35 rows, expected 36"):
        replay_mod.load_table(path, "pr_auc")


def test_curves_refuse_to_merge_rows_of_another_setup(tmp_path):
    path = tmp_path / "curves.csv"
    rows = pd.DataFrame({"trial": [0, 0], "fold": [0, 0], "epoch": [1, 2], "setup": ["a", "a"]})
    rows.to_csv(path, index=False)
    merged = curves_mod.merge(rows.assign(trial=1), "a", path)
    assert list(merged["trial"]) == [0, 0, 1, 1]
    with pytest.raises(SystemExit, match="another setup"):
        curves_mod.merge(rows.assign(setup="b"), "b", path)


def test_curves_defaults_recompute_the_committed_table():
    # make bench runs curves.py with its defaults: they must be the setup the table was recorded
    # with, or the merge refuses the committed rows
    *_, digest = curves_mod.table_setup(curves_mod.LAYERS, curves_mod.NEGATIVES,
                                        curves_mod.MAX_LR)
    assert set(pd.read_csv(curves_mod.CURVES)["setup"]) == {digest}
    with pytest.raises(SystemExit, match="--max-learning-rate 1e-06: need >= 0"):
        curves_mod.table_setup(curves_mod.LAYERS, curves_mod.NEGATIVES, 1e-6)


def test_hpo_efficiency_arms_differ_only_in_pruner_and_early_stopping(tmp_path):
    from pipeline.params import load_params, parse_params

    default = load_params(ROOT / "params.yaml")
    arms = {arm: parse_params(efficiency_mod.study_params(3, arm, 7, 1, "epoch", 2, tmp_path))
            for arm in efficiency_mod.ARMS}
    assert {a: (p.hpo.pruner.name, p.train.early_stopping_patience) for a, p in arms.items()} == {
        "none": ("none", 0), "early_stopping": ("none", 2),
        "pruning": (default.hpo.pruner.name, 0), "both": (default.hpo.pruner.name, 2)}
    for p in arms.values():
        assert (p.seed, p.hpo.n_trials, p.model.num_hidden_layers) == (3, 7, 1)
        assert p.hpo.pruner.report == "epoch"
        assert p.paths.study_db.startswith(str(tmp_path))  # outputs never touch the checkout
        assert p.paths.posts == str(ROOT / default.paths.posts)


def test_hpo_efficiency_summary_pairs_each_arm_with_the_none_arm_of_its_seed():
    import argparse

    # best value and wall-clock per (seed, arm); the runs come in seed-major order as in main()
    best = {1: {"none": 0.50, "early_stopping": 0.52, "pruning": 0.50, "both": 0.49},
            2: {"none": 0.60, "early_stopping": 0.60, "pruning": 0.56, "both": 0.55}}
    wall = {"none": 100, "early_stopping": 150, "pruning": 60, "both": 50}
    runs = [{"seed": seed, "arm": arm, "wall_seconds": wall[arm] * seed, "fold_fits_run": 4,
             "epochs_run": 10, "n_pruned": int(arm in ("pruning", "both")),
             "best_value": value, "best_fold_std": 0.01 * seed, "pruner": "percentile"}
            for seed, arms in best.items() for arm, value in arms.items()]
    args = argparse.Namespace(seeds=2, trials=10, layers=1, report="epoch", patience=1,
                              out=efficiency_mod.OUT)
    # the none arm's runs come as seed 2, 1, every other arm's as 1, 2: pairing by position fails
    runs = [runs[4], *runs[:4], *runs[5:]]
    result = efficiency_mod.summary(runs, args)
    arms = result["arms"]
    assert arms["both"]["best_value_delta_by_seed"] == pytest.approx({"1": -0.01, "2": -0.05})
    assert arms["both"]["best_value_delta"] == pytest.approx(-0.03)
    assert arms["early_stopping"]["best_value_delta_by_seed"] == pytest.approx(
        {"1": 0.02, "2": 0.0})
    assert arms["early_stopping"]["wall_saved_fraction"] == pytest.approx(-0.5)
    assert arms["both"]["wall_saved_fraction"] == pytest.approx(0.5)
    assert arms["pruning"]["n_pruned"] == 2 and arms["none"]["fold_fits_run"] == 8
    assert result["setup"]["seeds"] == [1, 2] and result["fold_noise"] == pytest.approx(0.015)
    assert result["command"].endswith("--report epoch --patience 1")


gpu_study_mod = _load("gpu_study")


def test_gpu_study_runs_the_full_profile_shrunk_to_its_arguments(tmp_path):
    from pipeline.params import parse_params

    args = argparse.Namespace(trials=10, folds=2, max_epochs=2, device="cuda")
    params = parse_params(gpu_study_mod.study_params(tmp_path, tmp_path / "model", args))
    full = yaml.safe_load((ROOT / "profiles" / "full.yaml").read_text())
    assert (params.hpo.n_jobs, params.hpo.parallelism) == ("auto", full["hpo.parallelism"])
    assert (params.hpo.pruner.name, params.hpo.pruner.report) == ("percentile", "epoch")
    assert params.train.negatives_per_positive == full["train.negatives_per_positive"]
    epochs = params.hpo.search_space["num_train_epochs"]
    assert (epochs.low, epochs.high) == (2, 2)  # the profile's 3..8, capped at --max-epochs
    assert (params.prepare.n_folds, params.hpo.n_trials) == (2, 10)
    assert params.model.name == str(tmp_path / "model")
    assert all(Path(p).is_relative_to(tmp_path)
               for p in dataclasses.asdict(params.paths).values())


def test_gpu_study_compares_its_rates_with_the_projection():
    jobs = json.loads((ROOT / "bench" / "results" / "gpu_jobs.json").read_text())
    projection = json.loads((ROOT / "bench" / "results" / "gpu_projection.json").read_text())
    n = projection["inputs"]["processes"]

    def table(run: str, jobs_n: int) -> dict[int, float]:
        return {int(b): c["samples_per_second"] / jobs_n
                for b, c in jobs["runs"][run]["batches"].items()}

    mps = table(f"mps_jobs{n}", n)
    samples = {8: 1000.0, 32: 3000.0}
    # batch 8 at half the table's rate, batch 32 at its rate: 1000/(r/2) + 3000/r32 against
    # 1000/r + 3000/r32
    found = {"n_jobs": n, "train_samples_by_batch": samples,
             "per_process_samples_per_second": {8: mps[8] / 2, 32: mps[32]}}
    expected = (1000 / mps[8] + 3000 / mps[32]) / (2000 / mps[8] + 3000 / mps[32])
    out = gpu_study_mod.against_projection(found, mps=True)
    assert out["vs_projection"] == pytest.approx(expected)
    assert out["projected_50_trial_hours"] == pytest.approx(
        projection["projected_hours"]["schedule"] / expected)
    # without MPS: the table's run without it, and the projection's arm without it
    plain = table(f"jobs{n}", n)
    out = gpu_study_mod.against_projection(
        {**found, "per_process_samples_per_second": plain}, mps=False)
    assert out["vs_projection"] == pytest.approx(1.0)
    assert out["projected_50_trial_hours"] == pytest.approx(
        projection["projected_hours"]["schedule_no_mps"])
    # another number of processes: compared in rate, not in the projection's hours
    two = table("jobs2", 2)
    out = gpu_study_mod.against_projection(
        {**found, "n_jobs": 2, "per_process_samples_per_second": two}, mps=False)
    assert out["vs_projection"] == pytest.approx(1.0) and out["projected_50_trial_hours"] is None
    # no measured table for that many processes: nothing to compare
    assert gpu_study_mod.against_projection({**found, "n_jobs": 3}, mps=False)[
        "vs_projection"] is None
