"""Real processes and real kills: crash-resume through `dvc repro` and `dvc exp run`, workers
sharing one study on a journal file and on PostgreSQL, and a worker killed mid-trial."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from sqlalchemy.exc import OperationalError

from conftest import BIN, dump_yaml, load_yaml, run
from pipeline import hpo
from pipeline.params import load_params
from pipeline.study import INDEX

pytestmark = pytest.mark.slow


def _popen(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    for leaky in ("DVC_ROOT", "MLFLOW_TRACKING_URI"):
        full_env.pop(leaky, None)
    full_env.update(env or {})
    return subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _store(repo: Path) -> str:
    """The workspace's study store, as its params.yaml names it. Read it before a `dvc exp run`
    starts: the experiment rewrites params.yaml in the workspace while it runs."""
    return f"sqlite:///{repo / load_yaml(repo / 'params.yaml')['paths']['study_store']}"


def _study(repo: Path, storage: str | None = None) -> optuna.Study:
    """The study as it runs: in the workspace's store (or ``storage``)."""
    url = storage or _store(repo)
    names = optuna.get_all_study_names(url)
    assert len(names) == 1, names
    return optuna.load_study(study_name=names[0], storage=url)


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (KeyError, AssertionError, IndexError, StopIteration, OperationalError):  # not yet
            value = None
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.trials]


def _attempts(study: optuna.Study, index: int) -> list:
    return [t for t in study.trials if t.user_attrs.get(INDEX) == index]


def _set(repo: Path, **hpo) -> None:
    params = load_yaml(repo / "params.yaml")
    params["hpo"].update(hpo)
    dump_yaml(repo / "params.yaml", params)


def _no_running_runs(repo: Path) -> None:
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("redsm5-evidence-binding")
    runs = client.search_runs([experiment.experiment_id], max_results=2000)
    assert runs and not [r.info.run_name for r in runs if r.info.status == "RUNNING"]


def test_kill_9_then_dvc_repro_resumes_without_rerunning_finished_trials(repo_copy):
    repo = repo_copy
    _set(repo, n_trials=4, heartbeat_interval=1, grace_period=5)
    run(["dvc", "repro", "prepare"], repo)
    # trial 2 hangs, so that the kill lands while it is RUNNING
    proc = _popen(["dvc", "repro", "hpo"], repo, env={"PIPELINE_FAULT": "hang@trial=2"})
    _wait_for(lambda: _states(_study(repo))[:3] == ["COMPLETE"] * 2 + ["RUNNING"] or
              _states(_study(repo))[:3] == ["COMPLETE", "PRUNED", "RUNNING"], 300,
              "two finished trials and a running third")
    before = {t.number: t.datetime_complete for t in _study(repo).trials if t.number < 2}
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _states(_study(repo))[2] == "RUNNING"

    start = time.perf_counter()
    run(["dvc", "repro", "hpo"], repo)  # the stages after hpo are not what a kill is about
    seconds = time.perf_counter() - start
    study = _study(repo)
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 4
    assert {t.number: t.datetime_complete for t in study.trials if t.number < 2} == before
    dead, retry = _attempts(study, 2)
    assert dead.state.name == "FAIL" and "died during the trial" in dead.user_attrs["fail_reason"]
    assert retry.state.name in ("COMPLETE", "PRUNED")
    assert retry.params == dead.params  # the same point of the search space, run again
    assert "RUNNING" not in _states(study)
    _no_running_runs(repo)
    assert "up to date" in run(["dvc", "status", "hpo"], repo).stdout
    print(f"kill-resume: kept 2 finished trials, ran trial 2 again as Optuna trial "
          f"{retry.number}, resume took {seconds:.1f}s")


def test_kill_9_then_the_same_dvc_exp_run_keeps_every_finished_trial(repo_copy):
    repo = repo_copy
    command = ["dvc", "exp", "run", "-S", "hpo.n_trials=4", "hpo"]  # up to hpo
    store = _store(repo)
    proc = _popen(command, repo, env={"PIPELINE_FAULT": "hang@trial=2"})

    def two_finished_and_the_third_running():
        ledger = {t.user_attrs.get(INDEX): t.state.name for t in _study(repo, store).trials}
        return ledger.get(2) == "RUNNING" and ledger.get(0) in ("COMPLETE", "PRUNED") and \
            ledger.get(1) in ("COMPLETE", "PRUNED")

    _wait_for(two_finished_and_the_third_running, 300, "two finished trials, the third running")
    before = {k: [(t.number, t.datetime_complete) for t in _attempts(_study(repo, store), k)]
              for k in (0, 1)}
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    run(command, repo)  # the same command again, without the fault
    study = _study(repo)
    # none of the finished trials ran twice: one attempt each, the same one
    assert {k: [(t.number, t.datetime_complete) for t in _attempts(study, k)]
            for k in (0, 1)} == before
    dead, again = _attempts(study, 2)
    assert dead.state.name == "FAIL" and again.state.name in ("COMPLETE", "PRUNED")
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials) == 4
    _no_running_runs(repo)


