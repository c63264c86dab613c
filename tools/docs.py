"""Write the generated tables of README.md and docs/*.md from the results files.

A page marks each table it shows between ``<!-- generated: NAME -->`` and
``<!-- end generated -->``; this script rewrites what lies between the two from
``bench/results/*.json``, ``metrics/*.json``, ``dvc.yaml`` and the code (``TABLES`` maps each NAME
to the one function that writes it) and leaves everything else on the page alone. A figure is
thus written in one place, its results file, and every table names the machine that measured it.

Usage: ``python tools/docs.py`` rewrites the pages (``make docs``); ``python tools/docs.py
--check`` changes nothing and exits 1 naming each page that differs from what it would write
(``tests/test_docs.py`` runs it).
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^(<!-- generated: ([\w-]+) -->\n).*?^(<!-- end generated -->)$", re.S | re.M)
DASH = "—"


class Sources:
    """The files the tables are made from, below one checkout (read once each)."""

    def __init__(self, root: Path = ROOT) -> None:
        self.root = root
        self._cache: dict[str, Any] = {}

    def json(self, rel: str) -> dict | None:
        """A JSON file, or None when it does not exist."""
        if rel not in self._cache:
            path = self.root / rel
            self._cache[rel] = json.loads(path.read_text()) if path.is_file() else None
        return self._cache[rel]

    def csv(self, rel: str) -> list[dict]:
        if rel not in self._cache:
            with open(self.root / rel, newline="") as f:
                self._cache[rel] = list(csv.DictReader(f))
        return self._cache[rel]

    def yaml(self, rel: str) -> dict:
        if rel not in self._cache:
            self._cache[rel] = yaml.safe_load((self.root / rel).read_text())
        return self._cache[rel]

    def results(self) -> list[str]:
        """Every results JSON, relative to the root."""
        return sorted(p.relative_to(self.root).as_posix()
                      for p in (self.root / "bench" / "results").glob("*.json"))

    def pages(self) -> list[Path]:
        return [self.root / "README.md", *sorted((self.root / "docs").glob("*.md"))]


# ---- formatting ----------------------------------------------------------------------------

def num(x: Any, digits: int = 3, sign: bool = False) -> str:
    """A number with thousands separators (``—`` when absent)."""
    if x is None or x == "":
        return DASH
    return f"{float(x):{'+' if sign else ''},.{digits}f}"


def pct(x: Any, digits: int = 1) -> str:
    return DASH if x is None else f"{100 * float(x):.{digits}f}%"


def secs(x: Any) -> str:
    if x is None:
        return DASH
    minutes = f" ({float(x) / 60:.0f} min)" if float(x) >= 600 else ""
    return f"{float(x):,.0f} s{minutes}"


def table(header: list[str], rows: list[list[Any]], align: str = "") -> str:
    """A Markdown table; ``align`` holds one ``l`` or ``r`` per column (default: left)."""
    align = align.ljust(len(header), "l")
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_label(machine: dict | None) -> str:
    """The machine's one-line label (built from its fields in files older than ``label``)."""
    if not machine:
        return "not recorded"
    if machine.get("label"):
        return machine["label"]
    kind = machine.get("cpu_kind") or machine.get("cpu_capability", "?")
    return f"{machine.get('cpu', '?')} ({kind}, {machine.get('cores', '?')} cores)"


def measured(data: dict, source: str) -> str:
    """The caption under a table: the machine, its library versions, the command, the file."""
    machine = data.get("machine") if isinstance(data.get("machine"), dict) else None
    versions = ", ".join(f"{lib} {machine[lib]}" for lib in ("torch", "transformers")
                         if machine and machine.get(lib))
    text = f"Machine: **{machine_label(machine)}**"
    gpu = machine.get("gpu") if machine else None
    if isinstance(gpu, dict) and gpu.get("driver"):
        text += f" (driver {gpu['driver']})"
    if versions:
        text += f", {versions}"
    if machine and machine.get("note"):
        text += f" ({machine['note']})"
    command = data.get("command")
    text += f". Command: `{command}`" if command else ". Command: not recorded"
    if data.get("command_note"):
        text += f" ({data['command_note']})"
    return text + f". Source: `{source}`."


# ---- the pipeline --------------------------------------------------------------------------

def _resolve(src: Sources, text: str) -> str:
    """``${paths.pairs}`` -> ``artifacts/prepared/pairs.csv`` (dvc.yaml's templating)."""

    def value(match: re.Match) -> str:
        node: Any = src.yaml("params.yaml")
        for key in match.group(1).split("."):
            node = node[key]
        return str(node)

    return re.sub(r"\$\{([\w.]+)\}", value, text)


def _entries(src: Sources, items: list) -> list[str]:
    """dvc.yaml list entries (a path, or a mapping of one path to its options), resolved."""
    return [_resolve(src, next(iter(i)) if isinstance(i, dict) else i) for i in items or []]


