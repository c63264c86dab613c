"""Typed, validated view of ``params.yaml`` (what each key means: the comments there).

Every stage calls :func:`load_params`: pydantic checks the file against the frozen dataclasses
below (strict types, ``Field`` ranges, no unknown keys, checks across keys in ``__post_init__``)
and the first problem becomes one line that names the key (``pipeline/validation.py``), so a
typo such as ``dvc exp run -S hpo.ntrials=5`` fails loudly. Building a section, or
``dataclasses.replace`` on one, checks the same way. Section ``paths`` writes every file name
once (dvc.yaml: ``${paths.*}``).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import pydantic
import yaml
from pydantic import Field, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic.dataclasses import dataclass as pydantic_dataclass

# ParamsError and PARAMS_FILE: stages import them from here
from pipeline.errors import ParamsError
from pipeline.validation import CONFIG, PARAMS_FILE, check, naming, section

Metric = Literal["macro_f1", "pos_f1", "roc_auc", "pr_auc"]
METRICS: tuple[str, ...] = typing.get_args(Metric)
# The decision threshold when none is tuned (export_best.threshold: default, or a check failed).
THRESHOLD = 0.5
# The work a validation counts on the hpo stage's virtual clock (pipeline/study.py): one unit per
# this many pairs. A constant, not train.eval_batch_size, which is not part of the study.
VALIDATION_UNIT = 256


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but ``1e-05`` and ``1.5e5`` are floats (YAML 1.2): ``dvc exp run
    -S x=0.00001`` writes ``x: 1e-05``, which plain PyYAML (YAML 1.1) reads as a string."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    """What a trial chooses. The ``Field`` ranges bind every value of ``hpo.search_space``; one
    built in code is not checked (tests probe divergence with lr 1e30)."""

    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)]
    per_device_train_batch_size: Annotated[int, Field(ge=1)]
    num_train_epochs: Annotated[int, Field(ge=1)]
    warmup_ratio: Annotated[float, Field(ge=0.0, le=1.0)]
    weight_decay: Annotated[float, Field(ge=0.0)]
    loss_function: Literal["weighted_ce", "focal"]
    focal_gamma: Annotated[float, Field(ge=0.0)] = 2.0
    focal_alpha: Annotated[float, Field(ge=0.0, le=1.0)] = 0.25

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.loss_function != "focal":  # not used, not reported
            del d["focal_gamma"], d["focal_alpha"]
        return d


# Each hyperparameter's type, its plain Python type, and a check of a value against its type and
# range (strict: a string is not a number and a bool is not an int; an int is a fine float).
_HP_TYPES: dict[str, Any] = typing.get_type_hints(Hyperparameters)
HYPERPARAMETERS: dict[str, type] = {
    name: type(typing.get_args(tp)[0]) if typing.get_origin(tp) is Literal else tp
    for name, tp in _HP_TYPES.items()
}
LOSSES: tuple[str, ...] = typing.get_args(_HP_TYPES["loss_function"])
_STRICT = pydantic.ConfigDict(strict=True, allow_inf_nan=False)
_HP_VALUES = {name: pydantic.TypeAdapter(tp, config=_STRICT) for name, tp in
              typing.get_type_hints(Hyperparameters, include_extras=True).items()}

_Count = Annotated[StrictInt, Field(ge=0)]
_Positive = Annotated[StrictInt, Field(ge=1)]
_Name = Annotated[StrictStr, Field(pattern=r"\S", description="must not be empty")]


# Every file the pipeline reads or writes: a section of strings (dvc.yaml reads ${paths.*}).
_PATHS = ["data_dir", "posts", "annotations", "criteria", "pairs", "splits", "study_db",
          "study_store", "trials", "fold_metrics", "study_summary", "importance", "pareto",
          "optuna_plots", "hpo_history_plot", "hpo_importance_plot", "hpo_folds_plot",
          "best_params", "model_dir", "data_metrics", "data_summary", "hpo_metrics",
          "eval_metrics", "pr_curve", "roc_curve", "confusion", "predictions"]
Paths = section("paths")(type("Paths", (), {"__annotations__": dict.fromkeys(_PATHS, StrictStr),
                                             "__module__": __name__}))


@section("prepare")
class PrepareParams:
    test_size: Annotated[StrictFloat, Field(gt=0, lt=1, description="must be in (0, 1)")]
    n_folds: Annotated[StrictInt, Field(ge=2, description="must be at least 2")]


@section("model")
class ModelParams:
    name: _Name
    max_length: Annotated[StrictInt, Field(ge=16, description="must be at least 16")]
    num_hidden_layers: Annotated[
        StrictInt | None, Field(ge=1, description="must be >= 1 or null")] = None


@section("train")
class TrainParams:
    negatives_per_positive: _Count
    eval_batch_size: _Positive
    max_device_batch_size: _Positive
    early_stopping_patience: _Count
    cpu_threads: Annotated[_Count, Field(description="must be >= 0 (0: all cores)")]
    device: Literal["auto", "cpu", "cuda"]
    compile: StrictBool = False
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"


@section("hpo.sampler")
class SamplerParams:
    name: Literal["tpe", "random"]
    n_startup_trials: _Count
    multivariate: StrictBool
    group: StrictBool
    constant_liar: StrictBool

    def __post_init__(self) -> None:
        check(not self.group or self.multivariate, "hpo.sampler.group",
               "needs hpo.sampler.multivariate: true")


@section("hpo.pruner")
class PrunerParams:
    name: Literal["median", "percentile", "none"]
    n_startup_trials: _Count
    n_warmup_steps: _Count
    percentile: Annotated[StrictFloat, Field(
        gt=0, lt=100, description="must be between 0 and 100 (exclusive), got {value}")]
    report: Literal["fold", "epoch"]


@dataclasses.dataclass(frozen=True)
class SearchParam:
    """One hyperparameter, searched or fixed; built by :func:`_search_param` (checks nothing)."""

    name: str
    type: Literal["float", "int", "categorical", "fixed"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    value: Any = None
    when: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def searched(self) -> bool:
        return self.type != "fixed"


@pydantic_dataclass(frozen=True, config=CONFIG)
class _SearchSpec:
    """A search-space entry as a mapping. One class, not a union per type, so a misplaced key
    (``choices`` of a float range) is named as such and an unknown key lists every key."""

    type: Literal["float", "int", "categorical"]
    low: Any = None  # checked against the hyperparameter's type and range
    high: Any = None
    log: StrictBool = False
    choices: list[Any] | None = None
    when: dict[str, Any] | None = None


@section("hpo")
class HpoParams:
    n_trials: _Positive
    metric: Metric
    fold_aggregation: Literal["mean", "median", "min", "max"]
    storage: StrictStr | None
    study_prefix: _Name
    max_failures: _Count
    max_retries: _Count
    heartbeat_interval: Annotated[_Positive, Field(description="must be >= 1 (seconds)")]
    grace_period: StrictInt
    isolate_trials: StrictBool
    importance_evaluator: Literal["fanova", "ped_anova", "mean_decrease_impurity"]
    mlflow_experiment: StrictStr
    sampler: SamplerParams
    pruner: PrunerParams
    search_space: dict[str, SearchParam]
    objectives: list[Literal["epochs", "fold_fit_seconds"]] = dataclasses.field(
        default_factory=list)
    warm_start: StrictStr | None = None
    warm_start_trials: _Positive = 3
    parallelism: _Positive = 1  # part of the study; n_jobs and devices are not
    n_jobs: Annotated[_Positive | Literal["auto"], Field(description="must be >= 1 or auto")] = 1
    devices: Literal["auto"] | list[StrictInt] = "auto"

    @pydantic.field_validator("search_space", mode="before")
    @classmethod
    def _parse_search_space(cls, raw: Any) -> dict[str, SearchParam]:
        return _search_space(raw, "hpo.search_space")

    def __post_init__(self) -> None:
        jobs, par, devices, storage = self.n_jobs, self.parallelism, self.devices, self.storage
        check(jobs == 1 or self.isolate_trials, "hpo.n_jobs",
               "parallel trials run in child processes: needs hpo.isolate_trials: true")
        check(jobs == "auto" or jobs <= par, "hpo.n_jobs", f"{jobs} trials at once need "
               f"hpo.parallelism >= {jobs} (it is {par}: at most {par} trial"
               f"{'s' if par > 1 else ''} of the study run{'' if par > 1 else 's'} at once)")
        check(devices == "auto" or (bool(devices) and min(devices) >= 0), "hpo.devices",
               "must be auto or a non-empty list of CUDA device indices")
        check(devices == "auto" or len(set(devices)) == len(devices), "hpo.devices",
               "has duplicates")
        check(len(set(self.objectives)) == len(self.objectives), "hpo.objectives",
               "has duplicates")
        check(self.grace_period > self.heartbeat_interval, "hpo.grace_period",
               "must be longer than hpo.heartbeat_interval")
        check(not self.objectives or self.pruner.name == "none", "hpo.objectives",
               "several objectives need hpo.pruner.name: none (Optuna cannot prune "
               "multi-objective trials)")
        if storage is not None and not storage.startswith("journal:"):
            check("://" in storage, "hpo.storage", f"got {storage!r}; expected null, a "
                   "database URL (sqlite:///path, postgresql://user@host/db) or journal:<path>")
            # params.yaml is committed: a password there would be published
            check(not urlsplit(storage).password, "hpo.storage", "the URL contains a "
                   "password; set the environment variable HPO_STORAGE instead (it overrides "
                   "hpo.storage)")


@section("export_best")
class ExportBestParams:
    select: Literal["best", "mean_minus_k_se"]
    k: Annotated[StrictFloat, Field(ge=0)]
    threshold: Literal["checked", "tuned", "default"]


@section("registry")
class RegistryParams:
    model_name: _Name


@section("")
class Params:
    seed: StrictInt
    paths: Paths
    prepare: PrepareParams
    model: ModelParams
    train: TrainParams
    hpo: HpoParams
    export_best: ExportBestParams
    registry: RegistryParams


# ---- the search space: one entry per Hyperparameters field ----

_SPEC = pydantic.TypeAdapter(_SearchSpec)
_NOT_A_RANGE = {str: "a string: use type: categorical", float: "a float, not an int",
                int: "an int: use type: int"}


def _hp_value(name: str, value: Any, key: str) -> Any:
    """``value`` checked against hyperparameter ``name``'s type and range."""
    with naming(_HP_TYPES[name], key, subject=name):
        return _HP_VALUES[name].validate_python(value)


