"""Profiles: validated overrides, and a fresh experiment name so a profile can run twice."""

from __future__ import annotations

import sys

import pytest

from conftest import dump_yaml, run
from pipeline import profiles


def test_fresh_name_skips_the_taken_ones():
    assert profiles.fresh_name("quick", set()) == "quick"
    assert profiles.fresh_name("quick", {"quick", "full"}) == "quick-2"
    assert profiles.fresh_name("quick", {"quick", "quick-2", "quick-4"}) == "quick-3"


@pytest.mark.slow
def test_a_profile_runs_twice_as_two_experiments_and_name_passes_through(repo_copy):
    repo = repo_copy
    dump_yaml(repo / "profiles" / "tiny.yaml", {"prepare.test_size": 0.3})
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "tiny profile"], repo)
    profile = [sys.executable, "-m", "pipeline.profiles", "tiny"]
    for _ in range(2):
        run([*profile, "prepare"], repo)  # extra arguments go to dvc exp run: one stage
    printed = run([*profile, "--print"], repo).stdout
    assert "dvc exp run -n tiny-3 -S prepare.test_size=0.3" in printed
    run([*profile, "--name", "mine", "prepare"], repo)
    names = run(["dvc", "exp", "list", "--name-only"], repo).stdout.split()
    assert sorted(names) == ["mine", "tiny", "tiny-2"]
    # an explicit name is the user's choice: DVC refuses it the second time
    again = run([*profile, "--name", "mine", "prepare"], repo, check=False)
    assert again.returncode != 0