def stages(src: Sources) -> str:
    """Each stage of dvc.yaml: its command, the code it depends on, the params it reads."""
    rows = []
    for name, stage in src.yaml("dvc.yaml")["stages"].items():
        code = [d.removeprefix("pipeline/") for d in _entries(src, stage.get("deps"))
                if d.startswith("pipeline/")]
        params = []
        for p in stage.get("params", []):
            if isinstance(p, dict):
                (file, keys), = p.items()
                params += [f"`{Path(_resolve(src, file)).name}`: " + ", ".join(keys)]
            else:
                params.append(p)
        rows.append([f"`{name}`", f"`{stage['cmd']}`", ", ".join(code), ", ".join(params)])
    return table(["stage", "runs", "code deps (`pipeline/`)", "params"], rows) + \
        "\n\nSource: `dvc.yaml` (a change to any of these reruns the stage and what follows it)."


def stage_io(src: Sources) -> str:
    """Each stage's data deps and outputs, with the paths of params.yaml."""
    rows = []
    for name, stage in src.yaml("dvc.yaml")["stages"].items():
        data = [d for d in _entries(src, stage.get("deps")) if not d.startswith("pipeline/")]
        rows.append([f"`{name}`", "<br>".join(f"`{d}`" for d in data),
                     "<br>".join(f"`{o}`" for o in _entries(src, stage.get("outs")))])
    return table(["stage", "reads", "writes"], rows) + "\n\nSource: `dvc.yaml`, `params.yaml`."


def modules(src: Sources) -> str:
    """Every module of the package with the first sentence of its docstring."""
    rows = []
    for path in sorted((src.root / "pipeline").glob("*.py")):
        if path.name == "__init__.py":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        first = " ".join(doc.split("\n\n")[0].split())
        sentence = re.split(r"(?<=\.)\s", first, maxsplit=1)[0] if first else DASH
        rows.append([f"`{path.name}`", sentence.replace("|", "\\|")])
    return table(["module", "what it is for"], rows) + \
        "\n\nSource: the first sentence of each module's docstring."


# ---- results of the pipeline ---------------------------------------------------------------

def latest_per_machine(runs: list[dict]) -> list[dict]:
    """The last entry of each machine (label), in the order the machines first appear: the
    results files keep every measurement, the tables show the newest."""
    return list({machine_label(r["machine"]): r for r in runs}.values())


def run_notes(runs: list[dict]) -> str:
    """Each run's machine, where its figure comes from and the machine's note."""
    return ". ".join(f"{machine_label(r['machine'])}: {r.get('source', 'source not recorded')}"
                     + (f"; {r['machine']['note']}" if r["machine"].get("note") else "")
                     for r in runs)


def test_times(src: Sources) -> str:
    """What ``make test`` and ``make test-fast`` cost on each machine kind measured."""
    d = src.json("bench/results/test_times.json")
    if d is None:
        return "*No `bench/results/test_times.json` yet.*"
    target, runs = d["targets_seconds"], latest_per_machine(d["runs"])

    def cell(part: dict, limit: float) -> str:
        over = "" if part["seconds"] <= limit else f" (over {limit:,.0f} s)"
        others = ", ".join(secs(x) for x in part.get("other_runs_seconds", []))
        return (f"{secs(part['seconds'])}{over}, {part['passed']} passed"
                + (f" (other runs: {others})" if others else ""))

    rows = [[machine_label(r["machine"]), cell(r["test"], target["test"]),
             cell(r["test_fast"], target["test_fast"]), f"`{r['commit']}`"] for r in runs]
    return (table(["machine", "`make test`", "`make test-fast`", "commit"], rows, "lrrl")
            + "\n\npytest's own seconds, fresh clone, nothing else running. " + run_notes(runs)
            + ". Source: `bench/results/test_times.json`.")


def repro_times(src: Sources) -> str:
    """What ``make repro`` costs on each machine kind measured."""
    runs = latest_per_machine(src.json("bench/results/repro_times.json")["runs"])
    rows = [[machine_label(r["machine"]), r.get("precision", DASH), secs(r["seconds"]),
             secs(r.get("stages", {}).get("hpo")), secs(r.get("stages", {}).get("retrain"))]
            for r in runs]
    commands = sorted({f"`{r['command']}`" for r in runs})
    return (table(["machine", "precision", "`make repro`", "hpo stage", "retrain stage"], rows,
                  "llrrr")
            + f"\n\nEach on a fresh clone: {', '.join(commands)} (install, sample data, "
              "`dvc repro`). " + run_notes(runs)
            + ". Source: `bench/results/repro_times.json`.")


def repro_metrics(src: Sources) -> str:
    """What ``make repro`` gives on each machine kind: the same code, another precision or
    kernel, other numbers; with the committed run's 95% intervals where recorded."""
    runs = [r for r in latest_per_machine(src.json("bench/results/repro_times.json")["runs"])
            if r.get("metrics")]
    committed = next((r for r in runs if r.get("committed")), None)
    intervals = (committed or {}).get("intervals", {})
    keys = [("pr_auc", "test PR-AUC"), ("pos_f1", "test pos_f1 at 0.5"),
            ("best_value", "hpo best value"), ("tuned_threshold", "tuned threshold")]

    def cell(r: dict, key: str) -> str:
        value = r["metrics"].get(key)
        text = num(value)
        low_high = intervals.get(key)
        if r is committed:
            return f"**{text}**" + (f" [{num(low_high[0])}, {num(low_high[1])}]"
                                    if low_high else "")
        if low_high and value is not None and not low_high[0] <= value <= low_high[1]:
            text += " (outside)"
        return text

    rows = [[machine_label(r["machine"]), r.get("precision", DASH),
             *[cell(r, k) for k, _ in keys], r.get("metrics_source", DASH)] for r in runs]
    return (table(["machine", "precision", *[label for _, label in keys], "from"], rows,
                  "llrrrrl")
            + "\n\nBold: the committed `metrics/` (95% bootstrap intervals over test posts from "
              "`make report`); \"outside\": a value outside that interval. "
              "Source: `bench/results/repro_times.json`.")


