"""A pull-request report: what this workspace changes against a base revision, and whether it is
more than noise.

Sections: params diff and best-params diff, metrics diff (``dvc params diff`` /
``dvc metrics diff``), test metrics with 95% bootstrap intervals (posts resampled, since the pairs
of a post are not independent), a fold-paired comparison of the base's and this branch's chosen
trials (same folds: a paired test), the importance ranking, and the plots.

Usage: ``python -m pipeline.report --rev main [--out report.md]`` (``make report``)
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from scipy import stats

from pipeline.common import derive_seed, run_stage, write_text
from pipeline.errors import StageError
from pipeline.metrics import classification_metrics
from pipeline.params import Params, YamlLoader, load_params
from pipeline.predictions import read_predictions

BOOTSTRAP = 1000


def _cmd(args: list[str]) -> str:
    proc = subprocess.run(args, capture_output=True, text=True)
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
    best = yaml.load(Path(params.paths.best_params).read_text(encoding="utf-8"),
                     Loader=YamlLoader)
    if text is None:
        return "## Test metrics\n\nNo predictions in the workspace: run `dvc repro` first.\n"
    pred = read_predictions(text)
    shipped = float(best.get("threshold", 0.5))
    tuned = float(best.get("tuned_threshold") or shipped)
    eval_text = _read_at(params.paths.eval_metrics, None)
    base_threshold = float(json.loads(eval_text).get("baseline_threshold", 0.5)
                           if eval_text else 0.5)
    posts = pred["post_id"].to_numpy()
    unique = np.unique(posts)
    members = {p: np.flatnonzero(posts == p) for p in unique}
    rng = np.random.default_rng(derive_seed(params.seed, "bootstrap"))

    def evaluate(rows: np.ndarray) -> dict[str, float]:
        y, p, b = (pred[c].to_numpy()[rows] for c in ("label", "probability",
                                                     "baseline_probability"))
        at_default = classification_metrics(y, p)
        at_shipped = classification_metrics(y, p, shipped)
        base = classification_metrics(y, b, base_threshold)
        return {"roc_auc": at_default["roc_auc"], "pr_auc": at_default["pr_auc"],
                "pos_f1 (0.5)": at_default["pos_f1"],
                f"pos_f1 (tuned {tuned:.3f})": classification_metrics(y, p, tuned)["pos_f1"],
                f"pos_f1 (shipped {shipped:.3f})": at_shipped["pos_f1"],
                f"macro_f1 (shipped {shipped:.3f})": at_shipped["macro_f1"],
                "baseline pr_auc": base["pr_auc"],
                f"baseline pos_f1 ({base_threshold:.3f})": base["pos_f1"],
                "pr_auc - baseline": at_default["pr_auc"] - base["pr_auc"],
                "pos_f1 (shipped) - baseline": at_shipped["pos_f1"] - base["pos_f1"]}

    point = evaluate(np.arange(len(pred)))
    samples = []
    for _ in range(BOOTSTRAP):
        drawn = rng.choice(unique, size=len(unique), replace=True)
        samples.append(evaluate(np.concatenate([members[p] for p in drawn])))
    rows = []
    for key, value in point.items():
        values = np.array([s[key] for s in samples])
        values = values[np.isfinite(values)]
        low, high = np.percentile(values, [2.5, 97.5])
        rows.append([key, value, f"[{low:.3f}, {high:.3f}]"])
    return (f"## Test metrics (95% bootstrap intervals, {BOOTSTRAP} resamples of the "
            f"{len(unique)} test posts)\n\n" + _table(["metric", "value", "95% interval"], rows))


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
    trial = yaml.load(best_text, Loader=YamlLoader)["trial"]
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
        se = float(np.std(diffs, ddof=1) / np.sqrt(len(diffs)))
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
             diff_sections(rev, params), bootstrap_section(params),
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
