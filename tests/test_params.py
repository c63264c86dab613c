"""params.yaml validation: every bad value is named, with the valid alternatives."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from conftest import ROOT, apply_overrides, load_yaml
from pipeline.params import (
    HYPERPARAMETERS,
    LOSSES,
    Hyperparameters,
    ModelParams,
    ParamsError,
    TrainParams,
    YamlLoader,
    load_params,
    parse_params,
)


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
         "got the string '2e-5', expected a number (a number in quotes is a string: write 2e-5 "
         "without them)"),
        ({"hpo.search_space.loss_function": "hinge"},
         "got 'hinge', expected one of 'weighted_ce', 'focal'"),
        ({"hpo.search_space.loss_function": {"type": "categorical", "choices": ["focal", "l1"]}},
         "loss_function.choices[1]: got 'l1', expected one of 'weighted_ce', 'focal'"),
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
        # strict types: a bool is not an int, a string is not a number, inf is not a value
        ({"hpo.n_trials": True}, "hpo.n_trials: got True, expected int"),
        ({"seed": 1.5}, "seed: got 1.5, expected int"),
        ({"prepare.test_size": "0.2"},
         "prepare.test_size: got the string '0.2', expected a number"),
        ({"train.compile": 1}, "train.compile: got 1, expected bool"),
        ({"hpo.pruner.percentile": float("inf")},
         "hpo.pruner.percentile: must be a finite number, got inf"),
        ({"hpo.search_space.per_device_train_batch_size": 8.0},
         "per_device_train_batch_size: got 8.0, expected int"),
        ({"hpo.search_space.focal_alpha": 1.5}, "focal_alpha must be <= 1.0, got 1.5"),
        ({"registry": "x"}, "registry: expected a mapping, got 'x'"),
        ({"hpo.storage": 5}, "hpo.storage: got 5, expected str or null"),
        # the keys added since the first version of this loader
        ({"train.precision": "int8"},
         "train.precision: got 'int8', expected one of 'auto', 'fp32', 'bf16', 'fp16'"),
        ({"hpo.n_jobs": 0}, "hpo.n_jobs: must be >= 1"),
        ({"hpo.n_jobs": 2, "hpo.isolate_trials": False},
         "hpo.n_jobs: parallel trials run in child processes: needs hpo.isolate_trials: true"),
        ({"hpo.devices": "all"}, "hpo.devices: got 'all', expected one of 'auto' or a list"),
        ({"hpo.devices": []}, "hpo.devices: must be auto or a non-empty list"),
        ({"hpo.devices": [-1]}, "hpo.devices: must be auto or a non-empty list"),
        ({"hpo.devices": [0, 0]}, "hpo.devices: has duplicates"),
        ({"registry.model_name": " "}, "registry.model_name: must not be empty"),
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


@pytest.mark.parametrize(
    ("section", "key", "valid"),
    [
        ("", "ntrials", "valid keys under the top level: seed, paths, prepare, model, train, hpo"),
        ("hpo.sampler", "seed", "valid keys under hpo.sampler: name, n_startup_trials"),
        ("hpo.search_space.learning_rate", "step",
         "valid keys under hpo.search_space.learning_rate: type, low, high, log, choices, when"),
    ],
)
def test_unknown_keys_at_every_depth(raw, section, key, valid):
    node = raw
    for part in filter(None, section.split(".")):
        node = node[part]
    node[key] = 1
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    dotted = f"{section}.{key}" if section else key
    assert str(err.value).startswith(f"params.yaml: unknown key '{dotted}'; {valid}")


def test_missing_key_is_named(raw):
    del raw["registry"]["model_name"]
    with pytest.raises(ParamsError, match="^params.yaml: missing key 'registry.model_name'$"):
        parse_params(raw)


def test_ints_are_floats_and_range_types_are_kept(raw):
    # an int is a fine float (stored as float); an int range keeps int bounds: both go into the
    # study's fingerprint, so 25 and 25.0 must not name two different studies
    raw["hpo"]["pruner"]["percentile"] = 25
    raw["export_best"]["k"] = 1
    raw["hpo"]["search_space"]["weight_decay"] = 0
    raw["hpo"]["search_space"]["num_train_epochs"] = {"type": "int", "low": 1, "high": 3}
    params = parse_params(raw)
    assert type(params.hpo.pruner.percentile) is float and params.hpo.pruner.percentile == 25.0
    assert type(params.export_best.k) is float
    assert type(params.hpo.search_space["weight_decay"].value) is float
    epochs = params.hpo.search_space["num_train_epochs"]
    assert (type(epochs.low), type(epochs.high)) == (int, int)


def test_sections_are_frozen_and_check_on_construction():
    params = load_params(ROOT / "params.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.train.device = "cpu"  # type: ignore[misc]
    # dataclasses.replace (as the tests and stages use it) validates like the file does
    with pytest.raises(ParamsError, match="^params.yaml: hpo.n_trials: must be >= 1$"):
        dataclasses.replace(params.hpo, n_trials=0)
    with pytest.raises(ParamsError, match="^params.yaml: train.device: got 'tpu', expected one"):
        TrainParams(negatives_per_positive=1, eval_batch_size=8, max_device_batch_size=8,
                    early_stopping_patience=0, cpu_threads=0, device="tpu")
    with pytest.raises(ParamsError, match="^params.yaml: missing key 'model.max_length'$"):
        ModelParams(name="bert")
    assert dataclasses.asdict(ModelParams(name="bert", max_length=32)) == {
        "name": "bert", "max_length": 32, "num_hidden_layers": None}


def test_hyperparameter_names_are_defined_once():
    params = load_params(ROOT / "params.yaml")
    names = [f.name for f in dataclasses.fields(Hyperparameters)]
    assert list(HYPERPARAMETERS) == names == list(params.hpo.search_space)
    assert HYPERPARAMETERS["per_device_train_batch_size"] is int
    assert HYPERPARAMETERS["loss_function"] is str and LOSSES == ("weighted_ce", "focal")
    hp = Hyperparameters(learning_rate=1e-4, per_device_train_batch_size=8, num_train_epochs=2,
                         warmup_ratio=0.0, weight_decay=0.0, loss_function="weighted_ce")
    assert hash(hp) == hash(dataclasses.replace(hp))
    assert "focal_gamma" not in hp.as_dict()
    assert dataclasses.replace(hp, loss_function="focal").as_dict()["focal_alpha"] == 0.25


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


@pytest.mark.parametrize(("text", "value"), [("2e-5", 2e-5), ("1.5e5", 1.5e5), ("-3E+2", -300.0),
                                            ("2.0e-5", 2e-5), ("'2e-5'", "2e-5"), ("2", 2)])
def test_exponent_floats_without_a_dot_are_floats(text, value):
    loaded = yaml.load(f"x: {text}", Loader=YamlLoader)["x"]
    assert loaded == value and type(loaded) is type(value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")


def test_parallelism_and_n_jobs(raw):
    # auto: as many trial processes as the machine fits (hpo.py caps them at hpo.parallelism)
    params = parse_params(apply_overrides(raw, {"hpo.n_jobs": "auto", "hpo.parallelism": 1}))
    assert (params.hpo.n_jobs, params.hpo.parallelism) == ("auto", 1)
    params = parse_params(apply_overrides(raw, {"hpo.n_jobs": 3, "hpo.parallelism": 4}))
    assert (params.hpo.n_jobs, params.hpo.parallelism) == (3, 4)
    with pytest.raises(ParamsError, match="^" + re.escape(
            "params.yaml: hpo.n_jobs: 2 trials at once need hpo.parallelism >= 2 (it is 1: "
            "at most 1 trial of the study runs at once)") + "$"):
        parse_params(apply_overrides(raw, {"hpo.n_jobs": 2, "hpo.parallelism": 1}))
    with pytest.raises(ParamsError, match="^params.yaml: hpo.parallelism: must be >= 1$"):
        parse_params(apply_overrides(raw, {"hpo.parallelism": 0}))
    with pytest.raises(ParamsError, match="^params.yaml: hpo.n_jobs: must be >= 1 or auto$"):
        parse_params(apply_overrides(raw, {"hpo.n_jobs": 0, "hpo.parallelism": 2}))
    with pytest.raises(ParamsError, match="^params.yaml: hpo.n_jobs: got 'all', expected int or"):
        parse_params(apply_overrides(raw, {"hpo.n_jobs": "all"}))
    # replace() checks the same way (stages and tests build variants of params with it)
    with pytest.raises(ParamsError, match="hpo.n_jobs: 4 trials at once need hpo.parallelism"):
        dataclasses.replace(params.hpo, n_jobs=4, parallelism=3)
