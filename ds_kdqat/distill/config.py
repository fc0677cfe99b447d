"""Typed config of the distillation objective and schedule (the ``kdqat.distill`` section).

Example (JSON)::

    {"recipe": "map_output", "unified": "SM1", "gamma": 0.5,
     "layers": {"mode": "uniform", "k": 4}, "weights": {"pred": 1.0, "ground_truth": 0.0},
     "budget": "O2"}

Recipe names come from :data:`ds_kdqat.distill.recipes.RECIPES` and term names (``terms``, the keys of
``weights``) from :data:`ds_kdqat.distill.terms.TERMS`, so a registered term is selected with
``{"recipe": "custom", "terms": ["pred", "my_term"], "weights": {"my_term": 0.5}}``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, get_args

from ds_kdqat.errors import ConfigError

from .recipes import RECIPES, kd_recipe_names
from .terms import TERMS

BUDGETS = {"O": 1.0, "O2": 2.0, "O4": 4.0}


def _allowed(values) -> str:
    return ", ".join(json.dumps(v) for v in values)


def _check_name(value, allowed, path: str) -> None:
    """``value`` is one of ``allowed`` (worded as configtools words a Literal)."""
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(path, f"got {json.dumps(value)}; allowed: {_allowed(allowed)}")


def _check_literal(value, literal, path: str) -> None:
    _check_name(value, get_args(literal), path)


def _check_positive(value: float, path: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ConfigError(path, f"got {value!r}; expected a finite number > 0")


@dataclass
class LayerSelection:
    """Which transformer layers the per-layer terms use.

    ``mode``: ``"all"`` (every layer), ``"uniform"`` (``k`` layers, uniformly spaced, the last layer
    always included: layer ⌈(i+1)·L/k⌉ − 1 for i = 0..k−1) or ``"list"`` (``indices``, 0-based; negative
    counts from the end). ``include_embedding``: the layer-output term also matches the embedding output
    ``X_0`` (TernaryBERT's L+1 tensors).
    """

    mode: Literal["all", "uniform", "list"] = "all"
    k: Optional[int] = None
    indices: Optional[list[int]] = None
    include_embedding: bool = True

    def validate(self, path: str = "layers") -> None:
        _check_literal(self.mode, Literal["all", "uniform", "list"], f"{path}.mode")
        if self.mode == "uniform":
            if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
                raise ConfigError(f"{path}.k", f"got {self.k!r}; mode \"uniform\" needs an integer k >= 1")
        elif self.k is not None:
            raise ConfigError(f"{path}.k", f"is only used with mode \"uniform\" (mode is \"{self.mode}\")")
        if self.mode == "list":
            if not self.indices:
                raise ConfigError(f"{path}.indices", "mode \"list\" needs a non-empty list of layer indices")
            if any(not isinstance(i, int) or isinstance(i, bool) for i in self.indices):
                raise ConfigError(f"{path}.indices", f"got {self.indices!r}; expected integers")
        elif self.indices is not None:
            raise ConfigError(f"{path}.indices", f"is only used with mode \"list\" (mode is \"{self.mode}\")")

    def resolve(self, num_layers: int, path: str = "layers") -> tuple[int, ...]:
        """The selected layer indices (sorted, distinct, 0-based) of a model with ``num_layers`` layers."""
        self.validate(path)
        if self.mode == "all":
            return tuple(range(num_layers))
        if self.mode == "uniform":
            if self.k > num_layers:
                raise ConfigError(f"{path}.k", f"got {self.k}; the model has only {num_layers} layers")
            return tuple(math.ceil((i + 1) * num_layers / self.k) - 1 for i in range(self.k))
        chosen = set()
        for position, index in enumerate(self.indices):
            resolved = index + num_layers if index < 0 else index
            if not 0 <= resolved < num_layers:
                raise ConfigError(
                    f"{path}.indices[{position}]", f"got {index}; the model has layers 0..{num_layers - 1}"
                )
            chosen.add(resolved)
        return tuple(sorted(chosen))


class TermWeights(dict):
    """Weight of each loss term, ``{term: weight}`` (multiplies the term; 0 switches it off).

    Holds every registered term (:data:`ds_kdqat.distill.terms.TERMS`) at its default weight (1; 0 for
    ``ground_truth``) unless given; a term registered later reads as its default. Items are also attributes
    (``weights.pred``). A recipe decides which terms take part; ``ground_truth`` (cross-entropy / MSE against
    the labels) is added to any recipe when its weight is > 0.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__({name: term.default_weight for name, term in TERMS.items()})
        self.update(*args, **kwargs)

    def weight(self, term: str) -> float:
        """The weight of ``term`` (its registered default when not set)."""
        if term in self:
            return self[term]
        return TERMS[term].default_weight

    def __getattr__(self, name: str) -> float:
        if name in self or name in TERMS:
            return self.weight(name)
        raise AttributeError(f"{type(self).__name__} has no term {name!r}")

    def __setattr__(self, name: str, value: float) -> None:
        self[name] = value

    def validate(self, path: str = "weights") -> None:
        for name, value in self.items():
            if name not in TERMS:
                raise ConfigError(f"{path}.{name}", f"unknown key; allowed keys: {', '.join(sorted(TERMS))}")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                    or value < 0:
                raise ConfigError(f"{path}.{name}", f"got {value!r}; expected a finite number >= 0")


DEFAULT_TI_STEP_FRACTION = 1.0 / 3.0


@dataclass
class ConvergenceConfig:
    """Ending a Teacher-Intervention phase early when its loss plateaus (``distill.ti.convergence``).

    The paper runs the TI step "until convergence (up to one epoch)". With ``enabled``, each TI phase
    (``ti_output``, ``ti_map``; in ``ti_gradual`` each of the two on its own) ends after the first optimizer
    step ``n`` (counted from the phase's start, ``n >= max(min_steps, 2·window)``) at which the mean of the
    phase's step losses over the last ``window`` steps improved on the mean over the ``window`` steps before by
    less than ``threshold``, relatively::

        (mean(L[n−2w : n−w]) − mean(L[n−w : n])) / |mean(L[n−2w : n−w])| < threshold

    ``L``: each step's ``total`` loss, the mean over its micro batches and over ranks (so every rank decides
    the same). The steps the phase did not use: ``unused_steps`` ``"drop"`` (the following phases keep their
    planned lengths and the run ends that many steps earlier: the paper's TI step of up to one epoch followed
    by a KD-QAT step of fixed length) or ``"kd"`` (the KD-QAT step takes them: the total stays the budget).
    The TI step's learning-rate segment (its warm-up and decay) is cut to end where the TI step now ends, and
    the KD-QAT step's starts there. Where a phase ended is checkpointed, so a resumed run continues in the phase
    (and learning-rate schedule) the uninterrupted run was in.
    """

    enabled: bool = False
    window: int = 20
    threshold: float = 0.01
    min_steps: int = 0
    unused_steps: Literal["drop", "kd"] = "drop"

    def validate(self, path: str = "ti.convergence") -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"{path}.enabled", f"got {self.enabled!r}; expected true or false")
        if not _is_int(self.window) or self.window < 1:
            raise ConfigError(f"{path}.window", f"got {self.window!r}; expected an integer >= 1 (steps)")
        if not isinstance(self.threshold, (int, float)) or isinstance(self.threshold, bool) \
                or not math.isfinite(self.threshold) or self.threshold < 0:
            raise ConfigError(f"{path}.threshold", f"got {self.threshold!r}; expected a finite number >= 0 "
                                                   "(relative improvement, e.g. 0.01 = 1 %)")
        if not _is_int(self.min_steps) or self.min_steps < 0:
            raise ConfigError(f"{path}.min_steps", f"got {self.min_steps!r}; expected an integer >= 0")
        _check_literal(self.unused_steps, Literal["drop", "kd"], f"{path}.unused_steps")

    @property
    def first_check(self) -> int:
        """The first phase step count at which the criterion is evaluated."""
        return max(self.min_steps, 2 * self.window)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class TeacherInterventionConfig:
    """The Teacher-Intervention step of the ``ti_*`` recipes.

    Training is a TI step, then normal KD-QAT on the intervened student for the rest. Its length:
    ``steps`` optimizer steps when given, else ``step_fraction`` of the total steps (default a third: the
    paper's one TI epoch of a three-epoch budget), in both cases at most ``max_epochs`` epochs of the training
    data (default 1, the paper's "up to one epoch"; ``null`` lifts the cap). ``convergence`` may end it earlier
    (:class:`ConvergenceConfig`). In ``ti_gradual`` the TI step is TI-O for its first ``output_fraction``
    (rounded half up), then TI-M. ``kd_recipe`` is the loss used in both steps (the paper trains the TI step
    with the same KD objective as the baseline); each TI phase adds its internal term
    (``weights.ti_mha_output`` / ``weights.ti_attention_map``). ``layers``: where the teacher intervenes (all
    layers by default).
    """

    step_fraction: float = DEFAULT_TI_STEP_FRACTION
    steps: Optional[int] = None
    max_epochs: Optional[float] = 1.0
    output_fraction: float = 0.5
    kd_recipe: str = "ternarybert"
    layers: LayerSelection = field(default_factory=LayerSelection)
    convergence: ConvergenceConfig = field(default_factory=ConvergenceConfig)

    def validate(self, path: str = "ti") -> None:
        for name in ("step_fraction", "output_fraction"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"{path}.{name}", f"got {value!r}; expected a number in [0, 1]")
        if self.steps is not None:
            if not _is_int(self.steps) or self.steps < 0:
                raise ConfigError(f"{path}.steps", f"got {self.steps!r}; expected an integer >= 0 or null")
            if self.step_fraction != DEFAULT_TI_STEP_FRACTION:
                raise ConfigError(f"{path}.steps", f"and {path}.step_fraction ({self.step_fraction!r}) both set the "
                                                   "TI step's length; set one of them")
        if self.max_epochs is not None and (not isinstance(self.max_epochs, (int, float))
                                            or isinstance(self.max_epochs, bool)
                                            or not math.isfinite(self.max_epochs) or self.max_epochs <= 0):
            raise ConfigError(f"{path}.max_epochs", f"got {self.max_epochs!r}; expected a number > 0 (epochs), "
                                                    "or null for no cap")
        _check_name(self.kd_recipe, kd_recipe_names(), f"{path}.kd_recipe")
        self.layers.validate(f"{path}.layers")
        if self.layers.include_embedding is not True:
            raise ConfigError(f"{path}.layers.include_embedding", "has no meaning for intervention layers")
        if not isinstance(self.convergence, ConvergenceConfig):
            raise ConfigError(f"{path}.convergence", f"got {self.convergence!r}; expected an object")
        self.convergence.validate(f"{path}.convergence")

    def non_default_keys(self) -> list[str]:
        """The keys (relative to ``ti``, nested ones dotted) whose values differ from the defaults: what a
        recipe without Teacher Intervention would leave unused."""
        return _changed_keys(self, type(self)(), "")