def _metrics_machine(src: Sources, rel: str = "metrics/eval.json") -> str:
    ev = src.json(rel)
    machine = ev.get("machine") or f"not recorded in `{rel}`"
    if isinstance(machine, dict):
        machine = machine_label(machine)
    precision = ev.get("precision") or "not recorded"
    return f"Machine: **{machine}**, precision: {precision}"


def metrics(src: Sources) -> str:
    """The committed test metrics against the baseline, and the study that chose the model."""
    ev, hpo = src.json("metrics/eval.json"), src.json("metrics/hpo.json")

    def row(name: str, ours: str, base: str, margin: str | None = None) -> list[str]:
        diff = ev.get(margin) if margin else (
            ev[ours] - ev[base] if ev.get(ours) is not None and ev.get(base) is not None
            else None)
        return [name, num(ev.get(ours)), num(ev.get(base)), num(diff, sign=True)]

    shipped = ("the tuned one" if ev.get("shipped_is_tuned") else
               f"not the tuned {num(ev.get('tuned_threshold'))}: `export_best.threshold`")
    rows = [row("PR-AUC", "pr_auc", "baseline_pr_auc", "pr_auc_minus_baseline"),
            row("pos_f1 at the shipped threshold", "shipped_pos_f1", "baseline_pos_f1",
                "pos_f1_minus_baseline"),
            row("ROC-AUC", "roc_auc", "baseline_roc_auc"),
            row("macro_f1 at the shipped threshold", "shipped_macro_f1", "baseline_macro_f1")]
    return (table(["test split", "transformer", "TF-IDF + LR baseline", "margin"], rows, "lrrr")
            + f"\n\n{ev['test_pairs']:,} test pairs, {ev['test_positives']} positives; shipped "
              f"threshold {num(ev.get('shipped_threshold'))} ({shipped}); the baseline's "
              f"pos_f1 is at its own tuned threshold {num(ev.get('baseline_threshold'))}. "
              f"Study: best fold-mean objective {num(hpo.get('best_value'))} (trial "
              f"{hpo.get('best_trial')}), {hpo.get('n_complete')} complete / "
              f"{hpo.get('n_pruned')} pruned / {hpo.get('n_failed')} failed trials. "
              f"{_metrics_machine(src)}. Source: `metrics/eval.json`, `metrics/hpo.json`.")


def per_criterion(src: Sources) -> str:
    """pos_f1 per DSM-5 criterion at 0.5 and at the tuned threshold."""
    ev = src.json("metrics/eval.json")
    ids = sorted(k.removeprefix("pos_f1_") for k in ev if re.fullmatch(r"pos_f1_A\d+", k))
    rows = [[f"A.{c[1:]}", num(ev[f"pos_f1_{c}"]), num(ev.get(f"tuned_pos_f1_{c}"))]
            for c in ids]
    return (table(["criterion", "pos_f1 at 0.5", "at the tuned threshold"], rows, "lrr")
            + f"\n\n{_metrics_machine(src)}. Source: `metrics/eval.json`.")


def study(src: Sources) -> str:
    """The committed study's counts (metrics/hpo.json) and the data (metrics/data.json)."""
    hpo, data = src.json("metrics/hpo.json"), src.json("metrics/data.json")
    rows = [["trials: complete / pruned / failed",
             f"{hpo['n_complete']} / {hpo['n_pruned']} / {hpo['n_failed']}"],
            ["best trial, objective (fold mean ± std)",
             f"{hpo['best_trial']}: {num(hpo['best_fold_mean'])} ± "
             f"{num(hpo['best_fold_std'])}"],
            ["fold fits run / possible", f"{hpo['fold_fits_run']} / {hpo['fold_fits_possible']}"],
            ["epochs run / possible", f"{hpo['epochs_run']} / {hpo['epochs_possible']}"]]
    rows += [[f"data: {k.replace('_', ' ')}", f"{v:,}"] for k, v in data.items()]
    return (table(["", "value"], rows, "lr")
            + f"\n\n{_metrics_machine(src, 'metrics/hpo.json')}. Source: `metrics/hpo.json`, "
              "`metrics/data.json`.")


