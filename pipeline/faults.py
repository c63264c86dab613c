"""Fault injection for tests: make a chosen trial fail the way real trials fail.

Set ``PIPELINE_FAULT`` to ``<kind>@trial=<n>[,fold=<k>][,step=<s>]`` (several separated by ``;``):

* ``oom``   raise ``torch.cuda.OutOfMemoryError`` (what a too-large batch does on a GPU)
* ``nan``   make the loss NaN (the engine reports "non-finite loss at step N")
* ``error`` raise a RuntimeError
* ``kill``  SIGKILL the process that trains (the trial's child process, or the worker)
* ``hang``  sleep for an hour (a worker to be killed from outside while its trial is RUNNING)
* ``delay`` sleep ``ms`` milliseconds, then go on (parallel trials finishing in another order)

``trial=-1`` matches every trial.

An environment variable rather than a param: it is for tests, is never part of an experiment, and
DVC does not track it. Unset, nothing happens.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import torch

ENV = "PIPELINE_FAULT"
KINDS = ("oom", "nan", "error", "kill", "hang", "delay")


@dataclass(frozen=True)
class Fault:
    kind: str
    trial: int
    fold: int = 0
    step: int = 1
    ms: int = 0  # delay only

    def __call__(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """Called by the engine at every optimizer step of the targeted fold (its ``fault``)."""
        if step != self.step:
            return loss
        if self.kind == "oom":
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory (simulated by {ENV} at step {step})")
        if self.kind == "error":
            raise RuntimeError(f"injected failure ({ENV} at step {step})")
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "hang":
            time.sleep(3600)
        if self.kind == "delay":
            time.sleep(self.ms / 1000)
            return loss
        return loss * float("nan")


def parse(spec: str) -> list[Fault]:
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        kind, _, args = item.partition("@")
        if kind not in KINDS or not args:
            raise ValueError(f"{ENV}: cannot parse {item!r}; expected e.g. oom@trial=1,fold=0")
        fields = dict(part.split("=", 1) for part in args.split(","))
        faults.append(Fault(kind, **{k: int(v) for k, v in fields.items()}))
    return faults


def for_fold(trial: int, fold: int, spec: str | None = None) -> Fault | None:
    """The fault planned for this trial (its index) and fold, if any (``spec``: default the
    environment; a trial's process gets the stage's, since the fork server's may be older)."""
    for fault in parse(os.environ.get(ENV, "") if spec is None else spec):
        if fault.trial in (trial, -1) and fault.fold == fold:
            return fault
    return None
