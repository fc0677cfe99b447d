"""Distillation core: KD losses, recipes (objectives over encoder taps) and Teacher-Intervention schedules."""

from .config import DistillConfig, LayerSelection, TeacherInterventionConfig, TermWeights, budget_multiplier
from .losses import LOSSES
from .recipes import RECIPES, DistillObjective, build_objective
from .schedule import PhaseSpan, TrainingPlan, build_interventions, plan_training, teacher_record

__all__ = [
    "DistillConfig", "LayerSelection", "TeacherInterventionConfig", "TermWeights", "budget_multiplier",
    "LOSSES", "RECIPES", "DistillObjective", "build_objective",
    "PhaseSpan", "TrainingPlan", "build_interventions", "plan_training", "teacher_record",
]
