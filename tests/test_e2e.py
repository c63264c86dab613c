"""The real pipeline end to end: `dvc repro`, `dvc exp run`, the queue, the diffs (tiny config)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from conftest import dump_yaml, load_yaml, run

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

    assert _rows(repo / p["pareto"])
    assert {f.name for f in (repo / p["optuna_plots"]).iterdir()} >= {
        "optimization_history.html", "param_importances.html"}
    for plot in ("hpo_history_plot", "hpo_importance_plot", "hpo_folds_plot"):
        assert (repo / p[plot]).is_file()

    best = yaml.safe_load((repo / p["best_params"]).read_text())
    assert best["selection"]["rule"] == "mean_minus_k_se" and best["selection"]["reason"]
    assert {"learning_rate", "loss_function", "num_train_epochs"} <= set(best["hyperparameters"])
    assert 0.0 < best["threshold"] < 1.0

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(repo / p["model_dir"])
    assert model.config.num_labels == 2
    assert AutoTokenizer.from_pretrained(repo / p["model_dir"]) is not None
    # the tests run with HF_HUB_OFFLINE=1, which transformers would record in the saved tokenizer
    # config: the model directory (a DVC output) must not depend on the environment
    assert "local_files_only" not in _json(repo / p["model_dir"] / "tokenizer_config.json")

    evaluation = _json(repo / p["eval_metrics"])
    for key in ("macro_f1", "pos_f1", "roc_auc", "pr_auc",
                *(f"pos_f1_A{i}" for i in range(1, 10)), "tuned_pos_f1", "tuned_macro_f1",
                "baseline_pos_f1", "baseline_pr_auc", "baseline_roc_auc"):
        assert 0.0 <= evaluation[key] <= 1.0, key
    assert evaluation["tuned_threshold"] == best["tuned_threshold"]
    assert evaluation["shipped_threshold"] == best["threshold"] in (0.5, best["tuned_threshold"])
    assert evaluation["shipped_is_tuned"] == int(best["threshold"] == best["tuned_threshold"])
    assert evaluation["pr_auc_minus_baseline"] == pytest.approx(
        evaluation["pr_auc"] - evaluation["baseline_pr_auc"], abs=2e-6)
    assert evaluation["pos_f1_minus_baseline"] == pytest.approx(
        evaluation["shipped_pos_f1"] - evaluation["baseline_pos_f1"], abs=2e-6)
    assert _rows(repo / p["pr_curve"]) and _rows(repo / p["roc_curve"])
    assert len(_rows(repo / p["confusion"])) == evaluation["test_pairs"]
    assert len(_rows(repo / p["predictions"])) == evaluation["test_pairs"]


def test_repro_then_exp_run_reuses_trials_and_diffs_show_it(reproduced):
    repo = reproduced  # `dvc repro` ran at HEAD~1, its results are committed at HEAD
    repro_commit = run(["git", "rev-parse", "HEAD~1"], repo).stdout.strip()
    _assert_all_outputs(repo)
    assert "up to date" in run(["dvc", "status"], repo).stdout
    assert not (repo / "mlruns").exists() and (repo / "mlflow.db").is_file()
    plots = json.loads(run(["dvc", "plots", "show", "--json"], repo).stdout)
    assert len(plots["data"]) == 6 and "errors" not in plots
    p = load_yaml(repo / "params.yaml")["paths"]
    trials_before = _rows(repo / p["trials"])

    _assert_nesting_as_dashboards_read_it(repo)
    start = time.perf_counter()
    run(["dvc", "exp", "run", "-n", "three-trials", "-S", "hpo.n_trials=3"], repo)
    seconds = time.perf_counter() - start
    metrics = _json(repo / p["hpo_metrics"])
    assert metrics["n_complete"] + metrics["n_pruned"] == 3
    storage = f"sqlite:///{repo / p['study_db']}"
    (name,) = optuna.get_all_study_names(storage)
    # the first two trials were reused, not run again: the study holds three in all
    assert len(optuna.load_study(study_name=name, storage=storage).trials) == 3
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

    # one identity: the trial run under `dvc exp run` knows the experiment and the commit
    study = optuna.load_study(study_name=name,
                              storage=f"sqlite:///{repo / p['study_db']}")
    new = study.trials[2]
    head = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    assert new.user_attrs["dvc_exp_name"] == "three-trials"
    assert new.user_attrs["git_commit"] == head
    assert study.trials[0].user_attrs["git_commit"] == repro_commit  # `dvc repro` before
    mlflow_run = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").get_run(
        new.user_attrs["mlflow_run_id"])
    assert mlflow_run.data.tags["dvc_exp_name"] == "three-trials"
    assert mlflow_run.data.tags["git_commit"] == head


def _assert_nesting_as_dashboards_read_it(repo: Path) -> None:
    """What optuna-dashboard and `mlflow ui` see: study -> trial -> fold runs, linked both ways."""
    import mlflow

    p = load_yaml(repo / "params.yaml")["paths"]
    name = _json(repo / p["study_summary"])["study_name"]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{repo / p['study_db']}")
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    try:
        runs = mlflow.search_runs(experiment_names=["redsm5-evidence-binding"])
    finally:  # set_tracking_uri also exports MLFLOW_TRACKING_URI; later tests must not see it
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    parents = runs[runs["tags.mlflow.parentRunId"].isna()]
    assert list(parents["tags.optuna.study_name"]) == [name]
    assert study.user_attrs["mlflow_run_id"] == parents["run_id"].iloc[0]
    by_id = runs.set_index("run_id")
    for trial in study.trials:
        run_id = trial.user_attrs["mlflow_run_id"]
        assert by_id.loc[run_id, "tags.mlflow.parentRunId"] == parents["run_id"].iloc[0]
        assert by_id.loc[run_id, "tags.optuna.trial_number"] == str(trial.number)
        folds = runs[runs["tags.mlflow.parentRunId"] == trial.user_attrs["mlflow_run_id"]]
        assert len(folds) == sum(trial.user_attrs.get(f"fold{k}") is not None for k in (0, 1))
        assert set(folds["tags.optuna.trial_number"]) == {str(trial.number)}


def test_warm_start_and_multi_objective_through_dvc_repro(reproduced, tmp_path):
    repo = reproduced
    p = load_yaml(repo / "params.yaml")["paths"]
    earlier = tmp_path / "best_params_main.yaml"
    shutil.copy(repo / p["best_params"], earlier)
    best = yaml.safe_load(earlier.read_text())["hyperparameters"]

    # warm start from a best-params file, two objectives (pr_auc up, epochs down)
    params = load_yaml(repo / "params.yaml")
    params["hpo"].update(warm_start=str(earlier), objectives=["epochs"])
    params["hpo"]["pruner"]["name"] = "none"
    params["hpo"]["search_space"]["num_train_epochs"] = {"type": "int", "low": 1, "high": 2}
    dump_yaml(repo / "params.yaml", params)
    run(["dvc", "repro"], repo)
    summary = _json(repo / p["study_summary"])
    assert summary["directions"] == ["maximize", "minimize"]
    study = optuna.load_study(study_name=summary["study_name"],
                              storage=f"sqlite:///{repo / p['study_db']}")
    first = study.trials[0].params
    assert first["learning_rate"] == best["learning_rate"]
    assert first["loss_function"] == best["loss_function"]
    assert len(study.trials[0].values) == 2
    pareto = _rows(repo / p["pareto"])
    chosen = yaml.safe_load((repo / p["best_params"]).read_text())
    assert chosen["selection"]["cost"] == "epochs"
    assert chosen["trial"] in [int(r["number"]) for r in pareto]
    assert _json(repo / p["hpo_metrics"])["n_pareto"] == len(pareto)


def test_report_on_two_commits(reproduced):
    repo = reproduced  # HEAD: the base's results
    params = load_yaml(repo / "params.yaml")
    params["hpo"]["n_trials"] = 3
    dump_yaml(repo / "params.yaml", params)
    run(["dvc", "repro"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "three trials"], repo)
    run([sys.executable, "-m", "pipeline.report", "--rev", "HEAD~1", "--out", "report.md"],
        repo)
    report = (repo / "report.md").read_text()
    print(report)
    for heading in ("## Params", "## Best params", "## Metrics", "## Test metrics (95% bootstrap",
                    "## Chosen trials, fold by fold", "## Hyperparameter importance",
                    "## Plots"):
        assert heading in report, heading
    assert "| params.yaml | hpo.n_trials | 2 | 3 |" in report
    assert "fold_fits_possible" in report
    assert "| pr_auc - baseline |" in report and "| pos_f1 (shipped) - baseline |" in report
    assert "paired t-test" in report or "identical or single-fold" in report
    assert "dvc plots diff HEAD~1" in report
    assert "(trial " in report and "are not available" not in report

    # `dvc plots diff` renders every plot with both revisions' data
    diff = json.loads(run(["dvc", "plots", "diff", "HEAD~1", "--json"], repo).stdout)
    assert len(diff["data"]) == 6 and not diff.get("errors")
    for plot_id, (plot, *_) in diff["data"].items():
        revs = {v["rev"] for v in plot["content"]["data"]["values"]}
        assert revs == {"workspace", "HEAD~1"}, (plot_id, revs)

    # A reviewer's clone without the base's DVC cache: the committed hpo fold plot stands in.
    shutil.rmtree(repo / ".dvc" / "cache")
    run([sys.executable, "-m", "pipeline.report", "--rev", "HEAD~1", "--out", "report.md"],
        repo)
    report = (repo / "report.md").read_text()
    assert "(trial " in report and "are not available" not in report
    assert "paired t-test" in report or "identical or single-fold" in report


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


def test_two_fresh_runs_give_identical_metrics(repo_copy, reproduced_template):
    run(["dvc", "repro"], repo_copy)  # the other fresh run: the template's, in another folder
    for name in ("data.json", "hpo.json", "eval.json"):
        assert (repo_copy / "metrics" / name).read_text() == \
            (reproduced_template / "metrics" / name).read_text()
