"""The documentation: generated figure tables up to date, the site builds strictly, a short README,
and every results file says where and how it was measured."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = sorted((ROOT / "bench" / "results").glob("*.json"))


def _load_tool():
    spec = importlib.util.spec_from_file_location("docs_tool", ROOT / "tools" / "docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


docs = _load_tool()


def _checkout_copy(dest: Path) -> Path:
    """What the generator reads and writes, copied below ``dest``."""
    for name in ("README.md", "dvc.yaml", "params.yaml"):
        shutil.copy2(ROOT / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__")
    for folder in ("docs", "pipeline", "metrics", "bench/results"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=ignore)
    return dest


def test_committed_pages_equal_what_the_generator_writes():
    assert docs.stale() == [], "run `make docs` (python tools/docs.py) and commit the pages"


def test_a_changed_figure_on_a_page_is_stale(tmp_path):
    root = _checkout_copy(tmp_path)
    readme = root / "README.md"
    text = readme.read_text()
    block = re.search(r"<!-- generated: repro_times -->.*?<!-- end generated -->", text, re.S)
    # one digit of the table's first row of figures, changed
    row = re.search(r"^\|(?!-).*\d.*\|$", block.group(0).split("|---", 1)[1], re.M).group(0)
    digit = re.search(r"(?<=\| )\d", row)  # the first cell that is a number
    edited_row = row[:digit.start()] + str((int(digit.group(0)) + 1) % 10) + row[digit.end():]
    readme.write_text(text.replace(row, edited_row, 1))
    assert docs.stale(root) == ["README.md"]
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "docs.py"), "--check", "--root",
                          str(root)], capture_output=True, text=True)
    assert out.returncode == 1 and "README.md" in out.stderr


def test_a_changed_results_file_makes_its_pages_stale(tmp_path):
    root = _checkout_copy(tmp_path)
    path = root / "bench" / "results" / "repro_times.json"
    data = json.loads(path.read_text())
    data["runs"][0]["seconds"] += 1
    path.write_text(json.dumps(data))
    assert "README.md" in docs.stale(root)
    subprocess.run([sys.executable, str(ROOT / "tools" / "docs.py"), "--root", str(root)],
                   check=True, capture_output=True)
    assert docs.stale(root) == []


def test_a_new_measurement_of_a_machine_replaces_its_row():
    src = docs.Sources()
    runs = src.json("bench/results/repro_times.json")["runs"]
    labels = [docs.machine_label(r["machine"]) for r in runs]
    assert len(set(labels)) > 1 and labels[0] not in labels[1:]
    newer = {**runs[0], "seconds": 4321}
    shown = docs.latest_per_machine([*runs, newer])
    # one row per machine, in the order they first appear; the newest entry of each
    assert [docs.machine_label(r["machine"]) for r in shown] == list(dict.fromkeys(labels))
    assert shown[0] is newer and newer not in docs.latest_per_machine(runs)
    last = {label: i for i, label in enumerate(labels)}
    assert docs.latest_per_machine(runs) == [runs[last[label]] for label in dict.fromkeys(labels)]


def test_prose_outside_the_marks_is_left_alone():
    src = docs.Sources()
    page = ("intro 1,234 s\n<!-- generated: repro_times -->\nold\n<!-- end generated -->\n"
            "outro 9.99\n")
    out = docs.render(page, src)
    assert out.startswith("intro 1,234 s\n")
    assert out.endswith("<!-- end generated -->\noutro 9.99\n")
    assert "old" not in out and "repro_times.json" in out


def test_every_table_is_shown_somewhere_and_every_mark_names_a_table():
    text = "".join(p.read_text() for p in docs.Sources().pages())
    used = set(re.findall(r"^<!-- generated: ([\w-]+) -->$", text, re.M))
    assert used == set(docs.TABLES)


def test_the_site_builds_strictly(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                          str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "site" / "benchmarks" / "index.html").is_file()


def test_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_every_results_file_records_its_machine_and_command(path):
    data = json.loads(path.read_text())
    # one measurement per file, or a list of runs that each record their own
    entries = [data] if "machine" in data or not isinstance(data.get("runs"), list) \
        else data["runs"]
    for entry in entries:
        assert entry.get("machine"), f"{path.name}: no machine"
        assert entry.get("command"), f"{path.name}: no command"
