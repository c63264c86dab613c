"""Stage ``export_best``: choose a trial and write its hyperparameters and threshold.

Reads   paths.trials, paths.fold_metrics, paths.pareto (the hpo stage's tables)
        params: export_best.select, export_best.k, hpo.metric, hpo.objectives
Writes  paths.best_params: the chosen trial's hyperparameters (read by ``retrain``), the decision
        threshold that ships (read by ``evaluate``; ``export_best.threshold`` decides between
        0.5 and the trial's tuned one: ``shipped_threshold``), the tuned one, and why each was
        chosen. Both stages declare it under ``params:``, so ``dvc params diff`` and
        ``dvc exp show`` show it next to params.yaml.

Rules (``export_best.select``):

* ``best``: the complete trial with the highest objective value.
* ``mean_minus_k_se``: the highest fold mean minus ``k`` standard errors (fold std / sqrt(folds)).
  On a few folds the best value is often one lucky fold; this prefers a trial that is good on
  every fold.
* With ``hpo.objectives`` (a multi-objective study) the choice is among the Pareto-optimal
  trials: those whose metric is within ``k`` standard errors of the best one (``best``: k = 0),
  and of those the cheapest by the first extra objective.

Ties go to the earlier trial.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import yaml
from scipy import stats

from pipeline.common import run_stage, write_text
from pipeline.errors import StageError
from pipeline.params import HYPERPARAMETERS, THRESHOLD, Params, load_params


def read_rows(path: str | Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


# Significant digits of a float hyperparameter in best_params.yaml. DVC records the params of
# retrain in dvc.lock and rewrites dvc.lock through ruamel.yaml's round trip after every stage,
# which turns some 16- and 17-digit floats into a neighbour (4.797485674370245e-05 became
# ...244e-05): `dvc status` then called retrain changed after every fresh `make repro`. 12 digits
# survived that round trip for 100,000 random floats from 1e-12 to 1e6, 14 digits did not
# (test_review.py checks the value that failed, through DVC's own functions).
FLOAT_DIGITS = 12


def hyperparameters(row: dict[str, str]) -> dict[str, Any]:
    """The row's hyperparameters with their declared types (empty cells: not used); floats at
    FLOAT_DIGITS significant digits."""
    values: dict[str, Any] = {}
    for name, kind in HYPERPARAMETERS.items():
        cell = row.get(f"params_{name}", "")
        if cell != "":
            if kind is int:
                values[name] = int(float(cell))
            elif kind is float:
                values[name] = float(f"{float(cell):.{FLOAT_DIGITS}g}")
            else:
                values[name] = kind(cell)
    return values


def fold_scores(folds: list[dict[str, str]], metric: str) -> dict[int, list[float]]:
    scores: dict[int, list[float]] = {}
    for r in folds:
        scores.setdefault(int(r["trial"]), []).append(float(r[metric]))
    return scores


def _se(scores: list[float]) -> float:
    """The standard error of the fold mean (sample std / sqrt(folds)); 0 for a single fold."""
    return float(stats.sem(scores)) if len(scores) > 1 else 0.0


def choose(trials: list[dict[str, str]], pareto: list[dict[str, str]],
           folds: list[dict[str, str]], params: Params) -> tuple[dict[str, str], dict[str, Any]]:
    """The chosen row and the record of the choice."""
    rule, k, metric = params.export_best.select, params.export_best.k, params.hpo.metric
    complete = [r for r in trials if r["state"] == "COMPLETE"]
    if not complete:
        raise StageError("export_best: no complete trial in the trials table")
    scores = fold_scores(folds, metric)
    by_value = max(complete, key=lambda r: (float(r["value"]), -int(r["number"])))
    record: dict[str, Any] = {"rule": rule, "k": k, "best_by_value": int(by_value["number"])}

    if params.hpo.objectives:
        cost = params.hpo.objectives[0]
        front = [r for r in pareto if r["state"] == "COMPLETE"] or [by_value]
        top = max(front, key=lambda r: (float(r["value"]), -int(r["number"])))
        margin = (k if rule == "mean_minus_k_se" else 0.0) * _se(scores[int(top["number"])])
        eligible = [r for r in front if float(r["value"]) >= float(top["value"]) - margin]
        chosen = min(eligible, key=lambda r: (float(r[f"objective_{cost}"]),
                                              -float(r["value"]), int(r["number"])))
        record.update(pareto_trials=sorted(int(r["number"]) for r in front), cost=cost,
                      reason=f"the lowest {cost} ({float(chosen[f'objective_{cost}']):.4g}) of "
                             f"the Pareto-optimal trials within {margin:.4f} of the best "
                             f"{metric} ({float(top['value']):.4f}, trial {top['number']})")
        return chosen, record

    if rule == "best":
        record["reason"] = f"the highest {metric} ({float(by_value['value']):.4f})"
        return by_value, record

    def score(r: dict[str, str]) -> float:
        s = scores[int(r["number"])]
        return sum(s) / len(s) - k * _se(s)

    chosen = max(complete, key=lambda r: (score(r), -int(r["number"])))
    s = scores[int(chosen["number"])]
    record["score"] = round(score(chosen), 6)
    record["reason"] = (f"the highest fold mean - {k:g} SE of {metric}: {sum(s) / len(s):.4f} - "
                        f"{k:g} x {_se(s):.4f} over {len(s)} folds")
    if chosen is not by_value:
        b = scores[int(by_value["number"])]
        record["reason"] += (f"; trial {by_value['number']} has the highest value "
                             f"({float(by_value['value']):.4f}) but a fold SE of {_se(b):.4f}")
    return chosen, record


def shipped_threshold(row: dict[str, str], rule: str) -> tuple[float, str]:
    """The decision threshold that ships with the chosen trial (``export_best.threshold``)."""
    tuned = float(row["threshold"]) if row.get("threshold") else None
    gain = float(row["threshold_gain"]) if row.get("threshold_gain") else None
    if rule == "default" or tuned is None:
        return THRESHOLD, ("export_best.threshold is default" if rule == "default" else
                           "the trial has no tuned threshold")
    if rule == "tuned":
        return tuned, "export_best.threshold is tuned"
    if gain is None:
        return THRESHOLD, "the trial has no threshold_gain (a study recorded before it existed)"
    if gain > 0:
        return tuned, (f"tuned on another fold, it raised pos_f1 over {THRESHOLD} on every fold "
                       f"(smallest gain {gain:+.4f})")
    return THRESHOLD, (f"tuned on another fold, it did not raise pos_f1 over {THRESHOLD} on every "
                       f"fold (smallest gain {gain:+.4f})")


def run(params: Params) -> dict[str, Any]:
    paths = params.paths
    row, record = choose(read_rows(paths.trials), read_rows(paths.pareto),
                         read_rows(paths.fold_metrics), params)
    threshold, why = shipped_threshold(row, params.export_best.threshold)
    doc = {
        "trial": int(row["number"]),
        "value": float(row["value"]),
        "threshold": threshold,  # the one that ships: evaluate, the registered model, predict
        # tuned on the trial's pooled out-of-fold predictions: the best pos_f1 threshold
        "tuned_threshold": float(row["threshold"]) if row.get("threshold") else None,
        "threshold_reason": why,
        "selection": record,
        "hyperparameters": hyperparameters(row),
    }
    header = ("# Written by `python -m pipeline.export_best` from the hpo stage's trials; do not\n"
              "# edit. retrain and evaluate read it as a DVC params file (`dvc params diff`).\n")
    write_text(paths.best_params, header + yaml.safe_dump(doc, sort_keys=False, width=99))
    return doc


def main() -> None:
    doc = run(load_params())
    print(f"export_best: trial {doc['trial']} ({doc['selection']['reason']}); threshold "
          f"{doc['threshold']:.4f} ({doc['threshold_reason']}); {doc['hyperparameters']}")


if __name__ == "__main__":
    run_stage(main)
