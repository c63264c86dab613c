"""progress: a bar on a terminal, one line per coarse item in a log, nothing for fine loops."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

from conftest import ROOT
from pipeline.progress import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_in_a_log_coarse_loops_print_one_line_per_item_and_fine_loops_nothing():
    log = io.StringIO()
    seen = []
    for epoch in progress(range(1, 3), "fold 0 epoch", plain=True, stream=log):
        for batch in progress(range(50), f"epoch {epoch}", leave=False, stream=log):
            seen.append((epoch, batch))
    assert len(seen) == 100  # every item passes through
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in log.getvalue()
    assert lines[0].startswith("fold 0 epoch 1/2 done (") and lines[1].startswith(
        "fold 0 epoch 2/2 done (")


def test_counted_by_hand_with_a_note_and_no_total():
    log = io.StringIO()
    bar = progress(desc="trials", total=5, initial=3, plain=True, stream=log)
    bar.update(1, note="trial 3 COMPLETE")
    bar.close()
    assert log.getvalue().startswith("trials 4/5 done (")
    assert log.getvalue().rstrip().endswith(", trial 3 COMPLETE)")
    log = io.StringIO()
    list(progress(iter("ab"), "posts", plain=True, stream=log))  # an iterator has no len
    assert [line.split(" (")[0] for line in log.getvalue().splitlines()] == ["posts 1 done",
                                                                             "posts 2 done"]


def test_on_a_terminal_it_is_a_tqdm_bar():
    term = _Terminal()
    assert list(progress(range(3), "folds", plain=True, stream=term)) == [0, 1, 2]
    out = term.getvalue()
    assert "folds" in out and "3/3" in out and "\r" in out and "done (" not in out


def test_a_killed_child_with_a_bar_leaks_no_semaphore(tmp_path):
    # A trial's process is killed once it has reported; tqdm's default (multiprocessing) lock
    # would then be left to the resource tracker, which warns when the stage exits.
    script = tmp_path / "kill.py"
    script.write_text(textwrap.dedent("""
        import io, multiprocessing as mp, time

        class Terminal(io.StringIO):
            def isatty(self):
                return True

        def child(conn):
            from pipeline.progress import progress
            for _ in progress(range(3), "folds", stream=Terminal()):
                pass
            conn.send("done")
            time.sleep(30)  # still exiting when the parent kills it

        if __name__ == "__main__":
            ctx = mp.get_context("forkserver")
            here, there = ctx.Pipe()
            p = ctx.Process(target=child, args=(there,), daemon=True)
            p.start()
            assert here.recv() == "done"
            p.kill()
            p.join()
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert "leaked semaphore" not in proc.stderr
