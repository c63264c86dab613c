"""Progress reporting that suits both a terminal and a log file: tqdm with ``disable=None``.

On a terminal (the stream, stderr by default, is a TTY) ``progress`` is a tqdm bar. Otherwise
(``dvc repro`` in CI, output redirected to a file) tqdm disables itself, as ``disable=None``
makes it do, since a bar would print hundreds of carriage-return lines; then the loops the caller
marks ``plain=True`` (the coarse ones: epochs, folds, trials) print one plain line per finished
item, and the others (batches) print nothing. No torch here.

    for epoch in progress(range(1, n + 1), "fold 0 epoch", plain=True):
        for batch in progress(batches, f"epoch {epoch}", leave=False):
            ...
    bar = progress(desc="trials", total=10, initial=3, plain=True)   # counted by hand
    bar.update(1, note="trial 3 COMPLETE")   # log: "trials 4/10 done (12.3 s, trial 3 COMPLETE)"
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm.std import tqdm


class Progress(tqdm):
    """A tqdm bar on a TTY; elsewhere one line per finished item (``plain``) or silence."""

    # A thread lock, not tqdm's default: that one holds a multiprocessing semaphore, and a trial's
    # child process killed before its exit handlers run leaves it behind ("resource_tracker: There
    # appear to be N leaked semaphore objects"). The bars of one process never share a lock with
    # other processes.
    _lock = threading.RLock()
    # No monitor thread (it exists to redraw a bar whose adaptive `miniters` skipped a slow
    # item; miniters=1 below never skips one) and so no extra thread in every trial process.
    monitor_interval = 0

    def __init__(self, iterable: Iterable | None = None, desc: str = "",
                 total: int | None = None, leave: bool = True, plain: bool = False,
                 initial: int = 0, stream: TextIO | None = None) -> None:
        self.plain, self.note = plain, ""
        self.stream = stream if stream is not None else sys.stderr
        self.started = time.perf_counter()
        super().__init__(iterable, desc=desc, total=total, leave=leave, initial=initial,
                         file=self.stream, dynamic_ncols=True, miniters=1, disable=None)
        self.desc = desc  # a disabled tqdm keeps no description; the plain lines need it

    def __iter__(self) -> Iterator[Any]:
        if not (self.disable and self.plain):
            yield from super().__iter__()
            return
        for item in self.iterable if self.iterable is not None else ():
            yield item  # the line below prints once the caller's loop body is done
            self.update(1)

    def update(self, n: int = 1, note: str | None = None) -> bool | None:
        """Count ``n`` finished items (for a bar counted by hand); ``note`` ends the line."""
        if note is not None:
            self.set_postfix_str(note, refresh=False)
        if not self.disable:
            return super().update(n)
        self.n += n  # a disabled tqdm counts nothing itself
        if self.plain:
            of = f"/{self.total}" if self.total is not None else ""
            note = f", {self.note}" if self.note else ""
            elapsed = time.perf_counter() - self.started
            print(f"{self.desc} {self.n}{of} done ({elapsed:.1f} s{note})", file=self.stream,
                  flush=True)
        return None

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """Text shown after the bar, or at the end of the next plain line."""
        self.note = str(s)
        super().set_postfix_str(s, refresh=refresh)


def progress(iterable: Iterable | None = None, desc: str = "", total: int | None = None,
             leave: bool = True, plain: bool = False, initial: int = 0,
             stream: TextIO | None = None) -> Progress:
    """Wrap ``iterable`` (or count by hand with ``update``); see the module docstring."""
    return Progress(iterable, desc, total, leave, plain, initial, stream)
