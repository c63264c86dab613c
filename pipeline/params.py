"""Typed, validated view of ``params.yaml``.

Every stage calls :func:`load_params`; it checks the whole file against the dataclasses below and
stops with a message that names the offending key (and lists the valid ones) instead of letting a
typo such as ``dvc exp run -S hpo.ntrials=5`` be silently ignored. Paths live here too (section
``paths``), so each path is written once: ``dvc.yaml`` reads them with ``${paths.*}``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

PARAMS_FILE = "params.yaml"

METRICS = ("macro_f1", "pos_f1", "roc_auc", "pr_auc")
AGGREGATIONS = ("mean", "median", "min", "max")
LOSSES = ("weighted_ce", "focal")


class ParamsError(ValueError):
    """A value in params.yaml is missing, misspelled, of the wrong type or out of range."""


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but ``1e-05`` is a float (YAML 1.2), as DVC writes it.

    ``dvc exp run -S x=0.00001`` rewrites params.yaml with ``x: 1e-05``, which plain PyYAML (YAML
    1.1: a float needs a dot) would read as a string.
    """


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


@dataclass(frozen=True)
class Paths:
    """Every file the pipeline reads or writes; dvc.yaml interpolates the same values."""

    data_dir: str
    posts: str
    annotations: str
    criteria: str
    pairs: str
    splits: str
    study_db: str
    trials: str
    fold_metrics: str
    study_summary: str
    importance: str
    pareto: str
    optuna_plots: str
    hpo_history_plot: str
    hpo_importance_plot: str
    hpo_folds_plot: str
    best_params: str
    model_dir: str
    data_metrics: str
    hpo_metrics: str
    eval_metrics: str
    pr_curve: str
    roc_curve: str
    confusion: str
    predictions: str


@dataclass(frozen=True)
class PrepareParams:
    test_size: float
    n_folds: int

    def __post_init__(self) -> None:
        _check(0.0 < self.test_size < 1.0, "prepare.test_size", "must be in (0, 1)")
        _check(self.n_folds >= 2, "prepare.n_folds", "must be at least 2")


@dataclass(frozen=True)
class ModelParams:
    name: str
    max_length: int
    num_hidden_layers: int | None = None

    def __post_init__(self) -> None:
        _check(bool(self.name.strip()), "model.name", "must not be empty")
        _check(self.max_length >= 16, "model.max_length", "must be at least 16")
        if self.num_hidden_layers is not None:
            _check(self.num_hidden_layers >= 1, "model.num_hidden_layers", "must be >= 1 or null")


