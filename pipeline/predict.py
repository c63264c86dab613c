"""Apply the trained model to new posts: which sentences are evidence for which criterion.

    python -m pipeline.predict --posts FILE.csv --out evidence.csv [--model DIR | models:/NAME/V]

Reads   FILE.csv in the ReDSM5 posts layout (``post_id``, ``text``), validated like ``prepare``
        does; the criteria of paths.criteria; the model: paths.model_dir (default), another
        model directory, or a registered version ``models:/<name>/<version>`` (or
        ``models:/<name>@<alias>``) from the MLflow store of pipeline/tracking.py
        params: model.max_length, train.eval_batch_size, train.device, train.cpu_threads,
        train.precision
Writes  --out: one row per sentence x criterion, ``post_id, sentence_id, sentence, criterion,
        probability, is_evidence``, written whole or not at all.

Sentences are split exactly as ``prepare`` splits them (same ids: ``<post_id>:<index>``). The
decision threshold is the shipped one: ``threshold`` of paths.best_params for a model directory,
the version tag ``threshold`` (set by ``evaluate``) for a registered model; ``--threshold``
overrides both. Pairs are scored in length-sorted batches on the device and precision that
``train.device`` / ``train.precision`` resolve to.
"""

from __future__ import annotations

import argparse
import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.common import run_stage, write_text
from pipeline.data import read_criteria, read_posts
from pipeline.engine import encode_pairs, predict
from pipeline.errors import DataError, StageError
from pipeline.inputs import read_best_params
from pipeline.model import pick_device
from pipeline.params import Params, load_params
from pipeline.prepare import build_sentences
from pipeline.progress import progress

COLUMNS = ("post_id", "sentence_id", "sentence", "criterion", "probability", "is_evidence")
REGISTRY_SCHEME = "models:/"
# Batches per progress-bar step: predict() sorts each chunk by length; the chunks are cut from
# the globally length-sorted pairs, so every batch is as tight as one big call would make it.
CHUNK_BATCHES = 8


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    threshold: float
    max_length: int
    source: str


def parse_registry_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/<name>/<version>`` -> (name, version, None); ``models:/<name>@<alias>`` ->
    (name, None, alias)."""
    ref = uri[len(REGISTRY_SCHEME):]
    if "@" in ref:
        name, alias = ref.rsplit("@", 1)
        if name and alias:
            return name, None, alias
    else:
        name, _, version = ref.rpartition("/")
        if name and version.isdigit():
            return name, version, None
    raise StageError(f"--model {uri}: expected models:/<name>/<version> or "
                     "models:/<name>@<alias>")


def _registry_version(client, uri: str):
    """The ModelVersion that ``uri`` names."""
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_registry_uri(uri)
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StageError(f"--model {uri}: not in the MLflow store: {first}") from err


def load_registered(uri: str, params: Params,
                    threshold_override: float | None = None) -> LoadedModel:
    """A registered version from the store of pipeline/tracking.py, with its threshold tag."""
    import mlflow
    from mlflow import MlflowClient

    from pipeline.tracking import fluent_store, tracking_uri

    parse_registry_uri(uri)  # a malformed uri fails before any store is opened
    store = tracking_uri()
    if store.startswith("sqlite:///") and not Path(store[len("sqlite:///"):]).is_file():
        raise StageError(f"--model {uri}: no MLflow store at {store} (run the pipeline first, "
                         "or set MLFLOW_TRACKING_URI)")
    version = _registry_version(MlflowClient(tracking_uri=store), uri)
    threshold = version.tags.get("threshold")
    if threshold is None and threshold_override is None:
        raise StageError(f"--model {uri}: the version has no 'threshold' tag (run the evaluate "
                         "stage on this model, or pass --threshold)")
    with fluent_store(store):
        components = mlflow.transformers.load_model(uri, return_type="components")
    return LoadedModel(components["model"], components["tokenizer"],
                       threshold_override if threshold_override is not None else float(threshold),
                       int(version.tags.get("max_length", params.model.max_length)),
                       f"{uri} (run {version.run_id})")


def load_directory(path: str | Path, params: Params,
                   threshold_override: float | None = None) -> LoadedModel:
    """A Hugging Face model directory; the threshold of paths.best_params."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise StageError(f"--model {path}: not a model directory (no config.json; run "
                         "`dvc repro retrain` or `dvc pull`, or pass models:/<name>/<version>)")
    threshold = threshold_override
    if threshold is None:
        try:
            threshold = read_best_params(params.paths.best_params).threshold
        except DataError as err:
            raise StageError(f"{err}; or pass --threshold") from err
    return LoadedModel(AutoModelForSequenceClassification.from_pretrained(path),
                       AutoTokenizer.from_pretrained(path), threshold, params.model.max_length,
                       str(path))


