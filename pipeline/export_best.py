"""Stage ``export_best``: the chosen trial's hyperparameters as a small YAML params file.

Reads   paths.trials (the hpo stage's trial table)
Writes  paths.best_params, which ``retrain`` declares under ``params:`` so that ``dvc params diff``
        and ``dvc exp show`` show the tuned hyperparameters next to params.yaml.

The choice: the complete trial with the highest objective value (ties: the earlier trial).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import yaml

from pipeline.common import StageError, run_stage, write_text
from pipeline.params import HYPERPARAMETERS, Params, load_params


def read_trials(path: str | Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def hyperparameters(row: dict[str, str]) -> dict[str, Any]:
    """The row's hyperparameters with their declared types (empty cells: not used)."""
    values = {}
    for name, kind in HYPERPARAMETERS.items():
        cell = row.get(f"params_{name}", "")
        if cell != "":
            values[name] = int(float(cell)) if kind is int else kind(cell)
    return values


def choose(rows: list[dict[str, str]]) -> dict[str, str]:
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    if not complete:
        raise StageError("export_best: no complete trial in the trials table")
    return max(complete, key=lambda r: (float(r["value"]), -int(r["number"])))


def run(params: Params) -> dict[str, Any]:
    row = choose(read_trials(params.paths.trials))
    doc = {"trial": int(row["number"]), "value": float(row["value"]),
           "hyperparameters": hyperparameters(row)}
    header = ("# Written by `python -m pipeline.export_best` from the hpo stage's trials; do not\n"
              "# edit. retrain reads it as a DVC params file (see `dvc params diff`).\n")
    write_text(params.paths.best_params, header + yaml.safe_dump(doc, sort_keys=False))
    return doc


def main() -> None:
    doc = run(load_params())
    print(f"export_best: trial {doc['trial']} (value {doc['value']:.4f}): "
          f"{doc['hyperparameters']}")


if __name__ == "__main__":
    run_stage(main)
