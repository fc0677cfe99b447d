"""Process-group set-up that works the same on a laptop CPU, one GPU and a multi-node launch.

The accelerator is chosen by what is present: CUDA when torch sees a GPU, else DeepSpeed's CPU accelerator
(``DS_ACCELERATOR=cpu``, gloo backend). Launchers (``deepspeed``, ``torchrun``, ``srun``) set RANK,
LOCAL_RANK and WORLD_SIZE; a plain ``python run/train.py`` is a single rank, for which the variables
DeepSpeed needs are filled in here (otherwise it would go looking for MPI).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


def choose_accelerator() -> str:
    """Set DS_ACCELERATOR (unless the user did) before deepspeed is imported; return its value."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    if os.environ["DS_ACCELERATOR"] == "cpu":
        # DeepSpeed compiles a shared-memory op on first use; keep the build in a reusable folder.
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.abspath(os.path.join(".cache", "torch_extensions")))
    return os.environ["DS_ACCELERATOR"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fill_single_rank_env() -> None:
    """When no launcher set the rank variables, describe a one-rank job on this machine."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
        return
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ and "MASTER_ADDR" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        return
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (idempotent) and describe this rank."""
    choose_accelerator()
    fill_single_rank_env()
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if get_accelerator().device_name() == "cuda":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    else:
        device = "cpu"
    return DistInfo(
        rank=torch.distributed.get_rank(),
        local_rank=local_rank,
        world_size=torch.distributed.get_world_size(),
        device=device,
    )
