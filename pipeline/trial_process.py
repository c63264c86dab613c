"""A trial's own process: where it runs (its slot), how it starts, and what it says to the stage.

With ``hpo.isolate_trials`` every trial computes its folds in a child process. A CUDA
out-of-memory error, a segfault or the OOM killer then ends only that process, and the memory
PyTorch would not give back is released with it. The child only computes: it sends events
(:class:`FoldStart`, :class:`EpochEnd`, :class:`FoldEnd`, then :class:`Finished` or
:class:`Failed`) over a pipe, and the stage does all the Optuna and MLflow I/O and answers
"prune?" after each fold.

Children come from a fork server whose process has imported the libraries but never run torch
(a plain fork of a process whose OpenMP pool has run deadlocks, and CUDA cannot be used in a
forked child). Starting a child costs about 0.7 s, plus about 4 s once for the fork server
(``bench/results/trial_isolation.json``).

A :class:`Slot` is where one of the ``hpo.n_jobs`` trial processes runs: one CUDA device (several
slots may share one), or a set of CPU cores of its own (parallel trials never share cores: two
2-thread jobs on 2 cores made a training step 30x slower).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import multiprocessing.connection
import os
import resource
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from transformers import AutoConfig

from pipeline.errors import ParamsError
from pipeline.model import resolve_model_path


# Events, child -> stage. The stage answers a FoldEnd or an EpochEnd with True (stop: pruned,
# or the stage failed the trial while recording the event, e.g. a non-finite score) or False;
# an EpochEnd is answered even when the pruner hears folds only, so that a failure recorded at
# an epoch stops the fine-tune there (one pipe round trip per epoch).
@dataclass(frozen=True)
class FoldStart:
    fold: int
    seed: int
    precision: str  # what train.precision resolved to on this device: fp32, bf16 or fp16


@dataclass(frozen=True)
class EpochEnd:
    fold: int
    epoch: int
    record: dict[str, float]


@dataclass(frozen=True)
class FoldEnd:
    fold: int
    summary: dict[str, Any]
    probs: np.ndarray  # validation probabilities, in the order of the fold's validation rows


@dataclass(frozen=True)
class Finished:
    completed: bool  # False: the stage answered "prune" after a fold or an epoch
    peak_rss_mb: float
    peak_gpu_mb: float | None


@dataclass(frozen=True)
class Failed:
    message: str


Event = FoldStart | EpochEnd | FoldEnd | Finished | Failed


class Runner(Protocol):
    """What a trial process runs (objective.FoldRunner): folds, reported through ``emit``."""

    def run(self, hp: Any, number: int, seed_number: int,
            emit: Callable[[Event], bool | None], fault_spec: str | None = None) -> bool: ...


@dataclass(frozen=True)
class Slot:
    """Where one trial process runs: its own CPU cores, or a CUDA device (None: unchanged)."""

    index: int
    cpus: tuple[int, ...] | None = None
    cuda: int | None = None

    def enter(self) -> None:
        """In the trial's process, before torch starts threads or touches CUDA."""
        if self.cpus is not None:
            os.sched_setaffinity(0, self.cpus)  # torch then uses len(cpus) threads
        if self.cuda is not None:
            import torch

            torch.cuda.set_device(self.cuda)

    def describe(self) -> str:
        if self.cuda is not None:
            return f"cuda:{self.cuda}"
        return "cpus " + ",".join(map(str, self.cpus)) if self.cpus is not None else "all cpus"


def _available_memory_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def estimate_trial_mb(model_name: str) -> float:
    """Host memory one CPU trial needs, before any trial has measured it: weights, gradients and
    two AdamW moments (4x the checkpoint), plus ~1 GiB of runtime (torch, tokens, activations)."""
    path = Path(resolve_model_path(model_name))
    weights = sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin")
                  for f in path.glob(pattern)) if path.is_dir() else 0
    return 4 * weights / 2**20 + 1024


