"""The grouped expert path wired into MoEExperts/LoraExperts equals the per-expert loop.

On CPU the grouped path is forced on (``grouped_path_available`` patched in
the two modules that dispatch) and runs on the loop fallback of
``grouped_mm``; the sorting, routing weights and LoRA wiring are what is
under test.  On CUDA the native bf16 grouped GEMM runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixtune.adapter import AdapterSpec, LoraExperts
from mixtune.model import MoEExperts, QuantSpec, load_quantized, random_checkpoint, tiny_config
from tests.adapter.helpers import lora_params, nudge_lora_b, relative_error
from tests.conftest import requires_gpu


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_checkpoint(
        tiny_config("mixtral"), tmp_path_factory.mktemp("grouped"), seed=5, dtype=torch.float32
    )


def _set_grouped(model: torch.nn.Module, on: bool) -> int:
    count = 0
    for module in model.modules():
        if isinstance(module, (MoEExperts, LoraExperts)):
            module.grouped = on
            count += 1
    return count


def _run(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, use_cache=False).logits
    logits.float().square().mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in lora_params(model).items()}
    return logits.detach(), grads


def _compare(
    path: Path, device: str, dtype: torch.dtype, tol: float, chunk_bytes: int | None = None
) -> None:
    loaded = load_quantized(
        path, quant=QuantSpec.nf4(compute_dtype=dtype), dtype=dtype, device_map=device
    )
    if chunk_bytes is not None:
        for module in loaded.model.modules():
            if isinstance(module, MoEExperts):
                module.dequant_chunk_bytes = chunk_bytes
    adapted = AdapterSpec.lora(r=4, alpha=8, dropout=0.0, targets=("experts",)).apply(
        loaded, dtype=dtype
    )
    model = adapted.model
    nudge_lora_b(model)
    ids = torch.randint(3, 32000, (2, 48), device=device)
    assert _set_grouped(model, False) > 0
    want_logits, want_grads = _run(model, ids)
    _set_grouped(model, True)
    got_logits, got_grads = _run(model, ids)
    assert relative_error(got_logits, want_logits) <= tol
    for name, want in want_grads.items():
        assert bool(want.abs().sum() > 0), name
        assert relative_error(got_grads[name], want) <= tol, name


@pytest.mark.parametrize("chunk_bytes", [None, 1])
def test_grouped_path_equals_loop_cpu(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch, chunk_bytes: int | None
) -> None:
    # chunk_bytes=1: one expert dequantized at a time, forward and backward.
    calls = []

    def forced(x: torch.Tensor) -> bool:
        calls.append(x.shape)
        return True

    monkeypatch.setattr("mixtune.adapter._lora.grouped_path_available", forced)
    monkeypatch.setattr("mixtune.model._experts.grouped_path_available", forced)
    fused = _count_fused(monkeypatch)
    _compare(ckpt, "cpu", torch.float32, 1e-5, chunk_bytes)
    assert calls, "the grouped path was never taken"
    # The model's activation (transformers' SiLU) must select the fused node.
    assert fused, "the fused expert node was never used"


def _count_fused(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from mixtune.kernels import _moe

    used: list[int] = []
    original = _moe._FusedExperts.apply

    def counting(*args: object) -> object:
        used.append(1)
        return original(*args)

    monkeypatch.setattr(_moe._FusedExperts, "apply", counting)
    return used


def test_stacked_weight_matches_per_expert_weights(ckpt: Path) -> None:
    loaded = load_quantized(
        ckpt, quant=QuantSpec.nf4(compute_dtype=torch.float32), dtype=torch.float32
    )
    experts = loaded.model.model.layers[0].mlp.experts
    for kind in ("gate_up", "down"):
        stack = experts.stacked_weight(kind)
        for e in range(experts.num_experts):
            torch.testing.assert_close(stack[e], experts.weight(kind, e), rtol=0, atol=0)
        fetch = experts.grouped_sources(torch.float32)[0 if kind == "gate_up" else 1]
        torch.testing.assert_close(fetch(1, 3), stack[1:3], rtol=0, atol=0)


def _adapted(path: Path, device: str, dtype: torch.dtype) -> torch.nn.Module:
    loaded = load_quantized(
        path, quant=QuantSpec.nf4(compute_dtype=dtype), dtype=dtype, device_map=device
    )
    spec = AdapterSpec.lora(r=8, alpha=16, dropout=0.0, targets=("experts",))
    model = spec.apply(loaded, dtype=dtype).model
    nudge_lora_b(model)
    return model


@pytest.mark.gpu
@requires_gpu
def test_grouped_path_is_as_accurate_as_loop_gpu(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two bf16 computations differ from each other by about twice their own
    # error, so both are measured against the float32 loop instead: the native
    # grouped GEMM may be no less accurate than the per-expert loop in bf16.
    ids = torch.randint(3, 32000, (2, 64), device="cuda")
    truth = _adapted(ckpt, "cuda", torch.float32)
    _set_grouped(truth, False)
    want_logits, want_grads = _run(truth, ids)
    model = _adapted(ckpt, "cuda", torch.bfloat16)
    _set_grouped(model, False)
    loop_logits, loop_grads = _run(model, ids)
    _set_grouped(model, True)
    fused = _count_fused(monkeypatch)
    got_logits, got_grads = _run(model, ids)
    assert fused, "the fused expert node was never used"
    budget = 1.5 * relative_error(loop_logits, want_logits) + 1e-3
    assert relative_error(got_logits, want_logits) <= budget
    for name, want in want_grads.items():
        loop_err = relative_error(loop_grads[name], want)
        assert relative_error(got_grads[name], want) <= 1.5 * loop_err + 1e-3, name
