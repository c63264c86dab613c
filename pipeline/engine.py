"""The fine-tuning engine that hpo (one call per CV fold) and retrain (one call) share.

Pairs are tokenised once per process (:class:`Encoded`) and every fold indexes into them.
Training batches are length-grouped (buckets of similar length, bucket order shuffled by the seed)
and padded per batch, so little compute goes to padding; evaluation runs in inference mode over
length-sorted, larger batches. Autocast follows ``train.precision`` (pipeline/model.py: bf16 on
CUDA and on CPUs with bf16 units, fp16 with a grad scaler on CUDA without bf16). On CUDA also TF32,
SDPA attention, pinned memory with asynchronous copies (token ids and labels), class weights
moved to the device once, and no read of a device value inside a training step: the loss is
summed on the device, checked for NaN/inf every ``LOSS_CHECK_STEPS`` steps and read once per
epoch (every read makes the host wait for the GPU; the fused AdamW takes fp16's loss scale
without one). Batches larger than ``train.max_device_batch_size`` are split into micro-batches
with gradient accumulation.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import get_linear_schedule_with_warmup

from pipeline.metrics import classification_metrics
from pipeline.model import Device, load_classifier
from pipeline.params import VALIDATION_UNIT, Hyperparameters, ModelParams, TrainParams
from pipeline.progress import progress

# Length buckets are this many batches wide: wide enough to shuffle well, narrow enough that a
# batch's sequences have similar lengths.
BUCKET_BATCHES = 50
# On CUDA, how many optimizer steps pass between checks of the loss for NaN/inf (each check is a
# host-device sync). On a CPU every step is checked: it costs nothing there.
LOSS_CHECK_STEPS = 50


@dataclass
class Encoded:
    """A table of (criterion, sentence) pairs tokenised once: ragged ids, lengths, labels."""

    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray] | None
    labels: np.ndarray
    lengths: np.ndarray
    pad_id: int
    # After compact(): the original token id of each compact id (None: the full vocabulary).
    vocab: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def compact(self) -> Encoded:
        """Renumber token ids to the few thousand this table uses (see shrink_embeddings)."""
        if self.vocab is not None:
            return self
        used = np.unique(np.concatenate([*self.input_ids, [self.pad_id]]))
        remap = np.full(int(used[-1]) + 1, -1, dtype=np.int64)
        remap[used] = np.arange(len(used))
        return dataclasses.replace(self, input_ids=[remap[ids] for ids in self.input_ids],
                                   pad_id=int(remap[self.pad_id]), vocab=used)


def shrink_embeddings(model, vocab: np.ndarray) -> torch.Tensor:
    """Keep only the input-embedding rows of ``vocab``; return the full matrix for later.

    A fine-tune only ever looks up the tokens of its data, and rows that get no gradient have no
    effect on the outputs, so training with the compact matrix gives the same model on that data.
    What it saves: the embedding matrix is the largest tensor of a small encoder (half of
    MiniLM's parameters, ~100M of DeBERTa-v3-base's 184M), and its gradient, clipping norm and
    AdamW update were paid for every row at every step.
    """
    full = model.get_input_embeddings()
    rows = torch.from_numpy(vocab).to(full.weight.device)
    # from_pretrained draws no random numbers (a fresh Embedding would shift the dropout stream)
    compact = torch.nn.Embedding.from_pretrained(full.weight.detach()[rows].clone(), freeze=False)
    if full.padding_idx is not None:
        (position,) = (rows == full.padding_idx).nonzero(as_tuple=True)
        compact.padding_idx = int(position[0]) if len(position) else None
    model.set_input_embeddings(compact)
    return full.weight.detach()


def expand_embeddings(model, vocab: np.ndarray, full: torch.Tensor) -> None:
    """Put the trained rows back into the full matrix (unused rows keep their original values)."""
    compact = model.get_input_embeddings()
    weight = full.clone()
    with torch.no_grad():
        weight[torch.from_numpy(vocab).to(weight.device)] = compact.weight.to(weight.dtype)
    embedding = torch.nn.Embedding.from_pretrained(weight, freeze=False)
    embedding.padding_idx = model.config.pad_token_id
    model.set_input_embeddings(embedding)


# How often encode_pairs ran in this process: the hpo stage tokenises once per study, not per
# trial or fold (checked by the tests, reported in the study's MLflow run).
ENCODE_STATS: Counter = Counter()


def encode_pairs(tokenizer, criteria: Sequence[str], sentences: Sequence[str],
                 labels: Sequence[int], max_length: int) -> Encoded:
    """``[CLS] criterion [SEP] sentence [SEP]``; only the sentence is ever truncated."""
    ENCODE_STATS["calls"] += 1
    ENCODE_STATS["pairs"] += len(labels)
    enc = tokenizer(list(criteria), list(sentences), truncation="only_second",
                    max_length=max_length, padding=False)
    ids = [np.asarray(x, dtype=np.int64) for x in enc["input_ids"]]
    types = enc.get("token_type_ids")
    return Encoded(
        input_ids=ids,
        token_type_ids=[np.asarray(x, dtype=np.int64) for x in types] if types else None,
        labels=np.asarray(labels, dtype=np.int64),
        lengths=np.asarray([len(x) for x in ids], dtype=np.int64),
        pad_id=tokenizer.pad_token_id,
    )


def subsample_negatives(labels: np.ndarray, indices: np.ndarray, per_positive: int,
                        seed: int) -> np.ndarray:
    """All positives of ``indices`` plus ``per_positive`` negatives each (0: keep all)."""
    if per_positive == 0:
        return np.sort(indices)
    pos = indices[labels[indices] == 1]
    neg = indices[labels[indices] == 0]
    n_neg = min(len(neg), per_positive * max(len(pos), 1))
    keep = np.random.default_rng(seed).choice(neg, size=n_neg, replace=False)
    return np.sort(np.concatenate([pos, keep]))


def length_grouped_batches(lengths: np.ndarray, indices: np.ndarray, batch_size: int,
                           rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle, sort by length within buckets of BUCKET_BATCHES batches, shuffle batch order."""
    perm = rng.permutation(indices)
    width = batch_size * BUCKET_BATCHES
    batches = []
    for start in range(0, len(perm), width):
        bucket = perm[start : start + width]
        bucket = bucket[np.argsort(-lengths[bucket], kind="stable")]
        batches += [bucket[i : i + batch_size] for i in range(0, len(bucket), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def padding_fraction(lengths: np.ndarray, batches: Sequence[np.ndarray]) -> float:
    """Pad tokens / all tokens when each batch is padded to its longest sequence."""
    real = sum(int(lengths[b].sum()) for b in batches)
    total = sum(int(lengths[b].max()) * len(b) for b in batches)
    return 1.0 - real / total if total else 0.0


def collate(enc: Encoded, idx: np.ndarray, device: Device) -> dict[str, torch.Tensor]:
    """Pad a batch to its own longest sequence and move it to the device."""
    width = int(enc.lengths[idx].max())
    ids = np.full((len(idx), width), enc.pad_id, dtype=np.int64)
    mask = np.zeros((len(idx), width), dtype=np.int64)
    types = np.zeros((len(idx), width), dtype=np.int64) if enc.token_type_ids else None
    for row, i in enumerate(idx):
        n = enc.lengths[i]
        ids[row, :n] = enc.input_ids[i]
        mask[row, :n] = 1
        if types is not None:
            types[row, :n] = enc.token_type_ids[i]
    arrays = {"input_ids": ids, "attention_mask": mask}
    if types is not None:
        arrays["token_type_ids"] = types
    return {key: to_device(arr, device) for key, arr in arrays.items()}


def to_device(arr: np.ndarray, device: Device) -> torch.Tensor:
    """A host array on the device: on CUDA through pinned memory, without waiting for the copy."""
    t = torch.from_numpy(arr)
    return t.pin_memory().to(device.torch, non_blocking=True) if device.type == "cuda" else t


def make_loss(hp: Hyperparameters, train_labels: np.ndarray,
              device: torch.device | None = None) -> Callable:
    """Per-sample loss: class-weighted cross-entropy, or focal loss (alpha: positive class).
    Its constants live on ``device`` (default CPU) from the start."""
    if hp.loss_function == "weighted_ce":
        n = len(train_labels)
        n_pos = max(int(train_labels.sum()), 1)
        weights = torch.tensor([n / (2 * max(n - n_pos, 1)), n / (2 * n_pos)], device=device)

        def weighted_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits.float(), y, weight=weights, reduction="none")

        weighted_ce.weights = weights  # the per-class weights, for the accumulation denominator
        return weighted_ce
    if hp.loss_function == "focal":
        alpha = torch.tensor([1.0 - hp.focal_alpha, hp.focal_alpha], device=device)

        def focal(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logp = F.log_softmax(logits.float(), dim=-1).gather(1, y[:, None]).squeeze(1)
            return -alpha[y] * (1 - logp.exp()) ** hp.focal_gamma * logp

        return focal
    raise ValueError(f"unknown loss_function {hp.loss_function!r}")


@torch.inference_mode()
def predict(model, enc: Encoded, indices: np.ndarray, batch_size: int,
            device: Device) -> np.ndarray:
    """Positive-class probabilities for ``indices`` (in their order), length-sorted batches."""
    if enc.vocab is not None and model.get_input_embeddings().num_embeddings != len(enc.vocab):
        raise ValueError("compact token ids need the model with the compact embeddings")
    model.eval()
    order = indices[np.argsort(enc.lengths[indices], kind="stable")]
    parts = []  # kept on the device: one copy back at the end, not one wait per batch
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        with torch.autocast(device.type, dtype=device.amp_dtype,
                            enabled=device.amp_dtype is not None):
            logits = model(**collate(enc, batch, device)).logits
        parts.append(torch.softmax(logits.float(), -1)[:, 1])
    probs = torch.cat(parts).double().cpu().numpy() if parts else np.empty(0)
    result = np.empty(len(order), dtype=np.float64)
    position = {int(i): k for k, i in enumerate(order)}
    for k, i in enumerate(indices):
        result[k] = probs[position[int(i)]]
    return result


def make_optimizer(groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """AdamW with the fused kernel where this torch has it (CPU and CUDA, torch >= 2.4): on a
    small model the optimizer step is a large share of a step, and fused is ~5x faster on CPU."""
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, foreach=True)


@dataclass
class FitResult:
    """What one fine-tune produced; ``metrics`` are the validation metrics of the scored epoch."""

    seed: int
    epochs_run: int
    best_epoch: int
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    train_samples: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    padding_fraction: float = 0.0
    val_probs: np.ndarray | None = None  # validation probabilities of the scored epoch
    model: Any = None
    stopped: bool = False  # on_epoch asked to stop (the trial was pruned mid-fold)


class _Trainer:
    """A fresh classifier with its optimizer, schedule and loss: :meth:`step` is one optimizer
    step over one batch (micro-batches when it is larger than train.max_device_batch_size)."""

    def __init__(self, model_params: ModelParams, train_params: TrainParams,
                 hp: Hyperparameters, enc: Encoded, train_idx: np.ndarray, seed: int,
                 device: Device, fault: Callable[[int, torch.Tensor], torch.Tensor] | None):
        self.enc, self.device, self.fault = enc, device, fault
        self.model = model = load_classifier(model_params.name, model_params.num_hidden_layers,
                                             seed)
        self.full_embeddings = None
        if enc.vocab is not None:
            self.full_embeddings = shrink_embeddings(model, enc.vocab)
        model.to(device.torch)
        # The compiled wrapper shares the parameters; `model` stays the saveable module.
        self.forward = torch.compile(model, dynamic=True) if train_params.compile else model
        self.micro = min(hp.per_device_train_batch_size, train_params.max_device_batch_size)
        steps_per_epoch = math.ceil(len(train_idx) / hp.per_device_train_batch_size)
        total_steps = steps_per_epoch * hp.num_train_epochs
        no_decay = ("bias", "LayerNorm.weight", "layernorm.weight", "norm.weight")
        groups = [
            {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
             "weight_decay": hp.weight_decay},
            {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)],
             "weight_decay": 0.0},
        ]
        self.optimizer = make_optimizer(groups, hp.learning_rate)
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, math.ceil(hp.warmup_ratio * total_steps), total_steps)
        # fp16 needs loss scaling; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(device.type,
                                           enabled=device.amp_dtype == torch.float16)
        self.loss_fn = make_loss(hp, enc.labels[train_idx], device.torch)
        self.class_weights = getattr(self.loss_fn, "weights", None)
        self.steps = 0

    def step(self, batch: np.ndarray) -> torch.Tensor:
        """Forward, backward and update on ``batch``; its mean loss, left on the device."""
        device = self.device
        y_all = to_device(self.enc.labels[batch], device)
        # the denominator of the full batch, so that accumulation equals one big batch
        denom = (self.class_weights[y_all].sum() if self.class_weights is not None
                 else float(len(batch)))
        batch_loss = torch.zeros((), device=device.torch)
        for m in range(0, len(batch), self.micro):
            inputs = collate(self.enc, batch[m : m + self.micro], device)
            with torch.autocast(device.type, dtype=device.amp_dtype,
                                enabled=device.amp_dtype is not None):
                logits = self.forward(**inputs).logits
            loss = self.loss_fn(logits, y_all[m : m + self.micro]).sum() / denom
            if self.fault is not None:
                loss = self.fault(self.steps + 1, loss)
            self.scaler.scale(loss).backward()
            batch_loss += loss.detach().float()
        self.steps += 1
        # update
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return batch_loss