def load_model(spec: str | None, params: Params,
               threshold: float | None = None) -> LoadedModel:
    """The model of ``--model`` (default paths.model_dir) with its shipped threshold."""
    if spec and spec.startswith(REGISTRY_SCHEME):
        return load_registered(spec, params, threshold)
    return load_directory(spec or params.paths.model_dir, params, threshold)


def run(params: Params, posts_path: str | Path, out: str | Path, model: str | None = None,
        threshold: float | None = None) -> dict[str, Any]:
    """Score every sentence x criterion of the posts file; write ``out``; return the counts."""
    criteria = read_criteria(Path(params.paths.criteria))
    posts = read_posts(Path(posts_path))  # validated before the model is loaded
    sentences, _ = build_sentences(posts, [], criteria)
    loaded = load_model(model, params, threshold)
    device = pick_device(params.train.device, params.train.cpu_threads, params.train.precision)
    loaded.model.to(device.torch)

    rows = [(s, c) for s in sentences for c in criteria]
    enc = encode_pairs(loaded.tokenizer, [c.text for _, c in rows], [s.text for s, _ in rows],
                       np.zeros(len(rows), dtype=np.int64), loaded.max_length)
    batch = params.train.eval_batch_size
    order = np.argsort(enc.lengths, kind="stable")
    probs = np.empty(len(rows), dtype=np.float64)
    start = time.perf_counter()
    # a bar on a terminal, silent in a log (pipeline/progress.py)
    with progress(desc="predict pairs", total=len(rows)) as bar:
        for lo in range(0, len(order), batch * CHUNK_BATCHES):
            chunk = order[lo : lo + batch * CHUNK_BATCHES]
            probs[chunk] = predict(loaded.model, enc, chunk, batch, device)
            bar.update(len(chunk))
    seconds = time.perf_counter() - start
    # the file's 6 decimals are the probability: is_evidence agrees with what a reader sees
    probs = np.round(probs, 6)

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for (s, c), p in zip(rows, probs, strict=True):
        writer.writerow((s.post_id, s.sentence_id, s.text, c.id, f"{p:.6f}",
                         int(p >= loaded.threshold)))
    write_text(out, buf.getvalue())
    return {"posts": len(posts), "sentences": len(sentences), "pairs": len(rows),
            "evidence": int((probs >= loaded.threshold).sum()), "threshold": loaded.threshold,
            "seconds": seconds, "pairs_per_second": len(rows) / max(seconds, 1e-9),
            "device": device.type, "precision": device.precision, "model": loaded.source}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Score every sentence x criterion of a ReDSM5 posts file with the model.")
    parser.add_argument("--posts", required=True, help="CSV with post_id,text")
    parser.add_argument("--out", required=True, help="CSV to write (evidence.csv)")
    parser.add_argument("--model", default=None,
                        help="model directory (default: paths.model_dir) or "
                             "models:/<name>/<version> from the MLflow Model Registry")
    parser.add_argument("--threshold", type=float, default=None,
                        help="decision threshold (default: the shipped one)")
    args = parser.parse_args(argv)
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold {args.threshold}: must be between 0 and 1")
    r = run(load_params(), args.posts, args.out, args.model, args.threshold)
    print(f"predict: {r['posts']} posts, {r['sentences']} sentences, {r['pairs']} pairs, "
          f"{r['evidence']} evidence at threshold {r['threshold']:.4f} -> {args.out}; "
          f"{r['pairs_per_second']:.0f} pairs/s ({r['seconds']:.1f} s, {r['device']} "
          f"{r['precision']}; model {r['model']})")


if __name__ == "__main__":
    run_stage(main)
