"""Recipe learning curves: what one fold-0 fine-tune learns for each training recipe.

The question of issue 10: the tuned transformer loses to the TF-IDF baseline; is it the model or
what the CPU profile lets it train on? Each recipe (negatives per positive, which negatives,
epochs, learning rate, layers kept, precision) fine-tunes ``model.name`` on the training rows of
fold 0 of a corpus and validates on its validation rows (every pair) after **every epoch**.
Everything else is the pipeline's: the engine (``pipeline.engine.fine_tune``), the prepared pairs,
the fold column, batch 8, weighted cross-entropy, warm-up 0.05, weight decay 0.01.

Which negatives (per training positive, training rows only; positives are always all kept):

* ``random``: drawn uniformly, as ``train.negatives_per_positive`` does today (0: all).
* ``same``: first the other-criterion pairings of each evidence sentence (up to 8 per positive),
  then random ones up to the count.
* ``hard``: the highest-scored by the TF-IDF + LR baseline (``pipeline.baseline``'s model, one
  per criterion) fitted on the fold's training rows.
* ``mixed``: half ``hard``, half ``random``.

Corpora: ``sample`` is the prepared sample (``paths.pairs``); ``seed7`` a second corpus written by
``python -m pipeline.sample_data --seed 7 --posts 400`` and prepared with this repository's
params into ``.bench/seed7/`` (git-ignored). ``--export DIR`` writes both pairs tables (and the
model, see below) for a machine without this environment; ``--pairs-dir DIR`` reads them there.

One CSV row per (corpus, recipe, seed, epoch): validation metrics, training samples so far, and
the wall-clock seconds of training and validation on the machine that ran it (the CPU cost of a
recipe is ``train_samples`` over the CPU's samples/s: docs/results.md, "Recipe curves"). A JSON
file beside the CSV (same name) records that machine and the command.

Usage: ``python bench/recipe_curves.py [--corpus sample seed7] [--seeds 2] [--jobs 1]``
       (``--jobs N`` runs N fine-tunes at once, each in its own process: for a GPU machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs where the package is not installed too (a GPU machine)
RESULTS = ROOT / "bench" / "results"
OUT = RESULTS / "recipe_curves.csv"
SCRATCH = ROOT / ".bench"
FOLD = 0
BASE_HP = {"per_device_train_batch_size": 8, "warmup_ratio": 0.05, "weight_decay": 0.01,
           "loss_function": "weighted_ce"}


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    negatives: str = "random"  # random | same | hard | mixed
    per_positive: int = 3  # 0: every negative
    epochs: int = 4
    lr: float = 1e-4
    layers: int | None = None  # keep the first N transformer layers (None: all six)
    precision: str = "fp32"


RECIPES = [  # in order of interest: a run cut short by --deadline keeps the first ones
    Recipe("today: 3 random, 4 ep"),
    Recipe("10 random, 4 ep", per_positive=10),
    Recipe("10 random, 8 ep", per_positive=10, epochs=8),
    Recipe("all negatives, 4 ep", per_positive=0),
    Recipe("10 hard, 4 ep", negatives="hard", per_positive=10),
    Recipe("10 same+random, 4 ep", negatives="same", per_positive=10),
    Recipe("10 mixed, 4 ep", negatives="mixed", per_positive=10),
    Recipe("3 random, 8 ep", epochs=8),
    Recipe("10 random, 8 ep, lr 2e-4", per_positive=10, epochs=8, lr=2e-4),
    Recipe("10 random, 8 ep, lr 5e-5", per_positive=10, epochs=8, lr=5e-5),
    Recipe("10 random, 8 ep, 3 layers", per_positive=10, epochs=8, layers=3),
    Recipe("10 random, 8 ep, bf16", per_positive=10, epochs=8, precision="bf16"),
    Recipe("3 random, 4 ep, lr 5e-5", lr=5e-5),
    Recipe("3 random, 8 ep, lr 5e-5", epochs=8, lr=5e-5),
    Recipe("10 random, 4 ep, lr 5e-5", per_positive=10, lr=5e-5),
]


def select_negatives(pairs: pd.DataFrame, train: np.ndarray, recipe: Recipe,
                     seed: int) -> np.ndarray:
    """Positives of ``train`` plus the recipe's negatives (sorted row indices)."""
    from pipeline import baseline
    from pipeline.engine import subsample_negatives

    labels = pairs["label"].to_numpy()
    if recipe.negatives == "random" or recipe.per_positive == 0:
        return subsample_negatives(labels, train, recipe.per_positive, seed)
    pos = train[labels[train] == 1]
    neg = train[labels[train] == 0]
    want = min(len(neg), recipe.per_positive * len(pos))
    rng = np.random.default_rng(seed)
    if recipe.negatives == "same":
        evidence = set(pairs["sentence_id"].to_numpy()[pos])
        same = neg[np.isin(pairs["sentence_id"].to_numpy()[neg], list(evidence))][:want]
        rest = np.setdiff1d(neg, same)
        chosen = np.concatenate([same, rng.choice(rest, size=want - len(same), replace=False)])
    else:  # hard / mixed: rank the negatives by the baseline fitted on the training rows
        features = baseline.vectorizer().fit(pairs["sentence"].to_numpy()[train])
        score = np.zeros(len(pairs))
        crit = pairs["criterion_id"].to_numpy()
        for c in np.unique(crit[train]):
            rows = train[crit[train] == c]
            x = features.transform(pairs["sentence"].to_numpy()[rows])
            score[rows] = baseline.fit_predict(x, labels[rows], x)
        ranked = neg[np.argsort(-score[neg], kind="stable")]
        n_hard = want if recipe.negatives == "hard" else want // 2
        hard = ranked[:n_hard]
        rest = ranked[n_hard:]
        chosen = np.concatenate([hard, rng.choice(rest, size=want - n_hard, replace=False)])
    return np.sort(np.concatenate([pos, chosen]))


