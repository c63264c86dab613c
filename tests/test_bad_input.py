"""Bad input, the way a user meets it: the stage exits non-zero with one line naming the file,
row, column or param, and leaves no output behind that DVC could record as a success.

Every case runs the stage's ``main`` here, through the same error boundary as its process
(``run_stage``); a few run ``python -m pipeline.prepare`` and `dvc repro` as processes, for what
only a process shows (its exit status, all of its stderr, DVC's record of the failure).
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest

from conftest import dump_yaml, load_yaml, run
from pipeline import prepare
from pipeline.common import run_stage

POSTS, ANNOTATIONS, CRITERIA = "redsm5_posts.csv", "redsm5_annotations.csv", "dsm5_criteria.json"


def _edit_text(name: str, old: str, new: str):
    def edit(data: Path) -> None:
        path = data / name
        text = path.read_text(encoding="utf-8")
        assert old in text, old
        path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return edit


def _edit_bytes(name: str, body: bytes):
    return lambda data: (data / name).write_bytes(body)


def _edit_criteria(mutate):
    def edit(data: Path) -> None:
        doc = json.loads((data / CRITERIA).read_text(encoding="utf-8"))
        mutate(doc)
        (data / CRITERIA).write_text(json.dumps(doc), encoding="utf-8")
    return edit


def _append_row(name: str, row: str):
    def edit(data: Path) -> None:
        with open(data / name, "a", encoding="utf-8") as f:
            f.write(row + "\n")
    return edit


DATA_CASES = {
    "missing file": (lambda d: (d / POSTS).unlink(), f"{POSTS}: file not found"),
    "missing column": (_edit_text(ANNOTATIONS, "DSM5_symptom,status,", "DSM5_symptom,"),
                       f"{ANNOTATIONS}: missing column 'status'"),
    "renamed column": (_edit_text(POSTS, "post_id,text", "post_id,body"),
                       f"{POSTS}: missing column 'text' (found columns: post_id, body)"),
    "empty file": (_edit_bytes(ANNOTATIONS, b""), f"{ANNOTATIONS}: file is empty"),
    "duplicated post_id": (_append_row(POSTS, "s_1000_40,again"),
                           "column post_id: duplicate post_id 's_1000_40' (first at row 1)"),
    "unknown post": (_append_row(ANNOTATIONS, "s_9_9,s_9_9_0,Hi.,FATIGUE,1,x"),
                     "column post_id: 's_9_9' is not in the posts file"),
    "unknown symptom": (_append_row(ANNOTATIONS, "s_1000_40,s_1000_40_0,Hi.,TIRED,1,x"),
                        "column DSM5_symptom: unknown symptom 'TIRED'"),
    "status not 0/1": (_append_row(ANNOTATIONS, "s_1000_40,s_1000_40_0,Hi.,FATIGUE,yes,x"),
                       "column status: 'yes' is not 0 or 1"),
    "non-UTF-8 bytes": (_edit_bytes(POSTS, "post_id,text\np1,caf\xe9\n".encode("latin-1")),
                        f"{POSTS}: line 2: not valid UTF-8"),
    "broken CSV quoting": (_append_row(POSTS, 'p_new,"never closed'),
                           f"{POSTS}: row 161"),
    "criteria missing one": (_edit_criteria(lambda c: c["criteria"].pop()),
                             f"{CRITERIA}: missing criterion 'A.9'"),
    "criteria unknown id": (_edit_criteria(lambda c: c["criteria"][0].update(id="B.1")),
                            "unknown criterion id 'B.1'"),
}

PARAMS_CASES = {
    "unknown key (-S hpo.ntrials=5)": (
        ("hpo", "ntrials", 5), "unknown key 'hpo.ntrials'; valid keys under hpo: n_trials"),
    "wrong type": (("hpo", "n_trials", "ten"), "hpo.n_trials: got 'ten', expected int"),
    "low > high": (("hpo.search_space", "warmup_ratio",
                    {"type": "float", "low": 0.2, "high": 0.1}),
                   "hpo.search_space.warmup_ratio: low (0.2) > high (0.1)"),
    "zero learning rate": (("hpo.search_space", "learning_rate", 0.0),
                           "learning_rate must be > 0.0, got 0.0"),
    "negative learning rate": (("hpo.search_space", "learning_rate",
                                {"type": "float", "low": -1.0e-5, "high": 1.0e-4}),
                               "learning_rate must be > 0.0, got -1e-05"),
    "unknown loss": (("hpo.search_space", "loss_function", "hinge"),
                     "loss_function: got 'hinge', expected one of 'weighted_ce', 'focal'"),
    "unknown metric": (("hpo", "metric", "accuracy"), "hpo.metric: got 'accuracy'"),
    "unknown aggregation": (("hpo", "fold_aggregation", "sum"),
                            "hpo.fold_aggregation: got 'sum'"),
    "unknown sampler": (("hpo.sampler", "name", "cmaes"), "hpo.sampler.name: got 'cmaes'"),
    "unknown pruner": (("hpo.pruner", "name", "hyperband"), "hpo.pruner.name: got 'hyperband'"),
    "fewer than 2 folds": (("prepare", "n_folds", 1), "prepare.n_folds: must be at least 2"),
    "more folds than posts": (("prepare", "n_folds", 500),
                              "160 posts cannot give a test split of 0.25 and 500 folds (params "
                              "prepare.test_size, prepare.n_folds)"),
    "password in storage": (("hpo", "storage", "postgresql://u:pw@db/hpo"),
                            "hpo.storage: the URL contains a password; set the environment "
                            "variable HPO_STORAGE"),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_model_dir):
    """A workdir with valid tiny params and sample data, copied per case."""
    from conftest import ROOT, apply_overrides, tiny_overrides
    from pipeline.sample_data import write

    root = tmp_path_factory.mktemp("pristine")
    params = apply_overrides(load_yaml(ROOT / "params.yaml"), tiny_overrides(tiny_model_dir))
    dump_yaml(root / "params.yaml", params)
    write(root / "data")
    (root / ".dvc").mkdir()
    return root


def _stage(workdir: Path, stage: str):
    return run([sys.executable, "-m", f"pipeline.{stage}"], workdir, check=False, timeout=300)


def _prepare_here(workdir: Path, monkeypatch, capsys) -> tuple[int, str]:
    """prepare's main in this process, in ``workdir``: its exit status and what it wrote to
    stderr. A warning it raises fails the test, as it would print in its own process (Python's
    default filters: deprecations are silent there)."""
    monkeypatch.chdir(workdir)
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for silent in (DeprecationWarning, PendingDeprecationWarning, ImportWarning,
                       ResourceWarning):
            warnings.simplefilter("ignore", silent)
        with pytest.raises(SystemExit) as exit_:
            run_stage(prepare.main)
    return exit_.value.code, capsys.readouterr().err


def _outputs(workdir: Path) -> list[str]:
    return sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")
                  if p.is_file() and p.parts[len(workdir.parts)] in ("artifacts", "metrics"))


def _bad_data(pristine: Path, dest: Path, case: str) -> tuple[Path, str]:
    """A copy of ``pristine`` with the data file edit of ``case``, and the expected message."""
    shutil.copytree(pristine, dest)
    edit, message = DATA_CASES[case]
    edit(dest / "data")
    return dest, message


def _bad_params(pristine: Path, dest: Path, case: str) -> tuple[Path, str]:
    """A copy of ``pristine`` with the params.yaml edit of ``case``, and the expected message."""
    shutil.copytree(pristine, dest)
    (section, key, value), message = PARAMS_CASES[case]
    params = load_yaml(dest / "params.yaml")
    node = params
    for part in section.split("."):
        node = node[part]
    node[key] = value
    dump_yaml(dest / "params.yaml", params)
    return dest, message


def _fails_in_one_line(workdir: Path, message: str, monkeypatch, capsys, case: str) -> None:
    """prepare in-process exits 2 with one line holding ``message``, and writes nothing."""
    code, err = _prepare_here(workdir, monkeypatch, capsys)
    assert code == 2, err[-2000:]
    assert message in err and "Traceback" not in err
    assert err.strip().startswith("ERROR: ") and "\n" not in err.strip()
    assert _outputs(workdir) == []
    print(f"{case}: {err.strip()}")


@pytest.mark.parametrize("case", DATA_CASES, ids=list(DATA_CASES))
def test_bad_data_file(pristine, tmp_path, monkeypatch, capsys, case):
    workdir, message = _bad_data(pristine, tmp_path / "w", case)
    _fails_in_one_line(workdir, message, monkeypatch, capsys, case)


@pytest.mark.parametrize("case", PARAMS_CASES, ids=list(PARAMS_CASES))
def test_bad_params(pristine, tmp_path, monkeypatch, capsys, case):
    workdir, message = _bad_params(pristine, tmp_path / "w", case)
    # prepare: every stage validates all of params.yaml first
    _fails_in_one_line(workdir, message, monkeypatch, capsys, case)


@pytest.mark.slow
@pytest.mark.parametrize(("bad", "case"), [(_bad_data, "unknown symptom"),
                                           (_bad_params, "unknown key (-S hpo.ntrials=5)")],
                         ids=["data", "params"])
def test_the_stage_process_exits_2_with_one_line(pristine, tmp_path, bad, case):
    """What the in-process cases cannot see: the process's exit status and all of its stderr,
    imports included."""
    workdir, message = bad(pristine, tmp_path / "w", case)
    proc = _stage(workdir, "prepare")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("ERROR: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr and proc.stdout == ""
    assert _outputs(workdir) == []


@pytest.mark.slow
def test_dvc_records_nothing_when_a_stage_fails(reproduced):
    repo = reproduced  # every stage ran and its results are committed
    lock = (repo / "dvc.lock").read_text()
    data = repo / "data" / ANNOTATIONS
    data.write_text(data.read_text() + "s_1000_40,x,Hi.,TIRED,1,x\n", encoding="utf-8")
    run(["dvc", "add", "-q", "data"], repo)
    proc = run(["dvc", "repro"], repo, check=False)
    assert proc.returncode != 0 and "unknown symptom 'TIRED'" in proc.stderr
    assert (repo / "dvc.lock").read_text() == lock  # nothing recorded
    assert "prepare" in run(["dvc", "status"], repo).stdout  # still out of date
