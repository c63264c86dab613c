"""What the hpo stage writes about its study: tables, summary, importances, plots, metrics.

Everything describes the first ``hpo.n_trials`` finished trials by index (pipeline/study.py),
each by its final attempt (failed trials in between are listed; attempts that died and ran again
are not), and a trial's ``number`` here is its index. So the outputs depend on params alone:
going back from 10 to 5 trials reports what the 5-trial run reported, and a study killed and
resumed writes what the uninterrupted one wrote. No absolute paths, run ids, pids, durations or
counts of this run go into the files (they are in the study and in MLflow), and the plotly plots
get fixed element ids, so a rerun on the same study writes the same bytes.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from pipeline.common import (
    atomic_dir,
    derive_seed,
    round_floats,
    write_json,
    write_text,
)
from pipeline.errors import StageError
from pipeline.params import HYPERPARAMETERS, METRICS, Params
from pipeline.storage import JOURNAL
from pipeline.study import FINISHED_STATES, Ledger, primary
from pipeline.tracking import RunTree

FOLD_COLUMNS = ["trial", "fold", "state", "seed", "epochs_run", "best_epoch", "padding_fraction",
                *METRICS]
OPTUNA_PLOTS = ("optimization_history", "param_importances", "parallel_coordinate", "slice",
                "intermediate_values")


def considered_trials(study: optuna.Study, params: Params) -> list[FrozenTrial]:
    """The final attempt of every index up to the n_trials-th finished trial (failed ones
    included), each renumbered to its index."""
    ledger = Ledger.of(study, params.hpo.max_retries)
    trials = []
    for k in ledger.considered(params.hpo.n_trials):
        t = copy.copy(ledger.final(k))
        t.number = k
        trials.append(t)
    return trials


def fold_rows(trials: list[FrozenTrial], n_folds: int) -> list[dict[str, Any]]:
    rows = []
    for t in trials:
        for fold in range(n_folds):
            f = t.user_attrs.get(f"fold{fold}")
            if f is not None:
                rows.append({"trial": t.number, "fold": fold, "state": t.state.name,
                             **{k: f.get(k) for k in FOLD_COLUMNS[3:]}})
    return rows


def trial_rows(trials: list[FrozenTrial], params: Params) -> list[dict[str, Any]]:
    """One row per trial: state, objective, fold mean/std, tuned threshold, hyperparameters."""
    metric, n_folds = params.hpo.metric, params.prepare.n_folds
    rows = []
    for t in trials:
        reason = t.user_attrs.get("fail_reason")
        folds = [t.user_attrs[f"fold{k}"][metric] for k in range(n_folds)
                 if t.user_attrs.get(f"fold{k}") is not None]
        hps = t.user_attrs.get("hyperparameters") or {}
        extra = t.user_attrs.get("objectives") or {}
        rows.append({
            "number": t.number, "state": t.state.name, "value": primary(t),
            **{f"objective_{name}": extra.get(name) for name in params.hpo.objectives},
            "fold_mean": float(np.mean(folds)) if folds else None,
            "fold_std": float(np.std(folds, ddof=1)) if len(folds) > 1 else None,
            "folds_run": len(folds),
            "threshold": t.user_attrs.get("threshold"),
            "oof_pos_f1": t.user_attrs.get("oof_pos_f1"),  # at 0.5
            "oof_pos_f1_tuned": t.user_attrs.get("oof_pos_f1_tuned"),
            # the threshold's worst pos_f1 gain on a fold it was not tuned on (trial._threshold)
            "threshold_gain": t.user_attrs.get("threshold_gain"),
            **{f"params_{name}": hps.get(name) for name in HYPERPARAMETERS},
            "fail_reason": reason,
        })
    return rows


def to_csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Rows as CSV; metrics rounded, hyperparameters (params_*) kept exact for export_best."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        row = {k: v if k.startswith("params_") else round_floats(v) for k, v in row.items()}
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()


def _complete_study(trials: list[FrozenTrial], directions: list) -> optuna.Study:
    """An in-memory study holding just the considered complete trials."""
    study = optuna.create_study(directions=directions)
    study.add_trials([t for t in trials if t.state == TrialState.COMPLETE])
    return study


def _evaluator(params: Params):
    """hpo.importance_evaluator, seeded (Optuna's default would be another, unseeded one)."""
    seed = derive_seed(params.seed, "importance")
    return {
        "fanova": lambda: optuna.importance.FanovaImportanceEvaluator(seed=seed),
        "ped_anova": lambda: optuna.importance.PedAnovaImportanceEvaluator(),
        "mean_decrease_impurity":
            lambda: optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=seed),
    }[params.hpo.importance_evaluator]()


