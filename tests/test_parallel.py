"""The schedule (hpo.parallelism, hpo.n_jobs): one study at any number of processes, at any timing,
after a kill; the ledger's rules; where processes run and what is refused."""

from __future__ import annotations

import datetime
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
from mlflow.tracking import MlflowClient
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import OperationalError

from conftest import BIN, dump_yaml, hpo_study, load_yaml, with_hpo
from pipeline import hpo, placement, prepare
from pipeline.params import ParamsError, load_params
from pipeline.storage import storage_url
from pipeline.study import COST, DUPLICATE, ERROR, INDEX, INTERRUPTED, PROGRESS, Ledger

CORES = len(os.sched_getaffinity(0))
needs_two_cores = pytest.mark.skipif(CORES < 2, reason="n_jobs: 2 needs two CPU cores")


@pytest.fixture
def params(workdir):
    p = load_params()
    prepare.run(p)
    # 6 trials, 2 at a time; the pruner may act from the second trial on
    return with_hpo(p, n_trials=6, parallelism=2,
                    pruner=replace(p.hpo.pruner, n_startup_trials=1))


def _finished(study: optuna.Study) -> list[tuple]:
    """What the study learnt, by index: hyperparameters, state, reports, value."""
    trials = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    return sorted((t.user_attrs[INDEX], t.params, t.state.name, t.intermediate_values, t.value)
                  for t in trials)


def _outputs(params) -> dict[str, str]:
    paths = params.paths
    return {p: Path(p).read_text() for p in (paths.trials, paths.fold_metrics, paths.hpo_metrics,
                                             paths.importance, paths.pareto)}


def _fresh(params) -> None:
    """Forget the study (the MLflow store stays: a new study run)."""
    Path(storage_url(params).removeprefix("sqlite:///")).unlink()
    shutil.rmtree(Path(params.paths.study_db).parent)


@pytest.mark.slow
@needs_two_cores
def test_the_study_is_the_same_at_any_n_jobs_and_timing(params, monkeypatch):
    one = hpo.run(with_hpo(params, n_jobs=1))
    outputs, study = _outputs(params), _finished(hpo_study(params))
    assert one["n_pruned"] >= 1  # trials of different lengths: the schedule is exercised
    _fresh(params)
    # two processes; trial 0 ends late, so trial 1 ends first (and 2 waits for 0 anyway)
    monkeypatch.setenv("PIPELINE_FAULT", "delay@trial=0,fold=0,step=1,ms=2500;"
                                         "delay@trial=3,fold=1,step=1,ms=1500")
    two = hpo.run(with_hpo(params, n_jobs=2))
    assert two == one
    assert _outputs(params) == outputs
    assert _finished(hpo_study(params)) == study
    trials = hpo_study(params).trials
    # trials ran in two processes at once, on disjoint cores
    slots = {t.user_attrs["slot"] for t in trials}
    assert slots == {"cpus 0", "cpus 1"} if CORES == 2 else len(slots) == 2
    overlap = [(a.user_attrs[INDEX], b.user_attrs[INDEX]) for a in trials for b in trials
               if a.number < b.number and b.datetime_start < a.datetime_complete]
    assert overlap, "no two trials ran at once"
    assert {t.user_attrs["precision"] for t in trials} <= {"fp32", "bf16"}
    assert all(t.user_attrs["peak_rss_mb"] > 0 for t in trials)


