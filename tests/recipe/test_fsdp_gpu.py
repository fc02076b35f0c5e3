"""GPU: FSDP2 on 2 GPUs from a model built on the CPU (run by the lead; needs 2 GPUs).

``fit`` with ``sharding="fsdp2"`` and ``run.device="cuda"`` moves the
CPU-built tiny NF4 Mixtral onto each rank's GPU a layer at a time while
sharding it, trains it there and publishes the whole adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.recipe.test_fsdp import _torchrun

# Same rule as tests/conftest.py's requires_gpu (conftest is not imported by name).
requires_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")

pytestmark = [pytest.mark.gpu, requires_two_gpus]


def test_a_cpu_built_model_trains_sharded_on_two_gpus(tmp_path: Path) -> None:
    run = _torchrun(tmp_path / "run", tmp_path / "gpu.json", "gpu", steps=4)
    assert run["world"] == 2
    # Everything ends up on the GPUs (rank 0's view), lm_head included.
    assert run["devices"] == ["cuda:0"]
    losses = [loss for _, loss in run["train_loss"]]
    assert len(losses) == 4
    assert all(torch.isfinite(torch.tensor(losses)))
    for before, after in run["packed_bytes"]:
        assert after < 0.6 * before
    published = json.loads((tmp_path / "run" / "published" / "adapter_config.json").read_text())
    assert published["r"] == 4
