"""A pull-request report: what this workspace changes against a base revision, and whether it is
more than noise.

First a warning when the base and this workspace ran on different hardware (the ``machine``,
``device``, ``precision`` or ``cpu_capability`` recorded in metrics/eval.json and
metrics/hpo.json differ): then the hardware, not the change, may have moved the numbers. Sections:
params diff and best-params diff, metrics diff (``dvc params diff`` / ``dvc metrics diff``), test
metrics with 95% percentile bootstrap intervals (``scipy.stats.bootstrap`` over the test posts:
the pairs of a post are not independent, and every metric of a resample is computed on the same
posts, so the differences to the baseline are paired), a fold-paired comparison of the base's and
this branch's chosen trials (same folds: a paired t-test), the importance ranking, and the plots.

Usage: ``python -m pipeline.report --rev main [--out report.md]`` (``make report``)
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from scipy import stats

from pipeline.common import derive_seed, run_stage, write_text
from pipeline.errors import StageError
from pipeline.inputs import parse_best_params, read_best_params
from pipeline.metrics import classification_metrics
from pipeline.params import Params, YamlLoader, load_params
from pipeline.predictions import read_predictions

BOOTSTRAP = 1000
# What produced a metrics file (evaluate writes the first three to eval.json, hpo to hpo.json):
# the same code gives other numbers in bf16 than in fp32, or with other CPU kernels.
HARDWARE = ("machine", "device", "precision", "cpu_capability")


def _cmd(args: list[str]) -> str:
    try:
        proc = subprocess.run(args, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise StageError(f"report: `{args[0]}` not found: run `make report`, or activate the "
                         "environment first (source .venv/bin/activate)") from err
    if proc.returncode:
        raise StageError(f"report: `{' '.join(args)}` failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _read_at(path: str, rev: str | None) -> str | None:
    """A file at a revision (git or DVC cache), or in the workspace; None when unavailable."""
    if rev is None:
        p = Path(path)
        return p.read_text(encoding="utf-8") if p.is_file() else None
    import dvc.api

    try:
        return dvc.api.read(path, rev=rev, repo=".", encoding="utf-8")
    except Exception:  # not in git, not in the local cache (dvc pull), or no such revision
        return None


def hardware_warning(base: dict[str, dict[str, Any]], this: dict[str, dict[str, Any]],
                     rev: str) -> str:
    """A warning line when a HARDWARE key that both sides record differs, else "".

    ``base`` and ``this``: metrics file name -> its metrics (``rev``'s and the workspace's)."""
    changes = [f"{name} {key}: {rev} `{base[name][key]}`, this `{this[name][key]}`"
               for name in sorted(set(base) & set(this)) for key in HARDWARE
               if key in base[name] and key in this[name] and base[name][key] != this[name][key]]
    if not changes:
        return ""
    return (f"> **Warning: different hardware.** {rev} and this workspace ran on different "
            f"machines or precisions ({'; '.join(changes)}): the hardware, not the change, may "
            "have moved the numbers below.\n")


def hardware_section(params: Params, rev: str) -> str:
    """hardware_warning for the committed metrics files at ``rev`` and in the workspace."""
    def recorded(at: str | None) -> dict[str, dict[str, Any]]:
        found = {}
        for path in (params.paths.eval_metrics, params.paths.hpo_metrics):
            text = _read_at(path, at)
            try:
                doc = json.loads(text) if text else None
            except json.JSONDecodeError:
                doc = None
            if isinstance(doc, dict):
                found[path] = doc
        return found

    return hardware_warning(recorded(rev), recorded(None), rev)


def diff_sections(rev: str, params: Params) -> str:
    out = []
    p_diff = json.loads(_cmd(["dvc", "params", "diff", rev, "--json"]) or "{}")
    best_file = params.paths.best_params
    rows = [[f, k, v.get("old"), v.get("new")] for f, d in p_diff.items() if f != best_file
            for k, v in sorted(d.items())]
    out.append("## Params\n\n" + (_table(["file", "param", rev, "this"], rows) if rows else
                                 "No change in params.yaml.\n"))
    rows = [[k, v.get("old"), v.get("new")] for k, v in sorted(p_diff.get(best_file, {}).items())]
    out.append("## Best params\n\n" + (_table(["param", rev, "this"], rows) if rows else
                                      "The chosen trial's hyperparameters did not change.\n"))
    m_diff = json.loads(_cmd(["dvc", "metrics", "diff", rev, "--json"]) or "{}")
    rows = [[f, k, v.get("old"), v.get("new"), v.get("diff")] for f, d in m_diff.items()
            for k, v in sorted(d.items())]
    out.append("## Metrics\n\n" + (_table(["file", "metric", rev, "this", "change"], rows)
                                   if rows else "No metric changed.\n"))
    return "\n".join(out)


def bootstrap_section(params: Params) -> str:
    """95% intervals of the test metrics, resampling posts (their pairs are correlated)."""
    text = _read_at(params.paths.predictions, None)
    if text is None:
        return "## Test metrics\n\nNo predictions in the workspace: run `dvc repro` first.\n"
    best = read_best_params(params.paths.best_params)
    pred = read_predictions(text)
    shipped, tuned = best.threshold, best.tuned_or_shipped
    eval_text = _read_at(params.paths.eval_metrics, None)
    base_threshold = float(json.loads(eval_text).get("baseline_threshold", 0.5)
                           if eval_text else 0.5)
    unique, post_of_row = np.unique(pred["post_id"].to_numpy(), return_inverse=True)
    members = [np.flatnonzero(post_of_row == i) for i in range(len(unique))]
    y, p, b = (pred[c].to_numpy() for c in ("label", "probability", "baseline_probability"))

    def evaluate(rows: np.ndarray) -> dict[str, float]:
        at_default = classification_metrics(y[rows], p[rows])
        at_shipped = classification_metrics(y[rows], p[rows], shipped)
        base = classification_metrics(y[rows], b[rows], base_threshold)
        return {"roc_auc": at_default["roc_auc"], "pr_auc": at_default["pr_auc"],
                "pos_f1 (0.5)": at_default["pos_f1"],
                f"pos_f1 (tuned {tuned:.3f})":
                    classification_metrics(y[rows], p[rows], tuned)["pos_f1"],
                f"pos_f1 (shipped {shipped:.3f})": at_shipped["pos_f1"],
                f"macro_f1 (shipped {shipped:.3f})": at_shipped["macro_f1"],
                "baseline pr_auc": base["pr_auc"],
                f"baseline pos_f1 ({base_threshold:.3f})": base["pos_f1"],
                "pr_auc - baseline": at_default["pr_auc"] - base["pr_auc"],
                "pos_f1 (shipped) - baseline": at_shipped["pos_f1"] - base["pos_f1"]}

    def of_posts(drawn: np.ndarray) -> np.ndarray:
        """Every metric on the pairs of the drawn posts (indices into ``unique``)."""
        rows = np.concatenate([members[i] for i in drawn])
        return np.array(list(evaluate(rows).values()))

    point = evaluate(np.arange(len(pred)))
    title = (f"## Test metrics (95% bootstrap intervals, {BOOTSTRAP} resamples of the "
             f"{len(unique)} test posts)\n\n")
    if len(unique) < 2:
        return title + "Fewer than two test posts: no interval.\n"
    with warnings.catch_warnings():
        # an AUC is NaN on a resample without both classes: handled below, not warned about
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        result = stats.bootstrap((np.arange(len(unique)),), of_posts, n_resamples=BOOTSTRAP,
                                 vectorized=False, method="percentile",
                                 rng=np.random.default_rng(derive_seed(params.seed, "bootstrap")))
    rows = []
    for k, (key, value) in enumerate(point.items()):
        low, high = result.confidence_interval.low[k], result.confidence_interval.high[k]
        values = result.bootstrap_distribution[k]
        undefined = int(np.isnan(values).sum())
        interval = f"[{low:.3f}, {high:.3f}]"
        if undefined == BOOTSTRAP:
            interval = "undefined (no resample has both classes)"
        elif undefined:
            # the interval of the resamples where the metric is defined (scipy's is NaN)
            low, high = np.nanpercentile(values, [2.5, 97.5])
            interval = (f"[{low:.3f}, {high:.3f}] ({undefined} resamples without both classes "
                        "left out)")
        rows.append([key, value, interval])
    return title + _table(["metric", "value", "95% interval"], rows)


def _folds_identity(params: Params, rev: str | None) -> str | None:
    """The prepared pairs (their hash in dvc.lock, in git) and the number of folds at ``rev``."""
    lock_text, params_text = _read_at("dvc.lock", rev), _read_at("params.yaml", rev)
    if not (lock_text and params_text):
        return None
    outs = yaml.safe_load(lock_text).get("stages", {}).get("prepare", {}).get("outs", [])
    md5 = next((o.get("md5") for o in outs if o.get("path") == params.paths.pairs), None)
    n_folds = (yaml.load(params_text, Loader=YamlLoader).get("prepare") or {}).get("n_folds")
    return f"pairs {md5[:12]} x {n_folds} folds" if md5 else None


def _chosen_folds(params: Params, rev: str | None) -> tuple[int, dict[int, float], str] | None:
    """The chosen trial's per-fold metric at ``rev``: from the fold metrics (DVC cache) or, when
    they are not in the local cache, from the committed hpo fold plot (in git)."""
    metric = params.hpo.metric
    best_text = _read_at(params.paths.best_params, rev)
    folds_id = _folds_identity(params, rev)
    if not (best_text and folds_id):
        return None
    where = f"{params.paths.best_params} at {rev or 'the workspace'}"
    trial = parse_best_params(best_text, where).trial
    if trial is None:
        return None
    for path in (params.paths.fold_metrics, params.paths.hpo_folds_plot):
        text = _read_at(path, rev)
        if not text:
            continue
        rows = pd.read_csv(io.StringIO(text))
        if metric not in rows.columns:  # the base optimised another metric
            continue
        rows = rows[rows["trial"] == trial].dropna(subset=[metric])
        if len(rows):
            return trial, dict(zip(rows["fold"], rows[metric], strict=True)), folds_id
    return None


def paired_section(params: Params, rev: str) -> str:
    metric = params.hpo.metric
    head = f"## Chosen trials, fold by fold ({metric})\n\n"
    base, this = _chosen_folds(params, rev), _chosen_folds(params, None)
    if base is None or this is None:
        return head + (f"The fold metrics ({metric}) of the chosen trial of "
                       f"{rev if base is None else 'the workspace'} are not available (neither "
                       f"{params.paths.hpo_folds_plot} in git nor {params.paths.fold_metrics} "
                       "in the local DVC cache: `dvc pull`).\n")
    (bt, bf, b_id), (tt, tf, t_id) = base, this
    if b_id != t_id or set(bf) != set(tf):
        return head + (f"The folds differ ({rev}: {b_id}; this: {t_id}), so the trials cannot "
                       f"be paired: {rev} trial {bt} mean {np.mean(list(bf.values())):.4f}, "
                       f"this trial {tt} mean {np.mean(list(tf.values())):.4f}.\n")
    folds = sorted(tf)
    diffs = np.array([tf[k] - bf[k] for k in folds])
    rows = [[k, bf[k], tf[k], tf[k] - bf[k]] for k in folds]
    text = head + _table(["fold", f"{rev} (trial {bt})", f"this (trial {tt})", "difference"],
                         rows)
    mean = float(diffs.mean())
    if len(diffs) > 1 and np.std(diffs) > 0:
        t, p = stats.ttest_rel([tf[k] for k in folds], [bf[k] for k in folds])
        se = float(stats.sem(diffs))
        verdict = ("more than fold noise" if p < 0.05 else
                   "within fold noise: not evidence of a real change")
        text += (f"\nMean difference {mean:+.4f} (SE {se:.4f}); paired t-test over "
                 f"{len(diffs)} folds: t = {t:.2f}, p = {p:.3f}: {verdict}.")
        if len(diffs) < 5:
            text += f" With {len(diffs)} folds the test has little power."
        text += "\n"
    else:
        text += f"\nMean difference {mean:+.4f} (identical or single-fold: no test).\n"
    return text


def importance_section(params: Params) -> str:
    text = _read_at(params.paths.importance, None)
    if text is None:
        return ""
    doc = json.loads(text)
    rows = [[i + 1, name, value] for i, (name, value) in enumerate(
        sorted(doc["importances"].items(), key=lambda kv: -kv[1]))]
    note = f" ({doc['error']})" if doc.get("error") else ""
    return (f"## Hyperparameter importance ({doc['evaluator']}, {doc['n_trials']} complete "
            f"trials){note}\n\n" + (_table(["rank", "param", "importance"], rows) if rows
                                    else "Not enough trials.\n"))


def plots_section(params: Params, rev: str) -> str:
    p = params.paths
    files = [p.pr_curve, p.roc_curve, p.confusion, p.hpo_history_plot, p.hpo_importance_plot,
             p.hpo_folds_plot]
    listing = "\n".join(f"- `{f}`" for f in files)
    return (f"## Plots\n\n{listing}\n\nRender both sides with `dvc plots diff {rev}` "
            f"(writes `dvc_plots/index.html`); Optuna's interactive plots are in "
            f"`{p.optuna_plots}/`.\n")


def build(params: Params, rev: str) -> str:
    head = _cmd(["git", "rev-parse", "--short", "HEAD"]).strip()
    base = _cmd(["git", "rev-parse", "--short", rev]).strip()
    parts = [f"# Experiment report: this workspace (HEAD {head}) vs {rev} ({base})\n",
             hardware_section(params, rev), diff_sections(rev, params), bootstrap_section(params),
             paired_section(params, rev), importance_section(params), plots_section(params, rev)]
    return "\n".join(part for part in parts if part)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="main", help="the base revision (default: main)")
    parser.add_argument("--out", type=Path, help="write Markdown here (default: print it)")
    args = parser.parse_args()
    text = build(load_params(), args.rev)
    if args.out:
        write_text(args.out, text)
        print(f"report: wrote {args.out}")
    else:
        print(text)


if __name__ == "__main__":
    run_stage(main)
