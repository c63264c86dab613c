"""Where the Optuna study lives, and how a dead worker's trial is noticed and retried.

* ``hpo.storage: null``: the SQLite file ``paths.study_db`` (the DVC output itself).
* ``postgresql://user@host/db`` (any SQLAlchemy URL): one study shared by workers on many machines.
* ``journal:<path>``: an Optuna journal file, for several worker processes on one machine.

``HPO_STORAGE`` in the environment overrides ``hpo.storage``; it is where a URL with a password
belongs (params.yaml is committed, so the params loader refuses one there). With any storage other
than the default file, the stage writes a snapshot of the study to ``paths.study_db`` for DVC.

A worker that dies leaves its trial RUNNING. Database storages record a heartbeat per running
trial; once it is older than ``hpo.grace_period`` the trial is failed and retried (Optuna's
``RetryHeartbeatStaleTrialCallback``, up to ``hpo.max_retries`` times). For the local file
storages (SQLite, journal) a dead worker on this host is also recognised at once by its pid.
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path
from urllib.parse import urlsplit

import optuna
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from pipeline.params import Params

ENV = "HPO_STORAGE"
# Heartbeats and the stale-trial retry are marked experimental in Optuna; we rely on them
# knowingly (and pin the version in constraints.txt).
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning,
                        module=r"optuna\..*|pipeline\.storage")
JOURNAL = "journal:"


def storage_url(params: Params) -> str:
    """``HPO_STORAGE``, else ``hpo.storage``, else the SQLite file (absolute, folder created)."""
    url = os.environ.get(ENV) or params.hpo.storage
    if url:
        return url
    path = Path(params.paths.study_db).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def redact(url: str) -> str:
    """The URL without its password, for files that go into git and MLflow."""
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
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
        # Queues a copy of a dead worker's trial (same hyperparameters) as WAITING.
        self.retry = RetryHeartbeatStaleTrialCallback(max_retry=params.hpo.max_retries)
        self.optuna = self._open()

    def _open(self) -> BaseStorage:
        if self.url.startswith(JOURNAL):
            path = Path(self.url[len(JOURNAL):]).resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))  # no heartbeat: pid checks
        hpo = self.params.hpo
        # SQLite: wait for the lock instead of failing while another process writes.
        engine_kwargs = {"connect_args": {"timeout": 60}} if self.url.startswith("sqlite") else {}
        return RDBStorage(self.url, engine_kwargs=engine_kwargs,
                          heartbeat_interval=hpo.heartbeat_interval,
                          grace_period=hpo.grace_period,
                          heartbeat_stale_trial_callback=self.retry)

    @property
    def redacted(self) -> str:
        return redact(self.url)

    @property
    def is_local(self) -> bool:
        """SQLite and journal files live on this machine: their workers can be checked by pid."""
        return self.url.startswith(("sqlite:", JOURNAL))

    def fail_dead_trials(self, study: optuna.Study) -> list[FrozenTrial]:
        """Fail and retry RUNNING trials whose worker is gone; return them, now FAIL.

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
                # Optuna's storage API is the only way to fail another process's trial.
                try:
                    self.optuna.set_trial_user_attr(
                        t._trial_id, "fail_reason", f"worker {host}:{pid} died during the trial")
                    self.optuna.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue  # another process got there first
                self.retry(study, self.optuna.get_trial(t._trial_id))
        optuna.storages.fail_stale_trials(study)  # heartbeat; its trials get no fail_reason
        still = {t.number for t in study.get_trials(deepcopy=False,
                                                    states=(TrialState.RUNNING,))}
        return [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                if t.number in running - still]

    def snapshot_needed(self) -> bool:
        """True when the study does not live in paths.study_db itself."""
        return self.url != f"sqlite:///{Path(self.params.paths.study_db).resolve()}"

    def snapshot(self, study: optuna.Study, path: str | Path) -> None:
        """Copy the study into a fresh SQLite file (the DVC output when it lives elsewhere)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.unlink(missing_ok=True)
        optuna.copy_study(from_study_name=study.study_name, from_storage=self.optuna,
                          to_storage=f"sqlite:///{tmp.resolve()}")
        os.replace(tmp, path)
