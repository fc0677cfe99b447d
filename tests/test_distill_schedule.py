"""Teacher-Intervention phase plans and budgets."""

import pytest

from ds_kdqat.distill.config import DistillConfig, TeacherInterventionConfig
from ds_kdqat.distill.schedule import PhaseSpan, plan_training, teacher_record


def spans(plan):
    return [(s.phase, s.start, s.end) for s in plan.phases]


def test_non_ti_recipes_are_one_kd_phase_of_the_budget():
    assert spans(plan_training(DistillConfig(), 300)) == [("kd", 0, 300)]
    assert spans(plan_training(DistillConfig(recipe="map", budget="O2"), 300)) == [("kd", 0, 600)]
    assert plan_training(DistillConfig(recipe="output", budget="O4"), 300).total_steps == 1200
    assert plan_training(DistillConfig(budget=1.5), 301).total_steps == 452  # 451.5 rounds up


def test_ti_gradual_plan():
    plan = plan_training(DistillConfig(recipe="ti_gradual", budget="O2"), 300)
    # 600 steps: TI step a third (200): TI-O 100, TI-M 100; then KD-QAT 400
    assert spans(plan) == [("ti_output", 0, 100), ("ti_map", 100, 200), ("kd", 200, 600)]
    assert [plan.phase_at(s) for s in (0, 99, 100, 199, 200, 599)] == \
        ["ti_output", "ti_output", "ti_map", "ti_map", "kd", "kd"]
    assert plan.span_at(150) == PhaseSpan("ti_map", 100, 200) and plan.span_at(150).steps == 100
    with pytest.raises(ValueError, match="outside the plan's steps 0..599"):
        plan.phase_at(600)


def test_ti_fractions_are_configurable():
    config = DistillConfig(recipe="ti_gradual", ti=TeacherInterventionConfig(step_fraction=0.5, output_fraction=0.25))
    assert spans(plan_training(config, 100)) == [("ti_output", 0, 13), ("ti_map", 13, 50), ("kd", 50, 100)]
    config = DistillConfig(recipe="ti_map", ti=TeacherInterventionConfig(step_fraction=0.1))
    assert spans(plan_training(config, 100)) == [("ti_map", 0, 10), ("kd", 10, 100)]
    config = DistillConfig(recipe="ti_output", ti=TeacherInterventionConfig(step_fraction=1.0))
    assert spans(plan_training(config, 10)) == [("ti_output", 0, 10)]  # empty phases are left out
    with pytest.raises(ValueError, match="base_steps must be a positive integer"):
        plan_training(DistillConfig(), 0)


def test_teacher_record_adds_intervention_taps():
    names, layers = teacher_record(frozenset({"layer_outputs"}), (1,), "ti_output", (0, 1))
    assert names == {"layer_outputs", "mha_outputs"} and layers == (0, 1)
    names, layers = teacher_record(frozenset({"attention_maps"}), (1,), "kd", (0, 1))
    assert names == {"attention_maps"} and layers == (1,)
