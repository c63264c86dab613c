"""Stage ``evaluate``: score the held-out test split with the retrained model.

Reads   paths.model_dir, paths.pairs (the ``test`` split)   (params: model.max_length, train.*)
Writes  paths.eval_metrics   macro_f1, pos_f1, roc_auc, pr_auc and pos_f1 per criterion
        paths.pr_curve, paths.roc_curve, paths.confusion   DVC plots (declared in dvc.yaml)
        paths.predictions   the probability of every test pair
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, precision_recall_curve, roc_curve
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pipeline.common import round_floats, run_stage, write_json, write_text
from pipeline.engine import encode_pairs, predict
from pipeline.metrics import THRESHOLD, classification_metrics
from pipeline.model import pick_device
from pipeline.params import Params, load_params

MAX_CURVE_POINTS = 200  # plots stay small enough to commit and diff


def _thin(frame: pd.DataFrame) -> pd.DataFrame:
    if len(frame) <= MAX_CURVE_POINTS:
        return frame
    keep = np.unique(np.linspace(0, len(frame) - 1, MAX_CURVE_POINTS).round().astype(int))
    return frame.iloc[keep]


def _to_csv(frame: pd.DataFrame, digits: int = 4) -> str:
    buf = io.StringIO()
    frame.to_csv(buf, index=False, lineterminator="\n", float_format=f"%.{digits}f")
    return buf.getvalue()


def run(params: Params) -> dict[str, Any]:
    paths = params.paths
    pairs = pd.read_csv(paths.pairs, keep_default_na=False)
    test = pairs[pairs["split"] == "test"].reset_index(drop=True)
    tokenizer = AutoTokenizer.from_pretrained(paths.model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(paths.model_dir)
    device = pick_device(params.train.device, params.train.cpu_threads)
    model.to(device.torch)
    enc = encode_pairs(tokenizer, test["criterion"], test["sentence"], test["label"],
                       params.model.max_length)
    probs = predict(model, enc, test.index.to_numpy(), params.train.eval_batch_size, device)
    labels = test["label"].to_numpy()
    preds = (probs >= THRESHOLD).astype(int)

    metrics: dict[str, Any] = classification_metrics(labels, probs)
    metrics.update({"test_pairs": len(test), "test_positives": int(labels.sum()),
                    "threshold": THRESHOLD})
    for cid in sorted(test["criterion_id"].unique()):
        rows = (test["criterion_id"] == cid).to_numpy()
        metrics[f"pos_f1_{cid.replace('.', '')}"] = float(
            f1_score(labels[rows], preds[rows], zero_division=0))
    write_json(paths.eval_metrics, round_floats(metrics))

    precision, recall, _ = precision_recall_curve(labels, probs)
    fpr, tpr, _ = roc_curve(labels, probs)
    write_text(paths.pr_curve, _to_csv(_thin(pd.DataFrame({"recall": recall,
                                                           "precision": precision}))))
    write_text(paths.roc_curve, _to_csv(_thin(pd.DataFrame({"fpr": fpr, "tpr": tpr}))))
    names = np.array(["no evidence", "evidence"])
    write_text(paths.confusion, _to_csv(pd.DataFrame({"actual": names[labels],
                                                      "predicted": names[preds]})))
    write_text(paths.predictions, _to_csv(pd.DataFrame({
        "pair_id": test["pair_id"], "criterion_id": test["criterion_id"], "label": labels,
        "probability": probs}), digits=6))
    return metrics


def main() -> None:
    m = run(load_params())
    print(f"evaluate: macro_f1 {m['macro_f1']:.4f} pos_f1 {m['pos_f1']:.4f} "
          f"roc_auc {m['roc_auc']:.4f} pr_auc {m['pr_auc']:.4f} on {m['test_pairs']} test pairs")


if __name__ == "__main__":
    run_stage(main)
