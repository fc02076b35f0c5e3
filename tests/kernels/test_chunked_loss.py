"""The chunked causal LM loss against cross-entropy on the full float32 logits."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixtune.adapter._lora import LoraLinear
from mixtune.kernels import causal_lm_loss_reference, chunked_causal_lm_loss

VOCAB, HIDDEN = 37, 12


def _head(seed: int) -> LoraLinear:
    gen = torch.Generator().manual_seed(seed)
    base = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=gen))
    base.weight.requires_grad_(False)
    head = LoraLinear(base, r=3, scale=2.0, dropout=0.0, generator=gen)
    with torch.no_grad():
        head.lora_B.copy_(torch.randn(VOCAB, 3, generator=gen) * 0.3)
    return head


def _independent_reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Written without the library: shift, drop -100, mean of -log softmax in float64."""
    logp = logits.double().log_softmax(-1)[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    picked = logp[keep].gather(-1, target[keep][:, None]).squeeze(-1)
    return -picked.mean()


def _grads(loss: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, tensors)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    seq=st.integers(2, 9),
    chunk=st.integers(1, 30),
    masked_rows=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_chunked_loss_equals_full_logits_loss(
    batch: int, seq: int, chunk: int, masked_rows: int, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    head = _head(seed)
    hidden = torch.randn(batch, seq, HIDDEN, generator=gen, requires_grad=True)
    labels = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    labels[torch.rand(batch, seq, generator=gen) < 0.3] = -100
    labels[: min(masked_rows, batch - 1)] = -100  # whole rows without a target
    labels[-1, 1] = 3  # at least one target somewhere

    loss = chunked_causal_lm_loss(hidden, head, labels, chunk_tokens=chunk)
    params = (hidden, head.lora_A, head.lora_B)
    got = _grads(loss, *params)

    ref = causal_lm_loss_reference(head(hidden), labels)
    want = _grads(ref, *params)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        loss.double(), _independent_reference(head(hidden).detach(), labels), rtol=1e-5, atol=1e-6
    )


def test_sum_reduction_and_all_masked() -> None:
    head = _head(0)
    hidden = torch.randn(2, 5, HIDDEN)
    labels = torch.randint(0, VOCAB, (2, 5))
    total = chunked_causal_lm_loss(hidden, head, labels, chunk_tokens=4, reduction="sum")
    ref = causal_lm_loss_reference(head(hidden), labels, reduction="sum")
    torch.testing.assert_close(total, ref)
    nothing = torch.full((2, 5), -100)
    assert chunked_causal_lm_loss(hidden, head, nothing, reduction="sum").item() == 0.0
    assert torch.isnan(chunked_causal_lm_loss(hidden, head, nothing))


def test_only_one_chunk_of_logits_is_alive() -> None:
    """The head sees chunk-sized inputs, and nothing of vocab width survives the forward."""
    head = _head(1)
    seen: list[int] = []
    head.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    hidden = torch.randn(2, 10, HIDDEN, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, 10))
    labels[0] = -100
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = chunked_causal_lm_loss(hidden, head, labels, chunk_tokens=4)
    # 9 targets (row 1 without its last position) in chunks of 4: 4, 4, 1.
    assert seen == [4, 4, 1]
    assert not any(shape and shape[-1] == VOCAB for shape in saved)
    loss.backward()
    assert hidden.grad is not None
    assert torch.all(hidden.grad[0] == 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"chunk_tokens": 0}, "chunk_tokens"), ({"reduction": "max"}, "reduction")],
)
def test_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        chunked_causal_lm_loss(torch.zeros(1, 2, HIDDEN), _head(0), torch.zeros(1, 2), **kwargs)  # type: ignore[arg-type]


def test_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="labels"):
        chunked_causal_lm_loss(torch.zeros(1, 3, HIDDEN), _head(0), torch.zeros(1, 2))


def test_reference_is_transformers_loss() -> None:
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = torch.randn(2, 6, VOCAB)
    labels = torch.randint(0, VOCAB, (2, 6))
    labels[0, 2:] = -100
    torch.testing.assert_close(
        causal_lm_loss_reference(logits, labels), ForCausalLMLoss(logits, labels, VOCAB)
    )
