"""How ``params.yaml`` is checked, apart from what it holds (that is ``pipeline/params.py``).

:func:`section` makes a class a frozen pydantic dataclass for one params section whose
construction (from the file, in code, or by ``dataclasses.replace``) raises :class:`ParamsError`;
:func:`naming` turns pydantic's first error into that one line, ``params.yaml: <dotted.key>: <what
is wrong>``, naming the key and, for an unknown key, the valid ones; :func:`check` is a check of
ours in the same form.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import types
import typing
from collections.abc import Iterator
from typing import Any, Literal

import pydantic
from pydantic.dataclasses import dataclass as pydantic_dataclass
from typing_extensions import dataclass_transform

from pipeline.errors import ParamsError

PARAMS_FILE = "params.yaml"
# Unknown keys and inf/nan are errors; strictness is per field (StrictInt, ...) because
# pydantic's strict mode would also refuse a mapping for a nested section.
CONFIG = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False)


@dataclass_transform(frozen_default=True)
def section(key: str) -> Any:
    """A frozen pydantic dataclass for the params section ``key`` that raises ParamsError."""

    def wrap(cls: type) -> type:
        cls = pydantic_dataclass(frozen=True, config=CONFIG)(cls)
        validate = cls.__init__

        @functools.wraps(validate)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            with naming(cls, key):
                validate(self, *args, **kwargs)

        cls.__init__ = __init__
        return cls

    return wrap


def check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ParamsError(f"{PARAMS_FILE}: {key}: {message}")


# dataclasses report a forbidden extra key as an unexpected argument; invalid_key: not a string
_UNKNOWN = ("unexpected_keyword_argument", "extra_forbidden", "invalid_key")
_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _locate(root: Any, loc: tuple, key: str) -> tuple[str, Any, str | None]:
    """The dotted key of the leading items of ``loc`` that are params keys (pydantic's labels of
    union members may follow), the plain type of the last one and its field's description."""
    tp, description = root, None
    for item in loc:
        fields = getattr(tp, "__pydantic_fields__", {})  # a section's (or a search spec's) keys
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
def naming(root: Any, prefix: str, subject: str | None = None) -> Iterator[None]:
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
