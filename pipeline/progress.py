"""Progress reporting that suits both a terminal and a log file.

On a terminal (stderr is a TTY) ``progress`` is a tqdm bar. Otherwise (``dvc repro`` in CI, output
redirected to a file) bars would print hundreds of carriage-return lines, so it prints one plain
line per finished item for the coarse loops only: the caller passes ``plain=True`` for the loops
worth a line each (epochs, folds, trials) and leaves it False for the fine ones (batches), which
then print nothing. No torch here.

    for epoch in progress(range(1, n + 1), "fold 0 epoch", plain=True):
        for batch in progress(batches, f"epoch {epoch}", leave=False):
            ...
    bar = progress(desc="trials", total=10, initial=3, plain=True)   # counted by hand
    bar.update(1, note="trial 3 COMPLETE")
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO


def _tqdm() -> type:
    """tqdm with a thread lock. Its default lock holds a multiprocessing semaphore; a trial's
    child process killed before its exit handlers run leaves that semaphore behind, and the stage
    ends with "resource_tracker: There appear to be N leaked semaphore objects". The bars of one
    process never need a lock shared with other processes."""
    from tqdm.auto import tqdm

    if not isinstance(getattr(tqdm, "_lock", None), type(threading.RLock())):
        tqdm.set_lock(threading.RLock())
    return tqdm


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """A tqdm bar on a TTY; elsewhere one line per finished item (``plain``) or silence."""

    def __init__(self, iterable: Iterable | None, desc: str, total: int | None, leave: bool,
                 plain: bool, initial: int, stream: TextIO | None) -> None:
        self.iterable, self.desc, self.plain = iterable, desc, plain
        self.stream = stream if stream is not None else sys.stderr
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.total, self.n, self.note = total, initial, ""
        self.start = time.perf_counter()
        self.bar = None
        if _is_tty(self.stream):
            self.bar = _tqdm()(iterable, desc=desc, total=total, leave=leave, initial=initial,
                            file=self.stream, dynamic_ncols=True)

    def __iter__(self) -> Iterator[Any]:
        if self.bar is not None:
            yield from self.bar
            return
        for item in self.iterable if self.iterable is not None else ():
            yield item  # the line below prints once the caller's loop body is done
            self.update(1)

    def update(self, n: int = 1, note: str | None = None) -> None:
        """Count ``n`` finished items (for a bar counted by hand); ``note`` ends the line."""
        if note is not None:
            self.set_postfix_str(note)
        if self.bar is not None:
            self.bar.update(n)
            return
        self.n += n
        if self.plain:
            of = f"/{self.total}" if self.total is not None else ""
            note = f", {self.note}" if self.note else ""
            elapsed = time.perf_counter() - self.start
            print(f"{self.desc} {self.n}{of} done ({elapsed:.1f} s{note})", file=self.stream,
                  flush=True)

    def set_postfix_str(self, note: str) -> None:
        """Text shown after the bar, or at the end of the next plain line."""
        self.note = note
        if self.bar is not None:
            self.bar.set_postfix_str(note)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(iterable: Iterable | None = None, desc: str = "", total: int | None = None,
             leave: bool = True, plain: bool = False, initial: int = 0,
             stream: TextIO | None = None) -> Progress:
    """Wrap ``iterable`` (or count by hand with ``update``); see the module docstring."""
    return Progress(iterable, desc, total, leave, plain, initial, stream)