def make_corpus(name: str) -> Path:
    """The prepared pairs of a corpus (written here on first use: seconds)."""
    from pipeline import prepare
    from pipeline.params import load_params

    params = load_params(ROOT / "params.yaml")
    if name == "sample":
        path = ROOT / params.paths.pairs
        if not path.is_file():
            os.chdir(ROOT)
            prepare.run(params)
        return path
    if name != "seed7":
        sys.exit(f"ERROR: --corpus {name}: expected sample or seed7")
    # the whole paths layout of params.yaml, below a scratch root
    base = SCRATCH / "seed7"
    moved = dataclasses.replace(params.paths, **{
        f.name: str(base / getattr(params.paths, f.name))
        for f in dataclasses.fields(params.paths)})
    pairs = Path(moved.pairs)
    if not pairs.is_file():
        import subprocess

        subprocess.run([sys.executable, "-m", "pipeline.sample_data", "--seed", "7", "--posts",
                        "400", "--out", moved.data_dir], cwd=ROOT, check=True)
        prepare.run(dataclasses.replace(params, paths=moved))
    return pairs


def _run_one(task: tuple) -> list[dict]:
    """One fine-tune (in a worker process): its per-epoch rows."""
    corpus, pairs_path, recipe, seed, model_name, threads = task
    import torch

    from pipeline.common import derive_seed
    from pipeline.engine import Hyperparameters, encode_pairs, fine_tune
    from pipeline.model import load_tokenizer, pick_device
    from pipeline.params import load_params

    torch.set_num_threads(threads)
    params = load_params(ROOT / "params.yaml")
    model = dataclasses.replace(params.model, name=model_name, num_hidden_layers=recipe.layers)
    train_params = dataclasses.replace(params.train, early_stopping_patience=10**6,
                                       precision=recipe.precision, cpu_threads=threads)
    pairs = pd.read_csv(pairs_path, keep_default_na=False)
    pairs = pairs[pairs["split"] == "train"].reset_index(drop=True)
    folds = pairs["fold"].to_numpy()  # as pipeline.trial.fold_indices (no optuna import)
    train, val = np.flatnonzero(folds != FOLD), np.flatnonzero(folds == FOLD)
    fold_seed = derive_seed(params.seed, "recipe", corpus, seed)
    train = select_negatives(pairs, train, recipe, fold_seed)
    enc = encode_pairs(load_tokenizer(model_name), pairs["criterion"], pairs["sentence"],
                       pairs["label"], model.max_length).compact()
    device = pick_device(train_params.device, threads, recipe.precision)
    hp = Hyperparameters(learning_rate=recipe.lr, num_train_epochs=recipe.epochs, **BASE_HP)
    rows: list[dict] = []
    mark = [time.perf_counter()]

    def on_epoch(epoch: int, rec: dict) -> None:
        now = time.perf_counter()
        rows.append({"corpus": corpus, "recipe": recipe.name, **dataclasses.asdict(recipe),
                     "seed": seed, "epoch": epoch, "train_pairs": len(train),
                     "train_positives": int(pairs["label"].to_numpy()[train].sum()),
                     "train_samples": len(train) * epoch, **rec,
                     "seconds": round(now - mark[0], 3), "device": device.torch.type,
                     "precision_used": device.precision})
        mark[0] = now

    fine_tune(model, train_params, hp, enc, train, fold_seed, device, val_idx=val,
              monitor="pr_auc", on_epoch=on_epoch, desc=f"{corpus} {recipe.name} s{seed}")
    last = rows[-1]
    print(f"{corpus:6s} {recipe.name:28s} seed {seed}: pr_auc "
          + " ".join(f"{r['val_pr_auc']:.3f}" for r in rows)
          + f"  pos_f1 {last['val_pos_f1']:.3f}", flush=True)
    return rows


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Last-epoch validation metrics per (corpus, recipe): mean over seeds, and the cost."""
    last = table[table["epoch"] == table["epochs"]]
    return (last.groupby(["corpus", "recipe"], sort=False)
            .agg(train_pairs=("train_pairs", "first"), train_samples=("train_samples", "first"),
                 pr_auc=("val_pr_auc", "mean"), pr_auc_sd=("val_pr_auc", "std"),
                 pos_f1=("val_pos_f1", "mean"), seeds=("seed", "nunique"))
            .reset_index())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", nargs="+", default=["sample", "seed7"])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--recipes", default="all", help="comma-separated indices into RECIPES")
    parser.add_argument("--jobs", type=int, default=1, help="fine-tunes at once (processes)")
    parser.add_argument("--model", default=None, help="model directory (default: model.name)")
    parser.add_argument("--pairs-dir", type=Path, default=None,
                        help="read <corpus>.csv from here (see --export)")
    parser.add_argument("--export", type=Path, default=None,
                        help="write <corpus>.csv here and exit")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds: stop starting fine-tunes after this, keep those done")
    args = parser.parse_args()
    from pipeline.common import write_json
    from pipeline.machine import command, describe
    from pipeline.params import load_params

    if args.export:
        args.export.mkdir(parents=True, exist_ok=True)
        for corpus in args.corpus:
            (args.export / f"{corpus}.csv").write_bytes(make_corpus(corpus).read_bytes())
        return
    model_name = args.model or load_params(ROOT / "params.yaml").model.name
    recipes = (RECIPES if args.recipes == "all"
               else [RECIPES[int(i)] for i in args.recipes.split(",")])
    paths = {c: (args.pairs_dir / f"{c}.csv" if args.pairs_dir else make_corpus(c))
             for c in args.corpus}
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    # every recipe's first seed on every corpus before any second seed
    tasks = [(c, str(paths[c]), r, s, model_name, threads)
             for s in range(args.seeds) for c in args.corpus for r in recipes]
    start = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def save() -> pd.DataFrame:  # after every fine-tune: a run cut short keeps what it did
        table = pd.DataFrame(rows).sort_values(["corpus", "recipe", "seed", "epoch"],
                                               kind="stable")
        table.to_csv(args.out, index=False, float_format="%.6g")
        return table

    done = 0
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        for result in pool.imap_unordered(_run_one, tasks, chunksize=1):
            rows.extend(result)
            done += 1
            save()
            if args.deadline and time.perf_counter() - start > args.deadline:
                print(f"deadline: {done} of {len(tasks)} fine-tunes done", flush=True)
                pool.terminate()
                break
    summary = summarise(save())
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    run = {"fine_tunes": done, "of": len(tasks), "jobs": args.jobs,
           "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(run))
    # where the table was measured: <out>.json beside the CSV
    write_json(args.out.with_suffix(".json"), {"machine": describe(), "command": command(),
                                              "table": args.out.name, **run}, sort_keys=False)


if __name__ == "__main__":
    main()
