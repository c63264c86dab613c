"""prepare: labels by normalised text, unmatched annotations kept, splits grouped by post."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline import prepare
from pipeline.data import Annotation, Criterion
from pipeline.errors import StageError
from pipeline.params import load_params

CRITERIA = [Criterion("A.4", "SLEEP_ISSUES", "Insomnia."), Criterion("A.6", "FATIGUE", "Tired.")]


def test_annotations_match_by_text_and_unmatched_ones_become_candidates():
    posts = {"p1": "Hello there. I can't sleep at night!\nSo tired; really drained."}
    annotations = [
        Annotation(1, "p1", "s_9", "  i CAN'T sleep at night  ", "SLEEP_ISSUES", 1),  # case/space
        Annotation(2, "p1", "s_2", "really drained.", "FATIGUE", 1),  # annotator split a run-on
        Annotation(3, "p1", "s_0", "Hello there.", "FATIGUE", 0),
        Annotation(4, "p1", "s_0", "Hello there.", "SPECIAL_CASE", 1),
    ]
    sentences, stats = prepare.build_sentences(posts, annotations, CRITERIA)
    texts = [(s.text, s.source, sorted(s.positives)) for s in sentences]
    assert texts == [
        ("Hello there.", "split", []),
        ("I can't sleep at night!", "split", ["A.4"]),
        ("So tired; really drained.", "split", []),
        ("really drained.", "annotation", ["A.6"]),
    ]
    assert stats["unmatched_annotated_sentences"] == 1
    assert stats["special_case_rows"] == 1
    assert stats["status0_rows"] == 1


@pytest.fixture
def prepared(workdir):
    params = load_params()
    metrics = prepare.run(params)
    pairs = pd.read_csv(params.paths.pairs, keep_default_na=False)
    return params, metrics, pairs


def test_pairs_splits_and_metrics(prepared):
    params, metrics, pairs = prepared
    assert len(pairs) == metrics["pairs"] == 9 * metrics["sentences"]
    assert pairs["label"].sum() == metrics["positives"] > 0
    assert sum(metrics[f"positives_A{i}"] for i in range(1, 10)) == metrics["positives"]
    assert metrics["unmatched_annotated_sentences"] > 0
    assert (pairs["source"] == "annotation").sum() == 9 * metrics["unmatched_annotated_sentences"]
    # grouped by post: a post is in exactly one of test / fold 0 / fold 1
    places = pairs.groupby("post_id").apply(
        lambda g: set(zip(g.split, g.fold, strict=True)), include_groups=False)
    assert places.map(len).eq(1).all()
    assert set(pairs.loc[pairs.split == "test", "fold"]) == {-1}
    assert set(pairs.loc[pairs.split == "train", "fold"]) == {0, 1}
    for fold in (0, 1):
        assert metrics[f"fold{fold}_positives"] > 0
    assert metrics["test_positives"] > 0
    # every count in the data summary; the headline counts, in their order, in the metrics file
    assert json.loads(Path(params.paths.data_summary).read_text()) == metrics
    headline = json.loads(Path(params.paths.data_metrics).read_text())
    assert list(headline) == list(prepare.HEADLINE)
    assert headline == {k: metrics[k] for k in prepare.HEADLINE}


def test_splits_are_fixed_by_the_seed(prepared, workdir):
    params, _, pairs = prepared
    again = prepare.run(params)
    assert pd.read_csv(params.paths.pairs, keep_default_na=False).equals(pairs)
    assert again["fold0_pairs"] == prepared[1]["fold0_pairs"]


def test_too_many_folds_is_a_clear_error(workdir, tiny_params):
    from dataclasses import replace

    params = load_params()
    params = replace(params, prepare=replace(params.prepare, n_folds=200))
    with pytest.raises(StageError, match="folds"):
        prepare.run(params)
