"""Exporting an adapted model: PEFT adapter folders and merged state dicts.

PEFT layout of the expert factors (peft 0.21, ``lora.ParamWrapper`` on a 3-D
parameter ``(E, d1, d2)`` of transformers' ``MixtralExperts``, stored
``(experts, out, in)``): with rank ``R``, ``lora_A.weight`` is ``(E·R, in)``
with row ``e·R + k``, ``lora_B.weight`` is ``(out, R·E)`` with column
``k·E + e``, and expert ``e``'s update is ``scale · B_e @ A_e``.  When both
``gate_up_proj`` and ``down_proj`` are targeted, PEFT nests the wrappers:
``gate_up_proj``'s factors sit under ``mlp.experts.base_layer.lora_*`` and
``down_proj``'s under ``mlp.experts.lora_*``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import Tensor, nn
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

from mixtune.adapter._lora import (
    ExpertsLike,
    LoraExperts,
    LoraLinear,
    LoraRouter,
    StockExperts,
    is_experts_like,
)
from mixtune.errors import AdapterError

if TYPE_CHECKING:
    from mixtune.adapter._apply import AdaptedModel

__all__ = ["merged_state_dict", "peft_tensors", "save_peft"]

_PREFIX = "base_model.model."


def _expert_gate_up(experts: LoraExperts) -> tuple[Tensor, Tensor, int] | None:
    """PEFT ``gate_up_proj`` factors ``(lora_A.weight, lora_B.weight, rank)`` or None."""
    gate, up = experts.factors("gate"), experts.factors("up")
    if gate is None and up is None:
        return None
    n_exp, inter, r = experts.num_experts, experts.intermediate_dim, experts.r
    ref = (gate or up).lora_A  # type: ignore[union-attr]  # one of them is set
    zeros = torch.zeros(n_exp, inter, r, dtype=ref.dtype, device=ref.device)
    a_parts: list[Tensor] = []
    b_cols: list[Tensor] = []
    # Gate rows come first in gate_up; a block-diagonal B keeps the gate and
    # up updates apart, so a rank-2r pair reproduces both rank-r pairs.
    for idx, factors in enumerate((gate, up)):
        if factors is None:
            continue
        a_parts.append(factors.lora_A.detach())
        halves = [zeros, zeros]
        halves[idx] = factors.lora_B.detach()
        b_cols.append(torch.cat(halves, dim=1))  # (E, 2I, r)
    a = torch.cat(a_parts, dim=1)  # (E, R, H)
    b = torch.cat(b_cols, dim=2)  # (E, 2I, R)
    rank = a.shape[1]
    return _to_peft_a(a), _to_peft_b(b), rank


def _to_peft_a(a: Tensor) -> Tensor:
    e, rank, fan_in = a.shape
    return a.reshape(e * rank, fan_in)


def _to_peft_b(b: Tensor) -> Tensor:
    e, fan_out, rank = b.shape
    return b.permute(1, 2, 0).reshape(fan_out, rank * e)


def peft_tensors(adapted: AdaptedModel) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The PEFT ``adapter_model.safetensors`` tensors and the ``LoraConfig`` arguments.

    Args:
        adapted: The adapted model.

    Returns:
        ``(tensors, config_kwargs)``: key → tensor (contiguous, CPU) and the
        keyword arguments of ``peft.LoraConfig``.

    Raises:
        AdapterError: An adapted module has no PEFT equivalent.
    """
    spec = adapted.spec
    tensors: dict[str, Tensor] = {}
    modules: list[str] = []
    params: list[str] = []
    fused_gate_up = False
    all_layers = spec.layers is None

    def short(path: str, tail: int) -> str:
        # With every layer adapted, the short suffix is the usual PEFT spelling;
        # with a layer subset, full paths keep the other layers untouched.
        return ".".join(path.split(".")[-tail:]) if all_layers else path

    for path, module in adapted.lora_modules.items():
        if isinstance(module, LoraLinear):
            tensors[f"{_PREFIX}{path}.lora_A.weight"] = module.lora_A.detach()
            tensors[f"{_PREFIX}{path}.lora_B.weight"] = module.lora_B.detach()
            modules.append(path.rpartition(".")[2] if all_layers else path)
        elif isinstance(module, LoraRouter):
            tensors[f"{_PREFIX}{path}.lora_A.weight"] = module.lora_A.detach()
            tensors[f"{_PREFIX}{path}.lora_B.weight"] = module.lora_B.detach()
            params.append(short(f"{path}.weight", 3))
        elif isinstance(module, LoraExperts):
            gate_up = _expert_gate_up(module)
            down = module.factors("down")
            if gate_up is not None:
                a, b, rank = gate_up
                fused_gate_up = fused_gate_up or rank == 2 * spec.r
                # PEFT wraps gate_up_proj first; a later down_proj wrapper
                # goes around it, pushing it one level down.
                where = f"{path}.base_layer" if down is not None else path
                tensors[f"{_PREFIX}{where}.lora_A.weight"] = a
                tensors[f"{_PREFIX}{where}.lora_B.weight"] = b
                params.append(short(f"{path}.gate_up_proj", 3))
            if down is not None:
                tensors[f"{_PREFIX}{path}.lora_A.weight"] = _to_peft_a(down.lora_A.detach())
                tensors[f"{_PREFIX}{path}.lora_B.weight"] = _to_peft_b(down.lora_B.detach())
                params.append(short(f"{path}.down_proj", 3))
        else:  # pragma: no cover - lora_modules only holds the three kinds
            raise AdapterError(f"{path}: {type(module).__name__} has no PEFT export")
    kwargs: dict[str, Any] = {
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "use_rslora": spec.rslora,
        "bias": "none",
        "target_modules": sorted(set(modules)) or None,
        "target_parameters": sorted(set(params)) or None,
        "task_type": "CAUSAL_LM",
    }
    if fused_gate_up:
        # The fused pair has rank 2r; its alpha keeps the scale of the
        # rank-r pairs it stands for.
        fused_alpha = spec.alpha * math.sqrt(2) if spec.rslora else 2 * spec.alpha
        kwargs["rank_pattern"] = {"gate_up_proj": 2 * spec.r}
        kwargs["alpha_pattern"] = {"gate_up_proj": fused_alpha}
    source = getattr(adapted.loaded, "source", None)
    if source is not None:
        kwargs["base_model_name_or_path"] = str(source)
    tensors = {k: v.to("cpu").contiguous() for k, v in tensors.items()}
    return tensors, kwargs


