"""Process-group set-up that works the same on a laptop CPU, one GPU and a multi-node launch.

The accelerator is chosen by what is present: CUDA when torch sees a GPU, else DeepSpeed's CPU accelerator
(``DS_ACCELERATOR=cpu``, gloo backend). Launchers (``deepspeed``, ``torchrun``, ``srun``) set RANK,
LOCAL_RANK and WORLD_SIZE; a plain ``python run/train.py`` is a single rank, for which the variables
DeepSpeed needs are filled in here (otherwise it would go looking for MPI).

Under a launcher the rank also starts the launcher watchdog (:mod:`ds_kdqat.training.watchdog`) before
anything else, and a rendezvous port that another job holds is reported as a :class:`ConfigError` naming
the port (exit status 2) instead of torch's EADDRINUSE traceback.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from ..errors import ConfigError


def choose_accelerator() -> str:
    """Set DS_ACCELERATOR (unless the user did) before deepspeed is imported; return its value."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    if os.environ["DS_ACCELERATOR"] == "cpu":
        # DeepSpeed compiles a shared-memory op on first use; keep the build in a reusable folder.
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.abspath(os.path.join(".cache", "torch_extensions")))
    return os.environ["DS_ACCELERATOR"]


def free_port() -> int:
    """A port nobody listens on now on 127.0.0.1 (the kernel's choice)."""
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
    os.environ.setdefault("MASTER_PORT", str(free_port()))


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _address_in_use(error: BaseException) -> bool:
    """Whether an exception (or one it was raised from) says the rendezvous port is taken."""
    while error is not None:
        text = str(error).lower()
        if "eaddrinuse" in text or "address already in use" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


def port_in_use_error() -> ConfigError:
    """The error for a MASTER_PORT that another process listens on."""
    port = os.environ.get("MASTER_PORT", "29500")
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    return ConfigError("MASTER_PORT", f"port {port} on {addr} is in use (another job on this machine?); pass "
                                      "--master_port N to the launcher or use run/launch.py, which picks a free one")


def init_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (idempotent) and describe this rank.

    Raises ConfigError when the rendezvous port (MASTER_PORT) is already in use.
    """
    from .watchdog import watch_launchers

    watch_launchers()  # record the launcher chain while it is intact
    choose_accelerator()
    fill_single_rank_env()
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    try:
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    except RuntimeError as error:
        if _address_in_use(error):
            raise port_in_use_error() from None
        raise
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
