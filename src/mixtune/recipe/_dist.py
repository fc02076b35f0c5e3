"""Process-group helpers: ``Recipe.fit`` under ``accelerate launch``/``torchrun`` (DDP).

Every helper is a no-op in a single process, so the code that calls them
reads the same either way. Collectives run on the device the caller names:
NCCL only reduces CUDA tensors, gloo reduces CPU tensors.
"""

from __future__ import annotations

import os

import attrs
import torch
import torch.distributed as dist

__all__ = ["World", "current_world", "fsdp_or_deepspeed_requested", "local_device"]


@attrs.frozen
class World:
    """Where this process sits among the processes training together.

    Attributes:
        rank: Global rank of this process (0 writes checkpoints and publishes).
        size: Number of processes (1 without a process group).
        device: Device the collectives run on (CUDA for NCCL, CPU for gloo).
    """

    rank: int = 0
    size: int = 1
    device: torch.device = attrs.field(factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every rank arrives here."""
        if self.size > 1:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over all ranks (float64).

        Args:
            values: This rank's numbers (same length on every rank).

        Returns:
            The sums, identical on every rank.
        """
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [float(x) for x in t.tolist()]

    def max(self, value: int) -> int:
        """The largest ``value`` over all ranks.

        Args:
            value: This rank's number.

        Returns:
            The maximum, identical on every rank.
        """
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())


def current_world(device: torch.device) -> World:
    """The process group this process belongs to (a world of one without one).

    Args:
        device: The training device; NCCL groups reduce on it, others on CPU.

    Returns:
        The :class:`World`.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    backend = str(dist.get_backend()).lower()
    on = device if "nccl" in backend and device.type == "cuda" else torch.device("cpu")
    return World(rank=dist.get_rank(), size=dist.get_world_size(), device=on)


def fsdp_or_deepspeed_requested() -> str | None:
    """Name the sharded-training launcher setting in force, if any.

    ``accelerate launch --use_fsdp``/``--use_deepspeed`` (or a config file
    selecting them) announce themselves through these variables.

    Returns:
        ``"FSDP"``, ``"DeepSpeed"`` or ``None``.
    """
    truthy = ("1", "true", "yes")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in truthy:
        return "FSDP"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in truthy:
        return "DeepSpeed"
    return None


def local_device() -> str:
    """The device this process should load the model onto.

    Under ``accelerate launch``/``torchrun`` each process drives the GPU of
    its local rank (``LOCAL_RANK``); a single process uses ``cuda:0``. Without
    CUDA it is the CPU. Pass it as ``load_quantized(..., device_map=local_device())``
    so one script runs on one GPU or on several.

    Returns:
        ``"cuda:<LOCAL_RANK>"`` (``"cuda:0"`` without a launcher) or ``"cpu"``.
    """
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
