"""Stage ``retrain``: fine-tune on every training pair with the exported hyperparameters.

Reads   paths.pairs (the ``train`` split), paths.best_params   (params: seed, model.*, train.*)
Writes  paths.model_dir: a Hugging Face model directory (weights, config, tokenizer) that
        ``AutoModelForSequenceClassification.from_pretrained`` loads, plus ``training.json``.

Negatives are subsampled as in the CV folds (training only), with a seed of their own.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from pipeline.common import StageError, run_stage
from pipeline.engine import (
    Hyperparameters,
    derive_seed,
    encode_pairs,
    fine_tune,
    subsample_negatives,
)
from pipeline.model import load_tokenizer, pick_device
from pipeline.params import Params, load_params


def read_best(path: str | Path) -> Hyperparameters:
    doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    try:
        return Hyperparameters(**doc["hyperparameters"])
    except (TypeError, KeyError) as err:
        raise StageError(f"{path}: not a best-params file written by export_best: {err}") from err


def run(params: Params) -> dict[str, Any]:
    hp = read_best(params.paths.best_params)
    pairs = pd.read_csv(params.paths.pairs, keep_default_na=False)
    pairs = pairs[pairs["split"] == "train"].reset_index(drop=True)
    tokenizer = load_tokenizer(params.model.name)
    enc = encode_pairs(tokenizer, pairs["criterion"], pairs["sentence"], pairs["label"],
                       params.model.max_length)
    seed = derive_seed(params.seed, "retrain")
    train_idx = subsample_negatives(enc.labels, pairs.index.to_numpy(),
                                    params.train.negatives_per_positive,
                                    derive_seed(params.seed, "negatives", "retrain"))
    device = pick_device(params.train.device, params.train.cpu_threads)
    # compact vocabulary while training; the saved model has the full embedding matrix again
    result = fine_tune(params.model, params.train, hp, enc.compact(), train_idx, seed, device,
                       keep_model=True, desc="retrain")
    info = {"hyperparameters": hp.as_dict(), "seed": seed, "train_pairs": len(train_idx),
            "epochs": result.epochs_run, "final_train_loss": result.history[-1]["train_loss"],
            "padding_fraction": result.padding_fraction, "base_model": params.model.name}

    # Write next to the target and swap in, so a crash leaves no half-written model directory.
    out = Path(params.paths.model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        result.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def main() -> None:
    info = run(load_params())
    print(f"retrain: {info['train_pairs']} pairs x {info['epochs']} epochs, final loss "
          f"{info['final_train_loss']:.4f}")


if __name__ == "__main__":
    run_stage(main)
