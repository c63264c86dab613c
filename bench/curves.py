"""Learning-curve table: a random-search study with every epoch of every fold validated.

The input of ``bench/pruning_replay.py`` (a tabular benchmark, as HPO research compares pruners):
trials drawn by Optuna's random sampler from ``hpo.search_space`` of params.yaml, each
fine-tuned on every CV fold of the prepared sample (``paths.pairs``: its train split and ``fold``
column, negatives subsampled per fold exactly as the hpo stage does), with no pruning and no
early stopping, and validated after every epoch. The model is ``model.name`` cut to
``--layers`` transformer layers (default 1) so that the whole table costs well under an hour of
a 2-core CPU. The committed table was recorded when the CPU profile trained 3 random negatives
per positive at learning rates up to 1.5e-4: ``--negatives-per-positive`` and
``--max-learning-rate`` default to those, so that ``make bench`` recomputes that table (the
replay's input) after the defaults moved on; ``0`` for either takes params.yaml's value (a new
setup: move the old table away first).

One row per (trial, fold, epoch): the hyperparameters, the fold's seed, ``train_loss``, the
validation metrics ``val_*``, and the wall-clock seconds of that epoch split in two:
``train_seconds`` (from the previous epoch's end, or from the start of the fold for epoch 1, so
it includes loading the model, to the start of validation) and ``eval_seconds`` (scoring every
validation pair and computing the metrics). They add up to the fold's wall time.

Resumable: ``--trials 0-9`` computes those trials and merges them into ``bench/results/curves.csv``
(rows of other trials are kept; a row set recorded with another setup is refused). Trial ``n``
has the same hyperparameters and seeds whichever chunk computes it. ``bench/results/curves.json``
records the machine and command of each chunk.

Usage: ``python bench/curves.py --trials 0-9`` (then 10-19, ...; needs ``dvc repro prepare``)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CURVES = RESULTS / "curves.csv"
CURVES_MACHINE = RESULTS / "curves.json"  # where each chunk of the table was recorded
# The committed table's setup: a 1-layer model, and the CPU profile of its day (3 random negatives
# per positive, learning rates up to 1.5e-4), pinned so that `make bench` recomputes it.
LAYERS, NEGATIVES, MAX_LR = 1, 3, 1.5e-4
# Hyperparameter columns in a fixed order (focal_* are empty for weighted_ce trials).
HP_COLUMNS = ("learning_rate", "per_device_train_batch_size", "num_train_epochs", "warmup_ratio",
              "weight_decay", "loss_function", "focal_gamma", "focal_alpha")


def parse_range(text: str) -> range:
    """``3`` or ``0-9`` (inclusive) -> a range of trial numbers."""
    first, _, last = text.partition("-")
    return range(int(first), int(last or first) + 1)


def draw_trials(space: dict, seed: int, n: int) -> list[dict]:
    """The hyperparameters of trials 0..n-1 from a seeded random sampler (same in every chunk)."""
    import optuna

    from pipeline.study import suggest

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=seed))
    drawn = []
    for _ in range(n):
        trial = study.ask()
        drawn.append(suggest(trial, space).as_dict())
        study.tell(trial, 0.0)
    return drawn


class _EvalClock:
    """Marks when the engine starts validating an epoch (wraps ``pipeline.engine.predict``)."""

    def __init__(self) -> None:
        from pipeline import engine

        self.started: float | None = None
        self._predict = engine.predict

        def timed(*args, **kwargs):
            self.started = time.perf_counter()
            return self._predict(*args, **kwargs)

        engine.predict = timed


def table_setup(layers: int, negatives: int, max_lr: float):
    """params.yaml with the table's overrides (``negatives`` per positive and learning-rate high
    ``max_lr``, 0: keep), the model, training settings and search space it implies, and the
    digest of that setup (rows of another digest are refused)."""
    from pipeline.params import load_params

    params = load_params(ROOT / "params.yaml")
    low = params.hpo.search_space["learning_rate"].low
    if negatives < 0 or max_lr < 0 or (max_lr and max_lr <= low):
        sys.exit(f"ERROR: --negatives-per-positive {negatives} / --max-learning-rate {max_lr}: "
                 "need >= 0, and a learning rate above params.yaml's "
                 f"hpo.search_space.learning_rate.low ({low})")
    model = dataclasses.replace(params.model, num_hidden_layers=layers)
    # no early stopping, and a patience no fold reaches: the engine validates every epoch
    train = dataclasses.replace(params.train, early_stopping_patience=10**6,
                                negatives_per_positive=(negatives or
                                                        params.train.negatives_per_positive))
    space = dict(params.hpo.search_space)
    if max_lr:
        space["learning_rate"] = dataclasses.replace(space["learning_rate"], high=max_lr)
    setup = {"model": model.name, "layers": layers, "max_length": model.max_length,
             "seed": params.seed, "n_folds": params.prepare.n_folds,
             "negatives_per_positive": train.negatives_per_positive,
             "search_space": {k: repr(v) for k, v in space.items()},
             "metric": params.hpo.metric, "precision": train.precision}
    digest = hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:12]
    return params, model, train, space, digest


def record(trials: range, layers: int, negatives: int, max_lr: float
           ) -> tuple[pd.DataFrame, str]:
    """Fine-tune ``trials`` on every fold; one row per (trial, fold, epoch). ``negatives`` and
    ``max_lr``: as in table_setup."""
    from pipeline.common import derive_seed
    from pipeline.engine import Hyperparameters, encode_pairs, fine_tune, subsample_negatives
    from pipeline.model import load_tokenizer, pick_device
    from pipeline.trial import fold_indices

    params, model, train, space, digest = table_setup(layers, negatives, max_lr)

    pairs = pd.read_csv(ROOT / params.paths.pairs, keep_default_na=False)
    pairs = pairs[pairs["split"] == "train"].reset_index(drop=True)
    enc = encode_pairs(load_tokenizer(model.name), pairs["criterion"], pairs["sentence"],
                       pairs["label"], model.max_length).compact()
    folds = [(subsample_negatives(enc.labels, tr, train.negatives_per_positive,
                                  derive_seed(params.seed, "negatives", k)), val)
             for k, (tr, val) in enumerate(fold_indices(pairs["fold"].to_numpy(),
                                                       params.prepare.n_folds))]
    device = pick_device(train.device, train.cpu_threads, train.precision)
    drawn = draw_trials(space, derive_seed(params.seed, "curves"),
                        trials.stop)
    clock = _EvalClock()
    rows = []
    for number in trials:
        hp = drawn[number]
        for fold, (train_idx, val_idx) in enumerate(folds):
            seed = derive_seed(params.seed, "curves", number, "fold", fold)
            mark = time.perf_counter()

            def on_epoch(epoch: int, rec: dict, number=number, fold=fold, seed=seed,
                         hp=hp) -> None:
                nonlocal mark
                now = time.perf_counter()
                rows.append({"trial": number, **{k: hp.get(k) for k in HP_COLUMNS},
                             "fold": fold, "seed": seed, "epoch": epoch, **rec,
                             "train_seconds": round(clock.started - mark, 4),
                             "eval_seconds": round(now - clock.started, 4),
                             "precision": device.precision, "setup": digest})
                mark = now

            fine_tune(model, train, Hyperparameters(**hp), enc, train_idx, seed, device,
                      val_idx=val_idx, monitor=params.hpo.metric, on_epoch=on_epoch,
                      desc=f"trial {number} fold {fold}")
        last = [r for r in rows if r["trial"] == number]
        print(f"trial {number:3d}: {params.hpo.metric} per fold (last epoch) "
              + ", ".join(f"{r['val_' + params.hpo.metric]:.3f}" for r in last
                          if r["epoch"] == hp["num_train_epochs"])
              + f"; {sum(r['train_seconds'] + r['eval_seconds'] for r in last):.1f} s",
              flush=True)
    return pd.DataFrame(rows), digest


def merge(new: pd.DataFrame, digest: str, path: Path = CURVES) -> pd.DataFrame:
    """Replace the rows of ``new``'s trials in ``path``; refuse rows of another setup."""
    if path.is_file():
        old = pd.read_csv(path)
        other = set(old["setup"]) - {digest}
        if other:
            sys.exit(f"ERROR: {path}: rows recorded with another setup ({sorted(other)}, now "
                     f"{digest}): move the file away to start a new table")
        old = old[~old["trial"].isin(new["trial"].unique())]
        new = pd.concat([old, new], ignore_index=True)
    return new.sort_values(["trial", "fold", "epoch"]).reset_index(drop=True)