def seed7(src: Sources) -> str:
    """The default pipeline end to end on a second corpus (figures kept in a results file)."""
    d = src.json("bench/results/seed7_repro.json")
    names = {"pr_auc": "PR-AUC", "roc_auc": "ROC-AUC", "pos_f1": "pos_f1 at 0.5",
             "shipped_pos_f1": f"pos_f1 at the shipped {d['shipped_threshold']} (tuned)"
             if d.get("shipped_is_tuned") else "pos_f1 at the shipped threshold",
             "baseline_pr_auc": "baseline PR-AUC",
             "baseline_pos_f1": f"baseline pos_f1 (at its tuned {d['baseline_threshold']})",
             "pr_auc_minus_baseline": "**PR-AUC margin**",
             "pos_f1_minus_baseline": "**pos_f1 margin** (shipped threshold)"}
    rows = []
    for key, m in d["metrics"].items():
        sign = key.endswith("_minus_baseline")
        digits = 4 if key == "pr_auc" else 3
        low, high = m["ci95"]
        rows.append([names.get(key, key), num(m["value"], digits, sign),
                     f"[{num(low, 3, sign)}, {num(high, 3, sign)}]"])
    return (table(["metric", "value", "95% bootstrap interval"], rows, "lrl")
            + f"\n\n{d['test_pairs']:,} test pairs, {d['test_positives']} positives "
              f"({d['test_posts']} test posts resampled {d['bootstrap_resamples']:,} times). "
              f"Commit {d['commit']}, precision {d['precision']}; `dvc repro` "
              f"{secs(d['seconds'])} (hpo {secs(d['stages']['hpo'])}, retrain "
              f"{secs(d['stages']['retrain'])}). {d['source'][:1].upper()}{d['source'][1:]}. "
              + measured(d, "bench/results/seed7_repro.json"))


RECIPE_FILES = ("recipe_curves", "recipe_curves_cpu", "recipe_curves_cpu_10neg_lr5e-5")
NEGATIVES = {"random": "random", "hard": "hard (baseline-scored)",
             "same": "other-criterion pairings of evidence sentences, then random",
             "mixed": "mixed (half hard, half random)"}


def _recipe(r: dict, params: dict) -> tuple[tuple, str]:
    """A recipe's sort key and its description (bold when it is the CPU profile's)."""
    per = int(r["per_positive"])
    lr = float(r["lr"])
    kind = NEGATIVES.get(r["negatives"], r["negatives"])
    what = ("every negative" if per == 0 else f"{per} {kind}") + \
        f", {r['epochs']} epochs, lr {lr:.0e}".replace("e-0", "e-")
    what += f", first {r['layers']} layers" if r["layers"] else ""
    what += ", bf16 autocast" if r["precision_used"] == "bf16" else ""
    space = params["hpo"]["search_space"]
    if (per == params["train"]["negatives_per_positive"] and not r["layers"]
            and int(r["epochs"]) == space["num_train_epochs"]
            and space["learning_rate"]["low"] <= lr <= space["learning_rate"]["high"]
            and r["precision_used"] == "fp32"):
        what = f"**{what}** (the CPU profile's recipe)"
    key = (per or 10**6, r["negatives"], int(r["epochs"]), lr, r["layers"], r["precision_used"])
    return key, what


def recipe_curves(src: Sources) -> str:
    """Last-epoch fold-0 validation metrics of each training recipe (mean ± sd over seeds)."""
    params = src.yaml("params.yaml")
    rows, captions = [], []
    for stem in RECIPE_FILES:
        groups: dict[str, dict[str, list[dict]]] = {}
        for r in src.csv(f"bench/results/{stem}.csv"):
            if r["epoch"] == r["epochs"]:
                groups.setdefault(r["recipe"], {}).setdefault(r["corpus"], []).append(r)
        described = sorted((_recipe(next(iter(c.values()))[0], params), c)
                           for c in groups.values())
        for (_, what), corpora in described:
            first = next(iter(corpora.values()))[0]
            cost = float(first["train_samples"]) / (16 * float(first["train_positives"]))
            row = [what, f"{cost:.1f}×", f"{first['device']}, `{stem}.csv`"]
            for corpus in ("sample", "seed7"):
                pr = [float(r["val_pr_auc"]) for r in corpora.get(corpus, [])]
                f1 = [float(r["val_pos_f1"]) for r in corpora.get(corpus, [])]
                sd = f" ± {statistics.stdev(pr):.3f}" if len(pr) > 1 else " (1 seed)"
                row += [f"{statistics.mean(pr):.3f}{sd}", f"{statistics.mean(f1):.3f}"] \
                    if pr else ["", ""]
            rows.append(row)
        captions.append(f"`{stem}.csv`: " + measured(src.json(f"bench/results/{stem}.json"),
                                                     f"bench/results/{stem}.json"))
    base = src.json("bench/results/recipe_curves.json").get("baseline_fold0_pr_auc")
    if base:
        rows.append(["TF-IDF + LR baseline, same fold", "", "", num(base["sample"]), "",
                     num(base["seed7"]), ""])
        captions.append(f"Baseline: {base['note']}.")
    header = ["recipe (fold 0, last epoch)", "cost", "device, file", "sample PR-AUC",
              "sample pos_f1", "seed 7 PR-AUC", "seed 7 pos_f1"]
    return (table(header, rows, "lrlrrrr")
            + "\n\nCost: training samples over those of 3 random negatives per positive for 4 "
              "epochs on the same corpus. PR-AUC: mean ± standard deviation over seeds.\n\n"
            + "\n\n".join(captions))


# ---- benchmarks ----------------------------------------------------------------------------