def _param_names(trials: list[FrozenTrial], params: Params) -> list[str] | None:
    """The parameters Optuna would assess (PED-ANOVA: every one of a complete trial; the others:
    those of all complete trials), sorted: Optuna orders equal importances as it meets the
    names, which must not vary between runs."""
    names = [set(t.params) for t in trials if t.state == TrialState.COMPLETE]
    if not names:
        return None
    if params.hpo.importance_evaluator == "ped_anova":
        return sorted(set().union(*names))
    return sorted(set.intersection(*names))


def importances(trials: list[FrozenTrial], params: Params) -> dict[str, Any]:
    """Importances for hpo.metric over the complete trials, with the evaluator set explicitly."""
    study = _complete_study(trials, ["maximize"] * (1 + len(params.hpo.objectives)))
    result: dict[str, Any] = {"evaluator": params.hpo.importance_evaluator,
                              "target": params.hpo.metric,
                              "n_trials": len(study.trials), "importances": {}}
    try:
        result["importances"] = optuna.importance.get_param_importances(
            study, evaluator=_evaluator(params), params=_param_names(study.trials, params),
            target=lambda t: t.values[0])
    except (RuntimeError, ValueError) as err:  # too few trials, or nothing varied
        result["error"] = str(err)
    return result


def pareto_rows(study: optuna.Study, trials: list[FrozenTrial],
                params: Params) -> list[dict[str, Any]]:
    """Pareto-optimal complete trials (with a single objective: the best trial)."""
    original = [t for t in trials if t.state == TrialState.COMPLETE]
    copy = _complete_study(trials, study.directions)  # add_trials renumbers from 0, in order
    best = {original[t.number].number for t in copy.best_trials}
    return [r for r in trial_rows(trials, params) if r["number"] in best]


def _plot_tables(trials: list[FrozenTrial], importance: dict, folds: list[dict],
                 metric: str) -> dict[str, list[dict[str, Any]]]:
    """The CSV files behind the hpo plots of dvc.yaml."""
    history, best = [], None
    for t in trials:
        value = primary(t)
        if t.state == TrialState.COMPLETE:
            best = value if best is None else max(best, value)
        history.append({"trial": t.number, "state": t.state.name, "value": value,
                        "best_value": best})
    ranked = sorted(importance["importances"].items(), key=lambda kv: -kv[1])
    return {
        "history": history,
        "importance": [{"param": k, "importance": v} for k, v in ranked],
        "folds": [{"trial": r["trial"], "fold": r["fold"], "state": r["state"],
                   metric: r[metric]} for r in folds],
    }


