"""The scratch workspace of the benchmarks that run the real stages (hpo_efficiency, study_speed,
trial_isolation): params.yaml with its inputs read from the checkout and every output written
under a temporary directory with its own MLflow store, so a benchmark never touches the
checkout's study, store or results."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def raw_params(workdir: Path) -> dict:
    """params.yaml as the project reads it (its YAML rules), before validation: the data paths
    (``data/...``) in the checkout, every other path under ``workdir``."""
    from pipeline.params import YamlLoader

    raw = yaml.load((ROOT / "params.yaml").read_text(encoding="utf-8"), Loader=YamlLoader)
    for key, value in raw["paths"].items():
        raw["paths"][key] = str((ROOT if value.startswith("data") else workdir) / value)
    return raw


@contextmanager
def workspace() -> Iterator[Path]:
    """A temporary directory made the current one, marked as a DVC root, with its own MLflow
    store (``MLFLOW_TRACKING_URI``); removed afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / ".dvc").mkdir()
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
        os.chdir(workdir)
        yield workdir