def _learnt(study: optuna.Study) -> list[tuple]:
    """What the study learnt, by index: hyperparameters, state, reports, value."""
    return sorted((t.user_attrs[INDEX], t.params, t.state.name, t.intermediate_values, t.value)
                  for t in study.trials if t.state.name in ("COMPLETE", "PRUNED"))


def test_journal_storage_shared_by_the_stage_and_a_worker_is_the_same_study(repo_copy,
                                                                           monkeypatch):
    repo = repo_copy
    journal = repo / "artifacts" / "hpo" / "study.journal"
    # parallelism 2: two trials may run at once, one in each process
    _set(repo, n_trials=4, parallelism=2, storage=f"journal:{journal}")
    run(["dvc", "repro", "prepare"], repo)
    worker = _popen([sys.executable, "-m", "pipeline.hpo", "--worker", "--wait", "120"], repo)
    # trial 0 pauses 10 s after its first step (timing only): by then its progress lets trial 1
    # start (parallelism 2), and the worker is up to take it
    run(["dvc", "repro", "hpo"], repo,
        env={"PIPELINE_FAULT": "delay@trial=0,fold=0,step=2,ms=10000"})
    assert worker.wait(timeout=300) == 0, worker.stderr.read()
    study = _study(repo, f"sqlite:///{repo / 'artifacts/hpo/study.db'}")  # the snapshot
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 4
    assert len({t.user_attrs["worker_pid"] for t in finished}) == 2  # both processes ran trials
    _no_running_runs(repo)
    # the stage alone, in another store, computes the same study: workers are reproducible
    # (without the snapshot, which a fresh store would start from)
    (repo / "artifacts" / "hpo" / "study.db").unlink()
    alone = repo / "alone.db"
    monkeypatch.chdir(repo)  # in this process: what is tested is the study, not a process
    monkeypatch.setenv("HPO_STORAGE", f"sqlite:///{alone}")
    hpo.run(load_params())
    assert _learnt(_study(repo, f"sqlite:///{alone}")) == _learnt(study)


@pytest.mark.postgres
def test_postgres_stage_and_worker_then_a_worker_killed_mid_trial(repo_copy, postgres_url):
    repo = repo_copy
    env = {"HPO_STORAGE": postgres_url}
    _set(repo, n_trials=4, parallelism=2, heartbeat_interval=1, grace_period=4)
    run(["dvc", "repro", "prepare"], repo)

    # 1. the stage and a second worker share the study on PostgreSQL
    worker = _popen([sys.executable, "-m", "pipeline.hpo", "--worker", "--wait", "120"], repo,
                    env)
    start = time.perf_counter()
    # as in the journal test: trial 0 pauses after its first step, so the worker takes trial 1
    run(["dvc", "repro", "hpo"], repo,
        env={**env, "PIPELINE_FAULT": "delay@trial=0,fold=0,step=2,ms=10000"})
    first_seconds = time.perf_counter() - start
    assert worker.wait(timeout=300) == 0, worker.stderr.read()
    study = _study(repo, postgres_url)
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 4
    workers = {(t.user_attrs["worker_host"], t.user_attrs["worker_pid"]) for t in finished}
    assert len(workers) == 2
    for t in finished:  # complete per-fold metrics for every finished trial
        folds = [t.user_attrs.get(f"fold{k}") for k in range(2)]
        ran = [f for f in folds if f is not None]
        assert ran and all({"macro_f1", "pos_f1", "roc_auc", "pr_auc", "seed"} <= set(f)
                           for f in ran)
        assert len(ran) == (2 if t.state.name == "COMPLETE" else len(t.intermediate_values))

    # 2. more trials; the extra worker hangs in its trial and is killed with SIGKILL
    _set(repo, n_trials=6)
    hanging = _popen([sys.executable, "-m", "pipeline.hpo", "--worker", "--wait", "120"], repo,
                     {**env, "PIPELINE_FAULT": "hang@trial=-1"})
    try:
        victim = _wait_for(
            lambda: next(t for t in _study(repo, postgres_url).trials if t.state.name == "RUNNING"
                         and t.user_attrs.get("worker_pid") == hanging.pid
                         and t.user_attrs.get("mlflow_run_id")), 120,  # set after worker_pid
            "the worker's trial to be running with its MLflow run")
    finally:  # a failed wait must not leave the hanging worker behind
        os.killpg(hanging.pid, signal.SIGKILL)
        hanging.wait()
    start = time.perf_counter()
    run(["dvc", "repro", "hpo"], repo, env=env)
    second_seconds = time.perf_counter() - start
    study = _study(repo, postgres_url)
    dead, retry = _attempts(study, victim.user_attrs[INDEX])
    assert dead.number == victim.number and dead.state.name == "FAIL"
    assert retry.state.name in ("COMPLETE", "PRUNED") and retry.params == dead.params
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials) == 6
    assert "RUNNING" not in _states(study)
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    assert client.get_run(dead.user_attrs["mlflow_run_id"]).info.status == "FAILED"
    _no_running_runs(repo)
    print(f"postgres: 4 trials by 2 workers in {first_seconds:.1f}s; killed worker's trial "
          f"{victim.number} failed by heartbeat and ran again as {retry.number}; "
          f"{second_seconds:.1f}s")