def save_peft(adapted: AdaptedModel, directory: Path) -> Path:
    """Implementation of :meth:`AdaptedModel.save_peft` (see there)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    tensors, kwargs = peft_tensors(adapted)
    if kwargs["target_modules"] is None:
        # PEFT fills in a default module list when target_modules is None; an
        # empty list means "no modules, only the parameters".
        kwargs["target_modules"] = []
    config = LoraConfig(**kwargs)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(str(directory))
        save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    except OSError as exc:
        raise AdapterError(f"cannot write the PEFT adapter to {directory}: {exc}") from exc
    return directory


# -- merged weights ---------------------------------------------------------


def _dense_weight(module: nn.Module, dtype: torch.dtype) -> Tensor:
    """A linear-like module's weight as a plain float tensor (dequantized if needed)."""
    dequantize = getattr(module, "dequantize", None)
    if callable(dequantize) and getattr(module, "is_quantized", False):
        out: Tensor = dequantize(dtype)
        return out.to(dtype)
    weight = module.weight
    assert isinstance(weight, Tensor)
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes Params4bit
        if getattr(quant_state, "packing_format_for_cpu", False):
            # bitsandbytes repacks CPU weights for its CPU kernel on first use;
            # the packed bytes no longer dequantize, but the layer still
            # computes x @ W.T, so read W back through the layer itself (to
            # the precision of that kernel, about bfloat16's).
            return _probe_weight(module, dtype)
        import bitsandbytes.functional as bnbf

        deq: Tensor = bnbf.dequantize_4bit(weight.data, quant_state)
        return deq.to(dtype)
    return weight.detach().to(dtype)


def _probe_weight(module: nn.Module, dtype: torch.dtype, chunk: int = 1024) -> Tensor:
    """``W`` of a linear-like module, read as ``module(I).T`` minus the bias, in chunks."""
    in_features = int(module.in_features)  # type: ignore[arg-type]  # linear-like
    device = module.get_parameter("weight").device
    compute = getattr(module, "compute_dtype", None) or torch.float32
    bias = getattr(module, "bias", None)
    columns = []
    for start in range(0, in_features, chunk):
        stop = min(start + chunk, in_features)
        eye = torch.zeros(stop - start, in_features, device=device, dtype=compute)
        eye[:, start:stop] = torch.eye(stop - start, device=device, dtype=compute)
        out = module(eye).to(torch.float32)
        if isinstance(bias, Tensor):
            out = out - bias.to(torch.float32)
        columns.append(out.t())
    return torch.cat(columns, dim=1).to(dtype)


def _emit_linear(
    out: dict[str, Tensor], prefix: str, module: nn.Module, dtype: torch.dtype
) -> None:
    base = module.base if isinstance(module, LoraLinear) else module
    assert isinstance(base, nn.Module)
    weight = _dense_weight(base, torch.float32)
    if isinstance(module, LoraLinear):
        weight = weight + module.delta_weight().detach().to(
            device=weight.device, dtype=torch.float32
        )
    out[f"{prefix}weight"] = weight.to(dtype)
    bias = getattr(base, "bias", None)
    if isinstance(bias, Tensor):
        out[f"{prefix}bias"] = bias.detach().to(dtype)


