"""Classification metrics for a rare positive class, computed alike by hpo and evaluate."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    precision_recall_curve,
    roc_auc_score,
)

from pipeline.params import THRESHOLD


def classification_metrics(labels: np.ndarray, probs: np.ndarray,
                           threshold: float = THRESHOLD) -> dict[str, float]:
    """macro_f1 and pos_f1 at ``threshold``; roc_auc and pr_auc (average precision) from ranks."""
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=float)
    if not np.all(np.isfinite(probs)):
        raise FloatingPointError("non-finite predicted probabilities")
    preds = (probs >= threshold).astype(int)
    both = len(np.unique(labels)) == 2
    return {
        "macro_f1": float(f1_score(labels, preds, average="macro", zero_division=0)),
        "pos_f1": float(f1_score(labels, preds, pos_label=1, zero_division=0)),
        # Undefined with a single class; NaN makes the problem visible instead of a fake 0.5.
        "roc_auc": float(roc_auc_score(labels, probs)) if both else float("nan"),
        "pr_auc": float(average_precision_score(labels, probs)) if both else float("nan"),
    }


def best_f1_threshold(labels: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """The decision threshold that maximises the evidence class's F1, and that F1.

    Thresholds are the observed probabilities (the midpoint to the next lower one, so that a
    slightly different model is not on the knife edge); ties go to the higher threshold.
    """
    labels = np.asarray(labels).astype(int)
    if labels.sum() == 0:
        return THRESHOLD, 0.0
    precision, recall, thresholds = precision_recall_curve(labels, probs)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    best = int(np.flatnonzero(f1 == f1.max())[-1])
    lower = thresholds[best - 1] if best > 0 else 0.0
    return float((thresholds[best] + lower) / 2), float(f1[best])


def threshold_transfer_gains(labels: np.ndarray, probs: np.ndarray,
                             folds: list[np.ndarray]) -> list[float]:
    """Whether a tuned threshold survives a change of model, measured across CV folds.

    For each fold: the threshold tuned (``best_f1_threshold``) on the other folds' out-of-fold
    predictions, made by other models, applied to this fold's predictions; the gain is this
    fold's pos_f1 at that threshold minus its pos_f1 at ``THRESHOLD``. A threshold that only fits
    one model's calibration gives negative gains; the retrained model is yet another model.
    ``folds``: the validation rows of each fold (indices into ``labels`` / ``probs``).
    """
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=float)
    gains = []
    for k, rows in enumerate(folds):
        others = np.concatenate([f for j, f in enumerate(folds) if j != k])
        threshold, _ = best_f1_threshold(labels[others], probs[others])
        at = classification_metrics(labels[rows], probs[rows], threshold)["pos_f1"]
        gains.append(at - classification_metrics(labels[rows], probs[rows])["pos_f1"])
    return gains