def results_files(src: Sources) -> str:
    """Every results JSON: the machine that measured it and the command that wrote it."""
    rows = []
    for rel in src.results():
        d = src.json(rel)
        runs = d.get("runs") if isinstance(d.get("runs"), list) else None
        if "machine" not in d and runs:
            label = "; ".join(machine_label(r.get("machine")) for r in runs)
            command = "; ".join(sorted({f"`{r.get('command')}`" for r in runs}))
        else:
            label = machine_label(d.get("machine") if isinstance(d.get("machine"), dict)
                                  else None)
            command = f"`{d['command']}`" if d.get("command") else "not recorded"
        rows.append([f"`{Path(rel).name}`", label, command])
    return table(["file", "machine", "command"], rows)


def throughput(src: Sources) -> str:
    """Engine vs Trainer vs padded loop: samples/s, padding, memory, metrics."""
    d = src.json("bench/results/train_throughput.json")
    names = {"engine": "our engine", "trainer": "`Trainer`, length-grouped, fused AdamW",
             "padded": "plain loop, padded to `max_length`"}
    rows = []
    for key in [k for k in names if k in d["variants"]]:
        v = d["variants"][key]
        per_seed = ", ".join(f"{r['samples_per_second']:.1f}" for r in d["runs"][key])
        pr_seed = ", ".join(f"{r['metrics']['pr_auc']:.3f}" for r in d["runs"][key])
        rows.append([names.get(key, key), f"{v['samples_per_second']:.1f} ({per_seed})",
                     pct(v["padding_fraction"]), f"{v['peak_rss_mb']:,.0f} MB",
                     f"{v['roc_auc']:.3f}", f"{v['pr_auc']:.3f} ({pr_seed})",
                     ", ".join(v["precision"])])
    s = d["setup"]
    return (table(["", "samples/s (per seed)", "padding", "peak RSS", "roc_auc",
                   "pr_auc (per seed)", "precision"], rows, "lrrrrrl")
            + f"\n\nEngine / Trainer **{d['ratio_vs_trainer']:.2f}×**, engine / padded "
              f"**{d['ratio_vs_padded']:.2f}×**. {s['model']}, batch {s['batch_size']} × "
              f"{s['epochs']} epochs, seeds {s['seeds']}. "
            + measured(d, "bench/results/train_throughput.json"))


def throughput_profile(src: Sources) -> str:
    """Where one engine epoch's time goes, phase by phase."""
    p = src.json("bench/results/train_throughput.json")["profile"]
    names = {"forward_loss": "forward + loss", "backward": "backward",
             "clip_grad_norm": "gradient clipping", "optimizer_step": "optimizer step",
             "collate": "collate (per-batch padding)",
             "zero_grad_scheduler": "zero_grad + scheduler", "rest_of_loop": "rest of the loop"}
    ms = p["phase_ms_per_step"]
    rows = [[names.get(k, k), f"{ms[k]:.1f}", pct(p["phase_fraction"][k])]
            for k in sorted(ms, key=lambda k: (list(names).index(k) if k in names else 99, k))]
    return (table(["phase", "ms per step", "share"], rows, "lrr")
            + f"\n\nOne epoch: {p['steps']} steps of batch {p['batch_size']}, "
              f"{p['precision']}, {p['epoch_seconds']:.1f} s (the engine's own timer: "
              f"{p['engine_epoch_seconds']:.1f} s). "
            + measured(p, "bench/results/train_throughput.json, profile"))


def curves_table(src: Sources) -> str:
    """The learning-curve table the pruning replay runs on."""
    t = src.json("bench/results/pruning_replay.json")["table"]
    rows = [["trials × folds × epochs", f"{t['trials']} × {t['folds']} × {t['epochs']}"],
            [f"{t['metric']} of the best / median trial (full protocol)",
             f"{num(t['best_value'])} / {num(t['median_value'])}"],
            ["training epoch (median)", f"{t['train_epoch_seconds_median']:.2f} s"],
            ["validation of every pair (median)", f"{t['eval_seconds_median']:.2f} s"],
            ["recorded seconds", secs(t["recorded_seconds"])],
            ["precision", ", ".join(t["precision"])]]
    return (table(["`curves.csv`", ""], rows, "lr") + "\n\n"
            + measured(src.json("bench/results/curves.json"), "bench/results/curves.json"))


REPLAYS = ("pruning_replay", "pruning_replay_patience2", "pruning_replay_startup5_patience2",
           "pruning_replay_warmup2")


def _saved(policy: dict | None) -> str:
    if not policy:
        return DASH
    return (f"{pct(policy['compute_saved_fraction'])}, {policy['regret_median']:.4f} / "
            f"{policy['regret_p90']:.4f}")


def pruning_replay(src: Sources) -> str:
    """Compute saved and regret of every replayed policy, per study size."""
    d = src.json("bench/results/pruning_replay.json")
    sizes = [str(s) for s in d["setup"]["study_sizes"]]
    full = sizes[0]

    def policy(size: str, name: str) -> dict | None:
        return (d["policies"] if size == full else d["by_study_size"][size]["policies"]).get(name)

    order = sorted(d["policies"], key=lambda n: (not d["policies"][n]["available_in_params"],
                                                 -d["policies"][n]["compute_saved_fraction"]))
    rows = []
    for name in order:
        label = f"`{name}`" if d["policies"][name]["available_in_params"] else \
            f"`{name}` (not offered)"
        if name == d["chosen_available"]:
            label = f"**{label}**"
        rows.append([label, *(_saved(policy(s, name)) for s in sizes)])
    s = d["setup"]
    return (table(["policy (`+es`: early stopping)",
                   *(f"{s} trials: saved, regret median / p90" for s in sizes)], rows,
                  "l" + "r" * len(sizes))
            + f"\n\nFold noise {d['fold_noise']:.4f}. Chosen among what `params.yaml` can "
              f"express (bold): `{d['chosen_available']}`; among all: `{d['chosen']}`. "
              f"{s['orders']} random orders, {s['pruner_startup_trials']} startup trials, "
              f"patience {s['early_stopping_patience']}, warmup {s['pruner_warmup_steps']}. "
            + measured(d, "bench/results/pruning_replay.json"))


