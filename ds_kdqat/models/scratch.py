"""Teachers built from scratch: ``kdqat.model.teacher: "init:<model_type>"`` plus ``kdqat.model.init_config``.

Where no pretrained checkpoint is reachable (no pretrained ViT here), the teacher is a random-init task model of a
supported family, built from the HF config class of ``<model_type>`` with ``init_config``'s keys (every other key
at the class's default), and trained by the ordinary teacher fine-tuning stage (``teacher_finetune: "always"``);
what it becomes is saved in ``output_dir/teacher/`` like any fine-tuned teacher, and everything after loads it
from there. The random init is seeded by ``kdqat.seed``.

``init_config`` is checked before anything is built: every key must be one of the config class's own keys (HF
would silently keep a misspelt one), an integer key takes an integer, a float key a finite number, a boolean key
a boolean; ``hidden_size`` must be a multiple of ``num_attention_heads`` and ``image_size`` of ``patch_size``.
The label keys (``num_labels``, ``id2label``, ``label2id``) come from the task and may not be set.
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional

from torch import nn

from ..errors import ConfigError

SCRATCH_PREFIX = "init:"
# keys of a config's to_dict() that describe the file or the task, not the architecture
_NOT_INIT_KEYS = frozenset({"_name_or_path", "architectures", "transformers_version", "model_type", "id2label",
                            "label2id", "num_labels", "problem_type", "dtype", "return_dict", "output_attentions",
                            "output_hidden_states"})


def scratch_model_type(teacher: str) -> Optional[str]:
    """``"vit"`` for ``"init:vit"``; None when ``teacher`` names a checkpoint."""
    return teacher[len(SCRATCH_PREFIX):] if isinstance(teacher, str) and teacher.startswith(SCRATCH_PREFIX) else None


def is_scratch(teacher: str) -> bool:
    return scratch_model_type(teacher) is not None


def _check_value(key: str, value: Any, default: Any, path: str) -> None:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{path}.{key}", f"got {json.dumps(value)}; expected {expected} "
                                            f"(the default is {json.dumps(default)})")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad("a finite number")
    elif isinstance(default, str) and not isinstance(value, str):
        raise bad("a string")


def scratch_config(teacher: str, init_config: Optional[dict], path: str = "kdqat.model"):
    """The HF config of a from-scratch teacher (``teacher`` = ``"init:<model_type>"``), checked (see the module
    docstring); a :class:`ConfigError` at ``path.teacher`` / ``path.init_config.<key>`` otherwise."""
    from transformers import AutoConfig

    from .families import FAMILIES, supported_model_types

    model_type = scratch_model_type(teacher)
    supported = ", ".join(supported_model_types())
    if model_type not in FAMILIES:
        raise ConfigError(f"{path}.teacher", f"{teacher!r}: no ds-kdqat adapter for model_type {model_type!r}; "
                                             f"init: takes one of {supported}")
    defaults = AutoConfig.for_model(model_type).to_dict()
    allowed = sorted(k for k in defaults if k not in _NOT_INIT_KEYS)
    init = dict(init_config or {})
    for key, value in init.items():
        if key not in allowed:
            why = "comes from the task" if key in _NOT_INIT_KEYS else f"not a {model_type} config key"
            raise ConfigError(f"{path}.init_config.{key}", f"{why}; allowed: {', '.join(allowed)}")
        _check_value(key, value, defaults[key], f"{path}.init_config")
    config = AutoConfig.for_model(model_type, **init)
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "image_size",
                "patch_size", "num_channels"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value < 1:
            raise ConfigError(f"{path}.init_config.{key}", f"got {value}; must be >= 1")
    heads, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    if isinstance(heads, int) and isinstance(hidden, int) and hidden % heads:
        raise ConfigError(f"{path}.init_config.hidden_size", f"{hidden} is not a multiple of num_attention_heads "
                                                             f"{heads}")
    image, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if isinstance(image, int) and isinstance(patch, int) and image % patch:
        raise ConfigError(f"{path}.init_config.patch_size", f"{patch} does not divide image_size {image}")
    return config


def build_scratch_model(config, num_labels: int, problem_type: Optional[str] = None) -> nn.Module:
    """A random-init task model of ``config`` (from :func:`scratch_config`) with ``num_labels`` outputs and eager
    attention: an image classifier for a family that takes pixels, a sequence classifier for one that takes
    tokens. Seed torch first for a reproducible init."""
    import copy

    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    from .families import adapter_for_config

    config = copy.deepcopy(config)
    config.num_labels = num_labels
    if problem_type:
        config.problem_type = problem_type
    auto = AutoModelForImageClassification if adapter_for_config(config).input_kind == "pixels" \
        else AutoModelForSequenceClassification
    return auto.from_config(config, attn_implementation="eager")


def name_classes(model: nn.Module, class_names) -> nn.Module:
    """Store the task's class names with the model (``config.id2label`` / ``label2id``, saved in its config.json)."""
    names = [str(name) for name in class_names]
    if len(names) == getattr(model.config, "num_labels", None):
        model.config.id2label = dict(enumerate(names))
        model.config.label2id = {name: i for i, name in enumerate(names)}
    return model
