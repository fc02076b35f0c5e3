"""Launching a test worker on 2 processes with torchrun, and comparing two runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port free on localhost right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(
    worker: Path, out: Path, result: Path, mode: str, steps: int, *, timeout: int = 600
) -> dict[str, Any] | None:
    """Run ``worker out result 2 1 steps mode`` on 2 processes; its JSON result if written."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
        "OMP_NUM_THREADS": "1",
        # No NVLink multicast: shared GPU hosts may forbid it (gloo ignores these).
        "NCCL_NVLS_ENABLE": "0",
        "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(worker),
        str(out),
        str(result),
        "2",
        "1",
        str(steps),
        mode,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return dict(json.loads(result.read_text())) if result.exists() else None


def end_worker() -> NoReturn:
    """End a worker whose work is done and written: tear down the group, exit 0 at once.

    Under CPU load, gloo (seen with torch 2.11 and 2.13) now and then aborts a
    rank during interpreter shutdown ("terminate called without an active
    exception"), after the run has finished and every file is written; torchrun
    then reports the whole run as failed (1 of 19 DDP test runs on a 2-core
    machine with two busy loops beside it; 0 of 50 with this ending).
    ``os._exit`` skips that shutdown.
    Anything that went wrong earlier has already raised and exited non-zero.
    """
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def assert_same_run(a: dict[str, Any], b: dict[str, Any], steps: int) -> None:
    """Same logged steps, losses within rtol 1e-5, LoRA weights within atol 1e-6."""
    assert [s for s, _ in a["train_loss"]] == list(range(1, steps + 1))
    assert [s for s, _ in a["train_loss"]] == [s for s, _ in b["train_loss"]]
    torch.testing.assert_close(
        torch.tensor(a["train_loss"]), torch.tensor(b["train_loss"]), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(
        torch.tensor(a["eval_loss"]), torch.tensor(b["eval_loss"]), rtol=1e-5, atol=0
    )
    assert set(a["lora"]) == set(b["lora"])
    for k in a["lora"]:
        torch.testing.assert_close(
            torch.tensor(a["lora"][k]), torch.tensor(b["lora"][k]), rtol=0, atol=1e-6
        )
