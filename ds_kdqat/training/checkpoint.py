"""Resumable checkpoints on top of DeepSpeed's, written so that a kill at any moment loses nothing.

Layout of a stage's checkpoint folder::

    ckpt/
      latest                  name of the newest complete checkpoint (replaced atomically, written last)
      step_00000120/          DeepSpeed's model / optimizer / scheduler states (any ZeRO stage)
        kdqat_state.json      our loop state: micro-batch counter, best metric, …
        kdqat_tensors.pt      tensors outside DeepSpeed's states (LAT second moments), when there are any
        rng_rank{r}.pt        Python, NumPy and torch RNG states of rank r

A checkpoint counts only once ``latest`` names it; a kill during a save leaves the previous one in force.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..fileio import atomic_write_json, atomic_write_text

LATEST = "latest"


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_tag(folder: str) -> Optional[str]:
    path = os.path.join(folder, LATEST)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        tag = handle.read().strip()
    return tag if os.path.isdir(os.path.join(folder, tag)) else None


def save(engine, folder: str, step: int, state: dict, rank: int, keep: int,
         tensors: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Collective: every rank calls it. Writes DeepSpeed's states, ours, and then ``latest``.

    ``tensors``: state that lives outside the engine and is the same on every rank (saved by rank 0)."""
    tag = _tag(step)
    engine.save_checkpoint(folder, tag=tag, save_latest=False)
    torch.save(rng_state(), os.path.join(folder, tag, f"rng_rank{rank}.pt"))
    if rank == 0:
        if tensors:
            torch.save(tensors, os.path.join(folder, tag, "kdqat_tensors.pt"))
        atomic_write_json(os.path.join(folder, tag, "kdqat_state.json"), state)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        atomic_write_text(os.path.join(folder, LATEST), tag)
        _prune(folder, keep)
    if dist.is_initialized():
        dist.barrier()


def _prune(folder: str, keep: int) -> None:
    tags = sorted(t for t in os.listdir(folder) if t.startswith("step_") and os.path.isdir(os.path.join(folder, t)))
    current = latest_tag(folder)
    for tag in tags[:-keep]:
        if tag != current:
            shutil.rmtree(os.path.join(folder, tag), ignore_errors=True)


def load(engine, folder: str, rank: int) -> tuple[Optional[dict], dict[str, torch.Tensor]]:
    """Restore the newest complete checkpoint into ``engine`` and this process's RNG.

    Returns (our loop state, the saved ``tensors``), or (None, {}) when there is no checkpoint."""
    tag = latest_tag(folder)
    if tag is None:
        return None, {}
    engine.load_checkpoint(folder, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    with open(os.path.join(folder, tag, "kdqat_state.json"), encoding="utf-8") as handle:
        state = json.load(handle)
    rng_path = os.path.join(folder, tag, f"rng_rank{rank}.pt")
    if os.path.exists(rng_path):
        set_rng_state(torch.load(rng_path, weights_only=False))
    tensors_path = os.path.join(folder, tag, "kdqat_tensors.pt")
    tensors = torch.load(tensors_path, weights_only=True) if os.path.exists(tensors_path) else {}
    return state, tensors
