"""Reading and validating the ReDSM5 files, sentence splitting and text normalisation.

Every error names the file, the row (1-based data row, header excluded, with the physical line)
and the column, so a user who drops in the real corpus knows exactly what to fix.
"""

from __future__ import annotations

import csv
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import DataError

# The nine DSM-5 criterion-A ids and the symptom names the annotations use for them.
CRITERION_SYMPTOMS = {
    "A.1": "DEPRESSED_MOOD",
    "A.2": "ANHEDONIA",
    "A.3": "APPETITE_CHANGE",
    "A.4": "SLEEP_ISSUES",
    "A.5": "PSYCHOMOTOR",
    "A.6": "FATIGUE",
    "A.7": "WORTHLESSNESS",
    "A.8": "COGNITIVE_ISSUES",
    "A.9": "SUICIDAL_THOUGHTS",
}
SPECIAL_CASE = "SPECIAL_CASE"  # annotated, but maps to no criterion

POST_COLUMNS = ("post_id", "text")
ANNOTATION_COLUMNS = ("post_id", "sentence_id", "sentence_text", "DSM5_symptom", "status",
                      "explanation")


@dataclass(frozen=True)
class Criterion:
    id: str
    symptom: str
    text: str


@dataclass(frozen=True)
class Annotation:
    row: int
    post_id: str
    sentence_id: str
    sentence_text: str
    symptom: str
    status: int


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at offset "
            f"{err.start}); re-save the file as UTF-8"
        ) from err
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    return text


def read_csv(path: Path, columns: tuple[str, ...]) -> list[tuple[int, int, dict[str, str]]]:
    """Rows of a CSV as (row number, line number, record), checking columns and quoting."""
    text = _read_text(path)
    reader = csv.reader(text.splitlines(keepends=True), strict=True)
    try:
        header = next(reader)
    except csv.Error as err:
        raise DataError(f"{path}: line 1: broken CSV header: {err}") from err
    header = [h.strip() for h in header]
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(
            f"{path}: missing column '{missing[0]}' (found columns: {', '.join(header)})"
        )
    rows = []
    row_number = 0
    while True:
        start_line = reader.line_num + 1
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise DataError(
                f"{path}: row {row_number + 1} (line {start_line}): broken CSV quoting: {err}"
            ) from err
        if not values:  # a blank line
            continue
        row_number += 1
        if len(values) != len(header):
            raise DataError(
                f"{path}: row {row_number} (line {start_line}): {len(values)} fields, the header "
                f"has {len(header)} (an unquoted comma or quote?)"
            )
        rows.append((row_number, start_line, dict(zip(header, values, strict=True))))
    if not rows:
        raise DataError(f"{path}: no data rows after the header")
    return rows


def _where(path: Path, row: int, line: int, column: str) -> str:
    return f"{path}: row {row} (line {line}), column {column}"


def read_posts(path: Path) -> dict[str, str]:
    """post_id -> text, in file order."""
    posts: dict[str, str] = {}
    first_row: dict[str, int] = {}
    for row, line, rec in read_csv(path, POST_COLUMNS):
        post_id = rec["post_id"].strip()
        if not post_id:
            raise DataError(f"{_where(path, row, line, 'post_id')}: empty")
        if post_id in posts:
            raise DataError(
                f"{_where(path, row, line, 'post_id')}: duplicate post_id '{post_id}' "
                f"(first at row {first_row[post_id]})"
            )
        if not rec["text"].strip():
            raise DataError(f"{_where(path, row, line, 'text')}: empty text for '{post_id}'")
        posts[post_id] = rec["text"]
        first_row[post_id] = row
    return posts


