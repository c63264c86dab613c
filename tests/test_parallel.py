"""Parallel trials (hpo.n_jobs): the same study at any timing, after a kill, and refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import optuna
import pytest

from conftest import BIN
from pipeline import hpo, prepare
from pipeline.params import ParamsError, load_params
from pipeline.storage import storage_url
from pipeline.trial_process import plan_slots

CORES = len(os.sched_getaffinity(0))
needs_two_cores = pytest.mark.skipif(CORES < 2, reason="n_jobs: 2 needs two CPU cores")


def _core_sets(n: int) -> list[list[int]]:
    cores = sorted(os.sched_getaffinity(0))
    size = len(cores) // n
    return [cores[k * size:(k + 1) * size] for k in range(n)] if len(cores) % n == 0 else []


def _hpo(params, **changes):
    return replace(params, hpo=replace(params.hpo, **changes))


@pytest.fixture
def params(workdir):
    p = load_params()
    prepare.run(p)
    # 6 trials in waves of 2; the pruner may act from the second wave on
    return _hpo(p, n_trials=6, n_jobs=2)


def _study(params) -> optuna.Study:
    name = json.loads(Path(params.paths.study_summary).read_text())["study_name"]
    return optuna.load_study(study_name=name, storage=storage_url(params))


def _finished(study: optuna.Study) -> list[tuple]:
    """What the study learnt, in order: hyperparameters, state, per-fold scores, value."""
    return [(t.params, t.state.name, t.intermediate_values, t.value)
            for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]


def _outputs(params) -> dict[str, str]:
    paths = params.paths
    return {p: Path(p).read_text() for p in (paths.trials, paths.fold_metrics, paths.hpo_metrics,
                                             paths.importance, paths.pareto)}


def _fresh(params) -> None:
    """Forget the study (the MLflow store stays: a new study run)."""
    shutil.rmtree(Path(params.paths.study_db).parent)


@pytest.mark.slow
@needs_two_cores
def test_parallel_trials_give_the_same_study_whatever_the_timing(params, monkeypatch):
    # trial 0 finishes its first fold late in one run, trial 1 in the other: the order in which
    # the wave's processes report flips, the study must not notice
    monkeypatch.setenv("PIPELINE_FAULT", "delay@trial=0,fold=0,step=1,ms=2500")
    first = hpo.run(params)
    outputs, study = _outputs(params), _finished(_study(params))
    waves = hpo.WAVE_STATS.waves
    _fresh(params)
    monkeypatch.setenv("PIPELINE_FAULT", "delay@trial=1,fold=0,step=1,ms=2500;"
                                         "delay@trial=2,fold=1,step=1,ms=1500")
    second = hpo.run(params)
    assert second == first
    assert _outputs(params) == outputs
    assert _finished(_study(params)) == study
    assert hpo.WAVE_STATS.waves - waves == 3  # 6 trials, 2 at a time
    # the two trials of a wave ran in two processes at once, on disjoint cores
    trials = _study(params).trials
    for wave in range(3):
        slots = {trials[2 * wave + k].user_attrs["slot"] for k in range(2)}
        assert slots == {f"cpus {','.join(map(str, cpus))}" for cpus in
                         _core_sets(2)}, slots
    assert {t.user_attrs["precision"] for t in trials} <= {"fp32", "bf16"}
    assert all(t.user_attrs["peak_rss_mb"] > 0 for t in trials)


@pytest.mark.slow
@needs_two_cores
def test_a_kill_mid_wave_then_a_rerun_ends_with_the_same_study(params, workdir):
    uninterrupted = hpo.run(params)
    expected = _finished(_study(params))
    _fresh(params)

    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           # trials 2 and 3 (the second wave) hang in their second fold
           "PIPELINE_FAULT": "hang@trial=2,fold=1;hang@trial=3,fold=1"}
    from conftest import dump_yaml, load_yaml

    raw = load_yaml(workdir / "params.yaml")
    raw["hpo"].update(n_trials=6, n_jobs=2, max_failures=1)
    dump_yaml(workdir / "params.yaml", raw)
    stage = subprocess.Popen([sys.executable, "-m", "pipeline.hpo"], cwd=workdir, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    url = storage_url(params)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:  # the stage may be creating the file
            names = optuna.get_all_study_names(url)
            trials = optuna.load_study(study_name=names[0], storage=url).trials if names else []
        except Exception:
            trials = []
        if sum(t.number in (2, 3) and t.state.name == "RUNNING" and "fold0" in t.user_attrs
               for t in trials) == 2:
            break
        assert stage.poll() is None, stage.stderr.read()
        time.sleep(0.5)
    else:
        raise AssertionError("the second wave never got past its first fold")
    os.killpg(stage.pid, signal.SIGKILL)
    stage.wait()

    resumed = hpo.run(params)  # no fault now
    study = _study(params)
    assert _finished(study) == expected
    dead = [t for t in study.trials if t.state.name == "FAIL"]
    assert [t.number for t in dead] == [2, 3]
    retries = {t.system_attrs["failed_trial"]: t for t in study.trials
               if "failed_trial" in t.system_attrs}
    assert sorted(retries) == [2, 3]
    assert all(t.user_attrs["seed_trial"] == n for n, t in retries.items())
    # the trials after the retries take the seeds the uninterrupted study gave their places
    assert [t.user_attrs["seed_trial"] for t in study.trials if t.state.name != "FAIL"] == \
        list(range(6))
    # what differs: the two failed attempts are listed, so trial numbers after them shift by two
    for key in ("best_value", "n_complete", "n_pruned", "fold_fits_run"):
        assert resumed[key] == uninterrupted[key], key
    assert resumed["n_failed"] == uninterrupted["n_failed"] + 2


def test_settings_that_cannot_fit_are_refused():
    with pytest.raises(ParamsError, match=f"hpo.n_jobs: {CORES + 1} trials at once need"):
        plan_slots(CORES + 1, "auto", "cpu", 0, 100.0, None)
    with pytest.raises(ParamsError, match="hpo.n_jobs: 1 trials at once need about"):
        plan_slots(1, "auto", "cpu", 0, 10.0**9, None)  # a trial that needs a petabyte
    with pytest.raises(ParamsError, match="hpo.devices: \\[0\\] names CUDA devices"):
        plan_slots(1, [0], "cpu", 0, 100.0, None)
    slots = plan_slots(CORES, "auto", "cpu", 0, 1.0, None)
    cpus = [set(s.cpus or os.sched_getaffinity(0)) for s in slots]
    assert set().union(*cpus) == set(os.sched_getaffinity(0))
    assert sum(map(len, cpus)) == CORES  # disjoint


def test_n_jobs_needs_isolated_trials(params):
    with pytest.raises(ParamsError, match="needs hpo.isolate_trials: true"):
        _hpo(params, isolate_trials=False, n_jobs=2)
