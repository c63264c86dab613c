"""Run a named profile (``profiles/<name>.yaml``) as a DVC experiment.

A profile is a flat map of params.yaml keys to values; this turns it into ``dvc exp run -S``
overrides, validates the result with the params loader first (a bad profile fails before DVC
starts), and runs ``dvc exp run -n <name> -S ...``. Extra arguments go to ``dvc exp run``.

DVC refuses an experiment name that the baseline commit already has, so the experiment is named
after the profile, or ``<profile>-2``, ``<profile>-3``, ... when that name is taken (a second
``make quick`` just works); ``--name`` gives it a name of your choice instead.

Usage: ``python -m pipeline.profiles full [--name NAME] [--queue] [--print]``
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from pipeline.common import run_stage
from pipeline.errors import StageError
from pipeline.params import PARAMS_FILE, ParamsError, YamlLoader, parse_params

PROFILES_DIR = Path("profiles")


def _hydra(value: Any) -> str:
    """A value in the override grammar ``dvc exp run -S`` parses (no spaces, floats with a dot)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_hydra(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        text = repr(value)
        return text.replace("e", ".0e", 1) if "e" in text and "." not in text else text
    if isinstance(value, str) and not re.fullmatch(r"[A-Za-z0-9_./:-]+", value):
        return json.dumps(value)
    return str(value)


def overrides(profile: dict[str, Any]) -> list[str]:
    """``-S`` arguments. A mapping replaces the old value whole (``~key`` then ``+key``): a plain
    ``-S key={...}`` would merge into the old mapping and keep its stale fields."""
    args = []
    for key, value in profile.items():
        if isinstance(value, dict):
            args += ["-S", f"~{key}", "-S", f"+{key}={_hydra(value)}"]
        else:
            args += ["-S", f"{key}={_hydra(value)}"]
    return args


def load_profile(name: str) -> dict[str, Any]:
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
        raise ParamsError(f"{path}: no such profile (known: {known})")
    profile = yaml.load(path.read_text(encoding="utf-8"), Loader=YamlLoader) or {}
    if not isinstance(profile, dict):
        raise ParamsError(f"{path}: expected a map of params keys to values")
    return profile


def apply(raw: dict[str, Any], profile: dict[str, Any], source: str) -> dict[str, Any]:
    """params.yaml content with the profile's dotted keys set (unknown keys are errors)."""
    merged = copy.deepcopy(raw)
    for dotted, value in profile.items():
        node = merged
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ParamsError(f"{source}: '{dotted}' is not a key of {PARAMS_FILE}")
            node = node[part]
        if leaf not in node:
            raise ParamsError(f"{source}: '{dotted}' is not a key of {PARAMS_FILE}")
        node[leaf] = value
    parse_params(merged)  # the same checks every stage runs
    return merged


def experiment_names() -> set[str]:
    """Names of the experiments of the current baseline commit (the ones ``-n`` must avoid)."""
    proc = subprocess.run(["dvc", "exp", "list", "--name-only"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise StageError(f"dvc exp list failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return set(proc.stdout.split())


def fresh_name(profile: str, taken: set[str]) -> str:
    """``profile`` if no experiment has that name yet, else the first free ``profile-N``."""
    name, n = profile, 1
    while name in taken:
        n += 1
        name = f"{profile}-{n}"
    return name


def command(name: str, extra: list[str], exp_name: str | None = None) -> list[str]:
    """The ``dvc exp run`` command of profile ``name`` (a fresh experiment name unless given)."""
    profile = load_profile(name)
    raw = yaml.load(Path(PARAMS_FILE).read_text(encoding="utf-8"), Loader=YamlLoader)
    apply(raw, profile, str(PROFILES_DIR / f"{name}.yaml"))
    exp_name = exp_name or fresh_name(name, experiment_names())
    return ["dvc", "exp", "run", "-n", exp_name, *overrides(profile), *extra]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("-n", "--name", dest="exp_name", default=None,
                        help="experiment name (default: the profile's, or <profile>-N if taken)")
    parser.add_argument("--print", action="store_true", help="print the command, do not run it")
    args, extra = parser.parse_known_args()
    cmd = command(args.name, extra, args.exp_name)
    print(shlex.join(cmd))
    if not args.print:
        sys.exit(subprocess.call(cmd))


if __name__ == "__main__":
    run_stage(main)