def read_annotations(path: Path, post_ids: set[str]) -> list[Annotation]:
    """Annotation rows, checked against the posts and the known symptom names."""
    known = set(CRITERION_SYMPTOMS.values()) | {SPECIAL_CASE}
    annotations = []
    for row, line, rec in read_csv(path, ANNOTATION_COLUMNS):
        post_id = rec["post_id"].strip()
        if post_id not in post_ids:
            raise DataError(
                f"{_where(path, row, line, 'post_id')}: '{post_id}' is not in the posts file"
            )
        if not rec["sentence_text"].strip():
            raise DataError(f"{_where(path, row, line, 'sentence_text')}: empty")
        symptom = rec["DSM5_symptom"].strip()
        if symptom not in known:
            raise DataError(
                f"{_where(path, row, line, 'DSM5_symptom')}: unknown symptom '{symptom}' "
                f"(expected one of {', '.join(sorted(known))})"
            )
        status = rec["status"].strip()
        if status not in ("0", "1"):
            raise DataError(f"{_where(path, row, line, 'status')}: '{status}' is not 0 or 1")
        annotations.append(Annotation(row, post_id, rec["sentence_id"].strip(),
                                      rec["sentence_text"], symptom, int(status)))
    return annotations


def read_criteria(path: Path) -> list[Criterion]:
    """The nine criteria in id order; every id A.1..A.9 exactly once."""
    text = _read_text(path)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: line {err.lineno}: not valid JSON: {err.msg}") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("criteria"), list):
        raise DataError(f"{path}: expected an object with a list under \"criteria\"")
    criteria: dict[str, Criterion] = {}
    for i, item in enumerate(doc["criteria"]):
        where = f"{path}: criteria[{i}]"
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected an object with id, symptom and text")
        for key in ("id", "symptom", "text"):
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise DataError(f"{where}: field '{key}' missing or empty")
        cid = item["id"].strip()
        if cid not in CRITERION_SYMPTOMS:
            raise DataError(
                f"{where}: unknown criterion id '{cid}' (expected {', '.join(CRITERION_SYMPTOMS)})"
            )
        if cid in criteria:
            raise DataError(f"{where}: criterion '{cid}' appears twice")
        if item["symptom"].strip() != CRITERION_SYMPTOMS[cid]:
            raise DataError(
                f"{where}: criterion '{cid}' has symptom '{item['symptom']}', expected "
                f"'{CRITERION_SYMPTOMS[cid]}'"
            )
        criteria[cid] = Criterion(cid, CRITERION_SYMPTOMS[cid], " ".join(item["text"].split()))
    missing = [c for c in CRITERION_SYMPTOMS if c not in criteria]
    if missing:
        raise DataError(f"{path}: missing criterion '{missing[0]}' (all of A.1..A.9 are needed)")
    return [criteria[c] for c in CRITERION_SYMPTOMS]


_ABBREVIATIONS = {"mr.", "mrs.", "ms.", "dr.", "st.", "e.g.", "i.e.", "etc.", "vs.", "jr.", "sr."}
# A run of sentence-final punctuation, with any closing quotes/brackets, followed by a space.
_CLOSERS = "\"'\u201d\u2019)]"
_BOUNDARY = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*(?=\s)")


def split_sentences(text: str) -> list[str]:
    """Split a post into sentences: at line breaks and after . ! ? … (not after Dr., e.g. ...)."""
    sentences = []
    for line in re.split(r"\s*\n\s*", text):
        start = 0
        for match in _BOUNDARY.finditer(line):
            piece = line[start : match.end()].strip()
            if not piece or piece.split()[-1].lower() in _ABBREVIATIONS:
                continue
            following = line[match.end() :].lstrip()[:1]
            if match.group()[-1] in _CLOSERS and following.islower():
                continue  # `she said "stop!" and left`: the quote ends, the sentence does not
            sentences.append(piece)
            start = match.end()
        rest = line[start:].strip()
        if rest:
            sentences.append(rest)
    return sentences


_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})
_EDGE = " \t\"'.,;:!?-\u2026()[]"


def normalize(text: str) -> str:
    """Text key for matching an annotated sentence to a split sentence of the same post."""
    text = unicodedata.normalize("NFKC", text).translate(_QUOTES).casefold()
    return " ".join(text.split()).strip(_EDGE)
