"""The real pipeline end to end: `dvc repro`, `dvc exp run`, the queue, the diffs (tiny config)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from mlflow import MlflowClient

from conftest import (
    BIN,
    ROOT,
    apply_overrides,
    copy_workspace,
    dump_yaml,
    load_yaml,
    make_repo,
    run,
    tiny_overrides,
)
from pipeline import report as report_module

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
    # the tokenizer saved with the model is the one it was trained with
    tokenizer = AutoTokenizer.from_pretrained(repo / p["model_dir"])
    trained_with = AutoTokenizer.from_pretrained(load_yaml(repo / "params.yaml")["model"]["name"])
    assert tokenizer.get_vocab() == trained_with.get_vocab()
    assert tokenizer.vocab_size == model.config.vocab_size
    pair = ("Insomnia or hypersomnia nearly every day.", "i cant sleep lol, up till 4am again")
    assert tokenizer(*pair)["input_ids"] == trained_with(*pair)["input_ids"]
    # the tests run with HF_HUB_OFFLINE=1, which transformers would record in the saved tokenizer
    # config: the model directory (a DVC output) must not depend on the environment
    assert "local_files_only" not in _json(repo / p["model_dir"] / "tokenizer_config.json")

    evaluation = _json(repo / p["eval_metrics"])
    for key in ("macro_f1", "pos_f1", "roc_auc", "pr_auc",
                *(f"pos_f1_A{i}" for i in range(1, 10)), "tuned_pos_f1", "tuned_macro_f1",
                "baseline_pos_f1", "baseline_pr_auc", "baseline_roc_auc"):
        assert 0.0 <= evaluation[key] <= 1.0, key
    assert evaluation["tuned_threshold"] == best["tuned_threshold"]
    # export_best.threshold: checked: the chosen trial's tuned threshold ships only when tuning
    # on the other folds raised pos_f1 over 0.5 on every fold (its threshold_gain > 0)
    (chosen,) = [r for r in _rows(repo / p["trials"]) if int(r["number"]) == best["trial"]]
    assert best["tuned_threshold"] == float(chosen["threshold"])
    shipped = best["tuned_threshold"] if float(chosen["threshold_gain"]) > 0 else 0.5
    assert evaluation["shipped_threshold"] == best["threshold"] == shipped
    assert evaluation["shipped_is_tuned"] == int(best["threshold"] == best["tuned_threshold"])
    assert evaluation["pr_auc_minus_baseline"] == pytest.approx(
        evaluation["pr_auc"] - evaluation["baseline_pr_auc"], abs=2e-6)
    assert evaluation["pos_f1_minus_baseline"] == pytest.approx(
        evaluation["shipped_pos_f1"] - evaluation["baseline_pos_f1"], abs=2e-6)
    assert _rows(repo / p["pr_curve"]) and _rows(repo / p["roc_curve"])
    assert len(_rows(repo / p["confusion"])) == evaluation["test_pairs"]
    assert len(_rows(repo / p["predictions"])) == evaluation["test_pairs"]


@pytest.fixture(scope="module")
def three_trials(tmp_path_factory, reproduced_template) -> tuple[Path, float]:
    """A copy of ``reproduced_template`` after `dvc exp run -n three-trials -S hpo.n_trials=3`
    in its workspace (the study extended by one trial; prepare up to date), and the seconds the
    run took. Run once for the module: tests read it, or take a copy_workspace of it."""
    repo = copy_workspace(reproduced_template, tmp_path_factory.mktemp("three-trials") / "repo")
    start = time.perf_counter()
    run(["dvc", "exp", "run", "-n", "three-trials", "-S", "hpo.n_trials=3"], repo)
    return repo, time.perf_counter() - start


def test_repro_then_exp_run_reuses_trials_and_diffs_show_it(reproduced, three_trials):
    # `reproduced`: `dvc repro` ran at HEAD~1, its results are committed at HEAD; `three_trials`:
    # the same workspace after `dvc exp run -S hpo.n_trials=3`
    repo = reproduced
    repro_commit = run(["git", "rev-parse", "HEAD~1"], repo).stdout.strip()
    _assert_all_outputs(repo)
    assert "up to date" in run(["dvc", "status"], repo).stdout
    assert not (repo / "mlruns").exists() and (repo / "mlflow.db").is_file()
    plots = json.loads(run(["dvc", "plots", "show", "--json"], repo).stdout)
    assert len(plots["data"]) == 6 and "errors" not in plots
    p = load_yaml(repo / "params.yaml")["paths"]
    trials_before = _rows(repo / p["trials"])
    _assert_nesting_as_dashboards_read_it(repo)

    repo, seconds = three_trials
    assert run(["git", "rev-parse", "HEAD~1"], repo).stdout.strip() == repro_commit
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
    # retrain and evaluate, later in the same `dvc repro`, took that trial
    trained = _json(repo / p["model_dir"] / "training.json")["hyperparameters"]
    assert {k: trained[k] for k in chosen["hyperparameters"]} == chosen["hyperparameters"]
    assert _json(repo / p["eval_metrics"])["shipped_threshold"] == chosen["threshold"]


def _paired(repo: Path, base_best: Path) -> bool:
    """Whether the report can pair the chosen trials of the base (``base_best``) and of
    ``repo`` fold by fold: their fold metrics (one study, the same folds) differ, and not by
    the same amount on every fold. Else its paired section says "identical or single-fold"."""
    params = load_yaml(repo / "params.yaml")
    p, metric = params["paths"], params["hpo"]["metric"]
    folds: dict[int, dict[str, float]] = {}
    for r in _rows(repo / p["fold_metrics"]):
        folds.setdefault(int(r["trial"]), {})[r["fold"]] = float(r[metric])
    base = yaml.safe_load(base_best.read_text())["trial"]
    this = yaml.safe_load((repo / p["best_params"]).read_text())["trial"]
    assert len(folds[this]) == 2 and folds[this].keys() == folds[base].keys()
    return bool(np.std([folds[this][k] - folds[base][k] for k in folds[this]]) > 0)


def test_report_on_two_commits(three_trials, reproduced_template, tmp_path, monkeypatch):
    # HEAD~1: the base's results; HEAD: the workspace after one more trial (`three_trials`)
    repo = copy_workspace(three_trials[0], tmp_path / "repo")
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "three trials"], repo)
    base_best = reproduced_template / load_yaml(repo / "params.yaml")["paths"]["best_params"]
    paired, unpaired = "paired t-test", "identical or single-fold"
    if not _paired(repo, base_best):
        paired, unpaired = unpaired, paired
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
    assert paired in report and unpaired not in report
    assert "dvc plots diff HEAD~1" in report
    assert "(trial " in report and "are not available" not in report

    # `dvc plots diff` renders every plot with both revisions' data
    diff = json.loads(run(["dvc", "plots", "diff", "HEAD~1", "--json"], repo).stdout)
    assert len(diff["data"]) == 6 and not diff.get("errors")
    for plot_id, (plot, *_) in diff["data"].items():
        revs = {v["rev"] for v in plot["content"]["data"]["values"]}
        assert revs == {"workspace", "HEAD~1"}, (plot_id, revs)

    # A reviewer's clone without the base's DVC cache: the committed hpo fold plot stands in.
    # Here in this process, with 100 bootstrap resamples (the process above drew all 1000, the
    # bootstrap itself is test_review's): what differs is where the fold metrics come from.
    shutil.rmtree(repo / ".dvc" / "cache")
    monkeypatch.chdir(repo)
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")  # report calls dvc
    monkeypatch.setattr(sys, "argv", ["report", "--rev", "HEAD~1", "--out", "report.md"])
    monkeypatch.setattr(report_module, "BOOTSTRAP", 100)
    report_module.main()
    report = (repo / "report.md").read_text()
    assert "(trial " in report and "are not available" not in report
    assert paired in report and unpaired not in report


@pytest.fixture(scope="module")
def queued_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A fresh repo_copy (nothing run before) whose pipeline ran once as a queued experiment:
    `dvc exp run --queue -S hpo.n_trials=2`, then `--run-all`, in DVC's temporary copy under
    .dvc/tmp/exps. The commit says 1 trial; with the 2 set on the queue the params are the
    template's, so that this is also a second fresh run of the same pipeline in another folder.
    Run once for the module; tests only read it."""
    params = apply_overrides(load_yaml(ROOT / "params.yaml"), tiny_overrides(tiny_model_dir))
    assert params["hpo"]["n_trials"] == 2
    params["hpo"]["n_trials"] = 1
    repo = make_repo(tmp_path_factory.mktemp("queued") / "repo", params)
    run(["dvc", "exp", "run", "--queue", "-S", "hpo.n_trials=2"], repo)
    run(["dvc", "exp", "run", "--run-all", "--jobs", "1"], repo, timeout=900)
    return repo


