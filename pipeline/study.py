"""The study's identity and its schedule: what defines it, what each trial may see of it.

The study's name is a fingerprint of everything that defines the objective (data and folds,
search space, model, training settings, metric, aggregation, sampler, pruner, seed and
``hpo.parallelism``), so changing any of them starts a new study, while raising ``hpo.n_trials``
extends the same one. How many processes run trials (``hpo.n_jobs``, ``hpo.devices``, extra
``--worker`` processes) and where the study is stored are not part of it.

**The schedule.** Every trial has an *index* k = 0, 1, 2, ... (user attribute ``index``; in a study
where no attempt died or lost a race it equals the Optuna trial number). What trial k may see is
decided on a *virtual clock* that only the trials' outcomes drive, never timing:
``hpo.parallelism`` virtual workers take the indices in order, each the worker that frees first,
and keep it for the trial's virtual duration, its count of optimizer steps and validation units of
256 pairs (``params.VALIDATION_UNIT``; user attribute ``cost``: a deterministic function of what
the trial ran, and on a GPU close to its wall time). Trial k is suggested from, and pruned against,
the trials that ended on that clock by its virtual start; the trials before it that had not are
passed as RUNNING (the constant liar sees their hyperparameters). The sampler is seeded by k. So
every trial's hyperparameters, fold scores and state are the same whatever the number of processes,
their timing, or a kill and resume, while processes start a trial as soon as its virtual start is
decided: when the trial that frees its worker has ended and every running trial's progress (user
attribute ``progress``, a lower bound of its duration) is past that time.

An attempt whose stage or worker died (a kill, a stale heartbeat) or stopped leaves its index open:
the index runs again, with the same hyperparameters and seeds; after ``hpo.max_retries`` deaths
(stops of its own stage do not count) it fails for good. A trial that raised, or whose own trial
process died (a crash, the OOM killer), fails for good at once (user attribute ``error``), and the
study takes one more index. Two processes that claimed the same index at once: the later attempt
(higher Optuna number) is marked ``duplicate`` and does nothing.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from pipeline.common import derive_seed
from pipeline.errors import StageError
from pipeline.inputs import read_best_params
from pipeline.params import VALIDATION_UNIT, Hyperparameters, Params, SearchParam
from pipeline.storage import StudyStorage

INDEX = "index"  # user attribute: the trial's index in the schedule
ERROR = "error"  # user attribute of a trial that failed for good (it raised)
DUPLICATE = "duplicate"  # user attribute of an attempt that lost a race for its index
COST = "cost"  # user attribute: an ended trial's virtual duration (steps + validation units)
PROGRESS = "progress"  # user attribute: the part of it a running attempt has done so far
START = "virtual_start"  # user attribute: the trial's start on the virtual clock (for reading)
INTERRUPTED = "interrupted"  # user attribute of an attempt its own stage stopped
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)

# The sampler's warning about the constant liar's experimental `group`; chosen knowingly.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning,
                        module=r"optuna\..*|pipeline\.study")


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
        "parallelism": params.hpo.parallelism,
        # the virtual clock's unit of validation; it acts only where several trials run at once
        **({"validation_unit": VALIDATION_UNIT} if params.hpo.parallelism > 1 else {}),
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


def make_sampler(params: Params, index: int) -> optuna.samplers.BaseSampler:
    """The sampler that suggests trial ``index``: TPE (or random) seeded by the study seed and
    the index, with every setting we rely on written out (Optuna 5 changed defaults)."""
    s = params.hpo.sampler
    seed = derive_seed(params.seed, "sampler", index)
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(
        n_startup_trials=s.n_startup_trials,
        n_ei_candidates=24,
        multivariate=s.multivariate,
        group=s.group,  # experimental in Optuna; focal_* exist only for focal loss
        constant_liar=s.constant_liar,
        seed=seed,
    )


def make_pruner(params: Params) -> optuna.pruners.BasePruner:
    """The median or percentile pruner (or none). One report per fold (step = fold index) or per
    epoch (step = fold x the space's most epochs + epoch), so interval 1 and the warmup counted
    in folds or epochs. Both compare with COMPLETE trials only, which the schedule fixes;
    successive halving and Hyperband read RUNNING trials too, which is why they are not offered.
    """
    p = params.hpo.pruner
    if p.name == "none":
        return optuna.pruners.NopPruner()
    if p.name == "percentile":  # median = percentile 50; a lower percentile prunes more
        return optuna.pruners.PercentilePruner(
            p.percentile, n_startup_trials=p.n_startup_trials,
            n_warmup_steps=p.n_warmup_steps, interval_steps=1)
    return optuna.pruners.MedianPruner(
        n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps, interval_steps=1)


def suggest(trial: optuna.Trial, space: dict[str, SearchParam]) -> Hyperparameters:
    """The one place the search space becomes Optuna calls (conditional entries via ``when``)."""
    values: dict[str, Any] = {}
    for name, p in space.items():
        if any(values.get(other) != wanted for other, wanted in p.when.items()):
            continue
        if p.type == "fixed":
            values[name] = p.value
        elif p.type == "float":
            values[name] = trial.suggest_float(name, p.low, p.high, log=p.log)
        elif p.type == "int":
            values[name] = trial.suggest_int(name, int(p.low), int(p.high), log=p.log)
        else:
            values[name] = trial.suggest_categorical(name, list(p.choices))
    return Hyperparameters(**values)


# A fixed timestamp for the frozen copies in a view: nothing in a view may depend on when or
# where a trial ran.
_EPOCH = datetime.datetime(2000, 1, 1)


def _copy(t: FrozenTrial, state: TrialState) -> FrozenTrial:
    """What a view keeps of a trial: state, values, hyperparameters, intermediate values."""
    finished = state in FINISHED_STATES
    return FrozenTrial(
        number=-1, trial_id=-1, state=state, value=None,
        values=t.values if state == TrialState.COMPLETE else None,
        datetime_start=_EPOCH, datetime_complete=_EPOCH if finished else None,
        params=t.params, distributions=t.distributions, user_attrs={}, system_attrs={},
        intermediate_values=dict(t.intermediate_values) if finished else {})


@dataclass
class Ledger:
    """The study as a sequence of trial indices: each index's attempts, where it stands, and the
    virtual clock that decides what each trial may see (see the module docstring)."""

    attempts: dict[int, list[FrozenTrial]]
    max_retries: int
    parallelism: int = 1

    @classmethod
    def of(cls, study: optuna.Study, max_retries: int, parallelism: int = 1) -> Ledger:
        attempts: dict[int, list[FrozenTrial]] = defaultdict(list)
        for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
            if isinstance(t.user_attrs.get(INDEX), int) and not t.user_attrs.get(DUPLICATE):
                attempts[t.user_attrs[INDEX]].append(t)
        return cls(dict(attempts), max_retries, parallelism)

    def final(self, k: int) -> FrozenTrial | None:
        """The attempt at index ``k`` that ended with a result, else the latest (None: never
        started). Only one attempt can end with a result: a later one that lost the race for k
        marks itself duplicate before it runs, or dies unmarked without running."""
        found = self.attempts.get(k)
        if not found:
            return None
        results = [t for t in found if t.state in FINISHED_STATES or ERROR in t.user_attrs]
        return results[0] if results else found[-1]

    def died(self, k: int) -> int:
        """Attempts at ``k`` that ended without a result (killed or stale, not interrupted by
        their own stage stopping: that is no fault of the trial)."""
        return sum(t.state == TrialState.FAIL and ERROR not in t.user_attrs
                   and not t.user_attrs.get(INTERRUPTED) for t in self.attempts.get(k, []))

    def status(self, k: int) -> str:
        """open (to run), running, complete, pruned or failed (for good)."""
        t = self.final(k)
        if t is None:
            return "open"
        if t.state == TrialState.RUNNING:
            return "running"
        if t.state in FINISHED_STATES:
            return t.state.name.lower()
        if ERROR in t.user_attrs or self.died(k) > self.max_retries:
            return "failed"
        return "open"

    def ended(self, k: int) -> bool:
        return self.status(k) in ("complete", "pruned", "failed")

    def considered(self, n_trials: int) -> list[int]:
        """The indices that make a study of ``n_trials`` finished trials: from 0 up to the
        n_trials-th complete or pruned one (failed ones in between included)."""
        out, finished, k = [], 0, 0
        while finished < n_trials and k in self.attempts:
            out.append(k)
            finished += self.status(k) in ("complete", "pruned")
            k += 1
        return out

    def finished(self, n_trials: int) -> int:
        return sum(self.status(k) in ("complete", "pruned") for k in self.considered(n_trials))

    def done(self, n_trials: int) -> bool:
        """True when the first n_trials finished trials exist and nothing before them runs."""
        return self.finished(n_trials) >= n_trials and all(
            self.ended(k) for k in self.considered(n_trials))

    def duration(self, k: int) -> tuple[float, bool]:
        """Trial k's virtual duration and whether it is final (ended), else a lower bound: the
        most any attempt at k has done (user attribute ``progress``). An attempt that died had
        done no more than its rerun will, which repeats it exactly where training is
        reproducible (on a CPU; on a GPU up to its nondeterministic kernels)."""
        t = self.final(k)
        if self.ended(k):
            return (float(t.user_attrs.get(COST, 0.0)) if t is not None else 0.0), True
        if self.status(k) == "running":
            return max(float(a.user_attrs.get(PROGRESS, 0.0)) for a in self.attempts[k]), False
        return 0.0, False

    @functools.cached_property
    def starts(self) -> dict[int, float]:
        """The virtual start of every index whose start is decided, in index order.

        hpo.parallelism virtual workers, all free at 0; each index in turn takes the worker that
        frees first (the lower worker on ties) and keeps it for its virtual duration. A start is
        decided once the worker that frees first is known for sure: its trial has ended, and
        every running trial's lower bound is past that time."""
        free = [(0.0, True)] * self.parallelism  # per worker: when it frees, and whether final
        starts: dict[int, float] = {}
        k = 0
        while True:
            final = [(t, w) for w, (t, exact) in enumerate(free) if exact]
            if not final:
                break
            t, w = min(final)
            if any(not exact and bound <= t for bound, exact in free):
                break  # a running trial might end first: wait for its progress or its end
            starts[k] = t
            if self.status(k) == "open":
                break
            length, exact = self.duration(k)
            free[w] = (t + length, exact)
            k += 1
        return starts

    def next_index(self, n_trials: int) -> int | None:
        """The lowest open index, if the study still needs it and its start is decided; None
        otherwise."""
        held, k = 0, 0
        while True:
            status = self.status(k)
            if status == "open":
                return k if held < n_trials and k in self.starts else None
            held += status in ("running", "complete", "pruned")
            k += 1

    def view(self, k: int) -> list[FrozenTrial]:
        """What trial ``k`` may know: the trials that ended (on the virtual clock) by its start,
        and the others before it as RUNNING, with their hyperparameters (failed ones that ended
        are left out, as Optuna's samplers ignore them)."""
        start, trials = self.starts[k], []
        for j in range(k):
            t, (length, exact) = self.final(j), self.duration(j)
            if exact and self.starts[j] + length <= start:
                if self.status(j) in ("complete", "pruned"):
                    trials.append(_copy(t, t.state))
            elif t is not None:
                trials.append(_copy(t, TrialState.RUNNING))
        return trials


def suggest_from_view(params: Params, index: int, view: list[FrozenTrial],
                      directions: list, point: dict[str, Any] | None = None,
                      ) -> tuple[Hyperparameters, dict, dict]:
    """Trial ``index``'s hyperparameters, suggested in an in-memory study holding ``view``
    (``point``: a warm-start point to take its values from). Returns the hyperparameters and
    the Optuna params and distributions to record."""
    study = optuna.create_study(directions=directions, sampler=make_sampler(params, index))
    study.add_trials(view)
    if point:
        study.enqueue_trial(point)
    trial = study.ask()
    hp = suggest(trial, params.hpo.search_space)
    return hp, trial.params, trial.distributions


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


def primary(t: FrozenTrial) -> float | None:
    """The trial's hpo.metric aggregate (the first value of a multi-objective trial)."""
    return t.values[0] if t.values else None


def warm_start_points(params: Params, storage: StudyStorage) -> list[dict[str, Any]]:
    """hpo.warm_start resolved to the points the first trials take (only valid values kept)."""
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
        points = [read_best_params(path).hyperparameters]
    unique: list[dict[str, Any]] = []
    for point in map(lambda p: _in_space(params, p), points):
        if point and point not in unique:
            unique.append(point)
    return unique
