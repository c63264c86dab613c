"""HPO efficiency: the chosen pruning policy end to end on the real prepare + hpo stages.

Four arms share the data, the folds, the sampler and its seed, and differ only in
``hpo.pruner.name`` and ``train.early_stopping_patience``:

* ``none``: no pruning, no early stopping (only the last epoch of a fold is validated);
* ``early_stopping``: no pruning, early stopping with patience 1 (every epoch validated);
* ``pruning``: ``hpo.pruner`` of params.yaml (the default chosen by bench/pruning_replay.py),
  no early stopping;
* ``both``: that pruner and early stopping.

Each arm runs the real stages in a temporary workspace (own study file and MLflow store) in a
fresh process, with the model of ``bench/curves.py`` (``model.name`` cut to ``--layers``
layers), and reports the wall-clock seconds of the hpo stage next to fold fits and epochs run
and the best value. Writes ``bench/results/hpo_efficiency.json``.

Usage: ``python bench/hpo_efficiency.py [--seeds 1] [--trials 30] [--layers 1]``. One seed of 30
trials costs about 4 x 30 trials x 1-1.5 min on a 2-core CPU: run it where that budget exists.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ARMS = {"none": (False, 0), "early_stopping": (False, 1), "pruning": (True, 0),
        "both": (True, 1)}


def study_params(seed: int, arm: str, trials: int, layers: int, workdir: Path) -> dict:
    from pipeline.params import YamlLoader

    raw = yaml.load((ROOT / "params.yaml").read_text(encoding="utf-8"), Loader=YamlLoader)
    raw["seed"] = seed
    for key in ("posts", "annotations", "criteria", "data_dir"):
        raw["paths"][key] = str(ROOT / raw["paths"][key])
    for key, value in raw["paths"].items():  # every output goes to the temporary workspace
        if not value.startswith(str(ROOT)):
            raw["paths"][key] = str(workdir / value)
    prune, patience = ARMS[arm]
    raw["model"]["num_hidden_layers"] = layers
    raw["train"]["early_stopping_patience"] = patience
    raw["hpo"].update(n_trials=trials, mlflow_experiment="bench-hpo-efficiency")
    if not prune:
        raw["hpo"]["pruner"]["name"] = "none"
    return raw


def _child(seed: int, arm: str, trials: int, layers: int) -> None:
    from pipeline import hpo, prepare
    from pipeline.params import parse_params

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / ".dvc").mkdir()
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
        os.chdir(workdir)
        params = parse_params(study_params(seed, arm, trials, layers, workdir))
        prepare.run(params)
        start = time.perf_counter()
        metrics = hpo.run(params)
        metrics["wall_seconds"] = time.perf_counter() - start
        metrics["pruner"] = params.hpo.pruner.name
    print("RESULT " + json.dumps(metrics))


def main() -> None:
    from pipeline.common import write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--child", nargs=4, metavar=("SEED", "ARM", "TRIALS", "LAYERS"))
    args = parser.parse_args()
    if args.child:
        _child(int(args.child[0]), args.child[1], int(args.child[2]), int(args.child[3]))
        return

    runs = []
    for seed in range(1, args.seeds + 1):
        for arm in ARMS:  # interleaved, so machine drift hits every arm alike
            out = subprocess.run([sys.executable, __file__, "--child", str(seed), arm,
                                  str(args.trials), str(args.layers)],
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                sys.exit(f"seed {seed} {arm} failed:\n{out.stderr[-3000:]}")
            line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
            m = json.loads(line[len("RESULT "):])
            runs.append({"seed": seed, "arm": arm, **m})
            print(f"  seed {seed} {arm:15s}: {m['wall_seconds']:7.0f} s, fold fits "
                  f"{m['fold_fits_run']}/{m['fold_fits_possible']}, epochs {m['epochs_run']}/"
                  f"{m['epochs_possible']}, best {m['best_value']:.4f}", flush=True)

    def total(arm: str, key: str) -> float:
        return sum(r[key] for r in runs if r["arm"] == arm)

    base = [r for r in runs if r["arm"] == "none"]
    arms = {}
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        arms[arm] = {
            "wall_seconds": total(arm, "wall_seconds"),
            "wall_saved_fraction": 1 - total(arm, "wall_seconds") / total("none", "wall_seconds"),
            "fold_fits_run": total(arm, "fold_fits_run"),
            "epochs_run": total(arm, "epochs_run"),
            "best_value_mean": float(np.mean([r["best_value"] for r in mine])),
            "best_value_delta": float(np.mean([m["best_value"] - b["best_value"]
                                               for b, m in zip(base, mine, strict=True)])),
        }
    result = {
        "arms": arms,
        "fold_noise": float(np.mean([r["best_fold_std"] for r in runs])),
        "pruner": next(r["pruner"] for r in runs if r["arm"] == "pruning"),
        "setup": {"seeds": args.seeds, "trials": args.trials, "layers": args.layers,
                  "early_stopping_patience": 1},
        "command": f"python bench/hpo_efficiency.py --seeds {args.seeds} --trials "
                   f"{args.trials} --layers {args.layers}",
        "runs": runs,
    }
    write_json(RESULTS / "hpo_efficiency.json", result)
    print(f"\n{'arm':15s} {'wall s':>8s} {'saved':>6s} {'fold fits':>10s} {'epochs':>7s} "
          f"{'best':>7s}")
    for arm, a in arms.items():
        print(f"{arm:15s} {a['wall_seconds']:8.0f} {a['wall_saved_fraction']:6.0%} "
              f"{a['fold_fits_run']:10.0f} {a['epochs_run']:7.0f} {a['best_value_mean']:7.4f}")


if __name__ == "__main__":
    main()
