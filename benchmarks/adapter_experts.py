"""Expert LoRA step cost: mixtune ``LoraExperts`` vs the base experts vs stock PEFT.

One MoE block's experts at Mixtral-8x7B width (hidden 4096, 8 experts ×
14336, top-2), random weights and routing. For each case, one
forward + backward (gradients on the input and the LoRA factors) is timed
over several iterations after warm-up, and the peak memory above the
starting point is recorded:

* ``base nf4``: mixtune ``MoEExperts`` in NF4, no LoRA (the floor);
* ``lora nf4``: ``LoraExperts`` (gate, up, down) over NF4 experts — QLoRA;
* ``lora bf16``: ``LoraExperts`` over plain bf16 ``MoEExperts``;
* ``peft bf16``: stock PEFT ``target_parameters`` LoRA on transformers'
  ``MixtralExperts`` (bf16), same rank; PEFT folds ``W + s·B@A`` for the
  whole expert stack each forward.

Prints a table and writes JSON (default ``benchmarks/results/adapter_experts.json``).

    python benchmarks/adapter_experts.py              # GPU, Mixtral-8x7B width
    python benchmarks/adapter_experts.py --tiny       # CPU smoke check
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

GIB = 2**30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(
    step: Callable[[], None], device: torch.device, warmup: int, iters: int
) -> dict[str, float]:
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start_mem = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    elapsed = (time.perf_counter() - start) / iters
    peak = 0.0
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - start_mem) / GIB
    return {"ms": elapsed * 1e3, "peak_extra_gib": peak}


def _experts_step(
    module: nn.Module, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor
) -> Callable[[], None]:
    def step() -> None:
        xi = x.detach().requires_grad_(True)
        out = module(xi, idx, w)
        out.float().square().mean().backward()
        for p in module.parameters():
            p.grad = None

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "adapter_experts.json"
    )
    args = parser.parse_args()

    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    from mixtune.adapter import LoraExperts
    from mixtune.model import MoEExperts, QuantSpec, mixtral_8x7b_config, tiny_config

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    config: Any = tiny_config() if args.tiny else mixtral_8x7b_config(1)
    tokens = 64 if args.tiny else args.tokens
    e, k, h = config.num_local_experts, config.num_experts_per_tok, config.hidden_size
    gen = torch.Generator(device=device).manual_seed(0)
    torch.manual_seed(0)
    with torch.device(device):
        stock = MixtralExperts(config).to(torch.bfloat16)
        nn.init.normal_(stock.gate_up_proj, std=0.02)
        nn.init.normal_(stock.down_proj, std=0.02)
    x = torch.randn(tokens, h, device=device, generator=gen).to(torch.bfloat16)
    idx = torch.rand(tokens, e, device=device, generator=gen).topk(k, dim=-1).indices
    w = torch.softmax(torch.rand(tokens, k, device=device, generator=gen), dim=-1)

    def lora(base: nn.Module) -> nn.Module:
        return LoraExperts(
            base,
            projections=("gate", "up", "down"),
            r=args.r,
            scale=2.0,
            dropout=0.0,
            generator=torch.Generator().manual_seed(0),
        )

    results: dict[str, dict[str, float]] = {}
    nf4 = MoEExperts.from_experts(stock, quant=QuantSpec.nf4(compute_dtype=torch.bfloat16))
    results["base nf4"] = _measure(_experts_step(nf4, x, idx, w), device, args.warmup, args.iters)
    results["lora nf4"] = _measure(
        _experts_step(lora(nf4), x, idx, w), device, args.warmup, args.iters
    )
    del nf4
    plain = MoEExperts.from_experts(stock, quant=QuantSpec.none(compute_dtype=torch.bfloat16))
    results["lora bf16"] = _measure(
        _experts_step(lora(plain), x, idx, w), device, args.warmup, args.iters
    )
    del plain
    if not args.skip_peft:
        from peft import LoraConfig, get_peft_model

        holder = nn.Module()
        holder.experts = stock
        peft_cfg = LoraConfig(
            r=args.r,
            lora_alpha=2 * args.r,
            lora_dropout=0.0,
            target_modules=[],
            target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        )
        peft_model: Any = get_peft_model(holder, peft_cfg)
        wrapped = peft_model.base_model.model.experts
        results["peft bf16"] = _measure(
            _experts_step(wrapped, x, idx, w), device, args.warmup, args.iters
        )

    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    )
    print(
        f"experts fwd+bwd, {tokens} tokens, r={args.r}, hidden {h}, {e}×{config.intermediate_size}, top-{k}, {device_name}"
    )
    print(f"{'case':<12} {'ms/step':>10} {'peak extra GiB':>15}")
    for name, row in results.items():
        print(f"{name:<12} {row['ms']:>10.2f} {row['peak_extra_gib']:>15.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "adapter_experts",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(),
        "device": device_name,
        "torch": torch.__version__,
        "tokens": tokens,
        "r": args.r,
        "shape": {"hidden": h, "experts": e, "intermediate": config.intermediate_size, "top_k": k},
        "results": results,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
