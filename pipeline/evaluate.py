"""Stage ``evaluate``: score the held-out test split with the retrained model.

Reads   paths.model_dir, paths.pairs (both splits: the baseline trains on ``train``)
        params: model.max_length, train.*, ``threshold`` (shipped) and ``tuned_threshold`` from
        paths.best_params
Writes  paths.eval_metrics   macro_f1, pos_f1, roc_auc, pr_auc and pos_f1 per criterion at the
                             default threshold 0.5; the margins to the TF-IDF + logistic
                             regression baseline (``pr_auc_minus_baseline``,
                             ``pos_f1_minus_baseline``: at the shipped threshold); the shipped
                             threshold (``threshold`` of paths.best_params), its pos_f1 and
                             whether it is the tuned one; the scores at the threshold tuned on
                             the chosen trial's out-of-fold predictions (``tuned_*``); the
                             baseline's own (``baseline_*``); and what produced them:
                             ``machine`` (pipeline.machine.label), ``device`` (cpu or cuda)
                             and ``precision`` (fp32, bf16 or fp16: train.precision resolved)
        paths.pr_curve, paths.roc_curve, paths.confusion   DVC plots (declared in dvc.yaml)
        paths.predictions   the probability of every test pair
Logs    an MLflow run ``evaluate``, a child of the ``retrain`` run that logged this model (found
        by the model directory's SHA-256; else a child of the study's run), with the metrics, the
        plots, the predictions, the shipped threshold and the machine; the registered model
        version with this hash gets the tags ``threshold`` (the shipped one, which predict
        applies), ``eval_run_id`` and its headline test metrics.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, precision_recall_curve, roc_curve
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pipeline.baseline import tfidf_baseline
from pipeline.common import round_floats, run_stage, write_json, write_text
from pipeline.engine import encode_pairs, predict
from pipeline.inputs import read_best_params, read_split
from pipeline.machine import label
from pipeline.metrics import classification_metrics
from pipeline.model import pick_device
from pipeline.params import THRESHOLD, Params, load_params
from pipeline.predictions import predictions_csv
from pipeline.tracking import (
    FAILED,
    FINISHED,
    RunTree,
    dir_sha256,
    find_model_run,
    find_version,
    study_link,
)

MAX_CURVE_POINTS = 200  # plots stay small enough to commit and diff
# The keys of eval.json that say what produced it, last in `dvc exp show` (strings: not metrics)
HARDWARE = ("machine", "device", "precision")


def _thin(frame: pd.DataFrame) -> pd.DataFrame:
    if len(frame) <= MAX_CURVE_POINTS:
        return frame
    keep = np.unique(np.linspace(0, len(frame) - 1, MAX_CURVE_POINTS).round().astype(int))
    return frame.iloc[keep]


def _to_csv(frame: pd.DataFrame) -> str:
    """CSV with floats at 4 decimals (the plot files)."""
    buf = io.StringIO()
    frame.to_csv(buf, index=False, lineterminator="\n", float_format="%.4f")
    return buf.getvalue()


def scores(test: pd.DataFrame, probs: np.ndarray, threshold: float) -> dict[str, float]:
    """The four metrics at ``threshold`` and pos_f1 per criterion (pos_f1_A1 ... pos_f1_A9)."""
    labels = test["label"].to_numpy()
    out = classification_metrics(labels, probs, threshold)
    preds = probs >= threshold
    for cid in sorted(test["criterion_id"].unique()):
        rows = (test["criterion_id"] == cid).to_numpy()
        out[f"pos_f1_{cid.replace('.', '')}"] = float(
            f1_score(labels[rows], preds[rows], zero_division=0))
    return out


def log_eval_run(params: Params, metrics: dict[str, Any], trial: int | None) -> dict[str, str]:
    """Log the evaluate run and tag the registered version of this model with its threshold."""
    paths = params.paths
    runs = RunTree(params.hpo.mlflow_experiment)
    sha = dir_sha256(paths.model_dir)
    link = study_link(runs, paths.study_summary, trial)
    model_run = find_model_run(runs, sha)
    name = params.registry.model_name
    version = find_version(runs.client, name, sha)
    tags = {**link, "pipeline_stage": "evaluate", "model_sha256": sha}
    if model_run:
        tags["retrain_run_id"] = model_run
    if version is not None:
        tags.update(registered_model=name, registered_model_version=version.version)
    run_id = runs.start("evaluate", model_run or link.get("study_run_id"), tags)
    status = FAILED
    try:
        runs.log(run_id, metrics={k: v for k, v in metrics.items()
                                  if isinstance(v, (int, float))},
                 params={"shipped_threshold": metrics["shipped_threshold"],
                         "max_length": params.model.max_length,
                         **{k: metrics[k] for k in HARDWARE if k in metrics}})
        for path in (paths.pr_curve, paths.roc_curve, paths.confusion):
            runs.artifact(run_id, path, "plots")
        runs.artifact(run_id, paths.predictions)
        runs.artifact(run_id, paths.eval_metrics)
        if version is not None:
            for key, value in {"threshold": metrics["shipped_threshold"], "eval_run_id": run_id,
                               "test_roc_auc": metrics["roc_auc"],
                               "test_pr_auc": metrics["pr_auc"],
                               "test_pos_f1": metrics["shipped_pos_f1"]}.items():
                runs.client.set_model_version_tag(name, version.version, key, str(value))
        status = FINISHED
    finally:
        runs.end(run_id, status)
    return {"run_id": run_id, "version": version.version if version is not None else ""}


def reviewer_order(metrics: dict[str, Any]) -> dict[str, Any]:
    """The test metrics in the order ``dvc exp show`` should show them: the model's headline
    scores, the margins to the baseline, the shipped threshold, the scores at the tuned
    threshold, the baseline, the per-criterion scores and counts, and the machine."""
    head = ("pr_auc", "roc_auc", "macro_f1", "pos_f1")
    groups = [
        [k for k in head if k in metrics],
        [k for k in ("pr_auc_minus_baseline", "pos_f1_minus_baseline") if k in metrics],
        sorted(k for k in metrics if k.startswith("shipped_")),
        sorted(k for k in metrics if k.startswith("tuned_")),
        [f"baseline_{k}" for k in head if f"baseline_{k}" in metrics],
        sorted(k for k in metrics if k.startswith("baseline_") and k[9:] not in head),
    ]
    hardware = [k for k in HARDWARE if k in metrics]
    seen = {k for group in groups for k in group} | set(hardware)
    groups += [sorted(k for k in metrics if k not in seen), hardware]
    return {k: metrics[k] for group in groups for k in group}


def run(params: Params) -> dict[str, Any]:
    paths = params.paths
    train, test = read_split(paths.pairs, "train"), read_split(paths.pairs, "test")
    best = read_best_params(paths.best_params)
    shipped, tuned = best.threshold, best.tuned_or_shipped

    tokenizer = AutoTokenizer.from_pretrained(paths.model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(paths.model_dir)
    device = pick_device(params.train.device, params.train.cpu_threads, params.train.precision)
    model.to(device.torch)
    enc = encode_pairs(tokenizer, test["criterion"], test["sentence"], test["label"],
                       params.model.max_length)
    probs = predict(model, enc, test.index.to_numpy(), params.train.eval_batch_size, device)
    labels = test["label"].to_numpy()

    metrics: dict[str, Any] = scores(test, probs, THRESHOLD)
    metrics.update({"test_pairs": len(test), "test_positives": int(labels.sum()),
                    "tuned_threshold": tuned})
    at_tuned = scores(test, probs, tuned)
    metrics.update({f"tuned_{k}": v for k, v in at_tuned.items()
                    if k not in ("roc_auc", "pr_auc")})  # threshold-free: same as above
    at_shipped = classification_metrics(labels, probs, shipped)
    metrics.update({"shipped_threshold": shipped, "shipped_is_tuned": int(shipped == tuned),
                    "shipped_pos_f1": at_shipped["pos_f1"],
                    "shipped_macro_f1": at_shipped["macro_f1"]})
    base_probs, base_threshold = tfidf_baseline(train, test)
    base = classification_metrics(labels, base_probs, base_threshold)
    metrics.update({f"baseline_{k}": v for k, v in base.items()})
    metrics["baseline_threshold"] = base_threshold
    metrics["pr_auc_minus_baseline"] = metrics["pr_auc"] - base["pr_auc"]
    metrics["pos_f1_minus_baseline"] = at_shipped["pos_f1"] - base["pos_f1"]
    # what produced these numbers: the same code gives bf16 scores on a CPU with bf16 units and
    # fp32 scores elsewhere (train.precision: auto); make report warns when base and head differ
    metrics.update({"machine": label(device.type), "device": device.type,
                    "precision": device.precision})
    write_json(paths.eval_metrics, round_floats(reviewer_order(metrics)), sort_keys=False)

    precision, recall, _ = precision_recall_curve(labels, probs)
    fpr, tpr, _ = roc_curve(labels, probs)
    write_text(paths.pr_curve, _to_csv(_thin(pd.DataFrame({"recall": recall,
                                                           "precision": precision}))))
    write_text(paths.roc_curve, _to_csv(_thin(pd.DataFrame({"fpr": fpr, "tpr": tpr}))))
    names = np.array(["no evidence", "evidence"])
    write_text(paths.confusion, _to_csv(pd.DataFrame({
        "actual": names[labels], "predicted": names[(probs >= shipped).astype(int)]})))
    write_text(paths.predictions, predictions_csv(test, labels, probs, base_probs))
    registry = log_eval_run(params, metrics, best.trial)
    return {**metrics, "mlflow": registry}


def main() -> None:
    m = run(load_params())
    print(f"evaluate on {m['test_pairs']} test pairs: roc_auc {m['roc_auc']:.4f} pr_auc "
          f"{m['pr_auc']:.4f}; pos_f1 {m['pos_f1']:.4f} at 0.5, {m['tuned_pos_f1']:.4f} at the "
          f"tuned {m['tuned_threshold']:.3f}, {m['shipped_pos_f1']:.4f} at the shipped "
          f"{m['shipped_threshold']:.3f}; TF-IDF baseline pos_f1 {m['baseline_pos_f1']:.4f} "
          f"pr_auc {m['baseline_pr_auc']:.4f} (margins {m['pr_auc_minus_baseline']:+.4f}, "
          f"{m['pos_f1_minus_baseline']:+.4f})")
    if m["mlflow"]["version"]:
        print(f"evaluate: registered model version {m['mlflow']['version']} carries threshold "
              f"{m['shipped_threshold']:.4f}")
    else:
        print("evaluate: no registered model version has this model's hash (run retrain to "
              "register it); metrics logged to MLflow only")


if __name__ == "__main__":
    run_stage(main)
