"""GPU checks on a Mixtral-8x7B-width slice (hidden 4096, 8 experts × 14336, 2 layers).

The slice is written once per session with ``random_checkpoint`` (~5.6 GB in
bf16 under pytest's tmp dir). The tiny-model correctness tests in
``test_model_loader.py`` also run on CUDA through their ``device`` parameter.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mixtune.model import (
    LoadedModel,
    MoEExperts,
    QuantLinear,
    QuantSpec,
    load_quantized,
    mixtral_8x7b_config,
    random_checkpoint,
)
from tests.model.model_helpers import requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu]

GIB = 2**30


@pytest.fixture(scope="module")
def slice_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # MIXTUNE_GPU_SLICE reuses a slice written earlier (e.g. by benchmarks/load.py).
    ready = os.environ.get("MIXTUNE_GPU_SLICE")
    if ready and (Path(ready) / "config.json").is_file():
        return Path(ready)
    return random_checkpoint(mixtral_8x7b_config(2), tmp_path_factory.mktemp("mixtral-8x7b-slice"))


@pytest.fixture(scope="module")
def slice_loaded(slice_path: Path) -> tuple[LoadedModel, dict[str, int]]:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loaded = load_quantized(slice_path, quant=QuantSpec.nf4(), device_map="cuda")
    torch.cuda.synchronize()
    stats = {
        "before": before,
        "after": torch.cuda.memory_allocated(),
        "peak": torch.cuda.max_memory_allocated(),
    }
    return loaded, stats


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def test_slice_weight_bytes_and_peak_memory(
    slice_loaded: tuple[LoadedModel, dict[str, int]],
) -> None:
    loaded, stats = slice_loaded
    census = loaded.census()
    print(census)
    assert census.total_bytes <= 1.9 * GIB
    assert census.bytes(kind="experts") == census.bytes(kind="experts", storage="4-bit")
    assert census.bytes(kind="attention") == census.bytes(kind="attention", storage="4-bit")
    layers = loaded.config.num_hidden_layers
    per_layer = (
        sum(census.bytes(kind=k) for k in ("attention", "experts", "router", "norms")) / layers
    )
    rest = census.total_bytes - per_layer * layers
    assert rest + 32 * per_layer <= 24 * GIB
    # Streaming: the load never holds more than the final weights plus about one
    # layer in bf16 (in fact one expert matrix and its quantization temporaries).
    config = loaded.config
    h, i, e = config.hidden_size, config.intermediate_size, config.num_local_experts
    one_layer_bf16 = (3 * e * h * i + 4 * h * h) * 2
    resident = stats["after"] - stats["before"]
    print(
        f"resident {resident / GIB:.3f} GiB, peak {(stats['peak'] - stats['before']) / GIB:.3f} GiB"
    )
    assert resident <= census.total_bytes * 1.05 + 64 * 2**20
    assert stats["peak"] - stats["before"] <= census.total_bytes + one_layer_bf16


def test_slice_experts_match_float32_reference(
    slice_loaded: tuple[LoadedModel, dict[str, int]],
) -> None:
    loaded, _ = slice_loaded
    experts = loaded.model.model.layers[0].mlp.experts
    assert isinstance(experts, MoEExperts)
    assert experts.is_quantized
    tokens = 96
    x = torch.randn(
        tokens, experts.hidden_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True
    )
    idx = torch.stack(
        [torch.randperm(experts.num_experts, device="cuda")[:2] for _ in range(tokens)]
    )
    w = torch.softmax(torch.randn(tokens, 2, device="cuda"), -1)
    y = experts(x, idx, w)
    g = torch.randn_like(y)
    y.backward(g)
    x32 = x.detach().float().requires_grad_()
    ref = torch.zeros_like(x32)
    for e in range(experts.num_experts):
        rows = (idx == e).any(-1)
        if not rows.any():
            continue
        gate, up = (x32[rows] @ experts.weight("gate_up", e, torch.float32).T).chunk(2, -1)
        out = (torch.nn.functional.silu(gate) * up) @ experts.weight("down", e, torch.float32).T
        ref = ref.index_add(
            0, rows.nonzero()[:, 0], out * (w * (idx == e))[rows].sum(-1, keepdim=True)
        )
    ref.backward(g.float())
    assert _rel(y, ref) <= 1e-2
    assert x.grad is not None
    assert x32.grad is not None
    assert _rel(x.grad, x32.grad) <= 1e-2


def test_slice_forward_backward_after_eval(
    slice_loaded: tuple[LoadedModel, dict[str, int]],
) -> None:
    loaded, _ = slice_loaded
    model = loaded.model
    assert isinstance(model.model.layers[1].self_attn.q_proj, QuantLinear)
    ids = torch.randint(0, loaded.config.vocab_size, (1, 32), device="cuda")
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    model.train()
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    model(inputs_embeds=embeds).logits.float().logsumexp(-1).sum().backward()
    model.eval()
    assert embeds.grad is not None
    assert torch.isfinite(embeds.grad).all()
    assert embeds.grad.abs().sum() > 0
