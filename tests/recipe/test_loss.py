"""The chunked training loss equals the stock forward's ``out.loss`` (router aux loss included)."""

from __future__ import annotations

import pytest
import torch

from mixtune.recipe._loss import causal_lm_training_loss, model_inputs
from tests.recipe.toy import toy_adapted


def _batch(layout: str, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    if layout == "padded":
        for row, n in enumerate((12, 7, 2)):
            mask[row, n:] = 0
            labels[row, n:] = -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    # Packed: chunks of 5 and 4 tokens then 3 of padding; positions restart per chunk.
    pos = torch.tensor([list(range(5)) + list(range(4)) + list(range(3))] * 3)
    labels[:, 0] = -100
    labels[:, 5] = -100
    labels[:, 9:] = -100
    mask[:, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": pos}


def _model(aux: bool) -> torch.nn.Module:
    model = toy_adapted(seed=3).model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    model.config.output_router_logits = aux
    model.router_aux_loss_coef = 0.02
    model.eval()  # no dropout: both paths must see the same network
    return model


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("aux", [True, False])
@pytest.mark.parametrize("items", [None, 17])
def test_training_loss_equals_stock_loss(layout: str, aux: bool, items: int | None) -> None:
    model = _model(aux)
    batch = _batch(layout)
    trainable = [p for p in model.parameters() if p.requires_grad]

    got = causal_lm_training_loss(model, batch, num_items_in_batch=items, chunk_tokens=5)
    got_grads = torch.autograd.grad(got, trainable)

    extra = {} if items is None else {"num_items_in_batch": items}
    stock = model(**model_inputs(batch), labels=batch["labels"], use_cache=False, **extra)
    want_grads = torch.autograd.grad(stock.loss, trainable)

    torch.testing.assert_close(got, stock.loss, rtol=1e-6, atol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    if aux:
        # The aux loss is really in there: without it the value differs.
        plain = causal_lm_training_loss(model, batch, num_items_in_batch=items, aux_loss=False)
        assert not torch.allclose(plain, got)


def test_packed_rows_do_not_attend_across_chunks() -> None:
    """Changing the first chunk must not change the loss of the second one."""
    model = _model(aux=False)
    batch = _batch("packed")
    second_only = dict(batch, labels=batch["labels"].clone())
    second_only["labels"][:, :5] = -100
    before = causal_lm_training_loss(model, second_only)
    changed = dict(second_only, input_ids=second_only["input_ids"].clone())
    changed["input_ids"][:, :5] = 7
    after = causal_lm_training_loss(model, changed)
    torch.testing.assert_close(before, after)


def test_model_inputs_drops_the_mask_of_packed_rows() -> None:
    packed = model_inputs(_batch("packed"))
    padded = model_inputs(_batch("padded"))
    assert packed["attention_mask"] is None
    assert packed["position_ids"] is not None
    assert padded["attention_mask"] is not None
    assert padded["position_ids"] is None


def test_preflight_counts_one_chunk_of_logits() -> None:
    from mixtune.recipe._loss import CHUNK_TOKENS
    from mixtune.recipe._preflight import estimate_memory

    model = _model(aux=True)
    est = estimate_memory(
        model,
        batch_size=8,
        seq_len=1200,
        gradient_checkpointing=True,
        optimizer="adamw_torch",
        activation_dtype=torch.float32,
        device=torch.device("cpu"),
        available=2**40,
    )
    # Not 8 x 1200 tokens' worth: the loss holds one chunk at a time.
    assert est.logits == 2 * CHUNK_TOKENS * model.config.vocab_size * 4
