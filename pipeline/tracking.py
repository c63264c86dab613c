"""MLflow bookkeeping: where the tracking store is, and the study -> trial -> fold run tree.

Tracking URI: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<workspace root>/mlflow.db`` as an
absolute path. The workspace root is ``DVC_ROOT`` (DVC sets it for every stage, and to the *main*
repository for a ``dvc exp run --queue`` copy under ``.dvc/tmp/exps``), so queued experiments log
to the same store as the workspace instead of a copy that is deleted afterwards. Artifacts go to
``<root>/mlartifacts`` for the same reason.

The store is shared by every experiment of the workspace, like a tracking server; it is not a DVC
output (DVC would delete it before each run) and it is git-ignored.

The retrained model joins the same experiment: ``retrain`` and ``evaluate`` runs are children of
the study's run (found through the study summary), and the model is a version of a registered
model, keyed by the SHA-256 of the model directory so that an unchanged model is not registered
twice (:func:`dir_sha256`, :func:`latest_version`, :func:`find_version`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from pipeline.common import workspace_root

FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"
# Optuna trial state -> MLflow run status.
STATUS_OF_STATE = {"COMPLETE": FINISHED, "PRUNED": KILLED, "FAIL": FAILED}


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

    def start(self, name: str, parent: str | None, tags: dict[str, Any]) -> str:
        """A new run, nested under ``parent`` when there is one, with the run identity tags."""
        if parent:
            return self.child(parent, name, tags)
        return self.client.create_run(self.experiment_id, run_name=name, tags={
            **self.identity, **{k: str(v) for k, v in tags.items()}}).info.run_id

    def child(self, parent: str, name: str, tags: dict[str, Any],
              start_time: float | None = None) -> str:
        """A run nested under ``parent`` (``start_time``: time.time() when it began, if not
        now: a fold recorded after its trial ended)."""
        tags = {"mlflow.parentRunId": parent, **self.identity,
                **{k: str(v) for k, v in tags.items()}}
        start = None if start_time is None else int(start_time * 1000)
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags,
                                      start_time=start).info.run_id

    def log(self, run_id: str, metrics: dict[str, float] | None = None,
            params: dict[str, Any] | None = None, tags: dict[str, Any] | None = None,
            step: int | None = None, at: float | None = None) -> None:
        """Metrics (at ``step``, timestamped ``at`` = time.time(), default now), params, tags."""
        now = _now_ms() if at is None else int(at * 1000)
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

    def end(self, run_id: str, status: str, at: float | None = None) -> None:
        self.client.set_terminated(run_id, status, None if at is None else int(at * 1000))

    def status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status


@contextlib.contextmanager
def fluent_store(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (``mlflow.<flavour>.log_model/load_model``) at ``uri``.

    ``mlflow.set_tracking_uri`` also exports MLFLOW_TRACKING_URI; the previous URI and the
    environment are restored on the way out, so the caller's process does not change stores."""
    import mlflow

    before_env = os.environ.get("MLFLOW_TRACKING_URI")
    before = mlflow.get_tracking_uri() if before_env else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if before_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)


@contextlib.contextmanager
def active_run(runs: RunTree, run_id: str) -> Iterator[None]:
    """Make ``run_id`` the fluent API's active run (``mlflow.<flavour>.log_model`` needs one).
    The run is left FINISHED (FAILED if the block raises)."""
    import mlflow

    with fluent_store(runs.uri), mlflow.start_run(run_id=run_id):
        yield


def dir_sha256(path: str | Path) -> str:
    """SHA-256 over the relative paths and bytes of every file under ``path``, in sorted order:
    the model's identity in the registry (same bytes, same hash, whichever run wrote them)."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def study_link(runs: RunTree, summary_path: str | Path, trial: int | None) -> dict[str, str]:
    """Tags that link a run to the study it came from: ``optuna.study_name``, ``study_run_id``
    and, for the chosen trial, ``chosen_trial`` and ``chosen_trial_run_id`` (when found in this
    store). The study's run id comes from the study summary when it holds one, else from the
    store (the run tagged with the study's name that has no parent). Empty without a summary."""
    try:
        summary = json.loads(Path(summary_path).read_text(encoding="utf-8"))
        name = summary["study_name"]
    except (OSError, ValueError, KeyError, TypeError):
        return {} if trial is None else {"chosen_trial": str(trial)}
    tags = {"optuna.study_name": name}
    study_runs = runs.client.search_runs(
        [runs.experiment_id], filter_string=f"tags.`optuna.study_name` = '{name}'",
        max_results=5000)
    listed = (summary.get("mlflow") or {}).get("study_run_id")
    parents = [r.info.run_id for r in study_runs if "mlflow.parentRunId" not in r.data.tags]
    if listed in parents or (not listed and parents):
        tags["study_run_id"] = listed or parents[0]
    if trial is not None:
        tags["chosen_trial"] = str(trial)
        for r in study_runs:
            if (r.data.tags.get("trial_index") == str(trial)
                    and r.data.tags.get("mlflow.parentRunId") == tags.get("study_run_id")):
                tags["chosen_trial_run_id"] = r.info.run_id
                break
    return tags


def _versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    try:
        found = client.search_model_versions(f"name = '{name}'", max_results=10000)
    except MlflowException:
        return []
    return sorted(found, key=lambda v: int(v.version))


def latest_version(client: MlflowClient, name: str) -> ModelVersion | None:
    """The newest version of registered model ``name`` (None: no such model or no version)."""
    versions = _versions(client, name)
    return versions[-1] if versions else None


def find_version(client: MlflowClient, name: str, sha256: str) -> ModelVersion | None:
    """The newest version of ``name`` whose ``model_sha256`` tag is ``sha256``."""
    matches = [v for v in _versions(client, name) if v.tags.get("model_sha256") == sha256]
    return matches[-1] if matches else None


def find_model_run(runs: RunTree, sha256: str) -> str | None:
    """The latest retrain run of this experiment that logged the model with this hash."""
    found = runs.client.search_runs(
        [runs.experiment_id],
        filter_string=f"tags.model_sha256 = '{sha256}' and tags.pipeline_stage = 'retrain'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return found[0].info.run_id if found else None
