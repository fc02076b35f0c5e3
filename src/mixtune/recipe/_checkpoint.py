"""Atomic checkpoints that hold only what the base model cannot give back.

A checkpoint is the folder ``checkpoint-<step>`` holding the LoRA weights
(``adapter.safetensors``), the optimizer, scheduler and RNG states and the
trainer state, and, written last, the marker ``COMPLETE``. Everything is
first written into a hidden ``.checkpoint-<step>.partial`` folder that is
renamed into place only once complete, so a crash mid-write leaves either
the previous checkpoints untouched or a ``.partial`` folder that resume
ignores (and the next save removes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mixtune.errors import CheckpointError

__all__ = [
    "ADAPTER_FILE",
    "COMPLETE_MARKER",
    "checkpoint_world_size",
    "complete_checkpoints",
    "last_complete_checkpoint",
    "load_adapter_weights",
    "partial_checkpoint_dir",
    "write_checkpoint",
]

ADAPTER_FILE = "adapter.safetensors"
COMPLETE_MARKER = "COMPLETE"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def _fsync_tree(folder: Path) -> None:
    # Data must reach the disk before the rename that publishes it, else a
    # power cut could leave a renamed folder with empty files.
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def partial_checkpoint_dir(run_dir: Path, step: int) -> Path:
    """The hidden folder ``checkpoint-<step>`` is written in before the rename.

    Args:
        run_dir: The run's output folder.
        step: The optimizer step.

    Returns:
        ``run_dir/.checkpoint-<step>.partial``.
    """
    return run_dir / f".checkpoint-{step}.partial"


def checkpoint_world_size(checkpoint: Path) -> int:
    """How many processes trained the run that wrote ``checkpoint``.

    Args:
        checkpoint: A ``checkpoint-<step>`` folder.

    Returns:
        The recorded ``world_size`` (1 for checkpoints written before it was recorded).
    """
    path = checkpoint / "mixtune_checkpoint.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return 1
    size = meta.get("world_size", 1) if isinstance(meta, dict) else 1
    return size if isinstance(size, int) and size >= 1 else 1


def write_checkpoint(
    run_dir: Path,
    step: int,
    lora_state: dict[str, torch.Tensor],
    write_rest: Callable[[Path], None],
    *,
    meta: dict[str, object] | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically.

    Args:
        run_dir: The run's output folder.
        step: The optimizer step.
        lora_state: The LoRA weights to save.
        write_rest: Writes the optimizer/scheduler/RNG/trainer state into the
            folder it is given.
        meta: Extra JSON written to ``mixtune_checkpoint.json``.

    Returns:
        The final checkpoint folder.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"checkpoint-{step}"
    tmp = partial_checkpoint_dir(run_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in lora_state.items()}
    save_file(tensors, str(tmp / ADAPTER_FILE))
    write_rest(tmp)
    (tmp / "mixtune_checkpoint.json").write_text(
        json.dumps({"step": step, **(meta or {})}, indent=2, sort_keys=True)
    )
    _fsync_tree(tmp)
    # The marker is the last file written: resume trusts nothing without it.
    with (tmp / COMPLETE_MARKER).open("w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        # A stale folder of the same step (e.g. from a run that crashed after
        # the rename but before later steps) is replaced, never merged.
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """List the complete checkpoints of a run, oldest step first.

    Args:
        run_dir: The run's output folder.

    Returns:
        Folders ``checkpoint-<step>`` that carry the ``COMPLETE`` marker.
    """
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        m = _NAME.match(child.name)
        if m and child.is_dir() and (child / COMPLETE_MARKER).is_file():
            found.append((int(m.group(1)), child))
    return [path for _, path in sorted(found)]


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run.

    Args:
        run_dir: The run's output folder.

    Returns:
        Its folder, or ``None`` when the run has none.
    """
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def load_adapter_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Read the LoRA weights of a checkpoint.

    Args:
        checkpoint: A ``checkpoint-<step>`` folder.

    Returns:
        The LoRA state dict.

    Raises:
        CheckpointError: If the folder is incomplete or lacks the weights.
    """
    if not (checkpoint / COMPLETE_MARKER).is_file():
        raise CheckpointError(
            f"{checkpoint} has no {COMPLETE_MARKER} marker: it was interrupted while being "
            "written; resume from an earlier checkpoint or delete it"
        )
    path = checkpoint / ADAPTER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: this is not a mixtune checkpoint")
    return load_file(str(path))


def prune_checkpoints(run_dir: Path, keep: int | None) -> None:
    """Delete the oldest complete checkpoints beyond ``keep``.

    Args:
        run_dir: The run's output folder.
        keep: How many to keep (``None`` keeps all).
    """
    if keep is None:
        return
    for old in complete_checkpoints(run_dir)[:-keep]:
        # Remove the marker first so a crash mid-delete leaves an ignored folder.
        (old / COMPLETE_MARKER).unlink()
        shutil.rmtree(old)
