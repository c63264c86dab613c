"""Where trial processes run and how many at once: decided before the first trial.

A :class:`Slot` is one trial process's place: a set of CPU cores of its own (parallel trials never
share cores: two 2-thread jobs on 2 cores made a training step 30x slower), or a CUDA device,
which several slots may share (at once under MPS, time-sliced without it).

On a CPU every trial gets the same number of threads, the machine's cores divided by
``hpo.parallelism`` (or ``train.cpu_threads``), whatever ``hpo.n_jobs`` is: a trial's arithmetic
(the order of its sums) follows its thread count, so a trial computes the same numbers at every
n_jobs. With fewer jobs than ``parallelism`` the remaining cores stay idle. Several slots of one
process are pinned to disjoint cores; a single slot is not pinned, so that two processes on one
machine (the stage and a ``--worker``) do not share a core. On CUDA the cores are split among
the slots for their host-side work.

``hpo.n_jobs`` is a number or ``auto``, and never more than ``hpo.parallelism`` (more could not
run at once):

* on a CPU, ``auto`` is one process per core, as far as host memory allows;
* on CUDA, ``auto`` comes from a probe (:func:`gpu_jobs`): one process's footprint at the
  largest batch of the search space (CUDA context included) bounds how many fit, and processes
  are added (1, 2, 4, ...) while the aggregate training samples/s still rises by 10%.

Settings that cannot fit are refused with one line before the first trial: more CPU processes
than cores, or more memory than there is (host: the peaks this study's trials recorded, else an
estimate from the checkpoint; GPU: the probe's footprint or the recorded peaks).

Trial processes fork from a server process that has imported their code (:func:`fork_server`);
``python -m pipeline.hpo`` starts it before its own imports (:func:`start_fork_server_early`).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import multiprocessing as mp
import multiprocessing.forkserver
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from pipeline.errors import ParamsError
from pipeline.model import resolve_model_path
from pipeline.params import load_params

# A trial process may use this share of a GPU's free memory (the rest: fragmentation, other
# processes' growth between the probe and the trials).
GPU_MEMORY_SHARE = 0.9
# auto adds processes while the aggregate samples/s grows by at least this factor.
GPU_GAIN = 1.1


@dataclass(frozen=True)
class Slot:
    """Where one trial process runs: its own CPU cores, or a CUDA device (None: unchanged)."""

    index: int
    cpus: tuple[int, ...] | None = None
    cuda: int | None = None
    threads: int = 0  # torch's intra-op threads in the trial (0: one per core it may use)

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


@functools.cache  # once per process and model: the stage asks early and again at its trials
def fork_server(model_name: str) -> mp.context.BaseContext | None:
    """The context whose processes fork from a server process (Linux), the server started now
    if it is not running (a process it starts later restarts it if it died); None where there
    is none.

    The server imports pipeline.trial and the model's modeling code once, so that a trial's
    process starts with them loaded (transformers imports model code lazily, ~1 s a process).
    Those imports (~6 s on 2 cores) run beside the caller's work until its first trial starts.
    """
    if "forkserver" not in mp.get_all_start_methods():
        return None
    preload = ["pipeline.trial"]
    with contextlib.suppress(Exception):  # unknown model type: just no preload
        model_type = AutoConfig.from_pretrained(resolve_model_path(model_name)).model_type
        preload.append(f"transformers.models.{model_type.replace('-', '_')}."
                       f"modeling_{model_type.replace('-', '_')}")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(preload)
    multiprocessing.forkserver.ensure_running()
    return ctx


def start_fork_server_early() -> None:
    """``python -m pipeline.hpo``, before the stage's own imports: start the fork server of its
    trials (hpo.isolate_trials), so that both import at once and the first trial starts ~6 s
    sooner on 2 cores. Any error is left to the stage, which reports a bad params.yaml itself
    and starts the server when it needs one. The server is stopped when the stage exits."""
    with contextlib.suppress(Exception):
        params = load_params()
        if params.hpo.isolate_trials and fork_server(params.model.name) is not None:
            atexit.register(_stop_fork_server)


def _stop_fork_server() -> None:
    """Kill this process's fork server. At the stage's exit it has nothing left to fork, and one
    still importing (no trial to run, or the stage failed first) would outlive the stage by
    seconds, holding its output open. The pid is a private attribute of CPython's server."""
    pid = getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)
    if pid:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def available_memory_mb() -> float | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return None


def estimate_trial_mb(model_name: str) -> float:
    """Host memory one CPU trial needs, before any trial has measured it: weights, gradients and
    two AdamW moments (4x the checkpoint), plus ~1 GiB of runtime (torch, tokens, activations)."""
    path = Path(resolve_model_path(model_name))
    weights = sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin")
                  for f in path.glob(pattern)) if path.is_dir() else 0
    return 4 * weights / 2**20 + 1024


def mps_running() -> bool:
    """True when an NVIDIA MPS control daemon listens (its pipe directory holds ``control``):
    CUDA processes then share the GPU at once instead of taking turns."""
    pipes = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    return Path(pipes, "control").exists()


def use_cuda(train_device: str) -> bool:
    import torch

    if train_device == "cuda" and not torch.cuda.is_available():
        raise ParamsError("params.yaml: train.device is 'cuda' but no CUDA device is available "
                          "(use auto or cpu)")
    return train_device != "cpu" and torch.cuda.is_available()