def pruning_variants(src: Sources) -> str:
    """The same replay with other startup, patience and warmup settings."""
    rows = []
    for stem in REPLAYS:
        d = src.json(f"bench/results/{stem}.json")
        s = d["setup"]
        sizes = [str(x) for x in s["study_sizes"]]
        pick = "epoch_percentile25+es"
        cells = [_saved(d["policies"].get(pick) if size == sizes[0]
                        else d["by_study_size"][size]["policies"].get(pick)) for size in sizes]
        rows.append([f"`{stem}.json`", s["pruner_startup_trials"], s["early_stopping_patience"],
                     s["pruner_warmup_steps"], f"`{d['chosen_available']}`", *cells])
    sizes = src.json("bench/results/pruning_replay.json")["setup"]["study_sizes"]
    return (table(["file", "startup", "patience", "warmup", "chosen (offered)",
                   *(f"`epoch_percentile25+es`, {n} trials" for n in sizes)], rows,
                  "lrrrl" + "r" * len(sizes))
            + "\n\nCells: compute saved, regret median / p90. Machines and commands: the "
              "results-files table above.")


def hpo_efficiency(src: Sources) -> str:
    """The pruning policy end to end: four arms of real hpo stages."""
    d = src.json("bench/results/hpo_efficiency.json")
    s = d["setup"]
    replay = src.json("bench/results/pruning_replay.json")["by_study_size"].get(str(s["trials"]))
    pruner = d["pruner"]
    if pruner == "percentile":
        pruner += f"{src.yaml('params.yaml')['hpo']['pruner']['percentile']:g}"
    predicted = {"none": "none", "early_stopping": "none+es",
                 "pruning": f"{s['report']}_{pruner}", "both": f"{s['report']}_{pruner}+es"}
    rows = []
    order = ("none", "early_stopping", "pruning", "both")
    for arm in sorted(d["arms"], key=lambda a: (order.index(a) if a in order else 9, a)):
        v = d["arms"][arm]
        pred = replay["policies"].get(predicted.get(arm, "")) if replay else None
        by_seed = " / ".join(f"{x:+.4f}" for x in v["best_value_delta_by_seed"].values())
        rows.append([arm.replace("_", " "), secs(v["wall_seconds"]),
                     DASH if arm == "none" else pct(v["wall_saved_fraction"], 0),
                     DASH if arm == "none" or not pred else pct(pred["compute_saved_fraction"]),
                     v["fold_fits_run"], v["epochs_run"], v["n_pruned"],
                     f"{v['best_value_mean']:.4f}" + ("" if arm == "none" else f" ({by_seed})")])
    return (table(["arm", f"hpo wall-clock ({len(s['seeds'])} seeds)", "saved",
                   "replay predicted", "fold fits", "epochs", "pruned",
                   "best value (Δ vs none per seed)"], rows, "lrrrrrrr")
            + f"\n\n{s['trials']} trials per study, {s['layers']}-layer model, reports per "
              f"{s['report']}, patience {s['early_stopping_patience']}, {d['pruner']} pruner; "
              f"fold noise {d['fold_noise']:.4f}. "
            + measured(d, "bench/results/hpo_efficiency.json"))


def study_speed(src: Sources) -> str:
    """Waves against the schedule: the real hpo stage at n_jobs 1 and 2, side by side."""
    d = src.json("bench/results/study_speed.json")
    if d is None:
        return "*No `bench/results/study_speed.json` yet.*"
    rows = [[f"`{arm}`", secs(v["wall_seconds"]), f"{v['speedup_vs_waves_n1']:.2f}×",
             pct(v["idle_fraction"]), num(v["best_value"]),
             f"{v['n_complete']} / {v['n_pruned']}", f"{v['epochs_run']} / {v['epochs_possible']}",
             "yes" if v["same_trials_as_n_jobs_1"] else "**no**"]
            for arm, v in d["schedules"].items()]
    s = d["setup"]
    return (table(["arm", "hpo stage", "vs waves_n1", "idle", "best value", "complete / pruned",
                   "epochs run", "same trials as n_jobs 1"], rows, "lrrrrrrl")
            + f"\n\n{s['trials']} trials: {s['study']}; waves from commit `{s['waves_rev']}`. "
            + measured(d, "bench/results/study_speed.json"))