def _changed_keys(obj, default, prefix: str) -> list[str]:
    keys = []
    for f in dataclasses.fields(obj):
        value, base = getattr(obj, f.name), getattr(default, f.name)
        if dataclasses.is_dataclass(value) and dataclasses.is_dataclass(base):
            keys += _changed_keys(value, base, f"{prefix}{f.name}.")
        elif value != base:
            keys.append(prefix + f.name)
    return keys


@dataclass
class StageSpec:
    """One stage of the KD-QAT step (``distill.stages``): the ``terms`` it minimises (registered term names,
    each with coefficient 1 × its weight) and its ``fraction`` of the total steps. The last stage's fraction
    may be omitted: it takes the rest. TernaryBERT's SQuAD schedule is two stages: the Transformer-layer terms,
    then those plus the prediction term::

        "stages": [{"terms": ["layer_output", "attention_score"], "fraction": 0.5},
                   {"terms": ["layer_output", "attention_score", "span_pred"]}]
    """

    terms: list[str] = field(default_factory=list)
    fraction: Optional[float] = None

    def validate(self, path: str = "stages[0]") -> None:
        if not self.terms:
            raise ConfigError(f"{path}.terms", "a stage needs a non-empty list of terms; allowed: " + _allowed(TERMS))
        for position, term in enumerate(self.terms):
            _check_name(term, tuple(TERMS), f"{path}.terms[{position}]")
            _check_not_internal(term, f"{path}.terms[{position}]")
        if len(set(self.terms)) != len(self.terms):
            raise ConfigError(f"{path}.terms", f"got {self.terms!r}; a term is listed twice")
        if self.fraction is not None and (not isinstance(self.fraction, (int, float)) or isinstance(self.fraction, bool)
                                          or not 0.0 < self.fraction <= 1.0):
            raise ConfigError(f"{path}.fraction", f"got {self.fraction!r}; expected a number in (0, 1]")


