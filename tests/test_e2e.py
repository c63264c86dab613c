"""The real pipeline end to end: `dvc repro`, `dvc exp run`, the queue, the diffs (tiny config)."""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from conftest import load_yaml, run

pytestmark = pytest.mark.slow


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _assert_all_outputs(repo: Path) -> None:
    p = load_yaml(repo / "params.yaml")["paths"]
    data = _json(repo / p["data_metrics"])
    assert data["pairs"] == 9 * data["sentences"] and data["positives"] > 0
    assert data["unmatched_annotated_sentences"] > 0
    assert _rows(repo / p["pairs"]) and _rows(repo / p["splits"])

    metrics = _json(repo / p["hpo_metrics"])
    assert metrics["n_complete"] + metrics["n_pruned"] == 2 and metrics["n_failed"] == 0
    summary = _json(repo / p["study_summary"])
    study = optuna.load_study(study_name=summary["study_name"],
                              storage=f"sqlite:///{repo / p['study_db']}")
    assert len(study.trials) == 2
    assert len(_rows(repo / p["trials"])) == 2
    assert len(_rows(repo / p["fold_metrics"])) == metrics["fold_fits_run"]
    assert "evaluator" in _json(repo / p["importance"])

    best = yaml.safe_load((repo / p["best_params"]).read_text())
    assert best["trial"] == metrics["best_trial"]
    assert {"learning_rate", "loss_function", "num_train_epochs"} <= set(best["hyperparameters"])

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(repo / p["model_dir"])
    assert model.config.num_labels == 2
    assert AutoTokenizer.from_pretrained(repo / p["model_dir"]) is not None

    evaluation = _json(repo / p["eval_metrics"])
    for key in ("macro_f1", "pos_f1", "roc_auc", "pr_auc",
                *(f"pos_f1_A{i}" for i in range(1, 10))):
        assert 0.0 <= evaluation[key] <= 1.0, key
    assert _rows(repo / p["pr_curve"]) and _rows(repo / p["roc_curve"])
    assert len(_rows(repo / p["confusion"])) == evaluation["test_pairs"]
    assert len(_rows(repo / p["predictions"])) == evaluation["test_pairs"]


def test_repro_then_exp_run_reuses_trials_and_diffs_show_it(repo_copy):
    repo = repo_copy
    run(["dvc", "repro"], repo)
    _assert_all_outputs(repo)
    assert "up to date" in run(["dvc", "status"], repo).stdout
    assert not (repo / "mlruns").exists() and (repo / "mlflow.db").is_file()
    plots = json.loads(run(["dvc", "plots", "show", "--json"], repo).stdout)
    assert len(plots["data"]) == 3 and "errors" not in plots
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "tiny results"], repo)
    p = load_yaml(repo / "params.yaml")["paths"]
    trials_before = _rows(repo / p["trials"])

    start = time.perf_counter()
    run(["dvc", "exp", "run", "-S", "hpo.n_trials=3"], repo)
    seconds = time.perf_counter() - start
    metrics = _json(repo / p["hpo_metrics"])
    assert metrics["n_complete"] + metrics["n_pruned"] == 3
    summary = _json(repo / p["study_summary"])
    assert summary["trials_reused"] == 2 and summary["trials_in_storage"] == 3
    trials_after = _rows(repo / p["trials"])
    keep = ("number", "state", "value", "params_learning_rate")
    assert [{k: r[k] for k in keep} for r in trials_after[:2]] == \
           [{k: r[k] for k in keep} for r in trials_before]
    print(f"exp run with one more trial: {seconds:.1f}s")

    params_diff = json.loads(run(["dvc", "params", "diff", "--all", "--json"], repo).stdout)
    assert params_diff["params.yaml"]["hpo.n_trials"]["new"] == 3
    assert "hyperparameters.learning_rate" in params_diff[p["best_params"]]
    metrics_diff = json.loads(run(["dvc", "metrics", "diff", "--json"], repo).stdout)
    assert metrics_diff[p["hpo_metrics"]]["fold_fits_possible"]["diff"] == 2
    shown = run(["dvc", "exp", "show", "--csv"], repo).stdout
    assert "hyperparameters.learning_rate" in shown and "best_value" in shown


def test_queued_experiment_logs_to_the_workspace_store(repo_copy):
    repo = repo_copy
    run(["dvc", "exp", "run", "--queue", "-S", "hpo.n_trials=1"], repo)
    run(["dvc", "exp", "run", "--run-all", "--jobs", "1"], repo, timeout=900)
    # the queued copy ran under .dvc/tmp/exps; its MLflow runs must be in the workspace store
    assert not list((repo / ".dvc").rglob("mlflow.db"))
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("redsm5-evidence-binding")
    runs = client.search_runs([experiment.experiment_id])
    assert any(r.data.tags.get("optuna.trial_number") == "0" for r in runs)
    assert all(r.info.status != "RUNNING" for r in runs)
    assert Path(experiment.artifact_location.removeprefix("file://")) == repo / "mlartifacts"
    exps = run(["dvc", "exp", "show", "--csv"], repo).stdout
    assert "hpo.n_trials" in exps


def test_two_fresh_runs_give_identical_metrics(repo_copy, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(repo_copy, other)
    for repo in (repo_copy, other):
        run(["dvc", "repro"], repo)
    for name in ("data.json", "hpo.json", "eval.json"):
        assert (repo_copy / "metrics" / name).read_text() == (other / "metrics" / name).read_text()
