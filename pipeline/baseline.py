"""TF-IDF + logistic regression on the same splits: what the transformer has to beat.

One logistic regression per criterion on TF-IDF word 1-2-grams of the sentence (class-balanced),
fitted on the training split. Its decision threshold is tuned like the transformer's: on pooled
out-of-fold predictions over the same CV folds (best pos_f1). Deterministic, seconds on a CPU.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from pipeline.metrics import best_f1_threshold


def vectorizer() -> TfidfVectorizer:
    """The baseline's features, unfitted: TF-IDF of word 1-2-grams, sublinear term frequency."""
    return TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)


def fit_predict(x_train, y_train: np.ndarray, x_test) -> np.ndarray:
    """One criterion's class-balanced logistic regression: P(evidence) of ``x_test``'s rows."""
    if y_train.min() == y_train.max():  # a criterion without positives (or negatives)
        return np.full(x_test.shape[0], float(y_train.max()))
    model = LogisticRegression(C=4.0, class_weight="balanced", max_iter=2000,
                               solver="liblinear", random_state=0)
    return model.fit(x_train, y_train).predict_proba(x_test)[:, 1]


def tfidf_baseline(train: pd.DataFrame, test: pd.DataFrame) -> tuple[np.ndarray, float]:
    """Test-pair probabilities (in ``test`` order) and the threshold tuned out of fold."""
    features = vectorizer().fit(train["sentence"].drop_duplicates())
    oof = np.zeros(len(train))
    probs = np.zeros(len(test))
    for criterion in sorted(train["criterion_id"].unique()):
        tr = np.flatnonzero(train["criterion_id"].to_numpy() == criterion)
        te = np.flatnonzero(test["criterion_id"].to_numpy() == criterion)
        x = features.transform(train["sentence"].iloc[tr])
        y = train["label"].to_numpy()[tr]
        folds = train["fold"].to_numpy()[tr]
        for fold in np.unique(folds):
            held = folds == fold
            oof[tr[held]] = fit_predict(x[~held], y[~held], x[held])
        probs[te] = fit_predict(x, y, features.transform(test["sentence"].iloc[te]))
    threshold, _ = best_f1_threshold(train["label"].to_numpy(), oof)
    return probs, threshold
