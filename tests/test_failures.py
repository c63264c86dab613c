"""Failures inside a trial, storages, credentials (real SQLite and journal storages, MLflow)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from conftest import with_hpo as _hpo
from pipeline import hpo, prepare
from pipeline.common import workspace_root
from pipeline.engine import ENCODE_STATS
from pipeline.params import ParamsError, load_params
from pipeline.storage import ENV, StudyStorage, redact
from pipeline.tracking import tracking_uri


@pytest.fixture
def params(workdir):
    p = load_params()
    prepare.run(p)
    return _hpo(p, max_failures=1)


def _study(params) -> optuna.Study:
    name = json.loads(Path(params.paths.study_summary).read_text())["study_name"]
    return optuna.load_study(study_name=name, storage=f"sqlite:///{Path(params.paths.study_db)}")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "reason", "isolate"),
    [
        ("oom", "OutOfMemoryError: CUDA out of memory (simulated", True),
        ("oom", "OutOfMemoryError: CUDA out of memory (simulated", False),
        ("nan", "FloatingPointError: non-finite loss at step 1", True),
        ("nan", "FloatingPointError: non-finite loss at step 1", False),
        ("error", "RuntimeError: injected failure", True),
        ("error", "RuntimeError: injected failure", False),
        # without isolation a kill ends the stage itself: that is test_workers' kill-resume
        ("kill", "the trial's process died with exit code -9", True),
    ],
)
def test_a_failing_trial_fails_and_the_study_goes_on(params, monkeypatch, fault, reason,
                                                     isolate):
    monkeypatch.setenv("PIPELINE_FAULT", f"{fault}@trial=0")
    metrics = hpo.run(_hpo(params, isolate_trials=isolate))
    assert metrics["n_complete"] + metrics["n_pruned"] == 2 and metrics["n_failed"] == 1
    study = _study(params)
    failed = study.trials[0]
    assert failed.state.name == "FAIL" and reason in failed.user_attrs["fail_reason"]
    assert [t.state.name for t in study.trials[1:]] in (["COMPLETE", "COMPLETE"],
                                                        ["COMPLETE", "PRUNED"])
    client = MlflowClient(tracking_uri())
    run = client.get_run(failed.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and reason in run.data.tags["fail_reason"]
    folds = client.search_runs([run.info.experiment_id],
                               f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    if fault == "kill":  # the process died with its folds: nothing of them came back
        assert not folds
    else:  # the fold it failed in is logged, FAILED
        assert folds and all(f.info.status == "FAILED" for f in folds)


@pytest.mark.slow
def test_the_study_is_tokenised_once(params):
    before = ENCODE_STATS["calls"]
    metrics = hpo.run(params)
    assert metrics["fold_fits_run"] >= 3  # several trials x folds ...
    assert ENCODE_STATS["calls"] - before == 1  # ... one tokenisation


@pytest.mark.slow
def test_journal_storage_and_its_snapshot(params, workdir):
    journal = workdir / "artifacts" / "hpo" / "study.journal"
    metrics = hpo.run(_hpo(params, storage=f"journal:{journal}"))
    assert journal.is_file()
    snapshot = _study(params)  # paths.study_db is a SQLite copy of the journal's study
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in snapshot.trials) == 2
    assert snapshot.best_value == pytest.approx(metrics["best_value"], abs=1e-6)


def test_storage_from_the_environment_and_no_password_in_params(params, monkeypatch, workdir):
    with pytest.raises(ParamsError, match=f"contains a password; set the environment variable "
                                          f"{ENV}"):
        _hpo(params, storage="postgresql://hpo:s3cret@db.example/hpo")
    # by default the workspace's store, at its root
    assert StudyStorage(params).url == f"sqlite:///{workspace_root() / 'optuna.db'}"
    monkeypatch.setenv(ENV, f"sqlite:///{workdir / 'elsewhere.db'}")
    assert StudyStorage(params).url.endswith("elsewhere.db")
    assert redact("postgresql://hpo:s3cret@db/hpo") == "postgresql://hpo:***@db/hpo"


def test_a_snapshot_seeds_a_fresh_store_and_its_running_trials_fail(monkeypatch, workdir):
    # a snapshot (paths.study_db) taken while another machine's worker still ran a trial
    snapshot = workdir / "snapshot.db"
    taken = optuna.create_study(study_name="s", storage=f"sqlite:///{snapshot}")
    taken.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.5))
    taken.ask()  # RUNNING in the snapshot, its worker out of reach
    monkeypatch.setenv(ENV, f"journal:{workdir / 'fresh.journal'}")
    store = StudyStorage(load_params())
    assert not store.seed("other", snapshot)  # a study the snapshot does not hold
    assert store.seed("s", snapshot)
    seeded = optuna.load_study(study_name="s", storage=store.optuna).trials
    assert [t.state.name for t in seeded] == ["COMPLETE", "FAIL"]
    assert seeded[1].user_attrs["fail_reason"] == "running when the snapshot was taken"
    assert not store.seed("s", snapshot)  # the store has it now: left alone
    assert len(optuna.load_study(study_name="s", storage=store.optuna).trials) == 2
