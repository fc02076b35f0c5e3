"""Pre-flight: will the run fit in the device's memory? Answer before step one.

The estimate adds up what training allocates beyond the loaded weights: the
LoRA weights with their gradients and optimizer states, the activations kept
for backward (all layers' without gradient checkpointing, one layer's plus
each layer's input with it), on CUDA the dequantized expert stack of the
layer being computed, and one chunk of fp32 logits with its gradient (the
loss is computed over chunks of tokens, never the whole batch's logits). It is deliberately
coarse (a 10 % margin is added); its job is to turn a certain out-of-memory
crash after minutes of loading into an error in seconds that says what to
change.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixtune.errors import PreflightError
from mixtune.kernels import experts_per_chunk
from mixtune.recipe._loss import CHUNK_TOKENS
from mixtune.recipe._result import MemoryEstimate

__all__ = ["check_preflight", "estimate_memory", "free_memory"]


def free_memory(device: torch.device) -> int:
    """Bytes the device can still allocate.

    Args:
        device: A CUDA device or the CPU.

    Returns:
        CUDA: free bytes from ``torch.cuda.mem_get_info``; CPU: ``MemAvailable``
        from ``/proc/meminfo`` (or physical memory where that file is missing).
    """
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))  # pragma: no cover


def _storage_bytes(model: nn.Module) -> int:
    # By storage, not by logical size: a 4-bit weight is a packed uint8 tensor
    # with half as many elements, and that is what occupies memory.
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        total += t.numel() * t.element_size()
    return total


def estimate_memory(
    model: nn.Module,
    *,
    batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool,
    optimizer: str,
    activation_dtype: torch.dtype,
    device: torch.device,
    available: int | None = None,
    weights_bytes: int | None = None,
) -> MemoryEstimate:
    """Estimate the memory a training run needs.

    Args:
        model: The adapted model (only LoRA parameters require grad).
        batch_size: Rows per micro-batch.
        seq_len: Tokens per row.
        gradient_checkpointing: Whether activations are recomputed in backward.
        optimizer: ``"paged_adamw_8bit"`` (2 bytes of state per weight) or
            ``"adamw_torch"`` (two states in the weight's dtype).
        activation_dtype: dtype of activations (bf16 under autocast, else fp32).
        device: The device that will train.
        available: Free memory to assume; ``None`` asks the device.
        weights_bytes: The weights' storage from ``LoadedModel.census()``;
            ``None`` sums the model's parameters and buffers.

    Returns:
        The :class:`MemoryEstimate`.
    """
    cfg: Any = model.config
    hidden = int(cfg.hidden_size)
    inter = int(getattr(cfg, "intermediate_size", 4 * hidden))
    layers = int(cfg.num_hidden_layers)
    heads = int(cfg.num_attention_heads)
    vocab = int(cfg.vocab_size)
    top_k = int(getattr(cfg, "num_experts_per_tok", 1) or 1)
    a = torch.tensor([], dtype=activation_dtype).element_size()

    params = list(model.parameters())
    weights = _storage_bytes(model) if weights_bytes is None else weights_bytes
    resident = all(p.device.type == device.type for p in params)
    trainable = 0
    for p in params:
        if p.requires_grad:
            e = p.element_size()
            state = 2 if optimizer == "paged_adamw_8bit" else 2 * e
            trainable += p.numel() * (2 * e + state)

    tokens = batch_size * seq_len
    # Per layer: attention inputs/outputs (about 6 hidden-sized tensors), the
    # attention scores, and per routed slot the gate, up and gated products.
    per_layer = tokens * a * (6 * hidden + top_k * 3 * inter) + batch_size * heads * seq_len**2 * a
    if gradient_checkpointing:
        activations = layers * tokens * hidden * a + per_layer
    else:
        activations = layers * per_layer
    # On CUDA the experts run as grouped GEMMs over dequantized weights, a
    # chunk of experts at a time (their gate_up matrices, 2I·H each, in the
    # compute dtype), fetched again in backward rather than kept: one chunk
    # exists at a time, with or without checkpointing.
    stack = 0
    for module in model.modules():
        experts: Any = module  # nn.Module attributes are untyped
        if hasattr(experts, "grouped_sources") and bool(getattr(experts, "is_quantized", False)):
            per_expert = 2 * experts.hidden_dim * experts.intermediate_dim * a
            budget = int(getattr(experts, "dequant_chunk_bytes", per_expert))
            chunk = experts_per_chunk(int(per_expert), budget, int(experts.num_experts))
            stack = max(stack, int(chunk * per_expert))
    if device.type == "cuda":
        activations += stack
    # The loss is chunked (mixtune.kernels.chunked_causal_lm_loss): one
    # chunk's fp32 logits and their gradient, never the whole batch's.
    logits = 2 * min(tokens, CHUNK_TOKENS) * vocab * 4
    free = free_memory(device) if available is None else available
    return MemoryEstimate(
        weights=weights,
        weights_resident=resident,
        trainable=trainable,
        activations=activations,
        logits=logits,
        available=free,
        device=device.type,
    )


def check_preflight(
    est: MemoryEstimate,
    *,
    batch_size: int,
    gradient_checkpointing: bool,
    quantized: bool,
) -> None:
    """Raise if the estimate does not fit.

    Args:
        est: The estimate.
        batch_size: The recipe's micro-batch size (for the advice).
        gradient_checkpointing: Whether it is on (for the advice).
        quantized: Whether the experts are already 4-bit (for the advice).

    Raises:
        PreflightError: With the breakdown and what to change.
    """
    if est.fits:
        return
    advice = []
    if batch_size > 1:
        advice.append(
            f"a smaller batch: Recipe(batch_size={max(1, batch_size // 2)}, "
            f"grad_accum=...) keeps the effective batch with more accumulation"
        )
    if not gradient_checkpointing:
        advice.append("gradient_checkpointing=True (recomputes activations in backward)")
    if not quantized:
        advice.append("4-bit weights: load_quantized(..., quant=QuantSpec.nf4())")
    advice.append("a shorter max_length for the corpus")
    raise PreflightError(
        "the run would not fit in memory (estimate before the first step):\n"
        + est.table()
        + "\ntry: "
        + "; ".join(advice)
    )