def plan_slots(n_jobs: int, devices: str | list[int], train_device: str, cpu_threads: int,
               trial_mb: float, trial_gpu_mb: float | None) -> list[Slot]:
    """The ``n_jobs`` slots for hpo.devices, or a ParamsError when they cannot fit this machine.

    ``trial_mb`` / ``trial_gpu_mb``: the largest peak a trial of this study has recorded (or an
    estimate for host memory; None: GPU memory not known yet).
    """
    import torch

    use_cuda = train_device != "cpu" and torch.cuda.is_available()
    if train_device == "cuda" and not use_cuda:
        raise ParamsError("params.yaml: train.device is 'cuda' but no CUDA device is available")
    if devices != "auto" and not use_cuda:
        raise ParamsError(f"params.yaml: hpo.devices: {devices} names CUDA devices, but none is "
                          "available (use auto)")
    if use_cuda:
        count = torch.cuda.device_count()
        gpus = list(range(count)) if devices == "auto" else list(devices)
        bad = [g for g in gpus if g >= count]
        if bad:
            raise ParamsError(f"params.yaml: hpo.devices: no CUDA device {bad[0]}; this machine "
                              f"has {count} (0..{count - 1})")
        slots = [Slot(i, cuda=gpus[i % len(gpus)]) for i in range(n_jobs)]
        if trial_gpu_mb is not None:
            for gpu in set(gpus):
                share = sum(s.cuda == gpu for s in slots)
                total = torch.cuda.get_device_properties(gpu).total_memory / 2**20
                if share * trial_gpu_mb > 0.95 * total:
                    raise ParamsError(
                        f"params.yaml: hpo.n_jobs: {share} trials on cuda:{gpu} need about "
                        f"{share * trial_gpu_mb:,.0f} MB (a trial of this study peaked at "
                        f"{trial_gpu_mb:,.0f} MB), the device has {total:,.0f} MB; lower "
                        "hpo.n_jobs or add devices")
        return slots
    cores = sorted(os.sched_getaffinity(0))
    if n_jobs > len(cores):
        raise ParamsError(
            f"params.yaml: hpo.n_jobs: {n_jobs} trials at once need {n_jobs} CPU cores, this "
            f"process may use {len(cores)}; parallel trials must not share cores (lower "
            "hpo.n_jobs)")
    if cpu_threads and cpu_threads * n_jobs > len(cores):
        raise ParamsError(
            f"params.yaml: train.cpu_threads: {n_jobs} trials x {cpu_threads} threads exceed "
            f"the {len(cores)} cores this process may use (set 0: the cores split evenly)")
    available = _available_memory_mb()
    if available is not None and n_jobs * trial_mb > available:
        raise ParamsError(
            f"params.yaml: hpo.n_jobs: {n_jobs} trials at once need about "
            f"{n_jobs * trial_mb:,.0f} MB of memory ({trial_mb:,.0f} MB each), "
            f"{available:,.0f} MB are available; lower hpo.n_jobs")
    if n_jobs == 1:
        return [Slot(0)]
    return [Slot(i, cpus=tuple(int(c) for c in chunk))
            for i, chunk in enumerate(np.array_split(cores, n_jobs))]


def _die_with_parent() -> None:
    """Linux: the kernel kills this child if its parent dies (a kill -9 of the stage)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def peak_memory() -> tuple[float, float | None]:
    """This process's peak resident memory and (on CUDA) peak reserved GPU memory, in MB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    gpu = None
    import torch

    if torch.cuda.is_initialized():
        gpu = torch.cuda.max_memory_reserved() / 2**20
    return round(rss, 1), None if gpu is None else round(gpu, 1)


def _child_main(conn, runner: Runner, hp: Any, number: int, seed_number: int, slot: Slot,
                fault_spec: str) -> None:
    """Entry point of a trial's process: run the folds, relay events over ``conn``."""
    _die_with_parent()
    slot.enter()

    def emit(event: Event) -> bool | None:
        conn.send(event)
        return conn.recv() if isinstance(event, (FoldEnd, EpochEnd)) else None

    try:
        completed = runner.run(hp, number, seed_number, emit, fault_spec)
        conn.send(Finished(completed, *peak_memory()))
    except BaseException as err:  # reported to the stage, which fails the trial
        conn.send(Failed(f"{type(err).__name__}: {err}"[:5000]))
    finally:
        conn.close()


def child_context(model_name: str) -> mp.context.BaseContext | None:
    """The fork server (Linux); None where there is none.

    Its process imports this module and the model's modeling code once, so that a trial's
    child starts with them loaded (transformers imports model code lazily, ~1 s per process).
    """
    if "forkserver" not in mp.get_all_start_methods():
        return None
    preload = [__name__, "pipeline.objective"]
    with contextlib.suppress(Exception):  # unknown model type: just no preload
        model_type = AutoConfig.from_pretrained(resolve_model_path(model_name)).model_type
        preload.append(f"transformers.models.{model_type.replace('-', '_')}."
                       f"modeling_{model_type.replace('-', '_')}")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(preload)
    return ctx


class TrialProcess:
    """The stage's handle on one trial's child process."""

    def __init__(self, context: mp.context.BaseContext, runner: Runner, hp: Any, number: int,
                 seed_number: int, slot: Slot, fault_spec: str) -> None:
        self.number = number
        here, there = context.Pipe()
        self.conn = here
        self.child = context.Process(target=_child_main,
                                     args=(there, runner, hp, number, seed_number, slot,
                                           fault_spec),
                                     daemon=True, name=f"trial-{number}")
        self.child.start()
        there.close()

    def receive(self) -> Event:
        """The next event; a child that died without a word becomes a Failed event."""
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            self.child.join(5)
            code = self.child.exitcode
            hint = " (killed: out of host memory?)" if code == -signal.SIGKILL else ""
            return Failed(f"the trial's process died with exit code {code}{hint}")

    def answer(self, prune: bool) -> None:
        with contextlib.suppress(OSError):  # the child may have died meanwhile
            self.conn.send(prune)

    def close(self, wait: float = 30.0) -> None:
        """Let a child that has said its last word exit by itself (killed while exiting, it
        would leave its semaphores to the resource tracker's "leaked" warning); kill it after
        ``wait`` seconds, at once with ``wait=0`` (the stage is stopping)."""
        self.child.join(wait)
        if self.child.is_alive():
            self.child.kill()
        self.child.join()
        self.child.close()  # releases the process's sentinel and pipe handles
        self.conn.close()


def wait_any(processes: list[TrialProcess], timeout: float) -> list[TrialProcess]:
    """The processes with an event (or an exit) to read, waiting up to ``timeout`` seconds."""
    ready = set(multiprocessing.connection.wait([p.conn for p in processes], timeout))
    return [p for p in processes if p.conn in ready]
