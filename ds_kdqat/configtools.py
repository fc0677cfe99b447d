"""Plain dicts (parsed JSON) to typed config dataclasses, with errors that name the key path.

Every config section in ds-kdqat is a ``@dataclass`` whose defaults are the documented defaults. This
module turns a JSON object into such a dataclass, field by field, following the type annotations:

* ``bool``, ``int``, ``float``, ``str`` (an int is accepted for a float, never a bool for a number; a float
  must be finite: Python's json reads ``NaN`` and ``Infinity``, which no setting accepts);
* ``Optional[X]`` / ``X | None``; ``Literal["a", "b"]``; unions of the above (first type that fits);
* ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]``; nested dataclasses.

A key the dataclass does not have is an error listing the allowed keys, so nothing a config says is
silently ignored. After a dataclass is built its ``validate(path)`` method, if any, checks ranges and
cross-field rules.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from .errors import ConfigError

_NONE_TYPE = type(None)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"object of {_type_name(get_args(tp)[1])}"
    if tp is _NONE_TYPE:
        return "null"
    if dataclasses.is_dataclass(tp):
        return "object"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in allowed)):
            return value
        raise ConfigError(path, f"got {json.dumps(value)}; allowed: {', '.join(json.dumps(a) for a in allowed)}")
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if _NONE_TYPE in options:
                return None
            raise ConfigError(path, f"must not be null; expected {_type_name(tp)}")
        candidates = [option for option in options if option is not _NONE_TYPE]
        if float in candidates and isinstance(value, float) and not math.isfinite(value):
            _to_finite_float(value, path)  # raises: NaN/inf is no other option either, say why
        if len(candidates) == 1:  # Optional[X]: X's own error, with its own (deeper) key path
            return _convert(value, candidates[0], path)
        for option in candidates:
            try:
                return _convert(value, option, path)
            except ConfigError:
                continue
        raise ConfigError(path, f"got {json.dumps(value)}; expected {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(path, f"got {json.dumps(value)}; expected a list")
        item_type = get_args(tp)[0]
        items = [_convert(v, item_type, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"got {json.dumps(value)}; expected an object")
        value_type = get_args(tp)[1]
        return {str(k): _convert(v, value_type, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if _is_real(value):
            return _to_finite_float(value, path)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a config class used a type this loader does not know
        raise TypeError(f"{path}: unsupported annotation {tp!r}")
    raise ConfigError(path, f"got {json.dumps(value)}; expected {_type_name(tp)}")


def is_int(value: Any) -> bool:
    """An int that is not a bool (JSON's ``true`` is no count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A real, finite number (not a bool, not NaN or ±inf)."""
    return _is_real(value) and math.isfinite(value)


def _to_finite_float(value: Any, path: str) -> float:
    """``value`` (an int or float) as a finite float; ConfigError naming ``path`` for NaN, ±inf or overflow."""
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        shown = json.dumps(value) if isinstance(value, float) else f"an integer of {value.bit_length()} bits"
        raise ConfigError(path, f"got {shown}; expected a finite number")
    return number


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data`` (a dict), validating every field; ``path`` prefixes errors."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected an object with keys {', '.join(sorted(_field_names(cls)))}")
    hints = typing.get_type_hints(cls)
    names = _field_names(cls)
    unknown = [k for k in data if k not in names]
    if unknown:
        key = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(key, f"unknown key; allowed keys: {', '.join(sorted(names))}")
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], f"{path}.{name}" if path else name)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(path)
    return obj


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def to_dict(obj: Any) -> Any:
    """A dataclass (tree) as plain JSON-ready data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"kdqat.distill.gamma=0.5"`` -> (["kdqat", "distill", "gamma"], 0.5).

    The value is read as JSON when it parses (numbers, true/false/null, lists, quoted strings), else it is
    taken as a plain string.
    """
    if "=" not in text:
        raise ConfigError(text, "an override must look like dotted.key=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise ConfigError(key, "an override key must be a dotted path such as kdqat.train.epochs")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of ``data`` with each ``dotted.key=value`` override set (creating objects on the way)."""
    result = json.loads(json.dumps(data))
    for text in overrides:
        parts, value = parse_override(text)
        node = result
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(".".join(parts[: i + 1]), f"is not an object, cannot set {'.'.join(parts)}")
            node = child
        node[parts[-1]] = value
    return result
