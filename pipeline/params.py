"""Typed, validated view of ``params.yaml``.

Every stage calls :func:`load_params`; pydantic checks the whole file against the frozen
dataclasses below (strict types, no unknown keys) and the first problem becomes one line that
names the key and lists the valid values or keys, so a typo such as
``dvc exp run -S hpo.ntrials=5`` fails loudly instead of being ignored. Paths live here too
(section ``paths``), so each path is written once: ``dvc.yaml`` reads them with ``${paths.*}``.

The sections are pydantic dataclasses, so ``dataclasses.asdict`` and ``dataclasses.replace``
work on them, and building or replacing one with a bad value raises :class:`ParamsError` too.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    field_validator,
)
from pydantic.dataclasses import dataclass as pydantic_dataclass
from typing_extensions import dataclass_transform

from pipeline.errors import ParamsError

PARAMS_FILE = "params.yaml"

Metric = Literal["macro_f1", "pos_f1", "roc_auc", "pr_auc"]
Aggregation = Literal["mean", "median", "min", "max"]
METRICS: tuple[str, ...] = typing.get_args(Metric)
AGGREGATIONS: tuple[str, ...] = typing.get_args(Aggregation)
# The decision threshold when none is tuned (export_best.threshold: default, or a check failed).
THRESHOLD = 0.5


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but ``1e-05`` and ``1.5e5`` are floats (YAML 1.2), as DVC writes them.

    ``dvc exp run -S x=0.00001`` rewrites params.yaml with ``x: 1e-05``, which plain PyYAML (YAML
    1.1: a float needs a dot and a signed exponent) would read as a string.
    """


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    """What a trial chooses: the search space's eight names, each with its type and range.

    The ranges (pydantic ``Field`` bounds) bind every value of ``hpo.search_space``; a
    Hyperparameters built in code is not range-checked (tests probe divergence with lr 1e30).
    """

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
            d.pop("focal_gamma")
            d.pop("focal_alpha")
        return d


# Each hyperparameter's declared type (bounds included) and its plain Python type.
_HP_HINTS: dict[str, Any] = typing.get_type_hints(Hyperparameters, include_extras=True)
HYPERPARAMETERS: dict[str, type] = {
    name: type(typing.get_args(tp)[0]) if typing.get_origin(tp) is Literal else tp
    for name, tp in typing.get_type_hints(Hyperparameters).items()
}
LOSSES: tuple[str, ...] = typing.get_args(_HP_HINTS["loss_function"])
# strict: a string is not a number and a bool is not an int; an int is a fine float
_HP_VALUES = {name: TypeAdapter(tp, config=ConfigDict(strict=True, allow_inf_nan=False))
              for name, tp in _HP_HINTS.items()}

# Sections: unknown keys and inf/nan are errors; strictness is per field (StrictInt, ...) because
# pydantic's strict mode would also refuse a mapping for a nested section.
_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)


@dataclass_transform(frozen_default=True)
def _section(key: str) -> Any:
    """A frozen pydantic dataclass for the params section ``key`` that raises ParamsError."""

    def wrap(cls: type) -> type:
        cls = pydantic_dataclass(frozen=True, config=_CONFIG)(cls)
        validate = cls.__init__

        @functools.wraps(validate)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                validate(self, *args, **kwargs)
            except ValidationError as err:
                raise _params_error(err, cls, kwargs, key) from None

        cls.__init__ = __init__
        return cls

    return wrap


@_section("paths")
class Paths:
    """Every file the pipeline reads or writes; dvc.yaml interpolates the same values."""

    data_dir: StrictStr
    posts: StrictStr
    annotations: StrictStr
    criteria: StrictStr
    pairs: StrictStr
    splits: StrictStr
    study_db: StrictStr
    study_store: StrictStr
    trials: StrictStr
    fold_metrics: StrictStr
    study_summary: StrictStr
    importance: StrictStr
    pareto: StrictStr
    optuna_plots: StrictStr
    hpo_history_plot: StrictStr
    hpo_importance_plot: StrictStr
    hpo_folds_plot: StrictStr
    best_params: StrictStr
    model_dir: StrictStr
    data_metrics: StrictStr
    data_summary: StrictStr
    hpo_metrics: StrictStr
    eval_metrics: StrictStr
    pr_curve: StrictStr
    roc_curve: StrictStr
    confusion: StrictStr
    predictions: StrictStr


@_section("prepare")
class PrepareParams:
    test_size: StrictFloat
    n_folds: StrictInt

    def __post_init__(self) -> None:
        _check(0.0 < self.test_size < 1.0, "prepare.test_size", "must be in (0, 1)")
        _check(self.n_folds >= 2, "prepare.n_folds", "must be at least 2")