@dataclass(frozen=True)
class TrainParams:
    negatives_per_positive: int
    eval_batch_size: int
    max_device_batch_size: int
    early_stopping_patience: int
    cpu_threads: int
    device: Literal["auto", "cpu", "cuda"]
    compile: bool = False

    def __post_init__(self) -> None:
        _check(self.negatives_per_positive >= 0, "train.negatives_per_positive", "must be >= 0")
        _check(self.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1")
        _check(self.max_device_batch_size >= 1, "train.max_device_batch_size", "must be >= 1")
        _check(self.early_stopping_patience >= 0, "train.early_stopping_patience", "must be >= 0")
        _check(self.cpu_threads >= 0, "train.cpu_threads", "must be >= 0 (0: all cores)")


@dataclass(frozen=True)
class SamplerParams:
    name: Literal["tpe", "random"]
    n_startup_trials: int
    multivariate: bool
    group: bool
    constant_liar: bool

    def __post_init__(self) -> None:
        _check(self.n_startup_trials >= 0, "hpo.sampler.n_startup_trials", "must be >= 0")
        _check(
            not self.group or self.multivariate,
            "hpo.sampler.group",
            "needs hpo.sampler.multivariate: true",
        )


@dataclass(frozen=True)
class PrunerParams:
    name: Literal["median", "percentile", "none"]
    n_startup_trials: int
    n_warmup_steps: int
    percentile: float  # percentile pruner: keep the trials in the top `percentile` % per fold

    def __post_init__(self) -> None:
        _check(0 < self.percentile < 100, "hpo.pruner.percentile",
               f"must be between 0 and 100 (exclusive), got {self.percentile}")
        _check(self.n_startup_trials >= 0, "hpo.pruner.n_startup_trials", "must be >= 0")
        _check(self.n_warmup_steps >= 0, "hpo.pruner.n_warmup_steps", "must be >= 0")


@dataclass(frozen=True)
class SearchParam:
    """One hyperparameter: searched over a range or choices, or fixed to one value."""

    name: str
    type: Literal["float", "int", "categorical", "fixed"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    value: Any = None
    when: dict[str, Any] = field(default_factory=dict)

    @property
    def searched(self) -> bool:
        return self.type != "fixed"


# The hyperparameters a trial sets, with the type each must have (the engine's Hyperparameters).
HYPERPARAMETERS: dict[str, type] = {
    "learning_rate": float,
    "per_device_train_batch_size": int,
    "num_train_epochs": int,
    "warmup_ratio": float,
    "weight_decay": float,
    "loss_function": str,
    "focal_gamma": float,
    "focal_alpha": float,
}
# Valid (low, high) bounds per hyperparameter; None means unbounded on that side.
_BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "learning_rate": (0.0, 1.0),
    "per_device_train_batch_size": (1, None),
    "num_train_epochs": (1, None),
    "warmup_ratio": (0.0, 1.0),
    "weight_decay": (0.0, None),
    "focal_gamma": (0.0, None),
    "focal_alpha": (0.0, 1.0),
}


@dataclass(frozen=True)
class HpoParams:
    n_trials: int
    metric: Literal["macro_f1", "pos_f1", "roc_auc", "pr_auc"]
    fold_aggregation: Literal["mean", "median", "min", "max"]
    storage: str | None
    study_prefix: str
    max_failures: int
    max_retries: int
    heartbeat_interval: int
    grace_period: int
    isolate_trials: bool
    importance_evaluator: Literal["fanova", "ped_anova", "mean_decrease_impurity"]
    mlflow_experiment: str
    sampler: SamplerParams
    pruner: PrunerParams
    search_space: dict[str, SearchParam]
    # Extra objectives (costs, minimised) after hpo.metric: a multi-objective study.
    objectives: list[Literal["epochs", "fold_fit_seconds"]] = field(default_factory=list)
    # Enqueue earlier best points first: a best-params YAML file, or study:<name> (same storage).
    warm_start: str | None = None
    warm_start_trials: int = 3

    def __post_init__(self) -> None:
        _check(self.n_trials >= 1, "hpo.n_trials", "must be >= 1")
        _check(self.max_failures >= 0, "hpo.max_failures", "must be >= 0")
        _check(self.max_retries >= 0, "hpo.max_retries", "must be >= 0")
        _check(self.heartbeat_interval >= 1, "hpo.heartbeat_interval", "must be >= 1 (seconds)")
        _check(self.grace_period > self.heartbeat_interval, "hpo.grace_period",
               "must be longer than hpo.heartbeat_interval")
        _check(not self.objectives or self.pruner.name == "none", "hpo.objectives",
               "several objectives need hpo.pruner.name: none (Optuna cannot prune "
               "multi-objective trials)")
        _check(self.warm_start_trials >= 1, "hpo.warm_start_trials", "must be >= 1")
        if self.storage is not None:
            _check(self.storage.startswith("journal:") or "://" in self.storage, "hpo.storage",
                   f"got {self.storage!r}; expected null, a database URL (sqlite:///path, "
                   "postgresql://user@host/db) or journal:<path>")
            # params.yaml is committed: a password there would be published
            _check(self.storage.startswith("journal:") or not urlsplit(self.storage).password,
                   "hpo.storage", "the URL contains a password; set the environment variable "
                   "HPO_STORAGE instead (it overrides hpo.storage)")
        _check(bool(self.study_prefix.strip()), "hpo.study_prefix", "must not be empty")


@dataclass(frozen=True)
class ExportBestParams:
    """How export_best chooses among the complete trials."""

    # best: highest objective value. mean_minus_k_se: highest fold mean - k standard errors,
    # i.e. prefer a trial that is good on every fold over one lucky fold.
    select: Literal["best", "mean_minus_k_se"]
    k: float

    def __post_init__(self) -> None:
        _check(self.k >= 0, "export_best.k", "must be >= 0")


@dataclass(frozen=True)
class Params:
    seed: int
    paths: Paths
    prepare: PrepareParams
    model: ModelParams
    train: TrainParams
    hpo: HpoParams
    export_best: ExportBestParams


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ParamsError(f"{PARAMS_FILE}: {key}: {message}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ParamsError(f"{PARAMS_FILE}: {key}: got {value!r}, expected {_type_name(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ParamsError:
                continue
        raise ParamsError(f"{PARAMS_FILE}: {key}: got {value!r}, expected {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{PARAMS_FILE}: {key}: got {value!r}, expected a list")
        (item,) = typing.get_args(tp)
        values = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        if len(set(map(repr, values))) != len(values):
            raise ParamsError(f"{PARAMS_FILE}: {key}: has duplicates")
        return values
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ParamsError(f"{PARAMS_FILE}: {key}: must be a finite number, got {value!r}")
            return float(value)
        if isinstance(value, str):
            hint = " (YAML reads 2e-5 as a string: write 2.0e-5)" if "e" in value.lower() else ""
            raise ParamsError(f"{PARAMS_FILE}: {key}: got the string {value!r}, expected a "
                              f"number{hint}")
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    else:  # pragma: no cover - only the annotations above are used
        raise TypeError(f"unsupported annotation {tp!r}")
    raise ParamsError(f"{PARAMS_FILE}: {key}: got {value!r}, expected {_type_name(tp)}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from mapping ``raw``, naming unknown and missing keys."""
    where = prefix or "the top level"
    if not isinstance(raw, dict):
        raise ParamsError(f"{PARAMS_FILE}: {where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        name = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ParamsError(
            f"{PARAMS_FILE}: unknown key '{name}'; valid keys under {where}: "
            + ", ".join(fields)
        )
    values = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in raw:
            has_default = (f.default is not dataclasses.MISSING
                           or f.default_factory is not dataclasses.MISSING)
            if has_default:
                continue
            raise ParamsError(f"{PARAMS_FILE}: missing key '{key}'")
        if name == "search_space":
            values[name] = _search_space(raw[name], key)
        else:
            values[name] = _coerce(raw[name], hints[name], key)
    return cls(**values)


def _search_param(name: str, raw: Any, key: str) -> SearchParam:
    expected = HYPERPARAMETERS[name]
    if not isinstance(raw, dict):  # a single value fixes the hyperparameter
        value = _coerce(raw, expected, key)
        if name == "loss_function":
            _check(value in LOSSES, key, f"got {value!r}, expected one of {', '.join(LOSSES)}")
        _check_bounds(name, value, value, key)
        return SearchParam(name=name, type="fixed", value=value)
    allowed = ("type", "low", "high", "log", "choices", "when")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ParamsError(f"{PARAMS_FILE}: unknown key '{key}.{unknown[0]}'; valid fields: "
                          + ", ".join(allowed))
    kind = raw.get("type")
    when = raw.get("when", {}) or {}
    _check(isinstance(when, dict), f"{key}.when", "must map a hyperparameter to a value")
    for other in when:
        _check(other in HYPERPARAMETERS and other != name, f"{key}.when",
               f"'{other}' is not another hyperparameter of the search space")
    if kind == "categorical":
        choices = raw.get("choices")
        _check(isinstance(choices, list) and len(choices) >= 1, f"{key}.choices",
               "must be a non-empty list")
        values = tuple(_coerce(c, expected, f"{key}.choices") for c in choices)
        _check(len(set(values)) == len(values), f"{key}.choices", "has duplicates")
        if name == "loss_function":
            bad = [v for v in values if v not in LOSSES]
            _check(not bad, f"{key}.choices",
                   f"unknown loss {bad[:1]}; expected {', '.join(LOSSES)}")
        for v in values:
            _check_bounds(name, v, v, f"{key}.choices")
        _check("low" not in raw and "high" not in raw, key,
               "type categorical takes choices, not low/high")
        return SearchParam(name=name, type="categorical", choices=values, when=when)
    _check(kind in ("float", "int"), f"{key}.type",
           f"got {kind!r}, expected 'float', 'int' or 'categorical'")
    _check(expected is not str, f"{key}.type", f"{name} is a string: use type: categorical")
    _check(kind == "float" or expected is int, f"{key}.type", f"{name} is a float, not an int")
    _check(kind == "int" or expected is float, f"{key}.type", f"{name} is an int: use type: int")
    _check("choices" not in raw, f"{key}.choices", f"only for type: categorical, not {kind}")
    for bound in ("low", "high"):
        _check(bound in raw, key, f"'{bound}' is required for type {kind}")
    num = int if kind == "int" else float
    low = _coerce(raw["low"], num, f"{key}.low")
    high = _coerce(raw["high"], num, f"{key}.high")
    log = _coerce(raw.get("log", False), bool, f"{key}.log")
    _check(low <= high, key, f"low ({low}) > high ({high})")
    _check(not log or low > 0, f"{key}.low", "must be > 0 when log: true")
    _check_bounds(name, low, high, key)
    return SearchParam(name=name, type=kind, low=low, high=high, log=log, when=when)


def _check_bounds(name: str, low: Any, high: Any, key: str) -> None:
    lo, hi = _BOUNDS.get(name, (None, None))
    if lo is not None:
        strict = name == "learning_rate"
        ok = low > lo if strict else low >= lo
        _check(ok, key, f"{name} must be {'>' if strict else '>='} {lo}, got {low}")
    if hi is not None:
        _check(high <= hi, key, f"{name} must be <= {hi}, got {high}")


def _search_space(raw: Any, key: str) -> dict[str, SearchParam]:
    _check(isinstance(raw, dict), key, "expected a mapping of hyperparameter -> spec")
    unknown = sorted(set(raw) - set(HYPERPARAMETERS))
    if unknown:
        raise ParamsError(f"{PARAMS_FILE}: unknown key '{key}.{unknown[0]}'; valid "
                          f"hyperparameters: {', '.join(HYPERPARAMETERS)}")
    missing = [n for n in HYPERPARAMETERS if n not in raw]
    if missing:
        raise ParamsError(f"{PARAMS_FILE}: missing key '{key}.{missing[0]}' (every "
                          "hyperparameter needs a range, choices or a fixed value)")
    space = {name: _search_param(name, raw[name], f"{key}.{name}") for name in HYPERPARAMETERS}
    for p in space.values():
        for other, value in p.when.items():
            target = space[other]
            possible = target.choices if target.type == "categorical" else (target.value,)
            _check(target.type in ("categorical", "fixed") and value in possible,
                   f"{key}.{p.name}.when", f"{other} can never be {value!r}")
    return space


def parse_params(raw: Any) -> Params:
    """Validate an already-loaded params mapping."""
    return _build(Params, raw, "")


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
