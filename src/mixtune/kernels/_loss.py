"""Causal LM loss over vocabulary chunks, never holding the whole batch's logits.

For Mixtral the logits of a ``8 × 1200`` batch are ``9600 × 32000`` values:
1.2 GB in float32, and the stock loss keeps the bf16 logits, their float32
copy and the softmax gradient alive together (several GB, more than every
LoRA weight, gradient and optimizer state of a QLoRA run). Here the tokens
that carry a label are cut into chunks; each chunk's logits are computed,
upcast to float32 and reduced to a summed cross-entropy inside an activation
checkpoint, so only one chunk's logits exist at a time, in forward and in
backward (where the chunk is recomputed).

The reference is the stock path: ``F.cross_entropy`` on the shifted float32
logits of the whole batch (transformers' ``ForCausalLMLoss``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["IGNORE_INDEX", "causal_lm_loss_reference", "chunked_causal_lm_loss"]

IGNORE_INDEX = -100


def _shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    # Position t predicts label t+1; the last position of every row predicts nothing.
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def _chunk_loss(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    lm_head: nn.Module,
    labels: torch.Tensor,
    *,
    chunk_tokens: int = 1024,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """Next-token cross-entropy of ``lm_head(hidden)`` without materialising all logits.

    Labels are shifted as in transformers' causal LM loss (position ``t``
    predicts ``labels[..., t + 1]``) and ``-100`` marks tokens without a loss.
    Only positions with a target go through ``lm_head`` (padding costs
    nothing), ``chunk_tokens`` at a time; each chunk runs under a
    non-reentrant activation checkpoint, so its logits are freed after the
    forward and recomputed in backward. Each chunk's logits are upcast to
    float32 before the softmax, like the stock loss.

    Args:
        hidden: ``(..., seq, hidden)`` final hidden states (after the last norm).
        lm_head: The output projection (an ``nn.Linear``, a quantized or a
            LoRA-wrapped linear): any module mapping ``(n, hidden)`` to
            ``(n, vocab)``.
        labels: ``(..., seq)`` token ids, ``-100`` where no loss is wanted.
        chunk_tokens: Tokens per chunk; the peak holds ``chunk_tokens × vocab``
            float32 logits (and their gradient in backward).
        reduction: ``"mean"`` over the tokens with a target (NaN if there are
            none, like ``F.cross_entropy``) or ``"sum"``.

    Returns:
        A float32 scalar.

    Raises:
        ValueError: If the shapes disagree, ``chunk_tokens`` is not positive or
            ``reduction`` is unknown.

    Example:
        >>> import torch
        >>> from mixtune.kernels import causal_lm_loss_reference, chunked_causal_lm_loss
        >>> head = torch.nn.Linear(8, 50, bias=False)
        >>> hidden = torch.randn(2, 5, 8)
        >>> labels = torch.randint(0, 50, (2, 5))
        >>> loss = chunked_causal_lm_loss(hidden, head, labels, chunk_tokens=3)
        >>> ref = causal_lm_loss_reference(head(hidden), labels)
        >>> torch.allclose(loss, ref, atol=1e-5)
        True
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"hidden has shape {tuple(hidden.shape)} and labels {tuple(labels.shape)}; "
            "labels must have hidden's shape without the last dimension"
        )
    given: object = chunk_tokens  # checked at run time: callers may pass anything
    if isinstance(given, bool) or not isinstance(given, int) or given < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens!r}: must be a positive int")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: must be 'mean' or 'sum'")
    targets = _shifted_targets(labels).reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    # One host sync per batch; ignored positions then cost no logits at all.
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(-1)
    flat = flat.index_select(0, keep)
    targets = targets.index_select(0, keep)
    total = flat.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.shape[0], chunk_tokens):
        part = checkpoint(
            _chunk_loss,
            lm_head,
            flat[start : start + chunk_tokens],
            targets[start : start + chunk_tokens],
            use_reentrant=False,
        )
        total = total + part
    if reduction == "sum":
        return total
    return total / targets.shape[0] if targets.shape[0] else total * float("nan")


def causal_lm_loss_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """The stock causal LM loss on full logits (what :func:`chunked_causal_lm_loss` equals).

    Args:
        logits: ``(..., seq, vocab)``.
        labels: ``(..., seq)``, ``-100`` where no loss is wanted.
        reduction: ``"mean"`` over tokens with a target, or ``"sum"``.

    Returns:
        A float32 scalar.
    """
    targets = _shifted_targets(labels).reshape(-1)
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets,
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )
