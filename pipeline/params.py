"""Typed, validated view of ``params.yaml``.

Every stage calls :func:`load_params`: pydantic checks the file against the frozen dataclasses
below (strict types, ``Field`` ranges, no unknown keys, checks across fields in
``__post_init__``) and :func:`_naming` turns the first problem into one line that names the key,
so a typo such as ``dvc exp run -S hpo.ntrials=5`` fails loudly instead of being ignored. A
failed range or pattern says "must be >= 1" and the like, or its field's ``description``.
Building or replacing a section (``dataclasses.replace``) raises :class:`ParamsError` the same
way. Paths live here too (section ``paths``), each written once: ``dvc.yaml`` reads ``${paths.*}``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import pydantic
import yaml
from pydantic import Field, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic.dataclasses import dataclass as pydantic_dataclass
from typing_extensions import dataclass_transform

from pipeline.errors import ParamsError  # raised here, and imported from here by stages

PARAMS_FILE = "params.yaml"

Metric = Literal["macro_f1", "pos_f1", "roc_auc", "pr_auc"]
Aggregation = Literal["mean", "median", "min", "max"]
METRICS: tuple[str, ...] = typing.get_args(Metric)
AGGREGATIONS: tuple[str, ...] = typing.get_args(Aggregation)
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
            d.pop("focal_gamma")
            d.pop("focal_alpha")
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

# Sections: unknown keys and inf/nan are errors; strictness is per field (StrictInt, ...) because
# pydantic's strict mode would also refuse a mapping for a nested section.
_CONFIG = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False)
_Count = Annotated[StrictInt, Field(ge=0)]
_Positive = Annotated[StrictInt, Field(ge=1)]
_Name = Annotated[StrictStr, Field(pattern=r"\S", description="must not be empty")]


@dataclass_transform(frozen_default=True)
def _section(key: str) -> Any:
    """A frozen pydantic dataclass for the params section ``key`` that raises ParamsError."""

    def wrap(cls: type) -> type:
        cls = pydantic_dataclass(frozen=True, config=_CONFIG)(cls)
        validate = cls.__init__

        @functools.wraps(validate)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            with _naming(cls, key):
                validate(self, *args, **kwargs)

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
    test_size: Annotated[StrictFloat, Field(gt=0, lt=1, description="must be in (0, 1)")]
    n_folds: Annotated[StrictInt, Field(ge=2, description="must be at least 2")]


@_section("model")
class ModelParams:
    name: _Name
    max_length: Annotated[StrictInt, Field(ge=16, description="must be at least 16")]
    num_hidden_layers: Annotated[
        StrictInt | None, Field(ge=1, description="must be >= 1 or null")] = None


@_section("train")
class TrainParams:
    negatives_per_positive: _Count
    eval_batch_size: _Positive
    max_device_batch_size: _Positive
    early_stopping_patience: _Count
    cpu_threads: Annotated[_Count, Field(description="must be >= 0 (0: all cores)")]
    device: Literal["auto", "cpu", "cuda"]
    compile: StrictBool = False
    # auto: bf16 autocast on CUDA with bf16 (fp16 without) and on CPUs with AMX or AVX512-BF16;
    # fp32 elsewhere. fp16 needs CUDA (loss scaling).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"


@_section("hpo.sampler")
class SamplerParams:
    name: Literal["tpe", "random"]
    n_startup_trials: _Count
    multivariate: StrictBool
    group: StrictBool
    constant_liar: StrictBool

    def __post_init__(self) -> None:
        _check(not self.group or self.multivariate, "hpo.sampler.group",
               "needs hpo.sampler.multivariate: true")


@_section("hpo.pruner")
class PrunerParams:
    name: Literal["median", "percentile", "none"]
    n_startup_trials: _Count
    n_warmup_steps: _Count
    # percentile pruner: keep the trials in the top `percentile` % at each step
    percentile: Annotated[StrictFloat, Field(
        gt=0, lt=100, description="must be between 0 and 100 (exclusive), got {value}")]
    # fold: one report after each fold (step = fold index); epoch: one after every epoch of every
    # fold (step = fold x the search space's most epochs + epoch; every epoch is validated)
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
    when: dict[str, Any] = field(default_factory=dict)

    @property
    def searched(self) -> bool:
        return self.type != "fixed"


@pydantic_dataclass(frozen=True, config=_CONFIG)
class _SearchSpec:
    """A search-space entry as a mapping. One class, not a union per type, so a misplaced key
    (``choices`` of a float range) is named as such and an unknown key lists every key."""

    type: Literal["float", "int", "categorical"]
    low: Any = None  # checked against the hyperparameter's type and range
    high: Any = None
    log: StrictBool = False
    choices: list[Any] | None = None
    when: dict[str, Any] | None = None


@_section("hpo")
class HpoParams:
    n_trials: _Positive
    metric: Metric
    fold_aggregation: Aggregation
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
    # Extra objectives (costs, minimised) after hpo.metric: a multi-objective study.
    objectives: list[Literal["epochs", "fold_fit_seconds"]] = field(default_factory=list)
    # Enqueue earlier best points first: a best-params YAML file, or study:<name> (same storage).
    warm_start: StrictStr | None = None
    warm_start_trials: _Positive = 3
    # The most trials that run at once: the workers of the study's virtual clock, which decides
    # what each trial is suggested and pruned from (pipeline/study.py). Part of the study.
    parallelism: _Positive = 1
    # Trial processes this stage runs at once (at most hpo.parallelism; auto: as many as the
    # machine fits). Not part of the study: any value gives the same study.
    n_jobs: Annotated[_Positive | Literal["auto"], Field(description="must be >= 1 or auto")] = 1
    # Where those processes run. auto: round-robin over the visible CUDA GPUs, else disjoint
    # sets of CPU cores; or a list of CUDA device indices.
    devices: Literal["auto"] | list[StrictInt] = "auto"

    @pydantic.field_validator("search_space", mode="before")
    @classmethod
    def _parse_search_space(cls, raw: Any) -> dict[str, SearchParam]:
        return _search_space(raw, "hpo.search_space")

    def __post_init__(self) -> None:
        jobs, par, devices, storage = self.n_jobs, self.parallelism, self.devices, self.storage
        _check(jobs == 1 or self.isolate_trials, "hpo.n_jobs",
               "parallel trials run in child processes: needs hpo.isolate_trials: true")
        _check(jobs == "auto" or jobs <= par, "hpo.n_jobs", f"{jobs} trials at once need "
               f"hpo.parallelism >= {jobs} (it is {par}: at most {par} trial"
               f"{'s' if par > 1 else ''} of the study run{'' if par > 1 else 's'} at once)")
        _check(devices == "auto" or (bool(devices) and min(devices) >= 0), "hpo.devices",
               "must be auto or a non-empty list of CUDA device indices")
        _check(devices == "auto" or len(set(devices)) == len(devices), "hpo.devices",
               "has duplicates")
        _check(len(set(self.objectives)) == len(self.objectives), "hpo.objectives",
               "has duplicates")
        _check(self.grace_period > self.heartbeat_interval, "hpo.grace_period",
               "must be longer than hpo.heartbeat_interval")
        _check(not self.objectives or self.pruner.name == "none", "hpo.objectives",
               "several objectives need hpo.pruner.name: none (Optuna cannot prune "
               "multi-objective trials)")
        if storage is not None and not storage.startswith("journal:"):
            _check("://" in storage, "hpo.storage", f"got {storage!r}; expected null, a "
                   "database URL (sqlite:///path, postgresql://user@host/db) or journal:<path>")
            # params.yaml is committed: a password there would be published
            _check(not urlsplit(storage).password, "hpo.storage", "the URL contains a "
                   "password; set the environment variable HPO_STORAGE instead (it overrides "
                   "hpo.storage)")


@_section("export_best")
class ExportBestParams:
    """How export_best chooses among the complete trials."""

    # best: highest objective value. mean_minus_k_se: highest fold mean - k standard errors,
    # i.e. prefer a trial that is good on every fold over one lucky fold.
    select: Literal["best", "mean_minus_k_se"]
    k: Annotated[StrictFloat, Field(ge=0)]
    # checked: the chosen trial's tuned threshold only when it beat 0.5 on every fold it was not
    # tuned on (trials.csv threshold_gain > 0), else 0.5. tuned: always. default: always 0.5.
    threshold: Literal["checked", "tuned", "default"]


@_section("registry")
class RegistryParams:
    """Where retrain/evaluate put the model in MLflow's Model Registry."""

    model_name: _Name


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


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ParamsError(f"{PARAMS_FILE}: {key}: {message}")