def _check_not_internal(term: str, path: str) -> None:
    phase = TERMS[term].intervention
    if phase is not None:
        raise ConfigError(path, f"\"{term}\" is the internal term of the Teacher-Intervention phase \"{phase}\"; it is "
                                f"added to that phase automatically (set weights.{term} to change or, at 0, drop it)")


def _ti_recipes() -> tuple[str, ...]:
    return tuple(name for name, recipe in RECIPES.items() if recipe.teacher_intervention)


def _validate_stages(stages: list[StageSpec], path: str) -> None:
    """Every stage but the last has a fraction; they leave the last stage steps (or, all given, sum to 1)."""
    for position, stage in enumerate(stages):
        stage.validate(f"{path}[{position}]")
        if stage.fraction is None and position < len(stages) - 1:
            raise ConfigError(f"{path}[{position}].fraction", "required for every stage but the last")
    given = sum(stage.fraction for stage in stages[:-1])
    last = stages[-1].fraction
    if last is None and given >= 1.0:
        raise ConfigError(f"{path}[{len(stages) - 1}]", f"the stages before it take {given:g} of the steps; "
                                                        "nothing is left for the last stage")
    if last is not None and abs(given + last - 1.0) > 1e-9:
        raise ConfigError(f"{path}[{len(stages) - 1}].fraction", f"the fractions sum to {given + last:g}; they must "
                                                                 "sum to 1 (or omit the last stage's)")