def _optuna_html(study: optuna.Study, trials: list[FrozenTrial], params: Params,
                 out_dir: Path) -> list[Path]:
    """Optuna's own interactive plots (plotly HTML) for the considered trials."""
    import optuna.visualization as vis

    copy = optuna.create_study(directions=study.directions)
    copy.add_trials([t for t in trials if t.state in FINISHED_STATES])
    target = {"target": lambda t: t.values[0], "target_name": params.hpo.metric}
    makers = {
        "optimization_history": lambda: vis.plot_optimization_history(copy, **target),
        "param_importances": lambda: vis.plot_param_importances(
            copy, evaluator=_evaluator(params), params=_param_names(copy.trials, params),
            **target),
        "parallel_coordinate": lambda: vis.plot_parallel_coordinate(copy, **target),
        "slice": lambda: vis.plot_slice(copy, **target),
        "intermediate_values": lambda: vis.plot_intermediate_values(copy),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in OPTUNA_PLOTS:
            path = out_dir / f"{name}.html"
            try:
                figure = makers[name]()
            except (ValueError, RuntimeError, ImportError) as err:  # e.g. too few trials
                path.write_text(f"<p>{name}: not available ({err})</p>\n", encoding="utf-8")
            else:
                # no plotly.js inline (3.5 MB each): the page loads it from its CDN; a fixed
                # div id (plotly draws a random one) keeps the bytes stable
                figure.write_html(path, include_plotlyjs="cdn", full_html=True,
                                  config={"responsive": True}, div_id=f"optuna-{name}")
            written.append(path)
    return written


def _ran_on(trials: list[FrozenTrial], key: str) -> str:
    """The distinct values of a trial attribute (precision, machine), joined by " + "."""
    return " + ".join(sorted({str(t.user_attrs[key]) for t in trials
                              if t.user_attrs.get(key)})) or "unknown"


def portable_storage(url: str) -> str:
    """The storage URL as it goes into a DVC output: a file inside the workspace relative to it
    (an absolute path differs between clones and DVC's experiment copies)."""
    root = Path.cwd().resolve()
    for prefix in ("sqlite:///", JOURNAL):
        path = Path(url[len(prefix):]) if url.startswith(prefix) else None
        if path is not None and path.is_absolute() and path.resolve().is_relative_to(root):
            return prefix + path.resolve().relative_to(root).as_posix()
    return url


def write_outputs(study: optuna.Study, params: Params, resumed: int, storage: str,
                  runs: RunTree, parent: str) -> dict[str, Any]:
    """Trials, fold metrics, summary, importances, plots and metrics; return the metrics."""
    paths, hpo, n_folds = params.paths, params.hpo, params.prepare.n_folds
    trials = considered_trials(study, params)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise StageError(f"hpo: none of the {len(trials)} trials completed (all pruned or failed)")
    best = max(complete, key=lambda t: (primary(t), -t.number))
    rows = trial_rows(trials, params)
    folds = fold_rows(trials, n_folds)
    best_row = next(r for r in rows if r["number"] == best.number)
    counts = {state: sum(t.state.name == state for t in trials)
              for state in ("COMPLETE", "PRUNED", "FAIL")}
    finished = counts["COMPLETE"] + counts["PRUNED"]
    pareto = pareto_rows(study, trials, params)
    metrics = round_floats({
        "best_value": primary(best),
        "best_trial": best.number,
        "best_fold_mean": best_row["fold_mean"],
        "best_fold_std": best_row["fold_std"],
        "n_complete": counts["COMPLETE"],
        "n_pruned": counts["PRUNED"],
        "n_failed": counts["FAIL"],
        "n_pareto": len(pareto),
        "fold_fits_run": sum(r["folds_run"] for r in rows
                             if r["state"] in ("COMPLETE", "PRUNED")),
        "fold_fits_possible": finished * n_folds,
        # early stopping and pruning save epochs: run vs what the finished trials asked for
        "epochs_run": sum(r["epochs_run"] or 0 for r in folds
                          if r["state"] in ("COMPLETE", "PRUNED")),
        "epochs_possible": sum(n_folds * t.user_attrs["hyperparameters"]["num_train_epochs"]
                               for t in trials if t.state in FINISHED_STATES),
        # what the trials ran on: the same code gives other numbers on other hardware
        "precision": _ran_on(trials, "precision"),
        "machine": _ran_on(trials, "machine"),
    })
    importance = round_floats(importances(trials, params))
    summary = {
        "study_name": study.study_name,
        "storage": portable_storage(storage),
        "directions": [d.name.lower() for d in study.directions],
        "objective": f"{hpo.fold_aggregation} over {n_folds} folds of {hpo.metric}",
        "extra_objectives": hpo.objectives,
        "n_trials": hpo.n_trials,
        "counts": counts,
        "best_trial": {"number": best.number, "value": round_floats(primary(best)),
                       "hyperparameters": best.user_attrs["hyperparameters"],
                       "fold_mean": best_row["fold_mean"], "fold_std": best_row["fold_std"]},
        # the study run: tag optuna.study_name in this experiment (its id is the study's user
        # attribute mlflow_run_id; ids differ between clones, so none are written here)
        "mlflow_experiment": hpo.mlflow_experiment,
        "definition": study.user_attrs["definition"],
    }
    write_text(paths.trials, to_csv(rows, list(rows[0])))
    write_text(paths.pareto, to_csv(pareto, list(rows[0])))
    write_text(paths.fold_metrics, to_csv(folds, FOLD_COLUMNS))
    write_json(paths.study_summary, summary)
    write_json(paths.importance, importance)
    tables = _plot_tables(trials, importance, folds, hpo.metric)
    for name, path in (("history", paths.hpo_history_plot),
                       ("importance", paths.hpo_importance_plot),
                       ("folds", paths.hpo_folds_plot)):
        table = tables[name]
        columns = list(table[0]) if table else ["param", "importance"]
        write_text(path, to_csv(table, columns))
    with atomic_dir(paths.optuna_plots) as tmp:  # written whole or not at all
        html = _optuna_html(study, trials, params, tmp)
    # not key-sorted: this order (best value first) is the column order of `dvc exp show`
    write_text(paths.hpo_metrics, json.dumps(metrics, indent=2) + "\n")

    # facts about this run rather than the study: in MLflow, not in the DVC outputs
    runs.log(parent, {"trials_in_storage": len(study.trials),
                      "trials_reused": min(resumed, hpo.n_trials),
                      **{k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                      **{f"importance_{k}": v for k, v in importance["importances"].items()}})
    for path in (paths.trials, paths.fold_metrics, paths.study_summary, paths.importance,
                 paths.pareto):
        runs.artifact(parent, path)
    for path in html:
        runs.artifact(parent, Path(paths.optuna_plots) / path.name, "optuna")
    return metrics