def parallelism_cost(src: Sources) -> str:
    """Best value after N trials at each hpo.parallelism (surrogate of the recorded curves)."""
    d = src.json("bench/results/parallelism_cost.json")
    if d is None:
        return "*No `bench/results/parallelism_cost.json` yet.*"
    s = d["setup"]
    checkpoints = [str(n) for n in s["checkpoints"]]
    def cell(v: dict, n: str) -> str:
        regret = num(v["regret_vs_sequential_mean"][n], 4, sign=True)
        return f"{num(v['value_median'][n], 4)} ({regret})"

    rows = [[lag] + [cell(v, n) for n in checkpoints] for lag, v in d["parallelism"].items()]
    return (table(["parallelism"] + [f"after {n} trials" for n in checkpoints], rows,
                  "r" * (len(checkpoints) + 1))
            + f"\n\nMedian surrogate value of the trial each study picked over {s['seeds']} "
              f"seeds (mean regret against parallelism {s['baseline_parallelism']}, paired by "
              f"seed, in brackets; fold noise {num(s['fold_noise'], 4)}). "
            + measured(d, "bench/results/parallelism_cost.json"))


def trial_isolation(src: Sources) -> str:
    """What a child process per trial costs."""
    d = src.json("bench/results/trial_isolation.json")
    n = d["setup"]["trials"]
    inner, child = d["durations"]["in_process"], d["durations"]["child_process"]
    first = [i for i in range(len(inner)) if i % n == 0]
    rest = [i for i in range(len(inner)) if i % n]

    def row(name: str, idx: list[int]) -> list[str]:
        a = statistics.mean(inner[i] for i in idx)
        b = statistics.mean(child[i] for i in idx)
        return [name, f"{a:.2f} s", f"{b:.2f} s", f"{b - a:+.2f} s"]

    rows = [row("first trial of a study", first), row("every later trial", rest),
            row("all trials", list(range(len(inner))))]
    s = d["setup"]
    return (table(["mean trial duration", "in process", "child process", "cost"], rows, "lrrr")
            + f"\n\n{s['trials']} trials × {s['repeats']} repeats, {s['model']}, {s['folds']} "
              f"folds × {s['epochs']} epoch, pruning off. "
            + measured(d, "bench/results/trial_isolation.json"))


def gpu_check(src: Sources) -> str:
    """The engine in bf16 on a DeBERTa-v3-base-shaped model, one GPU."""
    d = src.json("bench/results/gpu_check.json")
    names = {"eager_batch32": "batch 32", "compile_batch32":
             "batch 32, `torch.compile` (compilation included)", "eager_batch128": "batch 128"}
    rows = [[names.get(k, k), f"{v['train_samples_per_second']:,.0f}",
             f"{v['infer_pairs_per_second']:,.0f}", pct(v["padding_fraction"]),
             f"{v['peak_memory_gb']:.1f} GB", pct(v["mfu"])] for k, v in d["runs"].items()]
    s = d["setup"]
    return (table(["bf16", "train samples/s", "inference pairs/s", "padding",
                   "peak GPU memory", "MFU"], rows, "lrrrrr")
            + f"\n\n{s['model']}; {s['pairs']:,} training pairs of the sample, {s['epochs']} "
              f"epochs. " + measured(d, "bench/results/gpu_check.json"))


def gpu_jobs(src: Sources) -> str:
    """Aggregate training samples/s of N trial processes on one GPU."""
    d = src.json("bench/results/gpu_jobs.json")
    batches = list(next(iter(d["runs"].values()))["batches"])
    rows = []
    for key, v in d["runs"].items():
        if "batches" not in v:
            rows.append([key, *([v.get("error", DASH)] + [""] * len(batches))])
            continue
        jobs = key.removeprefix("mps_").removeprefix("jobs")
        rows.append([jobs + (", CUDA MPS" if key.startswith("mps_") else ""),
                     *(f"{v['batches'][b]['samples_per_second']:,.0f}" for b in batches),
                     pct(v["batches"].get("16", {}).get("mfu"))])
    return (table(["processes on one GPU", *(f"batch {b}" for b in batches), "MFU at batch 16"],
                  rows, "l" + "r" * (len(batches) + 1))
            + f"\n\n{d['setup']['measure']}. " + measured(d, "bench/results/gpu_jobs.json"))


def cpu_bf16(src: Sources) -> str:
    """bf16 against fp32 for a MiniLM-L6 training step on a CPU with bf16 units."""
    d = src.json("bench/results/gpu_jobs.json")
    c = d["cpu_bf16_on_gpu_host"]
    rows = [[k.removeprefix("threads"), f"{v['fp32']:.3f} s", f"{v['bf16']:.3f} s",
             f"{v['bf16_speedup']:.2f}×"] for k, v in c.items() if k.startswith("threads")]
    m = d.get("machine", {})
    host = {**m, "label": f"{m.get('cpu', 'CPU')} ({m.get('cores', '?')} cores), the host of "
                         f"the {machine_label(m)}"}
    return (table(["threads", "fp32 step", "bf16 step", "bf16 speed-up"], rows, "rrrr")
            + f"\n\n{c['note']}. "
            + measured({"machine": host, "command": c.get("command"),
                        "command_note": c.get("command_note")},
                       "bench/results/gpu_jobs.json, cpu_bf16_on_gpu_host"))


def _fields(d: dict, rel: str) -> str:
    """Any results file as a table of its figures (keys two levels deep), with its machine."""
    rows = []
    for key, value in d.items():
        if key in ("machine", "command", "command_note"):
            continue
        inner = value.items() if isinstance(value, dict) else [("", value)]
        for sub, v in inner:
            if isinstance(v, (dict, list)):
                continue
            name = f"{key}.{sub}" if sub else key
            rows.append([f"`{name}`", num(v) if isinstance(v, float) else v])
    return table(["", "value"], rows, "lr") + "\n\n" + measured(d, rel)