# ---- pydantic's errors as one line: params.yaml: <dotted.key>: <what is wrong> ----

# dataclasses report a forbidden extra key as an unexpected argument; invalid_key: not a string
_UNKNOWN = ("unexpected_keyword_argument", "extra_forbidden", "invalid_key")
_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _locate(root: Any, loc: tuple, key: str) -> tuple[str, Any, str | None]:
    """The dotted key of the leading items of ``loc`` that are params keys (pydantic's labels of
    union members may follow), the plain type of the last one and its field's description."""
    tp, description = root, None
    for item in loc:
        fields = getattr(tp, "__pydantic_fields__", {})  # a section's (or _SearchSpec's) keys
        if isinstance(item, int) and item < len(fields):  # a positional argument
            item = list(fields)[item]
        if item in fields:
            key, tp = f"{key}.{item}".lstrip("."), typing.get_type_hints(tp)[item]
            description = fields[item].description
        elif isinstance(item, int) and typing.get_origin(tp) is list:
            key, tp, description = f"{key}[{item}]", typing.get_args(tp)[0], None
        else:
            break
    return key, tp, description


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    names = {type(None): "null", list: "a list", dict: "a mapping"}
    return names.get(origin or tp) or getattr(tp, "__name__", str(tp))


@contextlib.contextmanager
def _naming(root: Any, prefix: str, subject: str | None = None) -> Iterator[None]:
    """Pydantic's first error (unknown keys first) as a ParamsError line naming the key under
    ``prefix`` in ``root`` (a section or a type); ``subject``: a hyperparameter's range errors."""
    try:
        yield
    except pydantic.ValidationError as err:
        e = min(err.errors(), key=lambda e: e["type"] not in _UNKNOWN)
        ctx, loc, value = e.get("ctx") or {}, tuple(e["loc"]), e["input"]
        if isinstance(ctx.get("error"), ParamsError):  # a check of ours, already one line
            raise ctx["error"] from None
        if e["type"] in _UNKNOWN:
            where, parent, _ = _locate(root, loc[:-1], prefix)
            valid = ", ".join(parent.__pydantic_fields__)
            name = f"{where}.{loc[-1]}" if where else loc[-1]
            raise ParamsError(f"{PARAMS_FILE}: unknown key '{name}'; valid keys under "
                              f"{where or 'the top level'}: {valid}") from None
        key, tp, description = _locate(root, loc, prefix)
        key = key or "the top level"
        bound = next((b for b in _BOUNDS if b in ctx), None)
        if e["type"] == "missing":
            raise ParamsError(f"{PARAMS_FILE}: missing key '{key}'") from None
        if e["type"] == "finite_number":
            what = f"must be a finite number, got {value!r}"
        elif bound and subject:
            what = f"{subject} must be {_BOUNDS[bound]} {ctx[bound]}, got {value}"
        elif description and (bound or "pattern" in ctx):  # as stored: an int becomes a float
            what = description.format(value=float(value) if tp is float else value)
        elif bound:
            what = f"must be {_BOUNDS[bound]} {ctx[bound]:g}"
        elif tp is float and isinstance(value, str):
            what = f"got the string {value!r}, expected a number"
            if re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", value):
                what += f" (a number in quotes is a string: write {value.strip()} without them)"
        elif dataclasses.is_dataclass(tp):
            what = f"expected a mapping, got {value!r}"
        else:
            what = f"got {value!r}, expected {_type_name(tp)}"
        raise ParamsError(f"{PARAMS_FILE}: {key}: {what}") from None


