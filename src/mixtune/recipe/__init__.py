"""Training: the :class:`Recipe` spec, ``Recipe.fit`` and what it returns.

``Recipe`` holds every knob that defines the trained adapter; run-time
choices (output folder, device, logging) sit in :class:`RunSettings`.
``Recipe.fit`` drives the Hugging Face Trainer with mixtune's atomic
LoRA-only checkpoints, NaN stop and memory pre-flight, and returns a
:class:`FitResult`; :func:`causal_lm_training_loss` is the loss it trains
with (the stock ``out.loss`` without the whole batch's logits). The same
script runs on several GPUs under ``accelerate launch`` (DDP; see the
"Multi-GPU" how-to), or, with ``RunSettings(sharding="fsdp2")``, with the
model sharded over them by :func:`shard_model` (FSDP2) for models whose 4-bit
weights do not fit one GPU.
"""

from __future__ import annotations

from mixtune.recipe._checkpoint import complete_checkpoints, last_complete_checkpoint
from mixtune.recipe._dist import local_device
from mixtune.recipe._fit import fit
from mixtune.recipe._fsdp import (
    full_lora_state_dict,
    gathered_lora,
    load_full_lora_state_dict,
    make_4bit_shardable,
    packed_4bit_bytes,
    shard_model,
)
from mixtune.recipe._loss import causal_lm_training_loss
from mixtune.recipe._preflight import estimate_memory
from mixtune.recipe._result import FitResult, LossPoint, MemoryEstimate
from mixtune.recipe._spec import Recipe, RunSettings

__all__ = [
    "FitResult",
    "LossPoint",
    "MemoryEstimate",
    "Recipe",
    "RunSettings",
    "causal_lm_training_loss",
    "complete_checkpoints",
    "estimate_memory",
    "fit",
    "full_lora_state_dict",
    "gathered_lora",
    "last_complete_checkpoint",
    "load_full_lora_state_dict",
    "local_device",
    "make_4bit_shardable",
    "packed_4bit_bytes",
    "shard_model",
]