@dataclass
class DistillConfig:
    """What the student is trained on, and for how long relative to the base schedule.

    ``recipe``:
      ``ternarybert`` soft CE + layer-output MSE + attention-score MSE; ``map`` the attention-map KL instead
      of the score term; ``output`` the attention-output MSE instead; ``map_output`` the unified loss
      (``unified`` SM1 = map + γ·output, SM2 = output + γ·map, γ = ``gamma``) instead; ``custom`` the
      terms listed in ``terms``; ``ti_map`` / ``ti_output`` / ``ti_gradual`` Teacher Intervention (see
      :class:`TeacherInterventionConfig`) with the ``ti.kd_recipe`` loss.
    Recipes are registered in :data:`ds_kdqat.distill.recipes.RECIPES`; ``terms`` and the keys of ``weights``
    name terms registered in :data:`ds_kdqat.distill.terms.TERMS`.
    ``temperature``: of the soft cross-entropy on logits; ``map_temperature``: of the attention-map KL.
    ``budget``: total steps as a multiple of the base schedule: ``"O"`` (1×), ``"O2"``, ``"O4"`` or a
    number > 0.
    ``stages``: recipe ``custom`` only, instead of ``terms``: the KD-QAT step as successive stages, each with
    its own terms and share of the steps (:class:`StageSpec`; one learning-rate schedule over all of them).
    """

    recipe: str = "ternarybert"
    temperature: float = 1.0
    map_temperature: float = 1.0
    layers: LayerSelection = field(default_factory=LayerSelection)
    weights: dict[str, float] = field(default_factory=TermWeights)
    gamma: float = 0.5
    unified: Literal["SM1", "SM2"] = "SM1"
    terms: list[str] = field(default_factory=list)
    ti: TeacherInterventionConfig = field(default_factory=TeacherInterventionConfig)
    budget: float | str = "O"
    stages: list[StageSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.weights, TermWeights) and isinstance(self.weights, dict):
            self.weights = TermWeights(self.weights)

    def validate(self, path: str = "distill") -> None:
        _check_name(self.recipe, tuple(RECIPES), f"{path}.recipe")
        _check_positive(self.temperature, f"{path}.temperature")
        _check_positive(self.map_temperature, f"{path}.map_temperature")
        self.layers.validate(f"{path}.layers")
        if not isinstance(self.weights, TermWeights):
            raise ConfigError(f"{path}.weights", f"got {self.weights!r}; expected an object of term weights")
        self.weights.validate(f"{path}.weights")
        if not isinstance(self.gamma, (int, float)) or isinstance(self.gamma, bool) or not math.isfinite(self.gamma) \
                or self.gamma < 0:
            raise ConfigError(f"{path}.gamma", f"got {self.gamma!r}; expected a finite number >= 0")
        _check_literal(self.unified, Literal["SM1", "SM2"], f"{path}.unified")
        for position, term in enumerate(self.terms):
            _check_name(term, tuple(TERMS), f"{path}.terms[{position}]")
            _check_not_internal(term, f"{path}.terms[{position}]")
        uses_custom = self.kd_recipe == "custom"
        if self.stages:
            if self.recipe != "custom":
                raise ConfigError(f"{path}.stages", f"only with recipe \"custom\" (recipe is \"{self.recipe}\")")
            if self.terms:
                raise ConfigError(f"{path}.terms", "not used with stages: each stage lists its own terms")
            _validate_stages(self.stages, f"{path}.stages")
        elif uses_custom and not self.terms:
            raise ConfigError(f"{path}.terms", "the \"custom\" recipe needs a non-empty list of terms; allowed: "
                              + _allowed(TERMS))
        if not uses_custom and self.terms:
            raise ConfigError(f"{path}.terms", f"is only used by the \"custom\" recipe (recipe is \"{self.recipe}\")")
        self.ti.validate(f"{path}.ti")
        if not self.is_teacher_intervention:
            for key in self.ti.non_default_keys():
                raise ConfigError(f"{path}.ti.{key}", f"is only used by the Teacher-Intervention recipes "
                                                      f"({_allowed(_ti_recipes())}); recipe is \"{self.recipe}\"")
        budget_multiplier(self.budget, f"{path}.budget")

    @property
    def is_teacher_intervention(self) -> bool:
        recipe = RECIPES.get(self.recipe)
        return recipe is not None and recipe.teacher_intervention

    @property
    def kd_recipe(self) -> str:
        """The loss recipe proper: ``ti.kd_recipe`` for the TI recipes, else ``recipe``."""
        return self.ti.kd_recipe if self.is_teacher_intervention else self.recipe


def budget_multiplier(budget: float | str, path: str = "budget") -> float:
    """``"O"`` → 1, ``"O2"`` → 2, ``"O4"`` → 4, a number > 0 → itself."""
    if isinstance(budget, str):
        if budget not in BUDGETS:
            raise ConfigError(path, f"got {budget!r}; allowed: {_allowed(BUDGETS)} or a number > 0")
        return BUDGETS[budget]
    _check_positive(budget, path)
    return float(budget)
