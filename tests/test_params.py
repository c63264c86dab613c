"""params.yaml validation: every bad value is named, with the valid alternatives."""

from __future__ import annotations

import pytest

from conftest import ROOT, apply_overrides, load_yaml
from pipeline.params import ParamsError, load_params, parse_params


def test_repository_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.hpo.search_space["focal_gamma"].when == {"loss_function": "focal"}
    assert params.hpo.search_space["per_device_train_batch_size"].type == "fixed"


@pytest.fixture
def raw():
    return load_yaml(ROOT / "params.yaml")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hpo.n_trials": "five"}, "hpo.n_trials: got 'five', expected int"),
        ({"hpo.n_trials": 0}, "hpo.n_trials: must be >= 1"),
        ({"hpo.metric": "accuracy"}, "hpo.metric: got 'accuracy', expected one of 'macro_f1'"),
        ({"hpo.fold_aggregation": "sum"}, "hpo.fold_aggregation: got 'sum'"),
        ({"hpo.sampler.name": "cmaes"}, "hpo.sampler.name: got 'cmaes', expected one of 'tpe'"),
        ({"hpo.pruner.name": "hyperband"}, "hpo.pruner.name: got 'hyperband'"),
        ({"hpo.pruner.percentile": 100.0}, "hpo.pruner.percentile: must be between 0 and 100"),
        ({"prepare.n_folds": 1}, "prepare.n_folds: must be at least 2"),
        ({"prepare.test_size": 1.5}, "prepare.test_size: must be in (0, 1)"),
        ({"hpo.search_space.learning_rate": {"type": "float", "low": 1.0e-3, "high": 1.0e-5}},
         "hpo.search_space.learning_rate: low (0.001) > high (1e-05)"),
        ({"hpo.search_space.learning_rate": 0.0}, "learning_rate must be > 0.0"),
        ({"hpo.search_space.learning_rate": {"type": "float", "low": -1.0, "high": 1.0e-5}},
         "learning_rate must be > 0.0"),
        ({"hpo.search_space.learning_rate": {"type": "float", "low": "2e-5", "high": 1.0e-4}},
         "write 2.0e-5"),
        ({"hpo.search_space.loss_function": "hinge"}, "got 'hinge', expected one of weighted_ce"),
        ({"hpo.search_space.loss_function": {"type": "categorical", "choices": ["focal", "l1"]}},
         "unknown loss ['l1']"),
        ({"hpo.search_space.num_train_epochs": {"type": "float", "low": 1.0, "high": 2.0}},
         "num_train_epochs is an int: use type: int"),
        ({"hpo.search_space.num_train_epochs": {"type": "int", "low": 1, "high": 3,
                                                "choices": [1]}},
         "choices: only for type: categorical"),
        ({"hpo.search_space.focal_gamma": {"type": "float", "low": 1.0, "high": 3.0,
                                           "when": {"loss_function": "hinge"}}},
         "loss_function can never be 'hinge'"),
        ({"model.name": ""}, "model.name: must not be empty"),
        ({"train.device": "tpu"}, "train.device: got 'tpu'"),
    ],
)
def test_bad_values_are_named(raw, overrides, message):
    with pytest.raises(ParamsError) as err:
        parse_params(apply_overrides(raw, overrides))
    assert message in str(err.value)


def test_unknown_key_names_it_and_lists_the_valid_ones(raw):
    # what `dvc exp run -S +hpo.ntrials=5` leaves in params.yaml
    raw["hpo"]["ntrials"] = 5
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert "unknown key 'hpo.ntrials'" in str(err.value)
    assert "n_trials" in str(err.value)


def test_unknown_and_missing_hyperparameters(raw):
    raw["hpo"]["search_space"]["dropout"] = 0.1
    with pytest.raises(ParamsError, match="unknown key 'hpo.search_space.dropout'"):
        parse_params(raw)
    del raw["hpo"]["search_space"]["dropout"]
    del raw["hpo"]["search_space"]["warmup_ratio"]
    with pytest.raises(ParamsError, match="missing key 'hpo.search_space.warmup_ratio'"):
        parse_params(raw)


def test_exponent_floats_as_dvc_writes_them(tmp_path):
    # `dvc exp run -S ...low=0.00001` rewrites params.yaml as `low: 1e-05` (no dot), which
    # plain PyYAML reads as a string; the loader must read it as the float it is.
    text = (ROOT / "params.yaml").read_text(encoding="utf-8")
    text = text.replace("low: 3.0e-5", "low: 1e-05")
    assert "low: 1e-05" in text
    (tmp_path / "params.yaml").write_text(text, encoding="utf-8")
    params = load_params(tmp_path / "params.yaml")
    assert params.hpo.search_space["learning_rate"].low == 1e-05


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
