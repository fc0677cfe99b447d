"""Task registry: the specs of the nine GLUE tasks and the embedded default."""

import pytest

from ds_kdqat.data.tasks import TASKS, TaskSpec, get_task
from ds_kdqat.errors import ConfigError

GLUE = ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]


def test_registry_holds_glue_and_embedded_default():
    assert sorted(TASKS) == sorted(GLUE + ["rt_polarity", "digits", "image_folder", "hub_images", "squad"])
    assert [name for name, spec in TASKS.items() if spec.embedded] == ["rt_polarity"]


@pytest.mark.parametrize(
    "name, metrics, primary",
    [
        ("cola", ("mcc",), "mcc"),
        ("mrpc", ("f1", "accuracy"), "f1"),
        ("qqp", ("f1", "accuracy"), "f1"),
        ("stsb", ("pearson", "spearman"), "pearson"),
        ("sst2", ("accuracy",), "accuracy"),
        ("mnli", ("accuracy",), "accuracy"),
        ("qnli", ("accuracy",), "accuracy"),
        ("rte", ("accuracy",), "accuracy"),
        ("wnli", ("accuracy",), "accuracy"),
        ("rt_polarity", ("accuracy",), "accuracy"),
    ],
)
def test_metrics_per_task(name, metrics, primary):
    spec = get_task(name)
    assert spec.metrics == metrics and spec.primary_metric == primary


def test_shapes_of_specs():
    assert get_task("stsb").is_regression and get_task("stsb").labels == () and get_task("stsb").num_labels == 1
    assert get_task("mnli").num_labels == 3
    assert get_task("mnli").eval_splits == ("dev_matched", "dev_mismatched")
    assert get_task("mnli").split_files["dev_mismatched"] == "dev_mismatched.tsv"
    assert get_task("mnli").hub_splits["dev_matched"] == "validation_matched"
    assert get_task("cola").has_header is False
    assert get_task("cola").columns == ("source", "label", "label_notes", "sentence")
    assert get_task("sst2").is_pair is False and get_task("qnli").is_pair is True
    assert get_task("cola").hub_id == ("nyu-mll/glue", "cola")
    assert get_task("rt_polarity").splits == ("train", "dev")
    assert get_task("wnli").hub_label_map == {"not_entailment": "0", "entailment": "1"}


def test_get_task_unknown_lists_known_names():
    with pytest.raises(ConfigError) as err:
        get_task("sst-2", path="kdqat.data.task")
    message = str(err.value)
    assert message.startswith("kdqat.data.task: unknown task 'sst-2'")
    for name in GLUE + ["rt_polarity"]:
        assert name in message


def test_spec_rejects_inconsistent_definitions():
    with pytest.raises(ValueError, match="primary_metric"):
        TaskSpec(name="x", text_fields=("s",), label_field="l", labels=("0", "1"), is_regression=False,
                 metrics=("accuracy",), primary_metric="f1")
    with pytest.raises(ValueError, match="regression"):
        TaskSpec(name="x", text_fields=("s",), label_field="l", labels=("0",), is_regression=True,
                 metrics=("pearson",), primary_metric="pearson")
    with pytest.raises(ValueError, match="columns"):
        TaskSpec(name="x", text_fields=("s",), label_field="l", labels=("0", "1"), is_regression=False,
                 metrics=("accuracy",), primary_metric="accuracy", has_header=False)
