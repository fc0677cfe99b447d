"""Distillation core: KD loss terms (registered in ``TERMS``), recipes (compositions of terms, ``RECIPES``),
the objective over encoder taps, Teacher-Intervention schedules, the phases of a training stage and the
forward half of one step."""

from .config import (ConvergenceConfig, DistillConfig, LayerSelection, TeacherInterventionConfig, TermWeights,
                     budget_multiplier)
from .phases import (KdPhases, Objective, Phase, SupervisedObjective, distill_phase, kd_phases, phase_at,
                     supervised_phases)
from .recipes import RECIPES, DistillObjective, Recipe, build_objective, register_recipe
from .schedule import (PhaseSpan, PlateauCriterion, TrainingPlan, build_interventions, find_span, plan_training,
                       replan, teacher_record)
from .step import kd_forward, model_inputs
from .terms import TERMS, Term, TermContext, describe_terms, register_term

__all__ = [
    "ConvergenceConfig", "DistillConfig", "LayerSelection", "TeacherInterventionConfig", "TermWeights",
    "budget_multiplier",
    "RECIPES", "DistillObjective", "Recipe", "build_objective", "register_recipe",
    "TERMS", "Term", "TermContext", "describe_terms", "register_term",
    "PhaseSpan", "PlateauCriterion", "TrainingPlan", "build_interventions", "find_span", "plan_training", "replan",
    "teacher_record",
    "KdPhases", "Objective", "Phase", "SupervisedObjective", "distill_phase", "kd_phases", "phase_at",
    "supervised_phases",
    "kd_forward", "model_inputs",
]
