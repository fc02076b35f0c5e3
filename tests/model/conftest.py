"""Tiny seeded checkpoints written with ``random_checkpoint`` and loaded back.

``make_checkpoint`` is the factory; the session fixtures below cache the
common cases. Other test packages can do the same in two lines::

    path = random_checkpoint(tiny_config(), tmp_path)
    loaded = load_quantized(path, quant=QuantSpec.nf4())
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from mixtune.model import random_checkpoint, tiny_config

CheckpointFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> CheckpointFactory:
    """``make_checkpoint(model_type="mixtral", layout="fused", shard_layers=None, seed=0, **config)``.

    Returns the folder of a fresh random checkpoint (cached per argument set).
    """
    cache: dict[tuple[Any, ...], Path] = {}

    def make(
        model_type: str = "mixtral",
        *,
        layout: str = "fused",
        shard_layers: int | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.bfloat16,
        **config: Any,
    ) -> Path:
        key = (model_type, layout, shard_layers, seed, dtype, tuple(sorted(config.items())))
        if key not in cache:
            dest = tmp_path_factory.mktemp(f"{model_type}-{layout}")
            cache[key] = random_checkpoint(
                tiny_config(model_type, **config),
                dest,
                layout=layout,  # type: ignore[arg-type]
                seed=seed,
                dtype=dtype,
                shard_layers=shard_layers,
            )
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_fused(make_checkpoint: CheckpointFactory) -> Path:
    """Tiny Mixtral (2 layers, hidden 64, 4 experts), fused layout, one file."""
    return make_checkpoint()


@pytest.fixture(scope="session")
def tiny_original(make_checkpoint: CheckpointFactory) -> Path:
    """The same weights in the hub's original layout, one shard per layer."""
    return make_checkpoint(layout="original", shard_layers=1)
