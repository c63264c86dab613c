"""The retrained model in MLflow: logged by retrain, linked to the study, registered once per
distinct model, tagged with its threshold by evaluate, loadable from the registry (real store)."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import dump_yaml, load_yaml
from pipeline import evaluate, export_best, hpo, predict, prepare, retrain
from pipeline.common import run_stage
from pipeline.engine import encode_pairs
from pipeline.engine import predict as score
from pipeline.inputs import read_split
from pipeline.machine import label
from pipeline.model import pick_device
from pipeline.params import load_params
from pipeline.tracking import dir_sha256, fluent_store, tracking_uri

pytestmark = pytest.mark.slow

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _versions(client: MlflowClient, name: str) -> list:
    return sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def _score(model, tokenizer, pairs: pd.DataFrame, params) -> np.ndarray:
    enc = encode_pairs(tokenizer, pairs["criterion"], pairs["sentence"], pairs["label"],
                       params.model.max_length)
    device = pick_device("cpu", 0, "fp32")
    return score(model.to(device.torch), enc, np.arange(len(pairs)), 64, device)


def test_registered_model_scores_like_the_model_directory_and_carries_its_threshold(
        workdir, monkeypatch, capsys):
    # a machine where HF_HUB_OFFLINE is not set (conftest sets it): MLflow's transformers flavour
    # lists the hub repository of the model's name_or_path (the local directory) for a license;
    # retrain makes that call fail at once instead of retrying for 23 s without a network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    offline_when_listed = []
    list_repo_files = huggingface_hub.list_repo_files

    def listing(*args, **kwargs):
        offline_when_listed.append(huggingface_hub.constants.is_offline_mode())
        return list_repo_files(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", listing)
    # what `dvc exp run -n registry-exp` passes to its stages
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", COMMIT)
    monkeypatch.setenv("DVC_EXP_NAME", "registry-exp")
    raw = load_yaml(workdir / "params.yaml")
    raw["train"]["precision"] = "fp32"
    raw["hpo"]["isolate_trials"] = False
    dump_yaml(workdir / "params.yaml", raw)
    params = load_params()
    for stage in (prepare, hpo, export_best, retrain, evaluate):
        stage.run(params)
    assert offline_when_listed == [True]
    paths, name = params.paths, params.registry.model_name
    best = yaml.safe_load(Path(paths.best_params).read_text())
    client = MlflowClient(tracking_uri())

    # one version, keyed by the model directory's hash, with the shipped threshold
    (version,) = _versions(client, name)
    sha = dir_sha256(paths.model_dir)
    assert version.tags["model_sha256"] == sha
    assert float(version.tags["threshold"]) == pytest.approx(best["threshold"])
    assert version.tags["max_length"] == str(params.model.max_length)

    # the retrain run: a child of the study's run, tagged with the lineage
    summary = json.loads(Path(paths.study_summary).read_text())
    study = optuna.load_study(study_name=summary["study_name"], storage=f"sqlite:///{Path(paths.study_db).resolve()}")
    trained = client.get_run(version.run_id)
    tags = trained.data.tags
    assert tags["pipeline_stage"] == "retrain" and tags["model_sha256"] == sha
    assert tags["mlflow.parentRunId"] == tags["study_run_id"] == study.user_attrs["mlflow_run_id"]
    assert tags["optuna.study_name"] == summary["study_name"]
    assert tags["chosen_trial"] == str(best["trial"])
    assert tags["chosen_trial_run_id"] == study.trials[best["trial"]].user_attrs["mlflow_run_id"]
    assert tags["git_commit"] == COMMIT and tags["dvc_exp_name"] == "registry-exp"
    assert tags["registered_model_version"] == "1" and tags["registered_model_new"] == "true"
    info = json.loads((Path(paths.model_dir) / "training.json").read_text())
    assert trained.data.params["seed"] == str(info["seed"])
    assert trained.data.params["learning_rate"] == str(best["hyperparameters"]["learning_rate"])
    assert trained.data.params["precision"] == "fp32"
    assert trained.data.metrics["train_seconds"] > 0
    assert trained.info.status == "FINISHED"

    # the evaluate run: a child of the retrain run, with the metrics and plots
    (evaluated,) = client.search_runs([trained.info.experiment_id],
                                      "tags.pipeline_stage = 'evaluate'")
    assert evaluated.data.tags["mlflow.parentRunId"] == trained.info.run_id
    assert version.tags["eval_run_id"] == evaluated.info.run_id
    eval_json = json.loads(Path(paths.eval_metrics).read_text())
    assert evaluated.data.metrics["pr_auc"] == pytest.approx(eval_json["pr_auc"], rel=1e-5)
    assert evaluated.data.params["shipped_threshold"] == str(eval_json["shipped_threshold"])
    # what produced the numbers, in eval.json (for `dvc metrics diff`, make report) and the run
    device = pick_device(params.train.device, 0, "fp32").type
    assert (eval_json["machine"], eval_json["device"], eval_json["precision"]) == (
        label(device), device, "fp32")
    assert list(eval_json)[-3:] == ["machine", "device", "precision"]
    assert evaluated.data.params["precision"] == "fp32"
    plots = {a.path for a in client.list_artifacts(evaluated.info.run_id, "plots")}
    assert plots == {"plots/pr_curve.csv", "plots/roc_curve.csv", "plots/confusion.csv"}

    # the registered version loads with the transformers flavour and scores like the directory
    with fluent_store(tracking_uri()):
        loaded = mlflow.transformers.load_model(f"models:/{name}/1", return_type="components")
    pairs = read_split(paths.pairs, "test").head(200)
    registered = _score(loaded["model"], loaded["tokenizer"], pairs, params)
    local = _score(AutoModelForSequenceClassification.from_pretrained(paths.model_dir),
                   AutoTokenizer.from_pretrained(paths.model_dir), pairs, params)
    np.testing.assert_allclose(registered, local, atol=1e-5)
    assert np.ptp(local) > 1e-4  # a model that says something, not a constant

    # predict from the registry: same scores and threshold as from the directory
    posts = str(Path(paths.posts))
    predict.run(params, posts, "from_dir.csv")
    predict.run(params, posts, "from_registry.csv", model=f"models:/{name}/1")
    from_dir, from_registry = pd.read_csv("from_dir.csv"), pd.read_csv("from_registry.csv")
    np.testing.assert_allclose(from_registry["probability"], from_dir["probability"], atol=2e-6)
    assert (from_registry["is_evidence"] == from_dir["is_evidence"]).all()
    with pytest.raises(SystemExit) as exit_:
        run_stage(lambda: predict.main(["--posts", posts, "--out", "x.csv",
                                        "--model", f"models:/{name}/7"]))
    assert exit_.value.code == 2 and not Path("x.csv").exists()
    assert f"--model models:/{name}/7: not in the MLflow store" in capsys.readouterr().err

    # an unchanged model is not registered again; a changed one is
    again = retrain.run(params)
    assert again["mlflow"] == {**again["mlflow"], "version": "1", "new_version": "false"}
    assert len(_versions(client, name)) == 1
    raw["seed"] += 1
    dump_yaml(workdir / "params.yaml", raw)
    changed = retrain.run(load_params())
    assert changed["mlflow"]["new_version"] == "true" and changed["mlflow"]["version"] == "2"
    assert [v.tags["model_sha256"] == sha for v in _versions(client, name)] == [True, False]
    runs = client.search_runs([trained.info.experiment_id], "tags.pipeline_stage = 'retrain'")
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