def _search_param(name: str, raw: Any, key: str) -> SearchParam:
    if not isinstance(raw, dict):  # a single value fixes the hyperparameter
        return SearchParam(name=name, type="fixed", value=_hp_value(name, raw, key))
    with naming(_SearchSpec, key):
        spec = _SPEC.validate_python(raw)
    when, kind, expected = spec.when or {}, spec.type, HYPERPARAMETERS[name]
    for other in when:
        check(other in HYPERPARAMETERS and other != name, f"{key}.when",
               f"'{other}' is not another hyperparameter of the search space")
    if kind == "categorical":
        check(spec.low is None and spec.high is None, key,
               "type categorical takes choices, not low/high")
        check(bool(spec.choices), f"{key}.choices", "must be a non-empty list")
        values = tuple(_hp_value(name, c, f"{key}.choices[{i}]")
                       for i, c in enumerate(spec.choices or ()))
        check(len(set(values)) == len(values), f"{key}.choices", "has duplicates")
        return SearchParam(name=name, type=kind, choices=values, when=when)
    check(expected.__name__ == kind, f"{key}.type", f"{name} is {_NOT_A_RANGE[expected]}")
    check(spec.choices is None, f"{key}.choices", f"only for type: categorical, not {kind}")
    for bound in ("low", "high"):
        check(getattr(spec, bound) is not None, key, f"'{bound}' is required for type {kind}")
    low = _hp_value(name, spec.low, f"{key}.low")
    high = _hp_value(name, spec.high, f"{key}.high")
    check(low <= high, key, f"low ({low}) > high ({high})")
    check(not spec.log or low > 0, f"{key}.low", "must be > 0 when log: true")
    return SearchParam(name=name, type=kind, low=low, high=high, log=spec.log, when=when)