def _moe_prefix(prefix: str, layout: str) -> str:
    # "model.layers.3.mlp." -> "model.layers.3.block_sparse_moe." in the hub's
    # original Mixtral layout.
    if layout == "original" and prefix.endswith("mlp."):
        return prefix[: -len("mlp.")] + "block_sparse_moe."
    return prefix


def _emit_router(
    out: dict[str, Tensor], prefix: str, module: nn.Module, dtype: torch.dtype, layout: str
) -> None:
    base: Any = module.base if isinstance(module, LoraRouter) else module
    weight = base.weight.detach().to(torch.float32)
    if isinstance(module, LoraRouter):
        weight = weight + module.delta_weight().detach().to(
            device=weight.device, dtype=torch.float32
        )
    parent = prefix[: -len("gate.")]
    out[f"{_moe_prefix(parent, layout)}gate.weight"] = weight.to(dtype)


def _emit_experts(
    out: dict[str, Tensor], prefix: str, module: nn.Module, dtype: torch.dtype, layout: str
) -> None:
    lora = module if isinstance(module, LoraExperts) else None
    base = lora.base if lora is not None else module
    experts = cast(ExpertsLike, base if is_experts_like(base) else StockExperts(base))
    n_exp, inter = int(experts.num_experts), int(experts.intermediate_dim)
    gate_up: list[Tensor] = []
    down: list[Tensor] = []
    for e in range(n_exp):
        gu = experts.weight("gate_up", e, torch.float32)
        dn = experts.weight("down", e, torch.float32)
        if lora is not None:
            for proj, rows in (("gate", slice(0, inter)), ("up", slice(inter, 2 * inter))):
                f = lora.factors(proj)  # type: ignore[arg-type]  # literal from the tuple
                if f is not None:
                    gu[rows] += (f.lora_B[e] @ f.lora_A[e]).detach().float().to(
                        gu.device
                    ) * lora.scale
            f = lora.factors("down")
            if f is not None:
                dn += (f.lora_B[e] @ f.lora_A[e]).detach().float().to(dn.device) * lora.scale
        gate_up.append(gu.to(dtype))
        down.append(dn.to(dtype))
    if layout == "fused":
        out[f"{prefix}gate_up_proj"] = torch.stack(gate_up)
        out[f"{prefix}down_proj"] = torch.stack(down)
        return
    moe = _moe_prefix(prefix[: -len("experts.")], layout)
    for e in range(n_exp):
        out[f"{moe}experts.{e}.w1.weight"] = gate_up[e][:inter].clone()
        out[f"{moe}experts.{e}.w3.weight"] = gate_up[e][inter:].clone()
        out[f"{moe}experts.{e}.w2.weight"] = down[e]


def _walk(
    out: dict[str, Tensor], module: nn.Module, prefix: str, dtype: torch.dtype, layout: str
) -> None:
    if isinstance(module, LoraLinear):
        _emit_linear(out, prefix, module, dtype)
        return
    if isinstance(module, (LoraRouter, MixtralTopKRouter)):
        _emit_router(out, prefix, module, dtype, layout)
        return
    if (
        isinstance(module, LoraExperts)
        or is_experts_like(module)
        or (
            isinstance(getattr(module, "gate_up_proj", None), Tensor)
            and isinstance(getattr(module, "down_proj", None), Tensor)
        )
    ):
        _emit_experts(out, prefix, module, dtype, layout)
        return
    if getattr(module, "is_quantized", False) is True or (
        getattr(getattr(module, "weight", None), "quant_state", None) is not None
    ):
        _emit_linear(out, prefix, module, dtype)
        return
    for name, param in module._parameters.items():
        if param is not None:
            out[f"{prefix}{name}"] = param.detach().to(dtype)
    for name, buf in module._buffers.items():
        if buf is not None and name not in module._non_persistent_buffers_set:
            out[f"{prefix}{name}"] = buf.detach().clone()
    for name, child in module._modules.items():
        if child is not None:
            _walk(out, child, f"{prefix}{name}.", dtype, layout)


def merged_state_dict(
    adapted: AdaptedModel, *, layout: Literal["original", "fused"], dtype: torch.dtype | None
) -> dict[str, Tensor]:
    """Implementation of :meth:`AdaptedModel.merged_state_dict` (see there)."""
    if layout not in ("original", "fused"):
        raise AdapterError(f"layout must be 'original' or 'fused' (got {layout!r})")
    model = adapted.model
    if dtype is None:
        getter: Any = getattr(model, "get_input_embeddings", None)
        embed = getter() if callable(getter) else None
        weight = getattr(embed, "weight", None)
        dtype = weight.dtype if isinstance(weight, Tensor) and weight.is_floating_point() else None
        if dtype is None:
            compute = getattr(getattr(adapted.loaded, "quant", None), "compute_dtype", None)
            dtype = compute if isinstance(compute, torch.dtype) else torch.bfloat16
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        _walk(out, model, "", dtype, layout)
    return {k: v.to("cpu").contiguous() for k, v in out.items()}