def _experiment_ref(repo: Path) -> str:
    """The git ref of the one experiment ``repo`` ran (refs/exps/<baseline>/<name>)."""
    (name,) = run(["dvc", "exp", "list", "--name-only"], repo).stdout.split()
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo).stdout.split()
    (ref,) = [r for r in refs if r.rsplit("/", 1)[-1] == name]
    return ref


def test_queued_experiment_logs_to_the_workspace_store(queued_run):
    repo = queued_run
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
    # the param set on the queue is what ran (the commit says 1)
    ref = _experiment_ref(repo)
    ran = yaml.safe_load(run(["git", "show", f"{ref}:params.yaml"], repo).stdout)
    assert ran["hpo"]["n_trials"] == 2
    assert load_yaml(repo / "params.yaml")["hpo"]["n_trials"] == 1
    hpo = json.loads(run(["git", "show", f"{ref}:metrics/hpo.json"], repo).stdout)
    assert hpo["n_complete"] + hpo["n_pruned"] == 2


def test_two_fresh_runs_give_identical_metrics(queued_run, reproduced_template):
    # the template's `dvc repro`, and the queued experiment of another repository, run by DVC in
    # its temporary copy (another folder): the same bytes in every metrics file
    ref = _experiment_ref(queued_run)
    for name in ("data.json", "hpo.json", "eval.json"):
        assert run(["git", "show", f"{ref}:metrics/{name}"], queued_run).stdout == \
            (reproduced_template / "metrics" / name).read_text()
