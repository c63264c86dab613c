"""Byte-stable outputs: rerunning a stage on unchanged inputs writes the same bytes, so
`dvc.lock` does not change although nothing did."""

from __future__ import annotations

import pytest
import yaml

from conftest import digests, load_yaml, run
from pipeline.study_outputs import portable_storage


def _out_hashes(lock: str, stage: str) -> dict[str, str]:
    return {o["path"]: o.get("md5") for o in yaml.safe_load(lock)["stages"][stage]["outs"]}


def test_storage_urls_in_outputs_are_relative_to_the_workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    inside = tmp_path / "artifacts" / "hpo" / "study.db"
    assert portable_storage(f"sqlite:///{inside}") == "sqlite:///artifacts/hpo/study.db"
    assert portable_storage(f"journal:{tmp_path}/j.log") == "journal:j.log"
    assert portable_storage("sqlite:////elsewhere/study.db") == "sqlite:////elsewhere/study.db"
    url = "postgresql://hpo:***@db.internal/hpo"
    assert portable_storage(url) == url


@pytest.mark.slow
def test_rerunning_hpo_on_a_finished_study_leaves_dvc_lock_unchanged(reproduced,
                                                                     reproduced_template):
    """Rerun in a copy of the workspace that ran the study, in another folder: no output may
    depend on where the workspace is."""
    repo = reproduced
    p = load_yaml(repo / "params.yaml")["paths"]
    lock = (repo / "dvc.lock").read_text()
    hpo_outs = [p[k] for k in ("trials", "fold_metrics", "pareto", "study_summary", "importance",
                               "optuna_plots", "hpo_history_plot", "hpo_importance_plot",
                               "hpo_folds_plot", "hpo_metrics")]
    before = {k: v for out in hpo_outs for k, v in digests(repo / out).items()}
    summary = (repo / p["study_summary"]).read_text()
    assert str(reproduced_template) not in summary and "run_id" not in summary

    run(["dvc", "repro", "-f", "hpo"], repo)  # prepare and hpo again, same inputs
    after = {k: v for out in hpo_outs for k, v in digests(repo / out).items()}
    assert after == before
    again = (repo / "dvc.lock").read_text()
    changed = sorted(path for stage in ("prepare", "hpo")
                     for path, md5 in _out_hashes(again, stage).items()
                     if _out_hashes(lock, stage)[path] != md5)
    assert not changed, f"outputs that changed bytes: {changed}"
    assert again == lock
