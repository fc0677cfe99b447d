"""Grid points of a sweep: their order, stable directory names, and the trainer command of each.

Order (and so the ``--run-index`` of a point and its SLURM array index): recipes, then budgets, then the
override combinations (keys in file order, values in list order), then tasks, then seeds, the last
varying fastest.

A point's directory name is readable and stable: ``<recipe>_<task>_<budget>_s<seed>[_<key>-<value>…]-<hash>``
where ``<key>`` is the last part of a dotted override key and ``<hash>`` the first 8 hex digits of the
SHA-1 of the point's canonical JSON, so two points never share a directory even when their readable parts
coincide, and the same point always gets the same name.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .config import AxisValue, SweepConfig, ds_config_for

_UNSAFE = re.compile(r"[^A-Za-z0-9.+-]+")


@dataclass(frozen=True)
class GridPoint:
    """One run of the sweep. ``hparams``: (dotted key, value) pairs of the swept overrides, in file order."""

    index: int
    recipe: str
    task: str
    seed: int
    budget: str | float
    hparams: tuple[tuple[str, AxisValue], ...] = ()

    @property
    def spec(self) -> dict:
        return {
            "recipe": self.recipe,
            "task": self.task,
            "seed": self.seed,
            "budget": self.budget,
            "hparams": {k: v for k, v in self.hparams},
        }

    @property
    def name(self) -> str:
        digest = hashlib.sha1(json.dumps(self.spec, sort_keys=True).encode()).hexdigest()[:8]
        parts = [self.recipe, self.task, budget_label(self.budget), f"s{self.seed}"]
        parts += [f"{key.rsplit('.', 1)[-1]}-{format_value(value)}" for key, value in self.hparams]
        readable = "_".join(_UNSAFE.sub("-", part).strip("-") or "x" for part in parts)
        return f"{readable}-{digest}"

    @property
    def group(self) -> tuple:
        """The table row this point belongs to: everything but task and seed."""
        return (self.recipe, self.budget, self.hparams)


def budget_label(budget: str | float) -> str:
    return budget if isinstance(budget, str) else f"x{budget:g}"


def format_value(value: AxisValue) -> str:
    """A value as written on a ``--set`` command line and in names; the trainer reads it back as the same
    JSON value (strings that would parse as JSON, like ``"1"`` or ``"true"``, are quoted)."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError:
            return value
        return json.dumps(value)
    return json.dumps(value)


def grid_points(config: SweepConfig) -> list[GridPoint]:
    axes = config.axes
    keys = list(axes.overrides)
    combos = list(itertools.product(*(axes.overrides[k] for k in keys))) if keys else [()]
    points = []
    for recipe, budget, combo, task, seed in itertools.product(axes.recipes, axes.budgets, combos, axes.tasks, axes.seeds):
        points.append(GridPoint(len(points), recipe, task, seed, budget, tuple(zip(keys, combo))))
    return points


def point_dir(config: SweepConfig, point: GridPoint) -> Path:
    return Path(config.output_root) / point.name


def point_overrides(config: SweepConfig, point: GridPoint) -> list[str]:
    """``dotted.key=value`` strings that turn the base config into this point's config."""
    keys = config.keys
    pairs = [(keys.recipe, point.recipe), (keys.task, point.task), (keys.seed, point.seed), (keys.budget, point.budget)]
    pairs += list(point.hparams)
    return [f"{key}={format_value(value)}" for key, value in pairs]


def point_command(config: SweepConfig, point: GridPoint) -> list[str]:
    """launcher + trainer + ``--ds_config`` + ``--output_dir`` + one ``--set`` per override + trainer_args."""
    ds_config = ds_config_for(config, point.recipe, point.task, point.budget)
    command = config.launcher_words() + [config.trainer, "--ds_config", ds_config,
                                         "--output_dir", str(point_dir(config, point))]
    for override in point_overrides(config, point):
        command += ["--set", override]
    return command + list(config.trainer_args)
