"""dvc.yaml lists, for every stage, exactly the pipeline modules its script imports.

A module missing from a stage's deps means an edit there does not rerun the stage (DVC's promise
broken); a module listed but not imported reruns the stage for nothing. The closure is computed
from the source with ``ast`` (imports inside functions count: they run when the stage runs).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "pipeline"


def _pipeline_imports(path: Path) -> set[str]:
    """Names of the pipeline modules that ``path`` imports (``pipeline.x`` -> ``x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == PACKAGE and len(parts) > 1:
                    found.add(parts[1])
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y / from . import x
                base = node.module.split(".") if node.module else []
            elif node.module and node.module.split(".")[0] == PACKAGE:
                base = node.module.split(".")[1:]
            else:
                continue
            if base:
                found.add(base[0])
            else:  # from pipeline import faults: the names are modules
                found.update(a.name for a in node.names
                             if (ROOT / PACKAGE / f"{a.name}.py").is_file())
    return {name for name in found if (ROOT / PACKAGE / f"{name}.py").is_file()}


def import_closure(module: str) -> set[str]:
    """``pipeline/<module>.py`` and every pipeline module it imports, transitively, as paths."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_pipeline_imports(ROOT / PACKAGE / f"{name}.py"))
    return {f"{PACKAGE}/{name}.py" for name in seen}


def _stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def test_the_closure_follows_every_import_form():
    # the real graph: common.py reaches only the errors leaf; params.py through it as well
    assert import_closure("common") == {"pipeline/common.py", "pipeline/errors.py"}
    assert "pipeline/errors.py" in import_closure("params")
    assert "pipeline/faults.py" in import_closure("trial")  # `from pipeline import faults, ...`


@pytest.mark.parametrize("stage", sorted(_stages()))
def test_stage_deps_are_the_import_closure_of_its_module(stage):
    spec = _stages()[stage]
    assert spec["cmd"].split()[:3] == ["python", "-m", f"{PACKAGE}.{stage}"], spec["cmd"]
    listed = {d for d in spec.get("deps", []) if d.startswith(f"{PACKAGE}/")}
    closure = import_closure(stage)
    assert listed == closure, (
        f"dvc.yaml stage {stage}: missing from deps {sorted(closure - listed)}, "
        f"listed but not imported {sorted(listed - closure)}")