def cuda_devices(devices: str | list[int]) -> list[int]:
    """hpo.devices as CUDA device indices, checked against this machine."""
    import torch

    count = torch.cuda.device_count()
    gpus = list(range(count)) if devices == "auto" else list(devices)
    bad = [g for g in gpus if g >= count]
    if bad:
        raise ParamsError(f"params.yaml: hpo.devices: no CUDA device {bad[0]}; this machine "
                          f"has {count} (0..{count - 1})")
    return gpus


def cores_per_trial(parallelism: int, cpu_threads: int) -> int:
    """The cores (and threads) of one trial process on a CPU: train.cpu_threads, else the cores
    split evenly among hpo.parallelism trials."""
    return cpu_threads or max(1, len(os.sched_getaffinity(0)) // parallelism)


def cpu_jobs(parallelism: int, cpu_threads: int, trial_mb: float) -> int:
    """``auto`` on a CPU: as many processes as the cores hold, at most hpo.parallelism, as
    host memory allows."""
    size = cores_per_trial(parallelism, cpu_threads)
    n = max(1, min(parallelism, len(os.sched_getaffinity(0)) // size))
    available = available_memory_mb()
    if available is not None:
        n = min(n, max(1, int(available // trial_mb)))
    return n


def gpu_jobs(measure: Callable[[int], list[dict[str, float]]], free_mb: float,
             limit: int) -> tuple[int, list[dict[str, Any]]]:
    """``auto`` on one GPU: processes per GPU, and what the probe measured.

    ``measure(n)`` runs n probe processes together and returns each one's samples/s and
    footprint (MB of device memory, context included; only the single-process run's counts).
    Memory bounds n (each process may take GPU_MEMORY_SHARE of the free memory / n); within that
    and ``limit``, n doubles while the aggregate samples/s grows by GPU_GAIN; a round that fails
    (a process out of memory) ends the search."""
    one = measure(1)
    footprint = one[0]["footprint_mb"]
    fit = max(1, int(GPU_MEMORY_SHARE * free_mb // footprint))
    trace = [{"processes": 1, "samples_per_second": one[0]["samples_per_second"],
              "footprint_mb": footprint}]
    best_n, best = 1, one[0]["samples_per_second"]
    n = 1
    while n < min(fit, limit):
        n = min(2 * n, fit, limit)
        try:
            rate = sum(r["samples_per_second"] for r in measure(n))
        except ChildProcessError as err:  # e.g. out of memory: n does not fit
            trace.append({"processes": n, "failed": str(err)})
            break
        trace.append({"processes": n, "samples_per_second": rate})
        if rate < GPU_GAIN * best:
            break
        best_n, best = n, rate
    return best_n, trace


def plan_slots(n_jobs: int, parallelism: int, devices: str | list[int], train_device: str,
               cpu_threads: int, trial_mb: float, trial_gpu_mb: float | None) -> list[Slot]:
    """The ``n_jobs`` slots for hpo.devices, or a ParamsError when they cannot fit this machine.

    ``trial_mb`` / ``trial_gpu_mb``: what one trial process needs of host / GPU memory (the
    largest peak this study recorded, the probe's footprint, or an estimate; None: unknown).
    """
    if devices != "auto" and not use_cuda(train_device):
        raise ParamsError(f"params.yaml: hpo.devices: {devices} names CUDA devices, but none is "
                          "available (use auto)")
    if use_cuda(train_device):
        import torch

        gpus = cuda_devices(devices)
        threads = max(1, len(os.sched_getaffinity(0)) // n_jobs)
        slots = [Slot(i, cuda=gpus[i % len(gpus)], threads=threads) for i in range(n_jobs)]
        if trial_gpu_mb is not None:
            for gpu in set(gpus):
                share = sum(s.cuda == gpu for s in slots)
                free, _ = torch.cuda.mem_get_info(gpu)
                free /= 2**20
                if share * trial_gpu_mb > GPU_MEMORY_SHARE * free:
                    raise ParamsError(
                        f"params.yaml: hpo.n_jobs: {share} trials on cuda:{gpu} need about "
                        f"{share * trial_gpu_mb:,.0f} MB ({trial_gpu_mb:,.0f} MB each), the "
                        f"device has {free:,.0f} MB free; lower hpo.n_jobs (or use auto), or "
                        "add devices")
        return slots
    cores = sorted(os.sched_getaffinity(0))
    size = cores_per_trial(parallelism, cpu_threads)
    if n_jobs * size > len(cores):
        what = (f"train.cpu_threads: {n_jobs} trials x {cpu_threads} threads exceed" if cpu_threads
                else f"hpo.n_jobs: {n_jobs} trials at once need {n_jobs * size} CPU cores,")
        raise ParamsError(
            f"params.yaml: {what} the {len(cores)} cores this process may use; parallel trials "
            "must not share cores (lower hpo.n_jobs" + (", or set train.cpu_threads: 0)"
                                                        if cpu_threads else ")"))
    available = available_memory_mb()
    if available is not None and n_jobs * trial_mb > available:
        raise ParamsError(
            f"params.yaml: hpo.n_jobs: {n_jobs} trials at once need about "
            f"{n_jobs * trial_mb:,.0f} MB of memory ({trial_mb:,.0f} MB each), "
            f"{available:,.0f} MB are available; lower hpo.n_jobs")
    if n_jobs == 1:
        return [Slot(0, threads=size)]
    return [Slot(i, cpus=tuple(cores[i * size:(i + 1) * size]), threads=size)
            for i in range(n_jobs)]
