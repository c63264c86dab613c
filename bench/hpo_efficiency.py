"""HPO efficiency: the chosen pruning policy end to end on the real prepare + hpo stages.

Four arms share the data, the folds, the sampler and its seed, and differ only in
``hpo.pruner.name`` and ``train.early_stopping_patience``:

* ``none``: no pruning, no early stopping (only the last epoch of a fold is validated);
* ``early_stopping``: no pruning, early stopping with ``--patience`` (every epoch validated);
* ``pruning``: ``hpo.pruner`` of params.yaml (the default chosen by bench/pruning_replay.py),
  reporting per ``--report`` (default: params.yaml's ``hpo.pruner.report``), no early stopping;
* ``both``: that pruner and early stopping.

Each arm runs the real stages in a temporary workspace (own study file and MLflow store) in a
fresh process, with the model of ``bench/curves.py`` (``model.name`` cut to ``--layers``
layers), and reports the wall-clock seconds of the hpo stage next to fold fits, epochs run,
pruned trials and the best value (and its change against the none arm of the same seed).
Writes ``bench/results/hpo_efficiency.json`` (``--out``).

Usage: ``python bench/hpo_efficiency.py [--seeds 1] [--trials 30] [--layers 1] [--report epoch]
[--patience 1] [--out PATH]``. On a 2-core CPU with per-epoch reports a trial took about 62 s
(none), 84 s (early stopping), 37 s (pruning) and 27 s (both) in 10-trial studies, so one seed
of 30 trials is about 1.8 h: run it where that budget exists. The JSON is rewritten after every
seed, so an interrupted run keeps the seeds it finished.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from workspace import raw_params, workspace  # bench/, the script's own folder

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
OUT = RESULTS / "hpo_efficiency.json"
ARMS = {"none": (False, False), "early_stopping": (False, True), "pruning": (True, False),
        "both": (True, True)}  # arm: (pruner of params.yaml, early stopping)


def study_params(seed: int, arm: str, trials: int, layers: int, report: str, patience: int,
                 workdir: Path) -> dict:
    raw = raw_params(workdir)
    raw["seed"] = seed
    prune, stop_early = ARMS[arm]
    raw["model"]["num_hidden_layers"] = layers
    raw["train"]["early_stopping_patience"] = patience if stop_early else 0
    raw["hpo"].update(n_trials=trials, mlflow_experiment="bench-hpo-efficiency")
    raw["hpo"]["pruner"]["report"] = report
    if not prune:
        raw["hpo"]["pruner"]["name"] = "none"
    return raw


def _child(seed: int, arm: str, trials: int, layers: int, report: str, patience: int) -> None:
    from pipeline import hpo, prepare
    from pipeline.params import parse_params

    with workspace() as workdir:
        params = parse_params(study_params(seed, arm, trials, layers, report, patience,
                                           workdir))
        prepare.run(params)
        start = time.perf_counter()
        metrics = hpo.run(params)
        metrics["wall_seconds"] = time.perf_counter() - start
        metrics["pruner"] = params.hpo.pruner.name
        # how the pruner heard the trial (the arms without a pruner report nothing)
        metrics["report"] = params.hpo.pruner.report if ARMS[arm][0] else None
    print("RESULT " + json.dumps(metrics))


def _shown(path: Path) -> str:
    """``path`` relative to the checkout where it lies inside it (no machine paths in results)."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def summary(runs: list[dict], args: argparse.Namespace) -> dict:
    """Totals per arm over the seeds finished so far (each arm paired with the none arm of the
    same seed)."""
    def total(arm: str, key: str) -> float:
        return sum(r[key] for r in runs if r["arm"] == arm)

    base = {r["seed"]: r["best_value"] for r in runs if r["arm"] == "none"}
    arms = {}
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        delta = {r["seed"]: r["best_value"] - base[r["seed"]] for r in mine}
        arms[arm] = {
            "wall_seconds": total(arm, "wall_seconds"),
            "wall_saved_fraction": 1 - total(arm, "wall_seconds") / total("none", "wall_seconds"),
            "fold_fits_run": total(arm, "fold_fits_run"),
            "epochs_run": total(arm, "epochs_run"),
            "n_pruned": total(arm, "n_pruned"),
            "best_value_mean": float(np.mean([r["best_value"] for r in mine])),
            "best_value_delta": float(np.mean(list(delta.values()))),
            "best_value_delta_by_seed": {str(k): v for k, v in delta.items()},
        }
    seeds = sorted({r["seed"] for r in runs})
    return {
        "arms": arms,
        "fold_noise": float(np.mean([r["best_fold_std"] for r in runs])),
        "pruner": next(r["pruner"] for r in runs if r["arm"] == "pruning"),
        "setup": {"seeds": seeds, "trials": args.trials, "layers": args.layers,
                  "early_stopping_patience": args.patience, "report": args.report},
        "command": f"python bench/hpo_efficiency.py --seeds {args.seeds} --trials "
                   f"{args.trials} --layers {args.layers} --report {args.report} "
                   f"--patience {args.patience}"
                   + (f" --out {_shown(args.out)}" if args.out.resolve() != OUT else ""),
        "runs": runs,
    }


def main() -> None:
    from pipeline.common import write_json
    from pipeline.machine import command, describe
    from pipeline.params import load_params

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--report", choices=("fold", "epoch"), default=None,
                        help="how the pruning arms report (default: params.yaml)")
    parser.add_argument("--patience", type=int, default=1,
                        help="early stopping patience of the early-stopping arms")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--child", nargs=6,
                        metavar=("SEED", "ARM", "TRIALS", "LAYERS", "REPORT", "PATIENCE"))
    args = parser.parse_args()
    if args.child:
        seed, arm, trials, layers, report, patience = args.child
        _child(int(seed), arm, int(trials), int(layers), report, int(patience))
        return
    for name in ("seeds", "trials", "layers", "patience"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    args.report = args.report or load_params(ROOT / "params.yaml").hpo.pruner.report

    runs: list[dict] = []
    for seed in range(1, args.seeds + 1):
        for arm in ARMS:  # interleaved, so machine drift hits every arm alike
            out = subprocess.run([sys.executable, __file__, "--child", str(seed), arm,
                                  str(args.trials), str(args.layers), args.report,
                                  str(args.patience)],
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                sys.exit(f"seed {seed} {arm} failed:\n{out.stderr[-3000:]}")
            line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
            m = json.loads(line[len("RESULT "):])
            runs.append({"seed": seed, "arm": arm, **m})
            print(f"  seed {seed} {arm:15s}: {m['wall_seconds']:7.0f} s, fold fits "
                  f"{m['fold_fits_run']}/{m['fold_fits_possible']}, epochs {m['epochs_run']}/"
                  f"{m['epochs_possible']}, pruned {m['n_pruned']}, best {m['best_value']:.4f}",
                  flush=True)
        result = {**summary(runs, args), "machine": describe(), "command": command()}
        write_json(args.out, result)  # every finished seed is kept

    print(f"\n{'arm':15s} {'wall s':>8s} {'saved':>6s} {'fold fits':>10s} {'epochs':>7s} "
          f"{'pruned':>7s} {'best':>7s}")
    for arm, a in result["arms"].items():
        print(f"{arm:15s} {a['wall_seconds']:8.0f} {a['wall_saved_fraction']:6.0%} "
              f"{a['fold_fits_run']:10.0f} {a['epochs_run']:7.0f} {a['n_pruned']:7.0f} "
              f"{a['best_value_mean']:7.4f}")


if __name__ == "__main__":
    main()
