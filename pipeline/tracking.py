"""MLflow bookkeeping: where the tracking store is, and the study -> trial -> fold run tree.

Tracking URI: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<workspace root>/mlflow.db`` as an
absolute path. The workspace root is ``DVC_ROOT`` (DVC sets it for every stage, and to the *main*
repository for a ``dvc exp run --queue`` copy under ``.dvc/tmp/exps``), so queued experiments log
to the same store as the workspace instead of a copy that is deleted afterwards. Artifacts go to
``<root>/mlartifacts`` for the same reason.

The store is shared by every experiment of the workspace, like a tracking server; it is not a DVC
output (DVC would delete it before each run) and it is git-ignored.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"
# Optuna trial state -> MLflow run status.
STATUS_OF_STATE = {"COMPLETE": FINISHED, "PRUNED": KILLED, "FAIL": FAILED}


def workspace_root() -> Path:
    """The DVC repository root, also from inside a queued experiment's temporary copy."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    cwd = Path.cwd().resolve()
    parts = cwd.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    for directory in (cwd, *cwd.parents):
        if (directory / ".dvc").is_dir():
            return directory
    return cwd


def run_identity() -> dict[str, str]:
    """What links an MLflow run, an Optuna trial and a DVC experiment: the git commit the
    pipeline runs from (the experiment's baseline under ``dvc exp run``) and the experiment's
    name. DVC passes both to queued and workspace experiments in the environment."""
    ids = {}
    commit = os.environ.get("DVC_EXP_BASELINE_REV")
    if not commit:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=workspace_root(),
                                    capture_output=True, text=True, timeout=10).stdout.strip()
    if commit:
        ids["git_commit"] = commit
    if os.environ.get("DVC_EXP_NAME"):
        ids["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return ids


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workspace_root() / 'mlflow.db'}"


def _now_ms() -> int:
    return int(time.time() * 1000)


class RunTree:
    """Creates and closes the runs of one study; every call names its run id explicitly."""

    def __init__(self, experiment: str) -> None:
        self.uri = tracking_uri()
        # every run carries them: mlflow.search_runs("tags.git_commit = '...'") finds them all
        self.identity = run_identity()
        self.client = MlflowClient(tracking_uri=self.uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            location = None
            if "MLFLOW_TRACKING_URI" not in os.environ:
                location = (workspace_root() / "mlartifacts").as_uri()
            try:
                self.experiment_id = self.client.create_experiment(
                    experiment, artifact_location=location)
            except MlflowException:  # another worker created it in between
                self.experiment_id = self.client.get_experiment_by_name(experiment).experiment_id

    def study_run(self, run_id: str | None, name: str, tags: dict[str, str]) -> str:
        """Reopen the study's parent run if it exists in this store, else start one."""
        if run_id:
            try:
                run = self.client.get_run(run_id)
                if run.info.experiment_id == self.experiment_id:
                    self.client.update_run(run_id, status="RUNNING")
                    self.log(run_id, tags=self.identity)  # the latest run that extended it
                    return run_id
            except MlflowException:
                pass
        return self.client.create_run(self.experiment_id, run_name=name,
                                      tags={**tags, **self.identity}).info.run_id

    def child(self, parent: str, name: str, tags: dict[str, Any]) -> str:
        tags = {"mlflow.parentRunId": parent, **self.identity,
                **{k: str(v) for k, v in tags.items()}}
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def log(self, run_id: str, metrics: dict[str, float] | None = None,
            params: dict[str, Any] | None = None, tags: dict[str, Any] | None = None,
            step: int | None = None) -> None:
        now = _now_ms()
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, step or 0) for k, v in (metrics or {}).items()],
            params=[Param(k, str(v)) for k, v in (params or {}).items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
        )

    def artifact(self, run_id: str, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), folder)

    def close_open_children(self, run_id: str, status: str) -> None:
        """End the child runs of ``run_id`` that are still RUNNING (their process died)."""
        for run in self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.mlflow.parentRunId = '{run_id}' "
                              "and attributes.status = 'RUNNING'"):
            self.end(run.info.run_id, status)

    def end(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status)

    def status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status