def gpu_projection(src: Sources) -> str:
    """Projected hours of the full profile on one H200 per schedule."""
    d = src.json("bench/results/gpu_projection.json")
    if d is None:
        return "*No `bench/results/gpu_projection.json` yet.*"
    i = d["inputs"]
    rows = [[f"`{name}`", num(hours, 2), pct(d["idle_fraction"][name]),
             num(d["longest_trial_hours"][name], 2), num(d["pruned_trials"][name], 0),
             pct(d["epochs_run_fraction"][name])]
            for name, hours in d["projected_hours"].items()]
    c = i["corpus"]
    return (table(["schedule", "projected hours", "idle slots", "longest trial (h)",
                   "pruned trials", "epochs run"], rows, "lrrrrr")
            + f"\n\n{i['trials']} trials × {i['folds']} folds, {i['processes']} processes "
              f"(batch {', '.join(map(str, i['batches']))}; epochs {i['epochs'][0]}–"
              f"{i['epochs'][1]}), {num(c['train_samples_per_epoch'], 0)} training samples and "
              f"{num(c['validation_pairs_per_fold'], 0)} validation pairs per fold and epoch "
              f"({c['posts']} posts); throughput from `{i['gpu_table']}` ({i['gpu']}, "
              f"{i['gpu_torch']}); medians over {i['draws']} draws. "
            + measured(d, "bench/results/gpu_projection.json"))


def parallelism_cost_short(src: Sources) -> str:
    """One line: what the largest parallelism measured costs after the most trials."""
    d = src.json("bench/results/parallelism_cost.json")
    if d is None:
        return "*No `bench/results/parallelism_cost.json` yet.*"
    s = d["setup"]
    lag = max(d["parallelism"], key=int)
    n = str(s["checkpoints"][-1])
    regret = d["parallelism"][lag]["regret_vs_sequential_mean"][n]
    return (f"What it costs in sample efficiency: at `parallelism: {lag}` the trial a study picks "
            f"after {n} trials has a mean regret of {num(regret, 4, sign=True)} against one trial "
            f"at a time's (negative: better; {num(abs(regret) / s['fold_noise'], 2)} × the fold "
            "noise; "
            f"{s['seeds']} seeds on a surrogate of the recorded learning curves: "
            "[docs/parallel.md](docs/parallel.md#what-it-costs)).")


def gpu_projection_hours(src: Sources) -> str:
    """The full profile's projected hours on one H200, per schedule (short form)."""
    d = src.json("bench/results/gpu_projection.json")
    if d is None:
        return "*No `bench/results/gpu_projection.json` yet.*"
    names = {"one_at_a_time": "one trial at a time", "schedule": "8 processes, MPS",
             "schedule_no_mps": "8 processes, no MPS",
             "schedule_batch_16_32": "8 processes, MPS, batch 16/32 only"}
    rows = [[label, f"{num(d['projected_hours'][key], 1)} h"] for key, label in names.items()]
    return (table(["full profile, 50 trials × 5 folds", "projected"], rows, "lr")
            + "\n\nDetails and the waves it replaces: "
              "[docs/parallel.md](docs/parallel.md#the-full-profile-on-one-gpu). "
            + measured(d, "bench/results/gpu_projection.json"))


TABLES: dict[str, Callable[[Sources], str]] = {
    f.__name__: f for f in (
        stages, stage_io, modules, repro_times, repro_metrics, test_times, metrics,
        per_criterion, study, seed7,
        recipe_curves, results_files, throughput, throughput_profile, curves_table,
        pruning_replay, pruning_variants, hpo_efficiency, study_speed, parallelism_cost,
        trial_isolation,
        gpu_check, gpu_jobs, cpu_bf16, gpu_projection, gpu_projection_hours,
        parallelism_cost_short)
}


def render(text: str, src: Sources) -> str:
    """The page with every generated block rewritten."""

    def block(match: re.Match) -> str:
        name = match.group(2)
        if name not in TABLES:
            raise SystemExit(f"ERROR: unknown generated table {name!r}; known: "
                             + ", ".join(TABLES))
        return f"{match.group(1)}\n{TABLES[name](src)}\n\n{match.group(3)}"

    return BLOCK.sub(block, text)


def stale(root: Path = ROOT) -> list[str]:
    """The pages (relative to ``root``) whose generated tables differ from the results files."""
    src = Sources(root)
    return [p.relative_to(root).as_posix() for p in src.pages()
            if render(p.read_text(), src) != p.read_text()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 naming each page that is out of date")
    parser.add_argument("--root", type=Path, default=ROOT,
                        help="the checkout (default: the one this script is in)")
    args = parser.parse_args()
    if args.check:
        pages = stale(args.root)
        if pages:
            sys.exit("stale generated tables in " + ", ".join(pages) + ": run `make docs`")
        return
    src = Sources(args.root)
    for page in src.pages():
        text = page.read_text()
        new = render(text, src)
        if new != text:
            page.write_text(new)
            print(f"updated {page.relative_to(args.root)}")


if __name__ == "__main__":
    main()
