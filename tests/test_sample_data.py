"""The sample corpus: deterministic to the byte and covering every case prepare must handle."""

from __future__ import annotations

import csv
import io
import re
import subprocess
import sys

from conftest import ROOT
from pipeline.data import CRITERION_SYMPTOMS, SPECIAL_CASE, normalize, split_sentences
from pipeline.sample_data import EVIDENCE, HARD_NEGATIVES, NEGATED, generate


def test_generation_is_deterministic_to_the_byte(tmp_path):
    assert generate() == generate()
    for out in (tmp_path / "a", tmp_path / "b"):
        subprocess.run([sys.executable, "-m", "pipeline.sample_data", "--out", str(out)],
                       cwd=ROOT, check=True, capture_output=True)
    for name in generate():
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_generated_files_match_the_committed_data_dvc():
    # data.dvc records the md5 of the sample; regenerating it anywhere must give that hash.
    import hashlib
    import json

    entries = sorted(
        ({"md5": hashlib.md5(text.encode("utf-8")).hexdigest(), "relpath": name}
         for name, text in generate().items()), key=lambda e: e["relpath"])
    # DVC's directory hash: md5 of the JSON listing of (md5, relpath), sorted by relpath.
    listing = json.dumps(entries, sort_keys=True).encode()
    dir_md5 = hashlib.md5(listing).hexdigest() + ".dir"
    assert f"md5: {dir_md5}" in (ROOT / "data.dvc").read_text()


def test_sample_covers_what_the_task_needs():
    files = generate()
    posts = list(csv.DictReader(io.StringIO(files["redsm5_posts.csv"])))
    annotations = list(csv.DictReader(io.StringIO(files["redsm5_annotations.csv"])))
    assert len(posts) >= 150
    positives = [a for a in annotations
                 if a["status"] == "1" and a["DSM5_symptom"] != SPECIAL_CASE]
    assert {a["DSM5_symptom"] for a in positives} == set(CRITERION_SYMPTOMS.values())
    assert all(len(set(phrasings)) >= 10 for _, phrasings in EVIDENCE.values())
    assert any(a["status"] == "0" for a in annotations)
    assert any(a["DSM5_symptom"] == SPECIAL_CASE for a in annotations)
    annotated_posts = {a["post_id"] for a in annotations}
    assert sum(p["post_id"] not in annotated_posts for p in posts) >= 20  # no evidence at all
    text = files["redsm5_posts.csv"]
    assert any(s in text for negatives in HARD_NEGATIVES.values() for s in negatives)
    assert any(s in text for s, _ in NEGATED)
    assert re.search(r"[^\x00-\x7f]", text) and "\n\n" in text  # non-ASCII, paragraphs
    # some annotated sentences are not what the splitter produces (the annotator split a run-on)
    sentences = {(p["post_id"], normalize(s)) for p in posts for s in split_sentences(p["text"])}
    unmatched = [a for a in annotations
                 if (a["post_id"], normalize(a["sentence_text"])) not in sentences]
    assert 0 < len(unmatched) < len(annotations) // 5
