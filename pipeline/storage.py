"""Where the Optuna study lives, and how a dead worker's trial is noticed.

* ``hpo.storage: null``: the SQLite file ``paths.study_store`` at the workspace root (git-ignored,
  shared by every experiment of the workspace, queued ones included, like MLflow's store). It is
  not a DVC output, so ``dvc exp run`` never restores it: a killed experiment run again with the
  same command keeps every trial that had finished.
* ``postgresql://user@host/db`` (any SQLAlchemy URL): one study shared by workers on many machines.
* ``journal:<path>``: an Optuna journal file, for several worker processes on one machine.

``HPO_STORAGE`` in the environment overrides ``hpo.storage``; it is where a URL with a password
belongs (params.yaml is committed, so the params loader refuses one there). The stage writes a
snapshot of the study to ``paths.study_db``, the DVC output; a store that lacks the study (a fresh
clone, a queued experiment's copy) starts from that snapshot, so a committed study is extended.

A worker that dies leaves its trial RUNNING. Database storages record a heartbeat per running
trial; once it is older than ``hpo.grace_period`` Optuna fails it. For the local file storages
(SQLite, journal) a dead worker on this host is also recognised at once by its pid. Either way
the trial's index is open again and runs again (pipeline/study.py).
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from pipeline.common import workspace_root
from pipeline.params import Params

ENV = "HPO_STORAGE"
# Heartbeats are marked experimental in Optuna; we rely on them knowingly (and pin the version in
# constraints.txt).
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning,
                        module=r"optuna\..*|pipeline\.storage")
JOURNAL = "journal:"


def storage_url(params: Params) -> str:
    """``HPO_STORAGE``, else ``hpo.storage``, else the workspace's SQLite store (absolute)."""
    url = os.environ.get(ENV) or params.hpo.storage
    if url:
        return url
    return f"sqlite:///{workspace_root() / params.paths.study_store}"


def redact(url: str) -> str:
    """The URL without its password, for files that go into git and MLflow."""
    if url.startswith(JOURNAL):
        return url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def worker_identity() -> dict[str, object]:
    """Recorded on every trial: which machine and process ran it."""
    return {"worker_host": socket.gethostname(), "worker_pid": os.getpid()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class StudyStorage:
    """The Optuna storage of the study, and what happens to the trials of dead workers."""

    def __init__(self, params: Params) -> None:
        self.url = storage_url(params)
        self.params = params
        self.optuna = self._open()

    def _open(self) -> BaseStorage:
        if self.url.startswith(JOURNAL):
            path = Path(self.url[len(JOURNAL):]).resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))  # no heartbeat: pid checks
        hpo = self.params.hpo
        # SQLite: wait for the lock instead of failing while another process writes.
        engine_kwargs = {"connect_args": {"timeout": 60}} if self.url.startswith("sqlite") else {}
        if self.url.startswith("sqlite:///"):
            Path(self.url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        return RDBStorage(self.url, engine_kwargs=engine_kwargs,
                          heartbeat_interval=hpo.heartbeat_interval,
                          grace_period=hpo.grace_period)

    @property
    def redacted(self) -> str:
        return redact(self.url)

    @property
    def is_local(self) -> bool:
        """SQLite and journal files live on this machine: their workers can be checked by pid."""
        return self.url.startswith(("sqlite:", JOURNAL))

    def fail_dead_trials(self, study: optuna.Study) -> list[FrozenTrial]:
        """Fail RUNNING trials whose worker is gone; return them, now FAIL.

        The caller closes what else the dead trials left open (their MLflow runs).

        Database storages: trials whose heartbeat is older than the grace period (Optuna).
        Local file storages, also: trials run on this host by a pid that no longer exists, so a
        rerun after a kill does not wait for the grace period.
        """
        running = {t.number for t in study.get_trials(deepcopy=False,
                                                      states=(TrialState.RUNNING,))}
        if self.is_local:
            host = socket.gethostname()
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                pid = t.user_attrs.get("worker_pid")
                if (t.user_attrs.get("worker_host") != host or not isinstance(pid, int)
                        or pid == os.getpid() or _alive(pid)):
                    continue
                try:
                    self._fail(t, f"worker {host}:{pid} died during the trial")
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue  # another process got there first
        optuna.storages.fail_stale_trials(study)  # heartbeat; its trials get no fail_reason
        still = {t.number for t in study.get_trials(deepcopy=False,
                                                    states=(TrialState.RUNNING,))}
        return [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                if t.number in running - still]

    def seed(self, name: str, snapshot: str | Path) -> bool:
        """Copy study ``name`` from a snapshot file (paths.study_db, as DVC checked it out) into
        this storage when the storage lacks it; True if it did."""
        snapshot = Path(snapshot)
        if not snapshot.is_file() or name in optuna.get_all_study_names(self.optuna):
            return False
        source = f"sqlite:///{snapshot.resolve()}"
        if name not in optuna.get_all_study_names(source):
            return False
        optuna.copy_study(from_study_name=name, from_storage=source, to_storage=self.optuna)
        # trials the snapshot caught running belong to no one here: fail them (no heartbeat
        # and no live pid would ever tell), so that their indices run again; each counts as a
        # death against hpo.max_retries, and its MLflow run, in the store it ran with, stays open
        copied = optuna.load_study(study_name=name, storage=self.optuna)
        for t in copied.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            self._fail(t, "running when the snapshot was taken")
        return True

    def _fail(self, trial: FrozenTrial, reason: str) -> None:
        """Fail a trial this process does not run, with its reason: Optuna's storage API is the
        only way."""
        self.optuna.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
        self.optuna.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)

    def snapshot(self, study: optuna.Study, path: str | Path) -> None:
        """Copy the study into a fresh SQLite file (the DVC output); nothing to do when the
        study lives in that very file (``HPO_STORAGE`` pointed there)."""
        path = Path(path)
        if self.url == f"sqlite:///{path.resolve()}":
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.unlink(missing_ok=True)
        optuna.copy_study(from_study_name=study.study_name, from_storage=self.optuna,
                          to_storage=f"sqlite:///{tmp.resolve()}")
        os.replace(tmp, path)
