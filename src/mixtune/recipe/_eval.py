"""Evaluation without the Trainer: token-weighted loss and expert routing load.

The Trainer's own evaluation reports the training loss, which includes the
router's auxiliary loss; perplexity needs the plain language-model loss, and
routing statistics need the router logits, so evaluation is done here. It
batches rows by slicing (no DataLoader, whose iterator draws from the global
RNG and would change the training run it is called from).

Under DDP every rank evaluates the rows ``rank, rank + N, rank + 2N, ...``
(no padding, so no row counts twice and none is skipped) and the summed
loss, token and routing counts are all-reduced, so every rank returns the
same numbers a single process would (up to float summation order). With
the model sharded (FSDP2) every forward gathers weights from all ranks, so
``lockstep=True`` makes every rank run the same number of batches: a rank
whose rows ran out repeats its first batch and leaves it out of the sums.
"""

from __future__ import annotations

import contextlib
from typing import Any

import attrs
import torch
from torch import nn

from mixtune.kernels import chunked_causal_lm_loss
from mixtune.recipe._dist import World
from mixtune.recipe._loss import model_inputs

__all__ = ["EvalStats", "evaluate"]

_COLUMNS = ("input_ids", "attention_mask", "position_ids")


@attrs.frozen
class EvalStats:
    """Result of one evaluation pass.

    Attributes:
        loss: Mean cross-entropy per predicted token (nats).
        tokens: Number of predicted tokens.
        routing_load: Per layer, the fraction of routed slots each expert got.
    """

    loss: float
    tokens: int
    routing_load: tuple[tuple[float, ...], ...]


def evaluate(
    model: nn.Module,
    dataset: Any,
    *,
    batch_size: int,
    max_rows: int | None = None,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    world: World | None = None,
    lockstep: bool = False,
) -> EvalStats:
    """Compute the LM loss and routing load of ``model`` on ``dataset``.

    Args:
        model: A transformers causal LM (``.model`` the decoder, ``.lm_head``
            the output projection; Mixtral-style ones also give routing load).
        dataset: Rows with ``input_ids``, ``attention_mask``, ``labels`` and
            optionally ``position_ids`` (packed rows: the model then runs
            without the mask, so attention stays inside each packed chunk).
        batch_size: Rows per forward pass.
        max_rows: Evaluate only the first this many rows.
        device: Where the inputs go.
        autocast_dtype: Autocast dtype (bf16 on CUDA), or ``None``.
        world: The process group; each rank evaluates its share of the rows
            and the totals are summed over ranks (``None``: one process).
        lockstep: Run as many forwards on every rank as on the busiest one
            (needed when the model is sharded, where a forward is a collective).

    Returns:
        The :class:`EvalStats` (the same on every rank).
    """
    world = world if world is not None else World()
    n = len(dataset) if max_rows is None else min(len(dataset), max_rows)
    mine = list(range(world.rank, n, world.size))
    cfg = model.config
    top_k = int(getattr(cfg, "num_experts_per_tok", 0) or 0)
    num_experts = int(getattr(cfg, "num_local_experts", 0) or 0)
    num_layers = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    # Fixed (layers, experts) shape from the config, so a rank with no rows
    # still joins the all-reduce with a tensor of the right size.
    counts = torch.zeros(num_layers, num_experts, dtype=torch.float64)
    route = top_k > 0 and num_experts > 0
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64)
    total_tokens = 0
    ctx: contextlib.AbstractContextManager[Any] = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    try:
        with torch.no_grad(), ctx:
            # Every rank's share has at most ceil(n / size) rows.
            busiest = -(-n // world.size)
            batches = -(-busiest // batch_size) if lockstep else -(-len(mine) // batch_size)
            for batch in range(batches):
                start = batch * batch_size
                counted = start < len(mine)
                # A rank that is out of rows runs a batch it throws away.
                picked = mine[start : start + batch_size] if counted else [0]
                rows = dataset[picked]
                inputs = {
                    k: torch.as_tensor(rows[k], dtype=torch.long, device=device)
                    for k in _COLUMNS
                    if k in rows
                }
                labels = torch.as_tensor(rows["labels"], dtype=torch.long, device=device)
                # The decoder body, then the loss chunk by chunk: the whole
                # batch's logits (GBs at 8 x 1200 tokens) are never built.
                extra = {"output_router_logits": True} if route else {}
                body: Any = model.model
                out = body(**model_inputs(inputs), use_cache=False, **extra)
                if not counted:
                    continue
                lm_head: Any = model.lm_head
                total_loss += chunked_causal_lm_loss(
                    out.last_hidden_state, lm_head, labels, reduction="sum"
                ).to("cpu", torch.float64)
                total_tokens += int((labels[:, 1:] != -100).sum())
                router_logits = getattr(out, "router_logits", None)
                if route and router_logits:
                    mask = inputs["attention_mask"].reshape(-1).bool()
                    for layer, rl in enumerate(router_logits[:num_layers]):
                        chosen = rl[mask].topk(top_k, dim=-1).indices.reshape(-1)
                        c = torch.bincount(chosen, minlength=num_experts)[:num_experts]
                        counts[layer] += c.to("cpu", torch.float64)
    finally:
        model.train(was_training)
    summed = world.sum([float(total_loss), float(total_tokens), *counts.reshape(-1).tolist()])
    total_tokens = round(summed[1])
    counts = torch.tensor(summed[2:], dtype=torch.float64).reshape(counts.shape)
    loss = summed[0] / max(total_tokens, 1)
    load = tuple(tuple(float(x) for x in c / c.sum()) for c in counts if c.sum() > 0)
    return EvalStats(loss=loss, tokens=total_tokens, routing_load=load)