@_section("model")
class ModelParams:
    name: StrictStr
    max_length: StrictInt
    num_hidden_layers: StrictInt | None = None

    def __post_init__(self) -> None:
        _check(bool(self.name.strip()), "model.name", "must not be empty")
        _check(self.max_length >= 16, "model.max_length", "must be at least 16")
        if self.num_hidden_layers is not None:
            _check(self.num_hidden_layers >= 1, "model.num_hidden_layers", "must be >= 1 or null")


@_section("train")
class TrainParams:
    negatives_per_positive: StrictInt
    eval_batch_size: StrictInt
    max_device_batch_size: StrictInt
    early_stopping_patience: StrictInt
    cpu_threads: StrictInt
    device: Literal["auto", "cpu", "cuda"]
    compile: StrictBool = False
    # auto: bf16 autocast on CUDA with bf16 (fp16 without) and on CPUs with AMX or AVX512-BF16;
    # fp32 elsewhere. fp16 needs CUDA (loss scaling).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"

    def __post_init__(self) -> None:
        _check(self.negatives_per_positive >= 0, "train.negatives_per_positive", "must be >= 0")
        _check(self.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1")
        _check(self.max_device_batch_size >= 1, "train.max_device_batch_size", "must be >= 1")
        _check(self.early_stopping_patience >= 0, "train.early_stopping_patience", "must be >= 0")
        _check(self.cpu_threads >= 0, "train.cpu_threads", "must be >= 0 (0: all cores)")


@_section("hpo.sampler")
class SamplerParams:
    name: Literal["tpe", "random"]
    n_startup_trials: StrictInt
    multivariate: StrictBool
    group: StrictBool
    constant_liar: StrictBool

    def __post_init__(self) -> None:
        _check(self.n_startup_trials >= 0, "hpo.sampler.n_startup_trials", "must be >= 0")
        _check(
            not self.group or self.multivariate,
            "hpo.sampler.group",
            "needs hpo.sampler.multivariate: true",
        )


@_section("hpo.pruner")
class PrunerParams:
    name: Literal["median", "percentile", "none"]
    n_startup_trials: StrictInt
    n_warmup_steps: StrictInt
    # percentile pruner: keep the trials in the top `percentile` % at each step
    percentile: StrictFloat
    # fold: one report after each fold (step = fold index); epoch: one after every epoch of every
    # fold (step = fold x the search space's most epochs + epoch; every epoch is validated)
    report: Literal["fold", "epoch"]

    def __post_init__(self) -> None:
        _check(0 < self.percentile < 100, "hpo.pruner.percentile",
               f"must be between 0 and 100 (exclusive), got {self.percentile}")
        _check(self.n_startup_trials >= 0, "hpo.pruner.n_startup_trials", "must be >= 0")
        _check(self.n_warmup_steps >= 0, "hpo.pruner.n_warmup_steps", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class SearchParam:
    """One hyperparameter: searched over a range or choices, or fixed to one value.

    Built from a validated :class:`_SearchSpec` (or in tests); the constructor checks nothing.
    """

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


@pydantic_dataclass(frozen=True, config=_CONFIG)
class _SearchSpec:
    """The mapping form of a search-space entry; the checks that depend on the name follow."""

    type: Literal["float", "int", "categorical"]
    low: Any = None  # checked against the hyperparameter's type and range
    high: Any = None
    log: StrictBool = False
    choices: list[Any] | None = None
    when: dict[str, Any] | None = None


@_section("hpo")
class HpoParams:
    n_trials: StrictInt
    metric: Metric
    fold_aggregation: Aggregation
    storage: StrictStr | None
    study_prefix: StrictStr
    max_failures: StrictInt
    max_retries: StrictInt
    heartbeat_interval: StrictInt
    grace_period: StrictInt
    isolate_trials: StrictBool
    importance_evaluator: Literal["fanova", "ped_anova", "mean_decrease_impurity"]
    mlflow_experiment: StrictStr
    sampler: SamplerParams
    pruner: PrunerParams
    search_space: dict[str, SearchParam]
    # Extra objectives (costs, minimised) after hpo.metric: a multi-objective study.
    objectives: list[Literal["epochs", "fold_fit_seconds"]] = field(default_factory=list)
    # Enqueue earlier best points first: a best-params YAML file, or study:<name> (same storage).
    warm_start: StrictStr | None = None
    warm_start_trials: StrictInt = 3
    # The most trials that may run at once: trial k is suggested and pruned knowing the trials
    # numbered up to k - parallelism (pipeline/hpo.py). Part of the study's definition.
    parallelism: StrictInt = 1
    # Trial processes this stage runs at once (at most hpo.parallelism; auto: as many as the
    # machine fits). Not part of the study: any value gives the same study.
    n_jobs: StrictInt | Literal["auto"] = 1
    # Where those processes run. auto: round-robin over the visible CUDA GPUs, else disjoint
    # sets of CPU cores; or a list of CUDA device indices.
    devices: Literal["auto"] | list[StrictInt] = "auto"

    @field_validator("search_space", mode="before")
    @classmethod
    def _parse_search_space(cls, raw: Any) -> dict[str, SearchParam]:
        return _search_space(raw, "hpo.search_space")

    def __post_init__(self) -> None:
        _check(self.n_trials >= 1, "hpo.n_trials", "must be >= 1")
        _check(self.parallelism >= 1, "hpo.parallelism", "must be >= 1")
        if self.n_jobs != "auto":
            _check(self.n_jobs >= 1, "hpo.n_jobs", "must be >= 1 or auto")
            _check(self.n_jobs <= self.parallelism, "hpo.n_jobs",
                   f"{self.n_jobs} trials at once need hpo.parallelism >= {self.n_jobs} (it is "
                   f"{self.parallelism}: trial k waits for trial k - {self.parallelism})")
        _check(self.n_jobs == 1 or self.isolate_trials, "hpo.n_jobs",
               "parallel trials run in child processes: needs hpo.isolate_trials: true")
        _check(self.devices == "auto" or (bool(self.devices) and min(self.devices) >= 0),
               "hpo.devices", "must be auto or a non-empty list of CUDA device indices")
        _check(self.devices == "auto" or len(set(self.devices)) == len(self.devices),
               "hpo.devices", "has duplicates")
        _check(len(set(self.objectives)) == len(self.objectives), "hpo.objectives",
               "has duplicates")
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


@_section("export_best")
class ExportBestParams:
    """How export_best chooses among the complete trials."""

    # best: highest objective value. mean_minus_k_se: highest fold mean - k standard errors,
    # i.e. prefer a trial that is good on every fold over one lucky fold.
    select: Literal["best", "mean_minus_k_se"]
    k: StrictFloat
    # checked: the chosen trial's tuned threshold only when it beat 0.5 on every fold it was not
    # tuned on (trials.csv threshold_gain > 0), else 0.5. tuned: always. default: always 0.5.
    threshold: Literal["checked", "tuned", "default"]

    def __post_init__(self) -> None:
        _check(self.k >= 0, "export_best.k", "must be >= 0")


@_section("registry")
class RegistryParams:
    """Where retrain/evaluate put the model in MLflow's Model Registry."""

    model_name: StrictStr

    def __post_init__(self) -> None:
        _check(bool(self.model_name.strip()), "registry.model_name", "must not be empty")


@_section("")
class Params:
    seed: StrictInt
    paths: Paths
    prepare: PrepareParams
    model: ModelParams
    train: TrainParams
    hpo: HpoParams
    export_best: ExportBestParams
    registry: RegistryParams


_PARAMS = TypeAdapter(Params)
_SPEC = TypeAdapter(_SearchSpec)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ParamsError(f"{PARAMS_FILE}: {key}: {message}")


# ---- pydantic's errors as one line: params.yaml: <dotted.key>: <what is wrong> ----

# dataclasses report a forbidden extra key as an unexpected argument; invalid_key: not a string
_UNKNOWN = ("unexpected_keyword_argument", "extra_forbidden", "invalid_key")
_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _strip(tp: Any) -> Any:
    return typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp


def _locate(root: Any, loc: tuple) -> tuple[list[str | int], Any]:
    """The leading items of ``loc`` that are params keys, and the annotation the last one has.

    ``loc`` may go on into pydantic's own labels (a union member such as ``list[int]``)."""
    parts: list[str | int] = []
    tp = _strip(root)
    for item in loc:
        if dataclasses.is_dataclass(tp) and item in (hints := typing.get_type_hints(tp)):
            tp = hints[item]
        elif isinstance(item, int) and typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        else:
            break
        parts.append(item)
    return parts, _strip(tp)


def _dotted(prefix: str, parts: list[str | int]) -> str:
    key = prefix
    for part in parts:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


def _lookup(raw: Any, parts: list[str | int], default: Any) -> Any:
    for part in parts:
        try:
            raw = raw[part]
        except (KeyError, IndexError, TypeError):
            return default
    return raw


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(_strip(a)) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _params_error(err: ValidationError, root: Any, raw: Any, prefix: str,
                  subject: str | None = None) -> ParamsError:
    """The first of pydantic's errors (unknown keys first) as one line naming the key.

    ``root`` is what was validated (a section, or a type), ``raw`` its input, ``prefix`` its
    dotted key; ``subject`` names the value in range errors (only hyperparameters have them)."""
    e = min(err.errors(), key=lambda e: e["type"] not in _UNKNOWN)
    cause = (e.get("ctx") or {}).get("error")
    if isinstance(cause, ParamsError):  # a check of ours, already one line
        return cause
    loc = tuple(e["loc"])
    if e["type"] in _UNKNOWN:
        parts, parent = _locate(root, loc[:-1])
        where = _dotted(prefix, parts)
        valid = ", ".join(f.name for f in dataclasses.fields(parent))
        return ParamsError(f"{PARAMS_FILE}: unknown key '{_dotted(where, [str(loc[-1])])}'; "
                           f"valid keys under {where or 'the top level'}: {valid}")
    parts, tp = _locate(root, loc)
    key = _dotted(prefix, parts) or "the top level"
    if e["type"] == "missing":
        return ParamsError(f"{PARAMS_FILE}: missing key '{key}'")
    value = _lookup(raw, parts, e["input"])
    ctx = e.get("ctx") or {}
    if e["type"] == "finite_number":
        what = f"must be a finite number, got {value!r}"
    elif bound := next((b for b in _BOUNDS if b in ctx), None):
        what = f"{subject or key} must be {_BOUNDS[bound]} {ctx[bound]}, got {value}"
    elif tp is float and isinstance(value, str):
        what = f"got the string {value!r}, expected a number"
        if re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", value):
            what += f" (a number in quotes is a string: write {value.strip()} without them)"
    elif dataclasses.is_dataclass(tp):
        what = f"expected a mapping, got {value!r}"
    else:
        what = f"got {value!r}, expected {_type_name(tp)}"
    return ParamsError(f"{PARAMS_FILE}: {key}: {what}")


# ---- the search space: one entry per Hyperparameters field ----

def _hp_value(name: str, value: Any, key: str) -> Any:
    """``value`` checked against hyperparameter ``name``'s type and range."""
    try:
        return _HP_VALUES[name].validate_python(value)
    except ValidationError as err:
        raise _params_error(err, _HP_HINTS[name], value, key, subject=name) from None


def _search_param(name: str, raw: Any, key: str) -> SearchParam:
    if not isinstance(raw, dict):  # a single value fixes the hyperparameter
        return SearchParam(name=name, type="fixed", value=_hp_value(name, raw, key))
    try:
        spec = _SPEC.validate_python(raw)
    except ValidationError as err:
        raise _params_error(err, _SearchSpec, raw, key) from None
    when = spec.when or {}
    for other in when:
        _check(other in HYPERPARAMETERS and other != name, f"{key}.when",
               f"'{other}' is not another hyperparameter of the search space")
    expected = HYPERPARAMETERS[name]
    if spec.type == "categorical":
        _check(spec.low is None and spec.high is None, key,
               "type categorical takes choices, not low/high")
        _check(bool(spec.choices), f"{key}.choices", "must be a non-empty list")
        values = tuple(_hp_value(name, c, f"{key}.choices[{i}]")
                       for i, c in enumerate(spec.choices or ()))
        _check(len(set(values)) == len(values), f"{key}.choices", "has duplicates")
        return SearchParam(name=name, type="categorical", choices=values, when=when)
    kind = spec.type
    _check(expected is not str, f"{key}.type", f"{name} is a string: use type: categorical")
    _check(kind == "float" or expected is int, f"{key}.type", f"{name} is a float, not an int")
    _check(kind == "int" or expected is float, f"{key}.type", f"{name} is an int: use type: int")
    _check(spec.choices is None, f"{key}.choices", f"only for type: categorical, not {kind}")
    for bound in ("low", "high"):
        _check(getattr(spec, bound) is not None, key, f"'{bound}' is required for type {kind}")
    low = _hp_value(name, spec.low, f"{key}.low")
    high = _hp_value(name, spec.high, f"{key}.high")
    _check(low <= high, key, f"low ({low}) > high ({high})")
    _check(not spec.log or low > 0, f"{key}.low", "must be > 0 when log: true")
    return SearchParam(name=name, type=kind, low=low, high=high, log=spec.log, when=when)


def _search_space(raw: Any, key: str) -> dict[str, SearchParam]:
    """Every hyperparameter's entry in Hyperparameters' order (``when`` names earlier ones)."""
    if isinstance(raw, dict) and all(isinstance(p, SearchParam) for p in raw.values()):
        return raw  # already built (dataclasses.replace in code and tests)
    _check(isinstance(raw, dict), key, "expected a mapping of hyperparameter -> spec")
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
            _check(target.type in ("categorical", "fixed") and value in possible,
                   f"{key}.{p.name}.when", f"{other} can never be {value!r}")
    return space


def parse_params(raw: Any) -> Params:
    """Validate an already-loaded params mapping."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{PARAMS_FILE}: the top level: expected a mapping, got {raw!r}")
    try:
        return _PARAMS.validate_python(raw)
    except ValidationError as err:
        raise _params_error(err, Params, raw, "") from None


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
