"""``random_quantized``: a seeded random model built directly in 4 bits.

Benchmarks of the full Mixtral-8x7B shape need its 47 B weights, but a bf16
copy (87 GiB) fits neither on disk nor in a GPU next to the 4-bit one. This
builder reuses :func:`load_quantized`'s skeleton and assignment (the model is
created on the meta device, mixtune's 4-bit modules are swapped in), then
draws each tensor where it will live, one at a time, and quantizes it on
arrival, as if it had been read from :func:`random_checkpoint`'s fused
layout. Peak memory is the final size plus one expert matrix in flight.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch

from mixtune.errors import ConfigError, UnsupportedModelError
from mixtune.model._experts import ExpertKind
from mixtune.model._loader import (
    NF4,
    LoadedModel,
    Loader,
    assign_direct,
    build_skeleton,
    check_load_args,
    finish_model,
    resolve_device,
)
from mixtune.model._quant import QuantSpec, require_4bit
from mixtune.model._random import SUPPORTED_TYPES, _plan

__all__ = ["random_quantized"]

_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def _progress(total: int, enabled: bool | None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc="mixtune: building",
        unit="layer",
        disable=None if enabled is None else not enabled,
    )


def random_quantized(
    config: Any,
    *,
    quant: QuantSpec = NF4,
    dtype: torch.dtype = torch.bfloat16,
    device_map: str | int | torch.device | None = None,
    seed: int = 0,
    tokenizer: Any = None,
    progress: bool | None = None,
) -> LoadedModel:
    """Build a seeded random model with 4-bit base weights, never holding it in full precision.

    The result is what :func:`load_quantized` gives for a checkpoint written
    by ``random_checkpoint(config, layout="fused", seed=seed, dtype=dtype)``
    (weights normal with std ``config.initializer_range``, norms at one), but
    no checkpoint is written: each tensor is drawn on the target device and
    quantized at once (experts one matrix at a time), so peak memory is the
    final 4-bit size plus one expert. On the CPU the weights are bit for bit
    those of the checkpoint; on a GPU they come from the GPU's generator (same
    distribution, other values, deterministic for a seed).

    Args:
        config: A ``MixtralConfig`` (or a dense ``MistralConfig``/``LlamaConfig``),
            e.g. :func:`mixtral_8x7b_config` with ``num_hidden_layers=32``
            for the full Mixtral-8x7B shape.
        quant: Storage of the base weights.
        dtype: dtype of the weights kept in high precision (and of the
            draws before quantization).
        device_map: Where to build (as in :func:`load_quantized`).
        seed: Seed of every tensor.
        tokenizer: A tokenizer to attach, or None.
        progress: Show a progress bar (None: only on a terminal).

    Returns:
        The :class:`LoadedModel` (``source`` says ``random(seed=...)``), in
        eval mode, every base weight frozen.

    Raises:
        ConfigError: For a bad ``quant``, ``dtype``, ``seed`` or ``device_map``.
        UnsupportedModelError: For a config of another architecture.
        QuantizationUnavailableError: If 4-bit is asked where bitsandbytes
            cannot run.

    Example:
        >>> from mixtune.model import random_quantized, tiny_config
        >>> loaded = random_quantized(tiny_config(), progress=False)
        >>> loaded.census().high_precision_bytes(("experts", "attention"))
        {}
    """
    check_load_args(quant, dtype)
    seed_value: object = seed  # checked at run time: callers may pass anything
    if isinstance(seed_value, bool) or not isinstance(seed_value, int):
        raise ConfigError([f"seed={seed!r}: must be an int"])
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"random_quantized cannot build model_type {model_type!r}; supported: "
            f"{', '.join(SUPPORTED_TYPES)}"
        )
    device = resolve_device(device_map)
    require_4bit(quant, device)
    config = copy.deepcopy(config)
    model, targets = build_skeleton(config, quant, dtype, device)
    loader = Loader(model, device, dtype)
    tie = bool(getattr(config, "tie_word_embeddings", False))
    groups = _plan(config, "fused", seed, dtype, device=device)
    bar = _progress(len(groups), progress)
    try:
        with torch.no_grad():
            for group in groups:
                for plan in group:
                    fused = _FUSED.match(plan.name)
                    if fused is None:
                        for tensor in plan.chunks():
                            assign_direct(loader, plan.name, tensor, tie, quant)
                        continue
                    layer = int(fused.group(1))
                    kind: ExpertKind = "gate_up" if fused.group(2) == "gate_up_proj" else "down"
                    # The plan yields one expert at a time: each is quantized
                    # and freed before the next is drawn.
                    for expert, tensor in enumerate(plan.chunks()):
                        loader.set_expert(layer, kind, expert, tensor, plan.name)
                bar.update(1)
    finally:
        bar.close()
    finish_model(loader, targets, config, quant, "the random model")
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        quant=quant,
        source=f"random(seed={seed})",
        config=config,
        device=device,
        dtype=dtype,
    )
