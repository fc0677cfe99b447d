"""The keys the installed DeepSpeed reads from a ds_config, derived from DeepSpeed itself, and a check against them.

DeepSpeed silently ignores a top-level key it does not know (``"zero_optimisation": {...}`` trains without
ZeRO), so ds-kdqat checks every key before any model loads. The accepted key set is not a hand-written list:
it is taken from the installed DeepSpeed at run time (once per process, :func:`deepspeed_schema` is cached):

* **traced keys** — :meth:`deepspeed.runtime.config.DeepSpeedConfig._initialize_params` (the code that reads
  a ds_config into DeepSpeed's config object) is run on an empty mapping that records every key looked up;
* **constants** — the key-like string constants (``ZERO_OPTIMIZATION = "zero_optimization"``) visible in
  ``deepspeed.runtime.config`` and in every DeepSpeed config module whose readers it imports (ZeRO,
  activation checkpointing, monitors, comm, autotuning, data pipeline, profiling, aio, checkpointing,
  precision, compile, timers, tensor parallel, …), which star-import their ``*constants*`` modules; this is
  a superset (it also holds the names of nested keys) that keeps a key valid should the trace miss it;
* the monitor sections (fields of ``DeepSpeedMonitorConfig``) and the two keys ``deepspeed.initialize``
  itself reads (``sequence_parallel_size``, ``data_parallel_size``);

minus the keys DeepSpeed lists as removed (``_REMOVED_TOP_LEVEL_CONFIG_KEYS``), which are reported with
DeepSpeed's own explanation. Inside a section that DeepSpeed parses with a pydantic model (``zero_optimization``,
``fp16``, ``bf16``, the monitors, ``comms_logger``, ``hybrid_engine``, ``compile``, ``tensor_parallel``,
``weight_quantization``), the keys are checked against the model's fields and aliases, recursively into
nested models (``zero_optimization.offload_param``). ``"kdqat"`` is ds-kdqat's own section and always allowed.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import logging
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

from .errors import ConfigError

KDQAT_SECTION = "kdqat"

# Sections DeepSpeed builds a pydantic model from: top-level key -> (module, class). The keys inside come from
# the model; a class an installed DeepSpeed does not have is skipped (that section's keys go unchecked).
_SECTION_MODELS: dict[str, tuple[str, str]] = {
    "zero_optimization": ("deepspeed.runtime.zero.config", "DeepSpeedZeroConfig"),
    "fp16": ("deepspeed.runtime.precision_config", "DeepSpeedFP16Config"),
    "bf16": ("deepspeed.runtime.precision_config", "DeepSpeedBF16Config"),
    "bfloat16": ("deepspeed.runtime.precision_config", "DeepSpeedBF16Config"),
    "comms_logger": ("deepspeed.comm.config", "CommsLoggerConfig"),
    "hybrid_engine": ("deepspeed.runtime.config", "HybridEngineConfig"),
    "compile": ("deepspeed.compile.config", "CompileConfig"),
    "tensor_parallel": ("deepspeed.runtime.tensor_parallel.config", "TPTrainingConfig"),
    "weight_quantization": ("deepspeed.inference.config", "WeightQuantConfig"),
}
# The model whose fields are the monitor sections (tensorboard, wandb, csv_monitor, comet).
_MONITOR_MODEL = ("deepspeed.monitor.config", "DeepSpeedMonitorConfig")
# Keys deepspeed.initialize reads as string literals, outside DeepSpeed's config modules.
_INITIALIZE_KEYS = frozenset({"sequence_parallel_size", "data_parallel_size"})
# Removed keys DeepSpeed lists, with its message: top level, and inside zero_optimization.
_REMOVED_TOP_LEVEL = "_REMOVED_TOP_LEVEL_CONFIG_KEYS"
_REMOVED_SECTION = {"zero_optimization": "_REMOVED_ZERO_CONFIG_KEYS"}

_KEY_LIKE = re.compile(r"[a-z][a-z0-9_]*")
_CONSTANT_NAME = re.compile(r"[A-Z][A-Z0-9_]*")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeepSpeedSchema:
    """What the installed DeepSpeed accepts.

    Attributes:
        version: ``deepspeed.__version__``.
        top_level: every accepted top-level key (``kdqat`` excluded; it is always allowed).
        sections: top-level key -> pydantic model class of that section.
        removed: top-level key -> DeepSpeed's message for a removed feature.
        removed_in_section: section -> {key -> DeepSpeed's message} for removed keys inside a section.
        traced: the top-level keys seen by the trace alone (reported, for inspection).
    """

    version: str
    top_level: frozenset[str]
    sections: Mapping[str, type] = field(default_factory=dict)
    removed: Mapping[str, str] = field(default_factory=dict)
    removed_in_section: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    traced: frozenset[str] = frozenset()


class _RecordingDict(dict):
    """A dict that notes every key looked up in it (``in``, ``get``, ``[]``, ``keys()``); writes go through.

    It is always truthy, so ``if param_dict and KEY in param_dict`` reaches the lookup.
    """

    def __init__(self, seen: set):
        super().__init__()
        self.seen = seen

    def __bool__(self) -> bool:
        return True

    def __contains__(self, key: object) -> bool:
        self.seen.add(key)
        return super().__contains__(key)

    def __getitem__(self, key: Any) -> Any:
        self.seen.add(key)
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self.seen.add(key)
        return super().get(key, default)

    def keys(self) -> "_RecordingKeys":  # type: ignore[override]
        return _RecordingKeys(self)


class _RecordingKeys:
    """``keys()`` of a :class:`_RecordingDict`: membership tests are recorded too."""

    def __init__(self, owner: _RecordingDict):
        self._owner = owner

    def __contains__(self, key: object) -> bool:
        return key in self._owner

    def __iter__(self):
        return iter(list(dict.keys(self._owner)))

    def __len__(self) -> int:
        return dict.__len__(self._owner)


def trace_read_keys(reader: Any) -> frozenset[str]:
    """The keys ``reader(param_dict)`` looks up in an empty ds_config (string keys only).

    A reader that fails part-way returns the keys it looked up before failing (logged at debug level).
    """
    seen: set = set()
    try:
        reader(_RecordingDict(seen))
    except Exception as error:  # noqa: BLE001 - a newer DeepSpeed may not read an empty dict to the end
        logger.debug("tracing DeepSpeed's config reader stopped early: %r", error)
    return frozenset(k for k in seen if isinstance(k, str))


def key_constants(modules: Iterable[types.ModuleType]) -> frozenset[str]:
    """Key-like string constants of ``modules``: UPPER_CASE names (not ``*_DEFAULT``) bound to ``snake_case``."""
    keys = set()
    for module in modules:
        for name, value in vars(module).items():
            if (isinstance(value, str) and _CONSTANT_NAME.fullmatch(name) and not name.endswith("_DEFAULT")
                    and _KEY_LIKE.fullmatch(value)):
                keys.add(value)
    return frozenset(keys)


def config_modules(root: types.ModuleType) -> list[types.ModuleType]:
    """``root`` and the DeepSpeed modules defining the functions and classes ``root`` imports (its readers)."""
    found = {root.__name__: root}
    for value in vars(root).values():
        if inspect.isfunction(value) or inspect.isclass(value):
            name = getattr(value, "__module__", "") or ""
            if name.startswith("deepspeed.") and name in sys.modules:
                found.setdefault(name, sys.modules[name])
    return [found[name] for name in sorted(found)]


def _field_keys(name: str, info: Any) -> list[str]:
    """A pydantic field's name and its aliases (string validation aliases and AliasChoices' strings)."""
    keys = [name]
    for alias in (info.alias, info.validation_alias):
        if isinstance(alias, str):
            keys.append(alias)
        else:  # None, or AliasChoices: its string choices
            keys.extend(c for c in getattr(alias, "choices", ()) if isinstance(c, str))
    return keys


def model_keys(model: type) -> frozenset[str]:
    """Field names and aliases (validation aliases included) of pydantic model ``model``."""
    return frozenset(k for name, info in model.model_fields.items() for k in _field_keys(name, info))


def _forbids_extra(model: type) -> bool:
    return getattr(model, "model_config", {}).get("extra") == "forbid"


def _nested_model(annotation: Any) -> Optional[type]:
    """The one pydantic model class in a field's annotation (``Optional[M]``, ``M``), else None."""
    from pydantic import BaseModel

    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    found = {m for m in (_nested_model(a) for a in typing.get_args(annotation)) if m is not None}
    return found.pop() if len(found) == 1 else None