def _search_space(raw: Any, key: str) -> dict[str, SearchParam]:
    """Every hyperparameter's entry in Hyperparameters' order (``when`` names earlier ones)."""
    if isinstance(raw, dict) and all(isinstance(p, SearchParam) for p in raw.values()):
        return raw  # already built (dataclasses.replace in code and tests)
    check(isinstance(raw, dict), key, "expected a mapping of hyperparameter -> spec")
    unknown = sorted(set(raw) - set(HYPERPARAMETERS), key=str)
    if unknown:
        raise ParamsError(f"{PARAMS_FILE}: unknown key '{key}.{unknown[0]}'; valid keys under "
                          f"{key}: {', '.join(HYPERPARAMETERS)}")
    missing = [n for n in HYPERPARAMETERS if n not in raw]
    if missing:
        raise ParamsError(f"{PARAMS_FILE}: missing key '{key}.{missing[0]}' (every "
                          "hyperparameter needs a range, choices or a fixed value)")
    space = {name: _search_param(name, raw[name], f"{key}.{name}") for name in HYPERPARAMETERS}
    for p in space.values():
        for other, value in p.when.items():
            target = space[other]
            possible = target.choices if target.type == "categorical" else (target.value,)
            check(target.type in ("categorical", "fixed") and value in possible,
                   f"{key}.{p.name}.when", f"{other} can never be {value!r}")
    return space


_PARAMS = pydantic.TypeAdapter(Params)


def parse_params(raw: Any) -> Params:
    """Validate an already-loaded params mapping."""
    with naming(Params, ""):
        return _PARAMS.validate_python(raw)


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; raise ParamsError naming the bad key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found (run from the repository root)")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=YamlLoader)
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from err
    return parse_params(raw)
