"""Stage ``prepare``: validate the ReDSM5 files and build the evidence-binding pairs.

Reads   paths.posts, paths.annotations, paths.criteria   (params: seed, prepare.*)
Writes  paths.pairs   one row per (sentence, criterion): text, label, split, fold
        paths.splits  one row per post: split, fold, sentences, positives
        paths.data_metrics   the headline counts (`dvc exp show` shows them after eval and hpo)
        paths.data_summary   every count: per split, per fold, per criterion, annotation checks

Annotations are matched to the splitter's sentences by normalised text within the post (never by
index: the annotator's splitter differs from ours). An annotated sentence the splitter did not
produce is added as an extra candidate and counted, not dropped. Test split and CV folds are
grouped by post (no post in two places) and fixed by ``seed``.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from pipeline.common import run_stage, write_json, write_text
from pipeline.data import (
    SPECIAL_CASE,
    Annotation,
    Criterion,
    normalize,
    read_annotations,
    read_criteria,
    read_posts,
    split_sentences,
)
from pipeline.errors import StageError
from pipeline.params import Params, load_params

PAIR_COLUMNS = ("pair_id", "post_id", "sentence_id", "criterion_id", "criterion", "sentence",
                "label", "split", "fold", "source")
TEST = "test"
TRAIN = "train"
# The counts that go into paths.data_metrics, in this order (a reviewer's columns in `dvc exp
# show`); every count, these included, goes into paths.data_summary.
HEADLINE = ("posts", "sentences", "pairs", "positives", "unmatched_annotated_sentences",
            "special_case_rows")


@dataclass
class Sentence:
    post_id: str
    index: int
    text: str
    source: str  # "split": produced by the splitter; "annotation": added from an annotation
    positives: set[str]  # criterion ids this sentence is evidence for

    @property
    def sentence_id(self) -> str:
        return f"{self.post_id}:{self.index}"


def build_sentences(
    posts: dict[str, str], annotations: list[Annotation], criteria: list[Criterion]
) -> tuple[list[Sentence], dict[str, int]]:
    """Split posts, attach annotations by normalised text, and count what could not be matched."""
    by_symptom = {c.symptom: c.id for c in criteria}
    sentences: dict[str, list[Sentence]] = {}
    index: dict[tuple[str, str], Sentence] = {}
    duplicates = 0
    for post_id, text in posts.items():
        sentences[post_id] = []
        for piece in split_sentences(text):
            key = (post_id, normalize(piece))
            if not key[1]:
                continue
            if key in index:  # the same sentence twice in a post is one example
                duplicates += 1
                continue
            s = Sentence(post_id, len(sentences[post_id]), piece, "split", set())
            sentences[post_id].append(s)
            index[key] = s
    stats = {"unmatched_annotated_sentences": 0, "unmatched_annotation_rows": 0,
             "special_case_rows": 0, "status0_rows": 0, "conflicting_annotations": 0,
             "duplicate_sentences": duplicates}
    rejected: set[tuple[int, str]] = set()
    for ann in annotations:
        key = (ann.post_id, normalize(ann.sentence_text))
        s = index.get(key)
        if s is None or s.source == "annotation":
            stats["unmatched_annotation_rows"] += 1
        if s is None:
            stats["unmatched_annotated_sentences"] += 1
            post = sentences[ann.post_id]
            s = Sentence(ann.post_id, len(post), " ".join(ann.sentence_text.split()),
                         "annotation", set())
            post.append(s)
            index[key] = s
        if ann.symptom == SPECIAL_CASE:
            stats["special_case_rows"] += 1
        elif ann.status == 1:
            s.positives.add(by_symptom[ann.symptom])
        else:
            stats["status0_rows"] += 1
            rejected.add((id(s), by_symptom[ann.symptom]))
    stats["conflicting_annotations"] = sum(
        1 for post in sentences.values() for s in post for c in s.positives
        if (id(s), c) in rejected
    )
    return [s for post in sentences.values() for s in post], stats


def assign_splits(
    sentences: list[Sentence], criteria: list[Criterion], seed: int, test_size: float,
    n_folds: int,
) -> dict[str, tuple[str, int]]:
    """post_id -> (split, fold): test posts by a stratified split on "post has evidence", then
    StratifiedGroupKFold over the training pairs (labels stratified, posts grouped)."""
    post_ids = list(dict.fromkeys(s.post_id for s in sentences))
    has_evidence = {p: 0 for p in post_ids}
    for s in sentences:
        has_evidence[s.post_id] |= int(bool(s.positives))
    strata = [has_evidence[p] for p in post_ids]
    min_stratum = min(strata.count(0), strata.count(1))
    n_test = int(np.ceil(test_size * len(post_ids)))
    if n_test < 2 or len(post_ids) - n_test < n_folds:
        raise StageError(
            f"prepare: {len(post_ids)} posts cannot give a test split of {test_size} and "
            f"{n_folds} folds (params prepare.test_size, prepare.n_folds)"
        )
    train_posts, test_posts = train_test_split(
        post_ids, test_size=n_test, random_state=seed,
        stratify=strata if min_stratum >= 2 else None,
    )
    assignment = {p: (TEST, -1) for p in test_posts}
    train_set = set(train_posts)
    groups, labels = [], []
    for s in sentences:
        if s.post_id in train_set:
            for c in criteria:
                groups.append(s.post_id)
                labels.append(int(c.id in s.positives))
    if n_folds > len(train_set):
        raise StageError(f"params.yaml: prepare.n_folds: {n_folds} folds but only "
                         f"{len(train_set)} training posts")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    dummy = np.zeros(len(labels))
    for fold, (_, val_idx) in enumerate(splitter.split(dummy, labels, groups)):
        for i in val_idx:
            assignment[groups[i]] = (TRAIN, fold)
    return assignment


def _csv(rows: list[dict], columns: tuple[str, ...]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def run(params: Params) -> dict:
    """Build pairs, splits and data counts from the files named in params; return every count
    (the data summary; the headline counts are a subset)."""
    paths = params.paths
    criteria = read_criteria(Path(paths.criteria))
    posts = read_posts(Path(paths.posts))
    annotations = read_annotations(Path(paths.annotations), set(posts))
    sentences, stats = build_sentences(posts, annotations, criteria)
    assignment = assign_splits(sentences, criteria, params.seed, params.prepare.test_size,
                               params.prepare.n_folds)

    pairs, per_post = [], defaultdict(lambda: [0, 0])
    for s in sentences:
        split, fold = assignment[s.post_id]
        per_post[s.post_id][0] += 1
        per_post[s.post_id][1] += len(s.positives)
        for c in criteria:
            pairs.append({
                "pair_id": len(pairs), "post_id": s.post_id, "sentence_id": s.sentence_id,
                "criterion_id": c.id, "criterion": c.text, "sentence": s.text,
                "label": int(c.id in s.positives), "split": split, "fold": fold,
                "source": s.source,
            })
    splits = [{"post_id": p, "split": assignment[p][0], "fold": assignment[p][1],
               "sentences": n, "positives": k} for p, (n, k) in per_post.items()]

    metrics = {
        "posts": len(posts),
        "posts_with_evidence": sum(1 for _, k in per_post.values() if k),
        "sentences": len(sentences),
        "annotations": len(annotations),
        "pairs": len(pairs),
        "positives": sum(p["label"] for p in pairs),
        **stats,
    }
    metrics["positive_rate"] = round(metrics["positives"] / metrics["pairs"], 6)
    for c in criteria:
        key = c.id.replace(".", "")
        metrics[f"positives_{key}"] = sum(p["label"] for p in pairs if p["criterion_id"] == c.id)
    for split in (TRAIN, TEST):
        rows = [p for p in pairs if p["split"] == split]
        metrics[f"{split}_posts"] = sum(1 for r in splits if r["split"] == split)
        metrics[f"{split}_pairs"] = len(rows)
        metrics[f"{split}_positives"] = sum(p["label"] for p in rows)
    for fold in range(params.prepare.n_folds):
        rows = [p for p in pairs if p["fold"] == fold]
        metrics[f"fold{fold}_pairs"] = len(rows)
        metrics[f"fold{fold}_positives"] = sum(p["label"] for p in rows)
        if not metrics[f"fold{fold}_positives"]:
            raise StageError(f"prepare: fold {fold} has no positive pair; use fewer folds "
                             "(params prepare.n_folds) or more data")
    if not metrics["test_positives"]:
        raise StageError("prepare: the test split has no positive pair; raise prepare.test_size")

    write_text(paths.pairs, _csv(pairs, PAIR_COLUMNS))
    write_text(paths.splits, _csv(splits, ("post_id", "split", "fold", "sentences", "positives")))
    write_json(paths.data_summary, metrics)
    # not key-sorted: the headline order is the column order of `dvc exp show`
    write_text(paths.data_metrics, json.dumps({k: metrics[k] for k in HEADLINE}, indent=2) + "\n")
    return metrics


def main() -> None:
    metrics = run(load_params())
    print(f"prepare: {metrics['posts']} posts, {metrics['sentences']} sentences, "
          f"{metrics['pairs']} pairs, {metrics['positives']} positives, "
          f"{metrics['unmatched_annotated_sentences']} annotated sentences not produced by the "
          f"splitter (added), {metrics['special_case_rows']} SPECIAL_CASE rows")


if __name__ == "__main__":
    run_stage(main)
