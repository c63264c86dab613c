"""Reading the ReDSM5 files: the splitter, normalisation, and an error that says where."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.data import (
    CRITERION_SYMPTOMS,
    DataError,
    normalize,
    read_annotations,
    read_criteria,
    read_posts,
    split_sentences,
)
from pipeline.sample_data import write

ANN_HEADER = "post_id,sentence_id,sentence_text,DSM5_symptom,status,explanation\n"


def test_split_sentences_handles_reddit_text():
    text = ('I saw Dr. Smith today. She said "rest more!" and I laughed\n\n'
            "i cant sleep lol\nAnyway… thanks? Bye")
    assert split_sentences(text) == [
        "I saw Dr. Smith today.",
        'She said "rest more!" and I laughed',
        "i cant sleep lol",
        "Anyway…",
        "thanks?",
        "Bye",
    ]


def test_normalize_ignores_case_spacing_quotes_and_edge_punctuation():
    assert normalize("  I CAN’T   sleep. ") == normalize("i can't sleep") == "i can't sleep"
    assert normalize("“Quoted”") == "quoted"


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    write(tmp_path, n_posts=12)
    return {"posts": tmp_path / "redsm5_posts.csv",
            "annotations": tmp_path / "redsm5_annotations.csv",
            "criteria": tmp_path / "dsm5_criteria.json"}


def test_sample_files_read_cleanly(files):
    posts = read_posts(files["posts"])
    annotations = read_annotations(files["annotations"], set(posts))
    criteria = read_criteria(files["criteria"])
    assert len(posts) == 12 and annotations
    assert [c.id for c in criteria] == list(CRITERION_SYMPTOMS)


def _bad_posts(path: Path, body: bytes) -> None:
    path.write_bytes(body)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "redsm5_posts.csv: file is empty"),
        (b"post_id,body\np1,hello\n", "missing column 'text' (found columns: post_id, body)"),
        (b"post_id,text\np1,hello\np1,again\n", "row 2 (line 3), column post_id: duplicate "
                                               "post_id 'p1' (first at row 1)"),
        (b"post_id,text\np1,\n", "row 1 (line 2), column text: empty text"),
        (b"post_id,text\np1,\"unclosed\n", "row 1 (line 2): broken CSV quoting"),
        (b"post_id,text\np1,\"closed\" junk\n", "broken CSV quoting"),
        (b"post_id,text\np1,caf\xe9\n", "line 2: not valid UTF-8 (byte 0xe9"),
        (b"post_id,text\np1,one,two\n", "row 1 (line 2): 3 fields, the header has 2"),
        (b"post_id,text\n", "no data rows after the header"),
    ],
)
def test_bad_posts_file(tmp_path, body, message):
    path = tmp_path / "redsm5_posts.csv"
    path.write_bytes(body)
    with pytest.raises(DataError) as err:
        read_posts(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("p9,s1,Hi.,FATIGUE,1,x", "column post_id: 'p9' is not in the posts file"),
        ("p1,s1,Hi.,TIREDNESS,1,x", "column DSM5_symptom: unknown symptom 'TIREDNESS'"),
        ("p1,s1,Hi.,FATIGUE,2,x", "column status: '2' is not 0 or 1"),
        ("p1,s1,,FATIGUE,1,x", "column sentence_text: empty"),
    ],
)
def test_bad_annotation_rows(tmp_path, row, message):
    path = tmp_path / "redsm5_annotations.csv"
    path.write_text(ANN_HEADER + "p1,s0,Fine.,SLEEP_ISSUES,0,\n" + row + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_annotations(path, {"p1"})
    assert f"{path}: row 2 (line 3), {message}" in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_posts(tmp_path / "nope.csv")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c["criteria"].pop(3), "missing criterion 'A.4'"),
        (lambda c: c["criteria"][0].update(id="A.10"), "unknown criterion id 'A.10'"),
        (lambda c: c["criteria"][1].update(id="A.1"), "criterion 'A.1' appears twice"),
        (lambda c: c["criteria"][2].update(symptom="SLEEP_ISSUES"),
         "criterion 'A.3' has symptom 'SLEEP_ISSUES', expected 'APPETITE_CHANGE'"),
        (lambda c: c["criteria"][0].pop("text"), "criteria[0]: field 'text' missing"),
    ],
)
def test_bad_criteria(files, mutate, message):
    doc = json.loads(files["criteria"].read_text(encoding="utf-8"))
    mutate(doc)
    files["criteria"].write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_criteria(files["criteria"])
    assert message in str(err.value)


def test_criteria_not_json(files):
    files["criteria"].write_text("{\n  criteria: [", encoding="utf-8")
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        read_criteria(files["criteria"])
