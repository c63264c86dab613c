"""The study's identity: what defines it, its name, its sampler and pruner, and its warm start.

The study's name is a fingerprint of everything that defines the objective (data and folds,
search space, model, training settings, metric, aggregation, sampler, pruner, seed), so changing
any of them starts a new study, while raising ``hpo.n_trials`` extends the same one. How many
trials run at once (``hpo.n_jobs``, ``hpo.devices``) and where the study is stored are not part of
it: they change how fast the study fills, not what it holds.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from pipeline.common import derive_seed
from pipeline.errors import StageError
from pipeline.params import Params, YamlLoader
from pipeline.storage import StudyStorage
from pipeline.study_outputs import primary


def study_definition(params: Params, pairs_digest: str,
                     warm_start: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Everything that defines the objective (n_trials, n_jobs and storage deliberately not)."""
    train = params.train
    return {
        "objectives": [params.hpo.metric, *params.hpo.objectives],
        "warm_start": warm_start or [],
        "pairs_sha256": pairs_digest,  # the prepared data, its split and its folds
        "n_folds": params.prepare.n_folds,
        "seed": params.seed,
        "model": asdict(params.model),
        "train": {"negatives_per_positive": train.negatives_per_positive,
                  "early_stopping_patience": train.early_stopping_patience,
                  "precision": train.precision},
        "metric": params.hpo.metric,
        "fold_aggregation": params.hpo.fold_aggregation,
        "sampler": asdict(params.hpo.sampler),
        "pruner": _pruner_definition(params),
        "search_space": {name: asdict(p) for name, p in params.hpo.search_space.items()},
    }


def _pruner_definition(params: Params) -> dict[str, Any]:
    """The pruner's settings that act: the percentile only defines a percentile pruner, and
    no setting but the name defines the absent pruner (``none``)."""
    d = asdict(params.hpo.pruner)
    if d["name"] == "none":
        return {"name": "none"}
    if d["name"] != "percentile":
        d.pop("percentile")
    return d


def study_name(prefix: str, definition: dict[str, Any]) -> str:
    blob = json.dumps(definition, sort_keys=True, default=list).encode()
    return f"{prefix}-{hashlib.sha256(blob).hexdigest()[:12]}"


def make_sampler(params: Params, finished: int, worker: bool) -> optuna.samplers.BaseSampler:
    """TPE (or random) with every setting we rely on written out (Optuna 5 changed defaults).

    The stage makes a fresh sampler for every wave of trials, seeded by ``seed`` and the number of
    trials the study had finished when the wave began: the same study history gives the same
    suggestions, however the earlier waves were timed or interrupted, and a resumed study does not
    replay the first run's startup points. An extra ``--worker`` also mixes in its host, pid and
    clock (workers are asynchronous anyway, see the README's "Parallel trials").
    """
    s = params.hpo.sampler
    keys = ("sampler", finished, socket.gethostname(), time.time_ns()) if worker else \
        ("sampler", finished)
    seed = derive_seed(params.seed, *keys)
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # `group` is marked experimental; we choose it knowingly (focal_* exist only for focal loss).
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna.samplers.TPESampler(
        n_startup_trials=s.n_startup_trials,
        n_ei_candidates=24,
        multivariate=s.multivariate,
        group=s.group,
        constant_liar=s.constant_liar,
        seed=seed,
    )


def make_pruner(params: Params) -> optuna.pruners.BasePruner:
    p = params.hpo.pruner
    if p.name == "none":
        return optuna.pruners.NopPruner()
    # One report per fold (step = fold index) or per epoch (step = fold x the space's most
    # epochs + epoch, hpo.pruner.report), so interval 1 and the warmup counted in folds or
    # epochs. Both pruners compare with COMPLETE trials only, which the stage tells at the end
    # of a wave: a decision never depends on how the trials of a wave are timed (successive
    # halving and Hyperband read RUNNING trials' values, which is why they are not offered).
    if p.name == "percentile":  # median = percentile 50; a lower percentile prunes more
        return optuna.pruners.PercentilePruner(
            p.percentile, n_startup_trials=p.n_startup_trials,
            n_warmup_steps=p.n_warmup_steps, interval_steps=1)
    return optuna.pruners.MedianPruner(
        n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps, interval_steps=1)


def _in_space(params: Params, point: dict[str, Any]) -> dict[str, Any]:
    """The part of ``point`` that is a valid value of a searched hyperparameter."""
    kept = {}
    for name, p in params.hpo.search_space.items():
        value = point.get(name)
        if value is None or not p.searched:
            continue
        if any(point.get(k, kept.get(k)) != v for k, v in p.when.items()):
            continue
        if p.type == "categorical":
            ok = value in p.choices
        else:
            ok = isinstance(value, (int, float)) and p.low <= value <= p.high
        if ok:
            kept[name] = int(value) if p.type == "int" else value
    return kept


def warm_start_points(params: Params, storage: StudyStorage) -> list[dict[str, Any]]:
    """hpo.warm_start resolved to the points to enqueue first (only valid values are kept)."""
    spec = params.hpo.warm_start
    if not spec:
        return []
    if spec.startswith("study:"):
        try:
            other = optuna.load_study(study_name=spec[len("study:"):], storage=storage.optuna)
        except KeyError as err:
            raise StageError(f"params.yaml: hpo.warm_start: no study '{spec[6:]}' in "
                             f"{storage.redacted}") from err
        complete = [t for t in other.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
        complete.sort(key=lambda t: (-primary(t), t.number))
        points = [t.params for t in complete[: params.hpo.warm_start_trials]]
    else:
        path = Path(spec)
        if not path.is_file():
            raise StageError(f"params.yaml: hpo.warm_start: {path} not found (a best-params "
                             "YAML written by export_best, or study:<name>)")
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=YamlLoader) or {}
        points = [doc.get("hyperparameters") or {}]
    unique: list[dict[str, Any]] = []
    for point in map(lambda p: _in_space(params, p), points):
        if point and point not in unique:
            unique.append(point)
    return unique
