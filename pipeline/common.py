"""Small helpers every stage shares: atomic writes, seeds and the error boundary of a stage's
main(). No torch here: the report and other light tools import it."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import DataError, ParamsError, StageError


def derive_seed(seed: int, *keys: object) -> int:
    """A 31-bit seed for (seed, keys...): stable across processes and Python versions."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it into place only if the block succeeds.

    A crash never leaves a half-written file where DVC (or the next stage) would read it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Like atomic_path, for a folder: fill the yielded folder; it replaces ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")


def write_json(path: str | Path, obj: Any, sort_keys: bool = True) -> None:
    """Pretty JSON, key-sorted unless the caller's order matters (``dvc exp show`` columns);
    either way the same object gives the same bytes."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n")


def round_floats(obj: Any, digits: int = 6) -> Any:
    """Every float in a nested structure to ``digits`` significant digits (metrics files should
    not diff on noise digits). Never for hyperparameters: those must round-trip exactly."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [round_floats(v, digits) for v in obj]
    return obj


def workspace_root() -> Path:
    """The DVC repository root, also from inside a queued experiment's temporary copy: DVC_ROOT
    (DVC sets it for every stage, to the *main* repository for a ``dvc exp run --queue`` copy
    under ``.dvc/tmp/exps``), else DVC's own ``Repo.find_root`` (the nearest folder with a
    ``.dvc`` directory), else the cwd."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    cwd = Path.cwd().resolve()
    parts = cwd.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        return Path(Repo.find_root(str(cwd))).resolve()
    except NotDvcRepoError:
        return cwd


def run_stage(main: Callable[[], Any]) -> None:
    """Run a stage's main; turn known input errors into one clear line and a non-zero exit."""
    try:
        main()
    except (ParamsError, DataError, StageError) as err:
        print(f"ERROR: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        # The interpreter's last collection at exit walks every object torch, transformers and
        # MLflow made, 1-2 s per stage process; the outputs are written and closed by now.
        gc.freeze()
