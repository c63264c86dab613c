"""predict: every sentence x criterion of a posts file, split as prepare splits; bad input."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import dump_yaml, load_yaml, run
from pipeline import predict, prepare
from pipeline.common import run_stage
from pipeline.params import load_params

THRESHOLD = 0.4987


@pytest.fixture
def shipped(workdir, tiny_model_dir) -> Path:
    """The workdir with a model at paths.model_dir, a best-params file and fp32 scoring."""
    params = load_yaml(workdir / "params.yaml")
    params["train"]["precision"] = "fp32"  # exact comparison with a plain forward pass below
    dump_yaml(workdir / "params.yaml", params)
    paths = params["paths"]
    shutil.copytree(tiny_model_dir, workdir / paths["model_dir"])
    (workdir / paths["best_params"]).write_text(
        yaml.safe_dump({"trial": 0, "threshold": THRESHOLD}), encoding="utf-8")
    return workdir


def test_predict_scores_every_sentence_of_every_post_split_as_prepare_splits(shipped):
    proc = run([sys.executable, "-m", "pipeline.predict", "--posts", "data/redsm5_posts.csv",
                "--out", "out/evidence.csv"], shipped)
    assert "pairs/s" in proc.stdout
    out = pd.read_csv(shipped / "out" / "evidence.csv", keep_default_na=False)
    assert tuple(out.columns) == predict.COLUMNS

    params = load_params()
    prepare.run(params)
    pairs = pd.read_csv(params.paths.pairs, keep_default_na=False)
    split = pairs[pairs["source"] == "split"]  # prepare also adds annotated sentences
    keys = ["post_id", "sentence_id", "sentence", "criterion"]
    expected = split.rename(columns={"criterion": "text", "criterion_id": "criterion"})
    assert len(out) == len(split) == 9 * split["sentence_id"].nunique()
    assert out[keys].values.tolist() == expected[keys].values.tolist()  # same rows, same order
    assert ((out["probability"] >= THRESHOLD) == (out["is_evidence"] == 1)).all()
    # --threshold overrides the shipped one (the median: both classes occur)
    median = float(out["probability"].median())
    predict.main(["--posts", "data/redsm5_posts.csv", "--out", "median.csv",
                  "--threshold", str(median)])
    at_median = pd.read_csv("median.csv")
    assert ((at_median["probability"] >= median) == (at_median["is_evidence"] == 1)).all()
    assert 0 < at_median["is_evidence"].sum() < len(at_median)

    # each probability belongs to its own pair: a plain fp32 forward pass on a few rows
    model = AutoModelForSequenceClassification.from_pretrained(params.paths.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(params.paths.model_dir)
    rows = split.iloc[np.linspace(0, len(split) - 1, 12).round().astype(int)]
    with torch.inference_mode():
        batch = tokenizer(list(rows["criterion"]), list(rows["sentence"]), padding=True,
                          truncation="only_second", max_length=params.model.max_length,
                          return_tensors="pt")
        direct = torch.softmax(model(**batch).logits, -1)[:, 1].numpy()
    got = out.set_index(["sentence_id", "criterion"]).loc[
        list(zip(rows["sentence_id"], rows["criterion_id"], strict=True)), "probability"]
    np.testing.assert_allclose(got.to_numpy(), direct, atol=2e-6)  # written with 6 decimals


def _edit(name: str, old: str, new: str):
    def edit(data: Path) -> None:
        path = data / name
        path.write_text(path.read_text(encoding="utf-8").replace(old, new, 1), encoding="utf-8")
    return edit


POSTS = "redsm5_posts.csv"
BEST = "artifacts/best_params.yaml"  # paths.best_params
BAD_INPUT = {
    "missing file": ([], lambda d: (d / POSTS).unlink(), f"{POSTS}: file not found"),
    "missing column": ([], _edit(POSTS, "post_id,text", "post_id,body"),
                       f"{POSTS}: missing column 'text' (found columns: post_id, body)"),
    "empty file": ([], lambda d: (d / POSTS).write_bytes(b""), f"{POSTS}: file is empty"),
    "no data rows": ([], lambda d: (d / POSTS).write_text("post_id,text\n"),
                     f"{POSTS}: no data rows after the header"),
    "model directory not found": (["--model", "no/such/model"], None,
                                  "--model no/such/model: not a model directory"),
    "registered model, no store": (["--model", "models:/nope/1"], None,
                                   "--model models:/nope/1: no MLflow store at sqlite:///"),
    "malformed registry uri": (["--model", "models:/nope"], None, "--model models:/nope"),
    # the model directory's shipped threshold cannot be read (and no --threshold)
    "bad best params": ([], lambda d: (d.parent / BEST).write_text("threshold: 1.5\n"),
                        f"{BEST}: threshold: Input should be less than or equal to 1 (got 1.5); "
                        "or pass --threshold"),
}


@pytest.mark.parametrize("case", BAD_INPUT, ids=list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_no_output(shipped, capsys, case):
    extra, edit, message = BAD_INPUT[case]
    data = shipped / "data"
    if edit is not None:
        edit(data)
    out = shipped / "out" / "evidence.csv"
    with pytest.raises(SystemExit) as exit_:
        run_stage(lambda: predict.main(["--posts", str(data / POSTS), "--out", str(out),
                                        *extra]))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ERROR: ") and "\n" not in err and message in err, err
    assert not out.parent.exists() or not list(out.parent.iterdir())  # not even a temp file