@pytest.mark.slow
@needs_two_cores
def test_a_kill_mid_study_then_a_rerun_ends_with_the_same_study(params, workdir):
    uninterrupted = hpo.run(with_hpo(params, n_jobs=2))
    expected, outputs = _finished(hpo_study(params)), _outputs(params)
    _fresh(params)

    raw = load_yaml(workdir / "params.yaml")
    raw["hpo"].update(n_trials=6, n_jobs=2, parallelism=2, max_failures=1)
    raw["hpo"]["pruner"]["n_startup_trials"] = 1
    dump_yaml(workdir / "params.yaml", raw)
    # trials 2 and 3 hang in their second fold: the kill lands while the study runs them
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "PIPELINE_FAULT": "hang@trial=2,fold=1;hang@trial=3,fold=1"}
    stage = subprocess.Popen([sys.executable, "-m", "pipeline.hpo"], cwd=workdir, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    url = storage_url(params)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:  # the stage may be creating the file
            trials = optuna.load_study(study_name=optuna.get_all_study_names(url)[0],
                                       storage=url).trials
        except (IndexError, KeyError, OperationalError):
            trials = []
        by_index = {t.user_attrs.get(INDEX): t for t in trials}
        hung = [k for k in (2, 3) if k in by_index and by_index[k].state == TrialState.RUNNING
                and by_index[k].user_attrs.get(PROGRESS)]  # past its first fold
        if hung and all(k in by_index and by_index[k].state in (TrialState.COMPLETE,
                                                                TrialState.PRUNED)
                        for k in (0, 1)):
            time.sleep(2)  # the other starts too if its start is decided
            break
        assert stage.poll() is None, stage.stderr.read()
        time.sleep(0.5)
    else:
        raise AssertionError("neither trial 2 nor 3 ran its second fold after 0 and 1 ended")
    os.killpg(stage.pid, signal.SIGKILL)
    stage.wait()

    resumed = hpo.run(params)  # no fault now
    study = hpo_study(params)
    assert _finished(study) == expected
    dead = [t for t in study.trials if t.state == TrialState.FAIL]
    assert sorted(t.user_attrs[INDEX] for t in dead) in ([2], [3], [2, 3])
    assert all("died during the trial" in t.user_attrs["fail_reason"] and ERROR not in
               t.user_attrs for t in dead)
    again = {t.user_attrs[INDEX]: t for t in study.trials if t.state != TrialState.FAIL}
    assert all(again[t.user_attrs[INDEX]].params == t.params for t in dead)
    # the outputs describe each index's final attempt: the same bytes as uninterrupted
    assert resumed == uninterrupted
    assert _outputs(params) == outputs


@pytest.mark.slow
def test_ctrl_c_leaves_the_index_open_without_counting_a_death(params, workdir):
    raw = load_yaml(workdir / "params.yaml")
    raw["hpo"].update(n_trials=1, max_retries=0)  # a death would end index 0 for good
    dump_yaml(workdir / "params.yaml", raw)
    env = {**os.environ, "PIPELINE_FAULT": "hang@trial=0"}
    # a terminal's default for SIGINT: a shell's background job (`make test &`) ignores it, and
    # a process started with SIGINT ignored never gets Python's KeyboardInterrupt
    stage = subprocess.Popen([sys.executable, "-m", "pipeline.hpo"], cwd=workdir, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    url = storage_url(params)

    def attempts() -> list[FrozenTrial]:
        try:
            return optuna.load_study(study_name=optuna.get_all_study_names(url)[0],
                                     storage=url).trials
        except (IndexError, KeyError, OperationalError):
            return []

    deadline = time.monotonic() + 120
    while not any(t.user_attrs.get("mlflow_run_id") for t in attempts()):  # trial 0 started
        if stage.poll() is not None or time.monotonic() > deadline:
            stage.kill()
            raise AssertionError(f"trial 0 did not start: {stage.communicate()[1]}")
        time.sleep(0.5)
    stage.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends
    try:
        assert stage.wait(timeout=60) != 0
    finally:  # a stage that ignored the signal must not outlive the test
        stage.kill()
        stage.wait()
    (stopped,) = attempts()
    assert stopped.state == TrialState.FAIL and stopped.user_attrs.get(INTERRUPTED)
    assert stopped.user_attrs["fail_reason"] == "the stage stopped during the trial"
    assert ERROR not in stopped.user_attrs
    run = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").get_run(
        stopped.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED"

    hpo.run(load_params())  # no fault: index 0 runs again although max_retries is 0
    assert [(t.user_attrs[INDEX], t.state) for t in attempts()] == [
        (0, TrialState.FAIL), (0, TrialState.COMPLETE)]


def _trial(index: int, state: TrialState, number: int, value: float | None = None,
           **attrs) -> FrozenTrial:
    now = datetime.datetime(2026, 1, 1)
    return FrozenTrial(number=number, trial_id=number, state=state, value=value,
                       datetime_start=now,
                       datetime_complete=None if state == TrialState.RUNNING else now,
                       params={"x": float(index)}, distributions={"x": FloatDistribution(0, 99)},
                       user_attrs={INDEX: index, **attrs}, system_attrs={},
                       intermediate_values={0: value} if value is not None else {})


def _ledger(trials: list[FrozenTrial], parallelism: int) -> Ledger:
    attempts: dict[int, list[FrozenTrial]] = {}
    for t in trials:
        if not t.user_attrs.get(DUPLICATE):
            attempts.setdefault(t.user_attrs[INDEX], []).append(t)
    return Ledger(attempts, max_retries=2, parallelism=parallelism)


def test_the_virtual_clock_decides_what_each_trial_sees():
    c, r = TrialState.COMPLETE, TrialState.RUNNING
    # two virtual workers: trials 0 and 1 start at 0 and end at 4 and 1
    trials = [_trial(0, c, 0, 0.5, **{COST: 4}), _trial(1, c, 1, 0.6, **{COST: 1}),
              _trial(2, c, 2, 0.7, **{COST: 2}), _trial(3, r, 3, **{PROGRESS: 0.5})]
    ledger = _ledger(trials, parallelism=2)
    assert ledger.starts == {0: 0, 1: 0, 2: 1, 3: 3}
    # trial 2 started at 1: trial 1 had ended, trial 0 was still running
    assert [(t.state, t.params["x"]) for t in ledger.view(2)] == [(r, 0.0), (c, 1.0)]
    assert [(t.state, t.params["x"]) for t in ledger.view(3)] == [(r, 0.0), (c, 1.0), (c, 2.0)]
    # trial 4 takes the worker that frees first: trial 0's at 4, unless trial 3 (started at 3)
    # could end before; with 0.5 done it might (3.5 <= 4), so trial 4 waits
    assert 4 not in ledger.starts and ledger.next_index(n_trials=6) is None
    ledger = _ledger([*trials[:3], _trial(3, r, 3, **{PROGRESS: 1.5})], parallelism=2)
    assert ledger.starts[4] == 4 and ledger.next_index(n_trials=6) == 4
    assert [t.state for t in ledger.view(4)] == [c, c, c, r]  # trial 0 ended at 4 exactly
    assert ledger.next_index(n_trials=4) is None  # 4 places held: nothing more is needed
    # one virtual worker: every trial sees all the trials before it, ended
    one = _ledger(trials[:3], parallelism=1)
    assert one.starts == {0: 0, 1: 4, 2: 5, 3: 7}
    assert all(t.state == c for t in one.view(3))


def test_the_ledger_tracks_attempts_by_index():
    c, p, r, f = TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.FAIL
    trials = [
        _trial(0, c, 0, 0.5, **{COST: 1}),
        _trial(1, f, 1, **{ERROR: "boom", COST: 1}),  # raised: failed for good
        _trial(2, f, 2),  # died: open again
        _trial(3, r, 3, **{PROGRESS: 1}),
        _trial(2, r, 4, **{PROGRESS: 1}),  # index 2 again
        _trial(3, r, 5, **{DUPLICATE: True}),  # lost the race for 3: ignored
        _trial(4, p, 6, 0.1, **{COST: 1}),
    ]
    ledger = _ledger(trials, parallelism=8)
    assert [ledger.status(k) for k in range(6)] == \
        ["complete", "failed", "running", "running", "pruned", "open"]
    assert ledger.died(2) == 1 and len(ledger.attempts[3]) == 1
    assert ledger.considered(2) == [0, 1, 2, 3, 4] and not ledger.done(2)
    # 8 workers: index 5 starts at 0 like the rest, once the running trials are past 0
    assert ledger.next_index(n_trials=5) == 5
    # a third death at index 2 is one more than max_retries: it fails for good; stops of the
    # attempt's own stage (interrupted) do not count
    dead = Ledger({2: [_trial(2, f, n) for n in range(3)]}, max_retries=2)
    assert dead.status(2) == "failed"
    stopped = Ledger({2: [_trial(2, f, n, **{INTERRUPTED: True}) for n in range(3)]}, 2)
    assert stopped.died(2) == 0 and stopped.status(2) == "open"
    # an attempt that lost the race for an index and died before it could say so does not
    # reopen the index that another attempt finished
    raced = Ledger({0: [_trial(0, c, 0, 0.5, **{COST: 1}), _trial(0, f, 1)]}, max_retries=2)
    assert raced.status(0) == "complete" and raced.final(0).number == 0


def test_settings_that_cannot_fit_are_refused():
    with pytest.raises(ParamsError, match=f"hpo.n_jobs: {CORES + 1} trials at once need"):
        placement.plan_slots(CORES + 1, CORES + 1, "auto", "cpu", 0, 100.0, None)
    with pytest.raises(ParamsError, match="hpo.n_jobs: 1 trials at once need about"):
        placement.plan_slots(1, 1, "auto", "cpu", 0, 10.0**9, None)  # a petabyte trial
    with pytest.raises(ParamsError, match="hpo.devices: \\[0\\] names CUDA devices"):
        placement.plan_slots(1, 1, [0], "cpu", 0, 100.0, None)
    slots = placement.plan_slots(CORES, CORES, "auto", "cpu", 0, 1.0, None)
    cpus = [set(s.cpus) for s in slots]
    assert set().union(*cpus) == set(os.sched_getaffinity(0))
    assert sum(map(len, cpus)) == CORES  # disjoint
    assert {s.threads for s in slots} == {1}
    # fewer jobs than parallelism: each keeps its share of the cores (same arithmetic)
    (alone,) = placement.plan_slots(1, CORES, "auto", "cpu", 0, 1.0, None)
    assert alone.threads == 1 and alone.cpus is None  # not pinned: another process's cores
    assert placement.cpu_jobs(CORES, 0, 1.0) == CORES
    assert placement.cpu_jobs(CORES, 0, 10.0**9) == 1  # memory bounds auto


def test_n_jobs_needs_isolated_trials_and_fits_parallelism(params):
    with pytest.raises(ParamsError, match="needs hpo.isolate_trials: true"):
        with_hpo(params, isolate_trials=False, n_jobs=2)
    with pytest.raises(ParamsError, match="hpo.n_jobs: 3 trials at once need hpo.parallelism"):
        with_hpo(params, n_jobs=3)


def test_gpu_auto_adds_processes_while_throughput_rises():
    def measure(rates: dict[int, float], footprint: float):
        def run(n: int) -> list[dict[str, float]]:
            return [{"samples_per_second": rates[n] / n, "footprint_mb": footprint}] * n
        return run

    # 436 -> 692 -> 1373 -> 2091 samples/s (the H200 table at batch 32): 8 processes
    h200 = {1: 436.0, 2: 692.0, 4: 1373.0, 8: 2091.0}
    n, trace = placement.gpu_jobs(measure(h200, 3200.0), free_mb=140_000.0, limit=8)
    assert n == 8 and [t["processes"] for t in trace] == [1, 2, 4, 8]
    # a GPU that saturates at 2: the 4-process round gains under 10%, so 2
    n, _ = placement.gpu_jobs(measure({1: 100.0, 2: 180.0, 4: 190.0}, 3200.0), 140_000.0, 8)
    assert n == 2
    # memory bounds it: 10 GB free, 3.2 GB each -> at most 2 (with the 10% margin)
    n, trace = placement.gpu_jobs(measure(h200, 3200.0), free_mb=10_000.0, limit=8)
    assert n == 2 and trace[-1]["processes"] == 2
    # and hpo.parallelism does (the last round tries the limit itself)
    n, trace = placement.gpu_jobs(measure({**h200, 3: 1000.0}, 3200.0), 140_000.0, limit=3)
    assert n == 3 and [t["processes"] for t in trace] == [1, 2, 3]


def test_probe_processes_measure_together(params):
    # the GPU probe's plumbing (processes on their slots, a barrier between warm-up and the
    # measured seconds, one result each), run on the CPU where it can run here
    from pipeline.engine import encode_pairs
    from pipeline.inputs import read_split
    from pipeline.model import load_tokenizer
    from pipeline.placement import fork_server
    from pipeline.trial import CrossValidation

    train = read_split(params.paths.pairs, "train")
    enc = encode_pairs(load_tokenizer(params.model.name), train["criterion"], train["sentence"],
                       train["label"], params.model.max_length)
    cv = CrossValidation.build(params, enc, train["fold"].to_numpy())
    slots = [placement.Slot(i, cpus=(i,), threads=1) for i in range(min(2, CORES))]
    context = fork_server(params.model.name)
    found = hpo.probe_together(context, cv, hpo.probe_point(params), slots, seconds=0.5)
    assert len(found) == len(slots)
    assert all(r["samples_per_second"] > 0 and "footprint_mb" in r for r in found)
    # a process that fails (here: a CUDA slot without CUDA) breaks the barrier, so the one
    # waiting at it stops at once instead of after PROBE_BARRIER_SECONDS
    failing = [placement.Slot(0, cpus=(0,), threads=1), placement.Slot(1, cuda=0)]
    start = time.monotonic()
    with pytest.raises(ChildProcessError):
        hpo.probe_together(context, cv, hpo.probe_point(params), failing, seconds=0.5)
    assert time.monotonic() - start < hpo.PROBE_BARRIER_SECONDS / 10


@pytest.mark.slow
@pytest.mark.parametrize("isolate", [True, False])
def test_the_early_fork_server_runs_for_isolated_trials_and_dies_with_its_stage(workdir,
                                                                                isolate):
    # what `python -m pipeline.hpo` runs before its own imports: with isolated trials the fork
    # server is up at once (its imports then run beside the stage's), and gone when it exits
    raw = load_yaml(workdir / "params.yaml")
    raw["hpo"]["isolate_trials"] = isolate
    dump_yaml(workdir / "params.yaml", raw)
    code = ("import multiprocessing.forkserver as fs, os, pathlib\n"
            "from pipeline.placement import start_fork_server_early\n"
            "start_fork_server_early()\n"
            "pid = fs._forkserver._forkserver_pid\n"
            "alive = pid and os.waitpid(pid, os.WNOHANG) == (0, 0)\n"
            "pathlib.Path('pid').write_text(str(pid if alive else 0))\n")
    # no pipes: a server left behind would hold them open, and the run would wait for it
    with open(workdir / "stderr", "w") as err:
        subprocess.run([sys.executable, "-c", code], cwd=workdir, stdout=subprocess.DEVNULL,
                       stderr=err, timeout=120, check=True)
    pid = int((workdir / "pid").read_text())
    assert bool(pid) == isolate  # a live server only where trials run in processes
    if pid:  # killed at the exit, not left importing for seconds: dead (or a zombie) at once

        def alive() -> bool:
            try:  # the state field follows the command name in parentheses
                return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            except FileNotFoundError:
                return False

        deadline = time.monotonic() + 1
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(), "the fork server outlived its stage"