def _resolve(module: str, name: str) -> Optional[type]:
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


@functools.lru_cache(maxsize=1)
def deepspeed_schema() -> DeepSpeedSchema:
    """The key schema of the installed DeepSpeed (imported here; cached for the process)."""
    import deepspeed
    import deepspeed.runtime.config as ds_config

    def read(param_dict: dict) -> None:
        stub = object.__new__(ds_config.DeepSpeedConfig)
        ds_config.DeepSpeedConfig._initialize_params(stub, param_dict)

    traced = trace_read_keys(read)
    sections: dict[str, type] = {}
    monitor = _resolve(*_MONITOR_MODEL)
    if monitor is not None:
        for name, info in monitor.model_fields.items():
            model = _nested_model(info.annotation)
            if model is not None:
                sections[name] = model
    for key, (module, name) in _SECTION_MODELS.items():
        model = _resolve(module, name)
        if model is not None:
            sections[key] = model
    removed = dict(getattr(ds_config, _REMOVED_TOP_LEVEL, {}) or {})
    removed_in_section = {key: dict(getattr(ds_config, attr, {}) or {}) for key, attr in _REMOVED_SECTION.items()}
    accepted = traced | key_constants(config_modules(ds_config)) | set(sections) | _INITIALIZE_KEYS
    return DeepSpeedSchema(
        version=str(getattr(deepspeed, "__version__", "?")),
        top_level=frozenset(accepted - set(removed) - {KDQAT_SECTION}),
        sections=sections,
        removed=removed,
        removed_in_section=removed_in_section,
        traced=traced,
    )