def record_machine(digest: str, trials: range, seconds: float, table: pd.DataFrame,
                   path: Path = CURVES_MACHINE) -> None:
    """Where the table was recorded: ``curves.json`` beside it, one entry per chunk of trials
    (chunks may come from different runs), the latest chunk's machine and command on top."""
    from pipeline.common import write_json
    from pipeline.machine import command, describe

    old = json.loads(path.read_text()) if path.is_file() else {}
    chunks = []
    if old.get("setup") == digest:  # rows of earlier chunks are kept, and so is where they ran
        chunks = old.get("chunks") or [{"trials": "earlier chunks",
                                        "machine": old["machine"].get("label"),
                                        "command": old.get("command")}]
    machine = describe()
    chunks.append({"trials": f"{trials.start}-{trials.stop - 1}", "machine": machine["label"],
                   "command": command(), "seconds": round(seconds, 1)})
    write_json(path, {"machine": machine, "command": command(), "setup": digest,
                      "table": CURVES.name, "trials": int(table["trial"].nunique()),
                      "rows": len(table), "chunks": chunks}, sort_keys=False)


def main() -> None:
    from pipeline.common import atomic_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=parse_range, default=parse_range("0-29"),
                        help="trial numbers to compute, e.g. 0-9 (inclusive)")
    parser.add_argument("--layers", type=int, default=LAYERS,
                        help="keep the first N transformer layers of model.name")
    parser.add_argument("--negatives-per-positive", type=int, default=NEGATIVES,
                        help="the committed table's 3 (0: params.yaml's train value)")
    parser.add_argument("--max-learning-rate", type=float, default=MAX_LR,
                        help="the committed table's 1.5e-4 (0: params.yaml's search space)")
    args = parser.parse_args()
    start = time.perf_counter()
    new, digest = record(args.trials, args.layers, args.negatives_per_positive,
                         args.max_learning_rate)
    table = merge(new, digest)
    with atomic_path(CURVES) as tmp:
        table.to_csv(tmp, index=False)
    record_machine(digest, args.trials, time.perf_counter() - start, table)
    print(f"{CURVES.relative_to(ROOT)}: {table['trial'].nunique()} trials, {len(table)} rows "
          f"({time.perf_counter() - start:.0f} s for trials {args.trials.start}-"
          f"{args.trials.stop - 1})")


if __name__ == "__main__":
    main()
