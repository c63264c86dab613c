"""Readers of the files one stage hands the next: a split of the prepared pairs, best_params.yaml.

``read_split``: the pairs of one split (``train`` or ``test``) of paths.pairs, as prepare wrote
them. hpo, retrain and evaluate read the pairs through it.

``read_best_params`` / ``parse_best_params``: paths.best_params (written by export_best) as a
:class:`BestParams`, read with the same YAML rules as params.yaml (``YamlLoader``: ``1e-05`` is a
float, as DVC reads it). retrain, evaluate, predict, the report and hpo's warm start read it
through them. A
file missing, malformed or with a bad value is a ``DataError`` naming the file.

Only pipeline.params (and its leaf, pipeline.errors) is imported: several DVC stages list this
module and its imports under ``deps``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import IO, Annotated, Any

import pandas as pd
import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

from pipeline.errors import DataError
from pipeline.params import HYPERPARAMETERS, THRESHOLD, Hyperparameters, YamlLoader

Probability = Annotated[float, Field(ge=0.0, le=1.0)]


def read_split(source: str | Path | IO[bytes], split: str = "train") -> pd.DataFrame:
    """The pairs of ``split`` in file order, indexed 0..n-1; ``source``: paths.pairs or its bytes.

    Cells are read as written (``keep_default_na=False``): a sentence such as "NA" or "null"
    stays text instead of becoming NaN."""
    pairs = pd.read_csv(source, keep_default_na=False)
    rows = pairs[pairs["split"] == split].reset_index(drop=True)
    if rows.empty:
        name = source if isinstance(source, (str, Path)) else "the pairs"
        raise DataError(f"{name}: no pairs in split '{split}' (run `dvc repro prepare`)")
    return rows


# Unknown keys are ignored: the report reads this file at older revisions, which export_best may
# have written with other keys. The hyperparameters are checked only when asked for (below).
@pydantic_dataclass(frozen=True, config=ConfigDict(extra="ignore", allow_inf_nan=False))
class BestParams:
    """best_params.yaml: the chosen trial, its hyperparameters and the decision thresholds."""

    source: str  # the file (and revision) it was read from, for error messages
    trial: int | None = None
    value: float | None = None  # the trial's objective value
    threshold: Probability = THRESHOLD  # the one that ships: evaluate, the registry, predict
    # tuned on the trial's pooled out-of-fold predictions (None: the trial has none)
    tuned_threshold: Probability | None = None
    threshold_reason: str = ""
    selection: dict[str, Any] = dataclasses.field(default_factory=dict)
    # as written; hyperparameters_checked() validates them against the search space's names
    hyperparameters: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def tuned_or_shipped(self) -> float:
        """The tuned threshold, or the shipped one when the trial has none."""
        return self.tuned_threshold if self.tuned_threshold is not None else self.threshold

    def hyperparameters_checked(self) -> Hyperparameters:
        """The hyperparameters, typed and range-checked (what retrain trains with)."""
        if not self.hyperparameters:
            raise DataError(f"{self.source}: no hyperparameters (not a best-params file written "
                            "by export_best: `dvc repro export_best`)")
        unknown = sorted(set(self.hyperparameters) - set(HYPERPARAMETERS), key=str)
        if unknown:
            raise DataError(f"{self.source}: unknown hyperparameter '{unknown[0]}'; known: "
                            f"{', '.join(HYPERPARAMETERS)}")
        try:
            return _HYPERPARAMETERS.validate_python(self.hyperparameters)
        except ValidationError as err:
            raise DataError(f"{self.source}: {_first_error(err, 'hyperparameters')}") from None


_HYPERPARAMETERS = TypeAdapter(Hyperparameters)
_BEST_PARAMS = TypeAdapter(BestParams)


def _first_error(err: ValidationError, prefix: str = "") -> str:
    first = err.errors()[0]
    key = ".".join(str(part) for part in (prefix, *first["loc"]) if part != "")
    if first["type"] == "missing":
        return f"missing key '{key}'"
    return f"{key}: {first['msg']} (got {first.get('input')!r})"


def parse_best_params(text: str, source: str) -> BestParams:
    """BestParams from the text of a best-params file; ``source`` names it in errors."""
    try:
        doc = yaml.load(text, Loader=YamlLoader)
    except yaml.YAMLError as err:
        raise DataError(f"{source}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise DataError(f"{source}: not a best-params file (expected a mapping of keys)")
    try:
        # keys that are not strings are not keys of the file's format (and are ignored like them)
        keys = {k: v for k, v in doc.items() if isinstance(k, str)}
        return _BEST_PARAMS.validate_python({**keys, "source": source})
    except ValidationError as err:
        raise DataError(f"{source}: {_first_error(err)}") from None


def read_best_params(path: str | Path) -> BestParams:
    """paths.best_params (or another best-params file) as BestParams."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found (export_best writes it: "
                        "`dvc repro export_best`)") from None
    return parse_best_params(text, str(path))