# ---- the search space: one entry per Hyperparameters field ----

_SPEC = pydantic.TypeAdapter(_SearchSpec)


def _hp_value(name: str, value: Any, key: str) -> Any:
    """``value`` checked against hyperparameter ``name``'s type and range."""
    with _naming(_HP_TYPES[name], key, subject=name):
        return _HP_VALUES[name].validate_python(value)


def _search_param(name: str, raw: Any, key: str) -> SearchParam:
    if not isinstance(raw, dict):  # a single value fixes the hyperparameter
        return SearchParam(name=name, type="fixed", value=_hp_value(name, raw, key))
    with _naming(_SearchSpec, key):
        spec = _SPEC.validate_python(raw)
    when = spec.when or {}
    for other in when:
        _check(other in HYPERPARAMETERS and other != name, f"{key}.when",
               f"'{other}' is not another hyperparameter of the search space")
    expected, kind = HYPERPARAMETERS[name], spec.type
    if kind == "categorical":
        _check(spec.low is None and spec.high is None, key,
               "type categorical takes choices, not low/high")
        _check(bool(spec.choices), f"{key}.choices", "must be a non-empty list")
        values = tuple(_hp_value(name, c, f"{key}.choices[{i}]")
                       for i, c in enumerate(spec.choices or ()))
        _check(len(set(values)) == len(values), f"{key}.choices", "has duplicates")
        return SearchParam(name=name, type="categorical", choices=values, when=when)
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


_PARAMS = pydantic.TypeAdapter(Params)


def parse_params(raw: Any) -> Params:
    """Validate an already-loaded params mapping."""
    with _naming(Params, ""):
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
