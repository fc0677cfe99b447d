"""Tasks and data: task registry, GLUE tsv reading/writing, the embedded default task, metrics, encoding.

Typical use::

    from ds_kdqat.data import DataConfig, get_task, load_split, encode, compute_metrics
    config = DataConfig(task="rt_polarity"); config.validate()
    spec = get_task(config.task)
    train = encode(load_split(config, "train"), tokenizer, spec, config.max_seq_length)
    loader = DataLoader(train, batch_size=32, shuffle=True, collate_fn=train.collate_fn)
"""

from ds_kdqat.data.config import DataConfig
from ds_kdqat.data.custom import read_described_file
from ds_kdqat.data.description import CUSTOM, described_spec, task_spec
from ds_kdqat.data.embedded import find_rt_polarity_csv, materialize_rt_polarity
from ds_kdqat.data.encode import EncodedDataset, collate, encode
from ds_kdqat.data.glue_format import BadRow, Example, ReadReport, read_task_file, write_task_file
from ds_kdqat.data.loading import load_split, task_dir, with_training_labels
from ds_kdqat.data.metrics import compute_metrics
from ds_kdqat.data.tasks import TASKS, TaskSpec, get_task

__all__ = [
    "BadRow", "CUSTOM", "DataConfig", "EncodedDataset", "Example", "ReadReport", "TASKS", "TaskSpec", "collate",
    "compute_metrics", "encode", "find_rt_polarity_csv", "get_task", "load_split", "materialize_rt_polarity",
    "read_described_file", "read_task_file", "described_spec", "task_dir", "task_spec", "with_training_labels",
    "write_task_file",
]
