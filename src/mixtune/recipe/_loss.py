"""The training loss of a causal LM batch, computed without the full logits.

``MixtralForCausalLM.forward`` projects every position to the vocabulary
before the loss: for a ``8 × 1200`` batch that is a ``9600 × 32000`` tensor
in bf16, its float32 copy and its gradient, several GB at the peak of a
QLoRA step. :func:`causal_lm_training_loss` runs the decoder body
(``model.model``) instead and hands the hidden states to
:func:`mixtune.kernels.chunked_causal_lm_loss`; the router's auxiliary loss
is added exactly as the stock forward adds it, so the value (and gradient)
is the stock ``out.loss``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mixtune.kernels import chunked_causal_lm_loss

__all__ = ["causal_lm_training_loss", "model_inputs"]

#: Tokens per chunk of logits (32000 × 1024 float32 logits ≈ 131 MB).
CHUNK_TOKENS = 1024


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The model's keyword arguments for a batch of corpus rows.

    Packed rows (those with ``position_ids``) are run **without** their
    ``attention_mask``: transformers builds the block-diagonal causal mask of
    the packed chunks from the restarting ``position_ids`` only when the
    mask is None; with a mask every chunk of a row would see the previous
    ones.

    Args:
        batch: Columns ``input_ids`` and optionally ``attention_mask``,
            ``position_ids`` (other keys are ignored).

    Returns:
        ``input_ids``, ``attention_mask`` (None for packed rows) and
        ``position_ids`` (None for padded rows).
    """
    position_ids = batch.get("position_ids")
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": None if position_ids is not None else batch.get("attention_mask"),
        "position_ids": position_ids,
    }


def causal_lm_training_loss(
    model: nn.Module,
    batch: dict[str, Any],
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    aux_loss: bool | None = None,
    chunk_tokens: int = CHUNK_TOKENS,
) -> torch.Tensor:
    """The stock ``model(**batch, labels=...).loss`` of a transformers causal LM, chunked.

    Args:
        model: A transformers ``*ForCausalLM`` (``.model`` is the decoder,
            ``.lm_head`` the output projection; LoRA-wrapped modules are fine).
        batch: ``input_ids``, ``labels`` and optionally ``attention_mask`` /
            ``position_ids`` (packed rows, those with ``position_ids``, run
            without their mask so attention stays inside each packed chunk).
        num_items_in_batch: As the Trainer passes it under gradient
            accumulation: the cross-entropy is summed and divided by it
            (transformers' ``fixed_cross_entropy``); None for a mean.
        aux_loss: Add the router's load-balancing loss times
            ``router_aux_loss_coef`` (MoE models only). None: as
            ``model.config.output_router_logits`` says, like the stock forward.
        chunk_tokens: Tokens per chunk of logits.

    Returns:
        The scalar loss (float32).

    Example:
        >>> loss = causal_lm_training_loss(model, batch)  # doctest: +SKIP
        >>> loss.backward()  # doctest: +SKIP
    """
    config: Any = model.config
    moe = hasattr(config, "num_local_experts")
    with_aux = moe and (
        bool(getattr(config, "output_router_logits", False)) if aux_loss is None else aux_loss
    )
    inputs = model_inputs(batch)
    body: Any = model.model
    extra = {"output_router_logits": with_aux} if moe else {}
    out = body(**inputs, use_cache=False, **extra)
    labels = batch["labels"].to(out.last_hidden_state.device)
    lm_head: Any = model.lm_head
    if num_items_in_batch is None:
        loss = chunked_causal_lm_loss(
            out.last_hidden_state, lm_head, labels, chunk_tokens=chunk_tokens
        )
    else:
        total = chunked_causal_lm_loss(
            out.last_hidden_state, lm_head, labels, chunk_tokens=chunk_tokens, reduction="sum"
        )
        if isinstance(num_items_in_batch, torch.Tensor):
            loss = total / num_items_in_batch.to(total.device)
        else:
            loss = total / num_items_in_batch
    if with_aux:
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        coef = float(getattr(model, "router_aux_loss_coef", config.router_aux_loss_coef))
        aux = load_balancing_loss_func(
            out.router_logits,
            int(config.num_local_experts),
            int(config.num_experts_per_tok),
            inputs["attention_mask"],
        )
        # transformers returns a plain 0 when there were no router logits.
        loss = loss + coef * (aux.to(loss.device) if isinstance(aux, torch.Tensor) else aux)
    return loss