def _did_you_mean(key: str, allowed: Iterable[str]) -> str:
    match = difflib.get_close_matches(key, sorted(allowed), n=1)
    return f"; did you mean '{match[0]}'?" if match else ""


def _unknown(path: str, key: str, allowed: Iterable[str], fallback: str) -> ConfigError:
    hint = _did_you_mean(key, allowed)
    return ConfigError(path, "unknown DeepSpeed key" + (hint or f"; {fallback}"))


def check_section_keys(section: Mapping[str, Any], model: type, path: str,
                       removed: Optional[Mapping[str, str]] = None, version: str = "?") -> None:
    """Every key of ``section`` (at dotted ``path``) must be a field or alias of pydantic ``model``.

    Nested sections whose field is itself a model are checked the same way. A model that does not forbid
    extra keys is not checked (DeepSpeed would accept anything there).
    """
    if not _forbids_extra(model):
        return
    by_key = {k: info for name, info in model.model_fields.items() for k in _field_keys(name, info)}
    allowed = frozenset(by_key)
    for key, value in section.items():
        where = f"{path}.{key}"
        if removed and key in removed:
            raise ConfigError(where, f"removed from DeepSpeed {version}: {removed[key]}")
        if key not in allowed:
            listing = ", ".join(sorted(allowed))
            raise _unknown(where, key, allowed, f"{model.__name__} of DeepSpeed {version} accepts: {listing}")
        nested = _nested_model(by_key[key].annotation)
        if nested is not None and isinstance(value, dict):
            check_section_keys(value, nested, where, version=version)


def check_deepspeed_keys(ds: Mapping[str, Any], schema: Optional[DeepSpeedSchema] = None) -> None:
    """Raise :class:`ConfigError` for the first key of ``ds`` the installed DeepSpeed does not read.

    ``ds`` is a ds_config dict (its ``"kdqat"`` section, if present, is skipped). ``schema`` defaults to
    :func:`deepspeed_schema`.
    """
    schema = schema if schema is not None else deepspeed_schema()
    for key, value in ds.items():
        if key == KDQAT_SECTION:
            continue
        if key in schema.removed:
            raise ConfigError(key, f"removed from DeepSpeed {schema.version}: {schema.removed[key]}")
        if key not in schema.top_level:
            raise _unknown(key, key, schema.top_level | {KDQAT_SECTION},
                           f"DeepSpeed {schema.version} does not read it (ds-kdqat's own settings go under "
                           f"\"{KDQAT_SECTION}\")")
        model = schema.sections.get(key)
        if model is not None and isinstance(value, dict):
            check_section_keys(value, model, key, schema.removed_in_section.get(key), schema.version)
