"""Reading frozen config dataclasses back from JSON that someone else may have written (a shared run's
config.json, a checkpoint's "config"): every field is checked against its declared type before the
dataclass is built, so a field of the wrong type or size is one clear error, never a traceback later.

The types understood are those the configs use: bool, int, float, str, ``X | None``, ``tuple[int, ...]``,
``tuple[int, int, int]`` and nested dataclasses. Ranges are the dataclasses' own (their ``__post_init__``);
this module adds what JSON alone can break: wrong types, non-finite numbers, integers past 64 bits,
unknown and missing keys, text and lists too long to be a real config.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import MISSING, fields, is_dataclass
from typing import Any

from fullres.errors import UserError

MAX_INT = 2**63 - 1
MAX_TEXT = 4096  # characters in one string field (a path, a network's arguments as JSON)
MAX_ITEMS = 64  # items in one tuple field (channels, a shape)


def from_data(cls: type, data: Any, where: str) -> Any:
    """`cls(**data)` after checking `data` against `cls`'s fields: unknown and missing keys, each value's type,
    nested dataclasses recursively. A field whose metadata says ``internal`` is never read from data (only the
    process that opens a run sets it). UserError naming `where` and the field on any mismatch, or the
    dataclass's own ValueError."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected an object, got {_kind(data)}")
    hints = typing.get_type_hints(cls)
    declared = {spec.name: spec for spec in fields(cls) if spec.init and not spec.metadata.get("internal")}
    unknown = sorted(str(key)[:40] for key in data if key not in declared)
    if unknown:
        raise UserError(f"{where}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
    missing = [name for name, spec in declared.items()
               if name not in data and spec.default is MISSING and spec.default_factory is MISSING]
    if missing:
        raise UserError(f"{where}: missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    values = {name: _value(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except UserError as error:
        raise UserError(f"{where}: {error}") from None
    except (TypeError, ValueError, OverflowError) as error:
        raise UserError(f"{where}: {str(error).strip() or type(error).__name__}") from None


def _value(kind: Any, value: Any, where: str) -> Any:
    if is_dataclass(kind):
        return from_data(kind, value, where)
    origin, arguments = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        (kind,) = [argument for argument in arguments if argument is not type(None)]
        return _value(kind, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) > MAX_ITEMS:
            raise UserError(f"{where}: expected a list of at most {MAX_ITEMS} items, got {_kind(value)}")
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return tuple(_value(arguments[0], item, where) for item in value)
        if len(value) != len(arguments):
            raise UserError(f"{where}: expected {len(arguments)} items, got {len(value)}")
        return tuple(_value(item_kind, item, where) for item_kind, item in zip(arguments, value))
    if kind is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {_kind(value)}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: expected a whole number, got {_kind(value)}")
        if abs(value) > MAX_INT:
            raise UserError(f"{where}: {str(value)[:20]}... does not fit in 64 bits")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: expected a number, got {_kind(value)}")
        if isinstance(value, int) and abs(value) > MAX_INT or not math.isfinite(value):
            raise UserError(f"{where}: expected a finite number, got {str(value)[:24]}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: expected text, got {_kind(value)}")
        if len(value) > MAX_TEXT or "\x00" in value:
            raise UserError(f"{where}: text of {len(value)} characters{' with a NUL' if chr(0) in value else ''} "
                            "is not a config value")
        return value
    raise TypeError(f"{where}: schema has no rule for {kind!r}")  # a config field of a type this module lacks


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return f"the number {str(value)[:24]}"
    if isinstance(value, str):
        return f"text {value[:30]!r}"
    return {"list": "a list", "tuple": "a list", "dict": "an object"}.get(type(value).__name__, type(value).__name__)