def fine_tune(
    model_params: ModelParams,
    train_params: TrainParams,
    hp: Hyperparameters,
    enc: Encoded,
    train_idx: np.ndarray,
    seed: int,
    device: Device,
    val_idx: np.ndarray | None = None,
    monitor: str = "pr_auc",
    on_epoch: Callable[[int, dict[str, float]], bool | None] | None = None,
    keep_model: bool = False,
    desc: str = "train",
    fault: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    validate_every_epoch: bool = False,
    tick: Callable[[int], None] | None = None,
) -> FitResult:
    """Fine-tune a fresh classifier on ``train_idx``; validate on ``val_idx``.

    With ``train.early_stopping_patience`` > 0 a fold validates every epoch, stops after that many
    epochs without a better ``monitor`` and its score is the best epoch's; otherwise only the
    last epoch is validated (every epoch with ``validate_every_epoch``) and it gives the score.
    ``on_epoch(epoch, record)`` sees every epoch's record; when it answers True the fit stops
    there (``FitResult.stopped``: a pruned trial). ``fault(step, loss) -> loss`` is called at
    every optimizer step (tests inject failures through it: pipeline/faults.py). ``tick(n)``
    counts the work done: 1 per optimizer step, 1 per VALIDATION_UNIT pairs validated (the hpo
    stage's virtual clock, pipeline/study.py).
    """
    trainer = _Trainer(model_params, train_params, hp, enc, train_idx, seed, device, fault)
    model = trainer.model
    try:
        rng = np.random.default_rng(seed)
        result = FitResult(seed=seed, epochs_run=0, best_epoch=0, metrics={})
        best_score, since_best = -math.inf, 0
        check_every = LOSS_CHECK_STEPS if device.type == "cuda" else 1
        pads: list[np.ndarray] = []
        for epoch in progress(range(1, hp.num_train_epochs + 1), f"{desc} epoch", plain=True,
                              leave=False):
            # forward/backward over length-grouped batches
            model.train()
            batches = length_grouped_batches(enc.lengths, train_idx,
                                             hp.per_device_train_batch_size, rng)
            pads += batches
            # sum of (batch loss x batch size) over the epoch, kept on the device
            epoch_loss = torch.zeros((), device=device.torch)
            epoch_n = 0
            start = time.perf_counter()
            for k, batch in enumerate(progress(batches,
                                               f"{desc} epoch {epoch}/{hp.num_train_epochs}",
                                               leave=False)):
                epoch_loss += trainer.step(batch) * len(batch)
                if tick is not None:
                    tick(1)
                if ((trainer.steps % check_every == 0 or k + 1 == len(batches))
                        and not torch.isfinite(epoch_loss)):
                    where = "at" if check_every == 1 else f"by (checked every {check_every})"
                    raise FloatingPointError(f"non-finite loss {where} step {trainer.steps}")
                epoch_n += len(batch)
            record = {"train_loss": float(epoch_loss) / max(epoch_n, 1)}  # the epoch's one sync
            result.train_seconds += time.perf_counter() - start
            result.train_samples += epoch_n
            result.epochs_run = epoch

            # validate, keep the best epoch, stop early when patience runs out. Without early
            # stopping only the last epoch is scored, so only the last epoch is validated unless
            # a per-epoch pruner needs every one: on a CPU, scoring every validation pair of a
            # fold costs 1.7 training epochs of the sample's fold (bench/curves.py).
            patience = train_params.early_stopping_patience
            if val_idx is not None and (patience or validate_every_epoch
                                        or epoch == hp.num_train_epochs):
                start = time.perf_counter()
                probs = predict(model, enc, val_idx, train_params.eval_batch_size, device)
                result.eval_seconds += time.perf_counter() - start
                if tick is not None:
                    tick(math.ceil(len(val_idx) / VALIDATION_UNIT))
                scores = classification_metrics(enc.labels[val_idx], probs)
                record.update({f"val_{k}": v for k, v in scores.items()})
                improved = scores[monitor] > best_score
                if improved:
                    best_score, since_best, result.best_epoch = scores[monitor], 0, epoch
                else:
                    since_best += 1
                # With early stopping a fold scores its best epoch, without it its last one.
                if improved or not patience:
                    result.metrics, result.val_probs = scores, probs
            result.history.append(record)
            if on_epoch is not None and on_epoch(epoch, record):
                result.stopped = True
                break
            if val_idx is not None and patience and since_best >= patience:
                break
        result.padding_fraction = padding_fraction(enc.lengths, pads)
        if keep_model:
            if trainer.full_embeddings is not None:
                expand_embeddings(model, enc.vocab, trainer.full_embeddings.to(device.torch))
            result.model = model
        return result
    finally:
        # Free the model and optimizer state before the next fold (GPU memory above all).
        del trainer
        if not keep_model:
            del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def throughput(model_params: ModelParams, train_params: TrainParams, hp: Hyperparameters,
               enc: Encoded, train_idx: np.ndarray, device: Device, seconds: float,
               warmup_steps: int = 5, start: Callable[[], None] | None = None,
               ) -> dict[str, float]:
    """Training samples per second of one fine-tune at ``hp``'s batch size, measured over
    ``seconds`` after ``warmup_steps`` (``start()`` is called in between: a barrier, so that
    several processes measure together), and the process's peak device memory in MB."""
    trainer = _Trainer(model_params, train_params, hp, enc, train_idx, 0, device, None)
    trainer.model.train()
    rng = np.random.default_rng(0)
    batches = length_grouped_batches(enc.lengths, train_idx, hp.per_device_train_batch_size, rng)
    batches.sort(key=lambda b: -int(enc.lengths[b].max()))  # longest first: the memory peak

    def run(seconds: float, steps: int) -> tuple[int, float]:
        done, n, t0 = 0, 0, time.perf_counter()
        while done < steps or (seconds and time.perf_counter() - t0 < seconds):
            batch = batches[done % len(batches)]
            trainer.step(batch)
            done, n = done + 1, n + len(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n, time.perf_counter() - t0

    run(0.0, warmup_steps)
    if start is not None:
        start()
    n, elapsed = run(seconds, 1)
    peak = torch.cuda.max_memory_reserved() / 2**20 if device.type == "cuda" else 0.0
    return {"samples_per_second": n / elapsed, "peak_memory_mb": peak}
