"""The hpo stage with a real SQLite study and a real MLflow store, on a tiny model."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow import MlflowClient

from conftest import hpo_study as _study
from conftest import with_hpo as _hpo
from pipeline import hpo, prepare
from pipeline.common import workspace_root
from pipeline.engine import Encoded
from pipeline.errors import StageError
from pipeline.params import ParamsError, SearchParam, load_params
from pipeline.storage import storage_url
from pipeline.study import INDEX, make_pruner, study_definition, study_name, suggest
from pipeline.tracking import tracking_uri
from pipeline.trial import CrossValidation, TrialResult, TrialTask, _Run


def _runs(params) -> list:
    client = MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name(params.hpo.mlflow_experiment)
    return client.search_runs([experiment.experiment_id], max_results=1000)


def _rows(path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _add_finished_trials(params, values: list[float], steps=(0, 1)) -> None:
    """Finished trials scoring ``value`` on both folds (reported at ``steps``), in the study the
    hpo stage will open."""
    definition = study_definition(params, hashlib.sha256(
        Path(params.paths.pairs).read_bytes()).hexdigest())
    study = optuna.create_study(storage=storage_url(params), direction="maximize",
                                study_name=study_name(params.hpo.study_prefix, definition))
    for index, value in enumerate(values):
        study.add_trial(optuna.trial.create_trial(
            value=value, intermediate_values={step: value for step in steps},
            user_attrs={INDEX: index, "hyperparameters": {"num_train_epochs": 1},
                        "fold0": {"pr_auc": value}, "fold1": {"pr_auc": value}}))


@pytest.fixture
def params(workdir):
    p = load_params()
    prepare.run(p)
    return p


def test_suggest_reads_the_search_space_and_skips_conditional_entries(params):
    space = params.hpo.search_space
    study = optuna.create_study()
    study.enqueue_trial({"loss_function": "weighted_ce"})
    study.enqueue_trial({"loss_function": "focal"})
    ce = suggest(study.ask(), space)
    trial = study.ask()
    focal = suggest(trial, space)
    assert ce.loss_function == "weighted_ce" and "focal_gamma" not in ce.as_dict()
    assert focal.loss_function == "focal" and 1.0 <= focal.focal_gamma <= 3.0
    # fixed values are used, not searched
    assert focal.num_train_epochs == 1 and "num_train_epochs" not in trial.params


def test_study_name_is_a_fingerprint_of_the_objective(params):
    name = study_name("s", study_definition(params, "abc"))
    assert name == study_name("s", study_definition(params, "abc"))
    assert name == study_name("s", study_definition(_hpo(params, n_trials=99, n_jobs="auto",
                                                                 storage="sqlite:///x"), "abc"))
    space = dict(params.hpo.search_space)
    space["num_train_epochs"] = SearchParam("num_train_epochs", "fixed", value=2)
    changed = [
        _hpo(params, search_space=space),
        _hpo(params, metric="roc_auc"),
        _hpo(params, fold_aggregation="median"),
        _hpo(params, pruner=replace(params.hpo.pruner, name="none")),
        _hpo(params, pruner=replace(params.hpo.pruner, name="median")),
        _hpo(params, pruner=replace(params.hpo.pruner, report="epoch")),
        _hpo(params, sampler=replace(params.hpo.sampler, name="random")),
        _hpo(params, parallelism=2),
        replace(params, model=replace(params.model, max_length=32)),
        replace(params, prepare=replace(params.prepare, n_folds=3)),
        replace(params, seed=params.seed + 1),
    ]
    for other in changed:
        assert study_name("s", study_definition(other, "abc")) != name
    assert study_name("s", study_definition(params, "abd")) != name
    # the percentile defines only a percentile pruner's study; no setting but its name the
    # absent pruner's
    def named(**changes):
        return study_name("s", study_definition(
            _hpo(params, pruner=replace(params.hpo.pruner, **changes)), "abc"))

    assert named(name="median") == named(name="median", percentile=10.0)
    assert named(name="percentile") != named(name="percentile", percentile=10.0)
    assert named(name="none") == named(name="none", report="epoch", n_startup_trials=9)


@pytest.mark.slow
def test_run_writes_outputs_logs_the_run_tree_and_resumes(params):
    metrics = hpo.run(params)
    assert metrics["n_complete"] + metrics["n_pruned"] == 2
    assert metrics["fold_fits_possible"] == 4 and 2 <= metrics["fold_fits_run"] <= 4
    for key in ("best_value", "best_trial", "best_fold_mean", "best_fold_std", "n_failed"):
        assert key in metrics
    trials = _rows(params.paths.trials)
    folds = _rows(params.paths.fold_metrics)
    assert [t["number"] for t in trials] == ["0", "1"]
    assert len(folds) == metrics["fold_fits_run"]
    assert {"macro_f1", "pos_f1", "roc_auc", "pr_auc", "seed"} <= set(folds[0])
    summary = json.loads(Path(params.paths.study_summary).read_text())
    assert summary["best_trial"]["number"] == metrics["best_trial"]
    assert "importances" in json.loads(Path(params.paths.importance).read_text())

    # the Optuna side: per-fold metrics, seeds, and the MLflow run id of each trial
    study = _study(params)
    for t in study.trials:
        assert t.user_attrs["fold0"]["seed"] > 0 and "mlflow_run_id" in t.user_attrs
        assert set(t.intermediate_values) <= {0, 1} and 0 in t.intermediate_values

    # the MLflow side: study > trial > fold, statuses, and trial number <-> run id both ways
    assert Path(tracking_uri().removeprefix("sqlite:///")) == workspace_root() / "mlflow.db"
    runs = {r.info.run_id: r for r in _runs(params)}
    parent = [r for r in runs.values() if "mlflow.parentRunId" not in r.data.tags]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert parent[0].data.tags["optuna.study_name"] == study.study_name
    assert "best_value" in parent[0].data.metrics
    for t in study.trials:
        run = runs[t.user_attrs["mlflow_run_id"]]
        assert run.data.tags["optuna.trial_number"] == str(t.number)
        assert run.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
        assert run.info.status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}[t.state.name]
        fold_runs = [r for r in runs.values()
                     if r.data.tags.get("mlflow.parentRunId") == run.info.run_id]
        assert len(fold_runs) == len([k for k in t.user_attrs if k.startswith("fold")])
        history = MlflowClient(tracking_uri()).get_metric_history(fold_runs[0].info.run_id,
                                                                  "train_loss")
        assert [m.step for m in history] == [1]  # one point per epoch

    # resume with a larger budget: only the missing trial runs, the parent run is reused
    before = {t.number: t.datetime_start for t in study.trials}
    metrics3 = hpo.run(_hpo(params, n_trials=3))
    study = _study(params)
    assert len(study.trials) == 3
    assert {t.number: t.datetime_start for t in study.trials if t.number < 2} == before
    assert metrics3["n_complete"] + metrics3["n_pruned"] == 3
    runs = _runs(params)
    assert sum("mlflow.parentRunId" not in r.data.tags for r in runs) == 1
    # asking for fewer trials again reports exactly the first two, as the first run did
    assert hpo.run(params) == metrics
    assert len(_study(params).trials) == 3


@pytest.mark.slow
def test_pruning_is_fed_once_per_fold(params):
    params = _hpo(params, pruner=replace(params.hpo.pruner, n_startup_trials=1))
    # A finished trial that scored a perfect 1.0 on fold 0: any real trial is below the median
    # at step 0 and must be pruned there, skipping fold 1.
    _add_finished_trials(params, [1.0])
    metrics = hpo.run(params)
    pruned = _study(params).trials[1]
    assert pruned.state.name == "PRUNED" and list(pruned.intermediate_values) == [0]
    assert metrics["n_pruned"] == 1 and metrics["fold_fits_run"] == 3
    run = MlflowClient(tracking_uri()).get_run(pruned.user_attrs["mlflow_run_id"])
    value = pruned.intermediate_values[0]
    assert run.info.status == "KILLED"
    how = f"{params.hpo.fold_aggregation} {params.hpo.metric}"
    assert run.data.tags["pruned_reason"] == f"{how} {value:.4f} after fold 0"


@pytest.mark.slow
def test_per_epoch_reports_prune_inside_a_fold(params):
    # 2 epochs per fold, a report after each (steps 1..4); a finished trial scored a perfect 1.0
    # at every step, so a real trial is pruned at its first epoch, half-way through fold 0.
    space = dict(params.hpo.search_space)
    space["num_train_epochs"] = SearchParam("num_train_epochs", "fixed", value=2)
    params = _hpo(params, search_space=space, n_trials=2,
                  pruner=replace(params.hpo.pruner, n_startup_trials=1, report="epoch"))
    _add_finished_trials(params, [1.0], steps=(1, 2, 3, 4))
    metrics = hpo.run(params)
    pruned = _study(params).trials[1]
    assert pruned.state.name == "PRUNED" and list(pruned.intermediate_values) == [1]
    assert pruned.user_attrs["fold0"]["epochs_run"] == 1 and "fold1" not in pruned.user_attrs
    assert metrics["n_pruned"] == 1 and metrics["epochs_run"] == 1  # the added trial has none
    runs = {r.info.run_name: r for r in _runs(params)}
    fold_run = runs["trial-1-fold-0"]
    assert fold_run.info.status == "KILLED"
    assert runs["trial-1"].data.tags["pruned_reason"] == (
        f"{params.hpo.fold_aggregation} {params.hpo.metric} "
        f"{pruned.intermediate_values[1]:.4f} after fold 0 epoch 1")
    assert f"val_{params.hpo.metric}" in fold_run.data.metrics  # epoch 1 was validated
    rows = [r for r in _rows(params.paths.fold_metrics) if r["trial"] == "1"]
    assert [(r["fold"], r["state"], r["epochs_run"]) for r in rows] == [("0", "PRUNED", "1")]


@pytest.mark.slow
def test_percentile_pruner_prunes_a_trial_outside_the_kept_percentile(params):
    # Finished trials scored 1.0, 0.0 and 0.0 on fold 0: a real trial beats their median (0.0),
    # so the median pruner would keep it, but a percentile pruner keeping the top 10% prunes it.
    pruner = replace(params.hpo.pruner, name="percentile", percentile=10.0, n_startup_trials=1)
    params = _hpo(params, pruner=pruner)
    assert isinstance(make_pruner(params), optuna.pruners.PercentilePruner)
    _add_finished_trials(params, [1.0, 0.0, 0.0])
    metrics = hpo.run(_hpo(params, n_trials=4))
    trial = _study(params).trials[3]
    assert 0.0 < trial.intermediate_values[0] < 1.0  # above the median, below the top 10%
    assert trial.state.name == "PRUNED" and list(trial.intermediate_values) == [0]
    assert metrics["n_pruned"] == 1


@pytest.mark.parametrize("report", ["fold", "epoch"])
def test_a_non_finite_validation_score_stops_the_trial_and_says_where(params, report):
    # A trial's own bookkeeping (pipeline/trial.py) fed a NaN score: per-epoch reports stop at
    # the epoch and name it; per-fold reports only log epochs and check the fold's score.
    params = _hpo(params, pruner=replace(params.hpo.pruner, report=report))
    labels = np.array([0, 1, 0, 1])
    enc = Encoded([np.array([1])] * 4, None, labels, np.ones(4, dtype=np.int64), 0)
    folds = [(np.array([2, 3]), np.array([0, 1])), (np.array([0, 1]), np.array([2, 3]))]
    hp = suggest(optuna.create_study().ask(), params.hpo.search_space)
    run = _Run(CrossValidation(params, enc, folds), TrialTask(0, hp), TrialResult(0))
    metric, nan = params.hpo.metric, float("nan")
    epoch = {"train_loss": 0.5, f"val_{metric}": nan}
    if report == "epoch":
        with pytest.raises(FloatingPointError, match=f"^fold 0 epoch 1: {metric} is not finite"):
            run.on_epoch(0, 1, epoch)
        return
    assert run.on_epoch(0, 1, epoch) is False

    class Fit:  # what engine.fine_tune returns, as far as a fold's bookkeeping reads it
        metrics = {"macro_f1": nan, "pos_f1": nan, "roc_auc": nan, "pr_auc": nan}
        epochs_run = best_epoch = 1
        train_samples, train_seconds, eval_seconds, padding_fraction = 2, 1.0, 0.1, 0.0
        val_probs, stopped = np.array([0.2, 0.7]), False

    with pytest.raises(FloatingPointError, match=f"^fold 0: {metric} is not finite"):
        run.fold(0, 1, Fit(), 0.0)


@pytest.mark.slow
def test_a_failing_trial_fails_with_its_reason_and_never_prunes(params):
    # A learning rate no validator would let through: the loss diverges inside the trial.
    space = dict(params.hpo.search_space)
    space["learning_rate"] = SearchParam("learning_rate", "fixed", value=1e30)
    broken = _hpo(params, search_space=space, max_failures=0)
    with pytest.raises(StageError, match="more than hpo.max_failures=0"):
        hpo.run(broken)
    definition = study_definition(broken, hashlib.sha256(
        Path(params.paths.pairs).read_bytes()).hexdigest())
    study = optuna.load_study(study_name=study_name("redsm5", definition),
                              storage=storage_url(params))
    (trial,) = study.trials
    assert trial.state.name == "FAIL"
    assert "non-finite loss at step" in trial.user_attrs["fail_reason"]
    run = MlflowClient(tracking_uri()).get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "non-finite loss" in run.data.tags["fail_reason"]


def test_an_unloadable_model_is_a_params_error(params):
    broken = replace(params, model=replace(params.model, name="no-such-model-dir"))
    with pytest.raises(ParamsError, match="model.name: cannot load 'no-such-model-dir'"):
        hpo.run(broken)
