"""The sweep file: which runs make up a grid, how each is launched, and how results are tabulated.

A sweep file is JSON or YAML (``.yaml``/``.yml``)::

    ds_config: ds_configs/map.json          # base config every point starts from; may name the point's
                                            # {task}, {recipe}, {budget} (lower case): per-task settings
                                            # such as ds_configs/paper/ternarybert_{task}.json
    output_root: runs/sweep-minilm          # one sub-directory per grid point
    launcher: "deepspeed --num_accelerators 2"   # command prefix; "" = the Python running the sweep
    axes:
      recipes: [ternarybert, map, output, map_output]
      tasks: [rt_polarity]
      seeds: [1, 2, 3]
      budgets: [O, O2, O4]
      overrides: {kdqat.distill.gamma: [0.2, 0.5]}    # dotted key → values; every combination is a point
    slurm: {partition: gpu, time: "04:00:00", gpus_per_task: 1, setup: ["source .venv/bin/activate"]}
    aggregate: {model: student, scale: 100, digits: 2}

Relative paths are taken from the current directory and made absolute when the file is loaded, so a
snapshot of the loaded config (``<output_root>/sweep_config.json``) runs the same from anywhere.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ..configtools import apply_overrides, from_dict, to_dict
from ..errors import ConfigError

Scalar = bool | int | float | str
# an override axis value; null sets the key to null (e.g. kdqat.data.train_file: [null, aug.tsv] = without / with)
AxisValue = Optional[Scalar]
BudgetName = Literal["O", "O2", "O4"]

# what a ds_config path may name of its point (ds_configs/paper/ternarybert_{task}.json)
PLACEHOLDERS = ("task", "recipe", "budget")
PLACEHOLDER = re.compile(r"\{(\w*)\}")

# run/train.py of this checkout: the default trainer.
DEFAULT_TRAINER = Path(__file__).resolve().parents[2] / "run" / "train.py"


def _require_unique(values: list, path: str) -> None:
    seen = set()
    for i, value in enumerate(values):
        key = json.dumps(value)
        if key in seen:
            raise ConfigError(f"{path}[{i}]", f"{key} appears twice; grid values must be distinct")
        seen.add(key)


def _require_dotted(key: str, path: str) -> None:
    if not key or any(not part for part in key.split(".")) or "=" in key or " " in key:
        raise ConfigError(path, f"got {key!r}; expected a dotted config key such as kdqat.distill.gamma")


@dataclass
class SweepAxes:
    """The grid: every combination of recipe × budget × overrides × task × seed is one run.

    ``budgets``: ``"O"``, ``"O2"``, ``"O4"`` (1×, 2×, 4× the base schedule) or a positive multiplier.
    ``overrides``: dotted config key → the values to sweep (e.g. γ of the unified loss, a KL temperature); null
    sets the key to null (``kdqat.data.train_file: [null, train_aug.tsv]`` = without and with a train file).
    """

    recipes: list[str] = field(default_factory=lambda: ["ternarybert"])
    tasks: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [42])
    budgets: list[BudgetName | float] = field(default_factory=lambda: ["O"])
    overrides: dict[str, list[AxisValue]] = field(default_factory=dict)

    def validate(self, path: str = "axes") -> None:
        for name in ("recipes", "tasks", "seeds", "budgets"):
            values = getattr(self, name)
            if not values:
                raise ConfigError(f"{path}.{name}", "must list at least one value")
            _require_unique(values, f"{path}.{name}")
        for i, recipe in enumerate(self.recipes):
            if not recipe:
                raise ConfigError(f"{path}.recipes[{i}]", "must be a recipe name")
        for i, task in enumerate(self.tasks):
            if not task:
                raise ConfigError(f"{path}.tasks[{i}]", "must be a task name")
        for i, budget in enumerate(self.budgets):
            if isinstance(budget, float) and budget <= 0:
                raise ConfigError(f"{path}.budgets[{i}]", f"got {budget}; a budget multiplier must be > 0")
        for key, values in self.overrides.items():
            _require_dotted(key, f"{path}.overrides.{key}")
            if not values:
                raise ConfigError(f"{path}.overrides.{key}", "must list at least one value")
            _require_unique(values, f"{path}.overrides.{key}")


@dataclass
class SweepKeys:
    """The config keys (``--set`` paths of the trainer) that each axis sets."""

    recipe: str = "kdqat.distill.recipe"
    task: str = "kdqat.data.task"
    seed: str = "kdqat.seed"
    budget: str = "kdqat.distill.budget"

    def validate(self, path: str = "keys") -> None:
        for name in ("recipe", "task", "seed", "budget"):
            _require_dotted(getattr(self, name), f"{path}.{name}")


@dataclass
class SlurmConfig:
    """The sbatch array script written by ``run/sweep.py --slurm`` (one array task per grid point).

    ``max_parallel`` throttles the array (``--array=0-(n-1)%max_parallel``); ``sbatch_options`` are extra
    ``#SBATCH`` options (e.g. ``"--account=lab"``); ``setup`` are shell lines run before the point (module
    loads, venv activation); ``script`` is the file name, relative to ``output_root``.
    """

    job_name: str = "kdqat-sweep"
    partition: Optional[str] = None
    time: Optional[str] = None
    nodes: int = 1
    gpus_per_task: int = 0
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None
    max_parallel: Optional[int] = None
    sbatch_options: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    script: str = "sweep.sbatch"

    def validate(self, path: str = "slurm") -> None:
        if not self.job_name or any(c.isspace() for c in self.job_name):
            raise ConfigError(f"{path}.job_name", f"got {self.job_name!r}; expected a name without spaces")
        for name in ("nodes",):
            if getattr(self, name) < 1:
                raise ConfigError(f"{path}.{name}", f"got {getattr(self, name)}; must be >= 1")
        if self.gpus_per_task < 0:
            raise ConfigError(f"{path}.gpus_per_task", f"got {self.gpus_per_task}; must be >= 0")
        for name in ("cpus_per_task", "max_parallel"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{path}.{name}", f"got {value}; must be >= 1 or null")
        for i, option in enumerate(self.sbatch_options):
            if not option.startswith("-") or "\n" in option:
                raise ConfigError(f"{path}.sbatch_options[{i}]", f"got {option!r}; expected one option like --account=lab")
        if not self.script or os.path.isabs(self.script):
            raise ConfigError(f"{path}.script", f"got {self.script!r}; expected a file name relative to output_root")


@dataclass
class AggregateConfig:
    """The results table: ``model``'s ``metric`` (null = each run's ``primary_metric``) × ``scale``,
    "mean ± std" over seeds with ``digits`` decimals; ``include_teacher`` adds the full-precision row."""

    model: Literal["student", "teacher"] = "student"
    metric: Optional[str] = None
    scale: float = 100.0
    digits: int = 2
    include_teacher: bool = True

    def validate(self, path: str = "aggregate") -> None:
        if self.scale <= 0:
            raise ConfigError(f"{path}.scale", f"got {self.scale}; must be > 0")
        if not 0 <= self.digits <= 8:
            raise ConfigError(f"{path}.digits", f"got {self.digits}; must be between 0 and 8")
        if self.metric is not None and not self.metric:
            raise ConfigError(f"{path}.metric", "must be a metric name or null")


@dataclass
class SweepConfig:
    """A whole sweep. ``trainer``: the training script ("" = run/train.py of this checkout); ``launcher``:
    the command prefix before it ("" = the Python running the sweep; e.g. ``"torchrun --standalone
    --nproc_per_node 2"``); ``trainer_args``: extra arguments after the per-point ones (e.g.
    ``["--set", "kdqat.logging.progress=false"]``); ``timeout_s``: kill a point that runs longer."""

    ds_config: str = ""
    output_root: str = "runs/sweep"
    name: str = "sweep"
    launcher: str = ""
    trainer: str = ""
    trainer_args: list[str] = field(default_factory=list)
    timeout_s: Optional[float] = None
    axes: SweepAxes = field(default_factory=SweepAxes)
    keys: SweepKeys = field(default_factory=SweepKeys)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    aggregate: AggregateConfig = field(default_factory=AggregateConfig)

    def validate(self, path: str = "") -> None:
        prefix = f"{path}." if path else ""
        if not self.ds_config:
            raise ConfigError(f"{prefix}ds_config", "is required: the base ds_config JSON every point starts from")
        unknown = sorted(set(PLACEHOLDER.findall(self.ds_config)) - set(PLACEHOLDERS))
        if unknown:
            raise ConfigError(f"{prefix}ds_config", f"unknown placeholder {{{unknown[0]}}}; allowed: "
                              + ", ".join(f"{{{name}}}" for name in PLACEHOLDERS))
        if not self.output_root:
            raise ConfigError(f"{prefix}output_root", "must be a directory path")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ConfigError(f"{prefix}timeout_s", f"got {self.timeout_s}; must be > 0 or null")
        try:
            shlex.split(self.launcher)
        except ValueError as error:
            raise ConfigError(f"{prefix}launcher", f"cannot be split into words: {error}") from None
        swept = {self.keys.recipe, self.keys.task, self.keys.seed, self.keys.budget}
        for key in self.axes.overrides:
            if key in swept:
                raise ConfigError(f"{prefix}axes.overrides.{key}", "is already set by an axis (see keys)")

    def launcher_words(self) -> list[str]:
        return shlex.split(self.launcher) if self.launcher.strip() else [sys.executable]


def _read_file(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(str(path), f"cannot read the sweep file: {error.strerror}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            problem = getattr(error, "problem", None) or str(error)
            raise ConfigError(where, f"not valid YAML: {problem}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}:{error.lineno}", f"not valid JSON: {error.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "the sweep file must hold one object (mapping) at the top level")
    return data


def load_sweep_config(path: str | os.PathLike, overrides: list[str] = (), check_files: bool = True) -> SweepConfig:
    """Read, override (``dotted.key=value``), validate and resolve a sweep file.

    Errors are :class:`ConfigError` naming the key path and the file. With ``check_files`` the base
    ds_config and the trainer must exist.
    """
    path = Path(path)
    data = apply_overrides(_read_file(path), list(overrides))
    try:
        config = from_dict(SweepConfig, data, "")
    except ConfigError as error:
        raise ConfigError(error.path, f"{error.message} (in {path})") from None
    return resolve_paths(config, check_files)


def resolve_paths(config: SweepConfig, check_files: bool = True) -> SweepConfig:
    """Make ``ds_config``, ``output_root`` and ``trainer`` absolute (from the current directory)."""
    config.ds_config = str(Path(config.ds_config).expanduser().resolve())
    config.output_root = str(Path(config.output_root).expanduser().resolve())
    config.trainer = str(Path(config.trainer).expanduser().resolve()) if config.trainer else str(DEFAULT_TRAINER)
    if check_files:
        for ds_config in sorted(set(ds_configs_of(config))):
            if not Path(ds_config).is_file():
                raise ConfigError("ds_config", f"file not found: {ds_config}")
        if not Path(config.trainer).is_file():
            raise ConfigError("trainer", f"file not found: {config.trainer}")
    return config


def ds_config_for(config: SweepConfig, recipe: str, task: str, budget) -> str:
    """The ds_config of a point: ``config.ds_config`` with its placeholders filled in (lower case;
    budget ``O2`` → ``o2``, a numeric budget as written, ``1.5``)."""
    values = {"task": task, "recipe": recipe, "budget": budget if isinstance(budget, str) else f"{budget:g}"}
    return PLACEHOLDER.sub(lambda match: str(values[match.group(1)]).lower(), config.ds_config)


def ds_configs_of(config: SweepConfig) -> list[str]:
    """Every point's ds_config (one path when the file names no placeholder)."""
    axes = config.axes
    return [ds_config_for(config, recipe, task, budget)
            for recipe in axes.recipes for task in axes.tasks for budget in axes.budgets]


def sweep_config_to_json(config: SweepConfig) -> dict:
    return to_dict(config)
