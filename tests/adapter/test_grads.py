"""Training signal: every LoRA tensor, every expert slice, gets a gradient."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mixtune.adapter import AdapterSpec, LoraExperts

from .helpers import Loaded, lora_params, nudge_lora_b

ALL = ("attention", "experts", "router", "lm_head")


def _record_routing(model: nn.Module) -> dict[str, set[int]]:
    hit: dict[str, set[int]] = {}

    def hook(module: nn.Module, args: tuple[Tensor, ...], name: str) -> None:
        hit.setdefault(name, set()).update(args[1].flatten().tolist())

    for name, module in model.named_modules():
        if isinstance(module, LoraExperts):
            module.register_forward_pre_hook(lambda m, a, n=name: hook(m, a, n))
    return hit


def _loss(model: nn.Module, ids: Tensor) -> Tensor:
    loss: Tensor = model(ids, labels=ids).loss
    return loss


def _nonzero_per_expert(grad: Tensor) -> list[bool]:
    return [bool(grad[e].abs().sum() > 0) for e in range(grad.shape[0])]


def test_every_lora_tensor_and_expert_gets_gradients(tiny_mixtral: nn.Module) -> None:
    adapted = AdapterSpec.lora(targets=ALL, r=4, dropout=0.1).apply(Loaded(tiny_mixtral))
    model = adapted.model.train()
    hit = _record_routing(model)
    ids = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))
    params = lora_params(model)
    assert params

    # Step 1: B = 0, so only B has a gradient (dL/dA = B^T ... = 0).
    _loss(model, ids).backward()
    # Precondition: routing sent tokens to every expert of every layer.
    assert hit == {f"model.layers.{i}.mlp.experts": {0, 1, 2, 3} for i in range(2)}
    for name, p in params.items():
        assert p.grad is not None, name
        if name.endswith("lora_B"):
            if p.ndim == 3:
                assert all(_nonzero_per_expert(p.grad)), name
            else:
                assert p.grad.abs().sum() > 0, name
        else:
            assert not p.grad.any(), name

    # One optimizer step moves B off zero; now A gets gradients too.
    optimizer = torch.optim.SGD(params.values(), lr=0.1)
    optimizer.step()
    optimizer.zero_grad()
    _loss(model, ids).backward()
    for name, p in params.items():
        assert p.grad is not None, name
        if p.ndim == 3:
            assert all(_nonzero_per_expert(p.grad)), name
        else:
            assert p.grad.abs().sum() > 0, name
    # The frozen base received nothing.
    for name, p in model.named_parameters():
        if name not in params:
            assert p.grad is None, name


def test_expert_dropout_in_the_full_model(tiny_mixtral: nn.Module) -> None:
    adapted = AdapterSpec.lora(targets="experts", r=4, dropout=0.3).apply(Loaded(tiny_mixtral))
    nudge_lora_b(adapted.model, std=0.5)
    ids = torch.randint(0, 96, (2, 16))
    model = adapted.model
    with torch.no_grad():
        model.train()
        first, second = model(ids).logits, model(ids).logits
        assert not torch.allclose(first, second)
        model.eval()
        torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)
