"""Applying an :class:`AdapterSpec` to a model: target resolution, wrapping, coverage."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Literal, Protocol, TypeGuard, runtime_checkable

import attrs
import torch
from torch import Tensor, nn
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

from mixtune.adapter._coverage import CoverageEntry, CoverageReport
from mixtune.adapter._lora import (
    EXPERT_PROJECTIONS,
    ExpertProjection,
    LoraExperts,
    LoraLinear,
    LoraRouter,
    StockExperts,
    is_experts_like,
)
from mixtune.adapter._spec import AdapterSpec
from mixtune.errors import AdapterError, TargetNotFoundError, UnsupportedModelError

__all__ = ["AdaptedModel", "SupportsModel", "apply_spec"]


@runtime_checkable
class SupportsModel(Protocol):
    """What :meth:`AdapterSpec.apply` needs: a causal LM at ``.model``.

    :class:`~mixtune.model.LoadedModel` is one; ``source`` (for the exported
    ``base_model_name_or_path``) is read when present.
    """

    @property
    def model(self) -> torch.nn.Module:
        """The causal LM."""
        ...


_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_EXPERT_TARGET: dict[str, ExpertProjection] = {
    "expert_gate": "gate",
    "expert_up": "up",
    "expert_down": "down",
}
_FFN_TARGET: dict[str, ExpertProjection] = {
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
}


def _is_linear(module: object) -> TypeGuard[nn.Module]:
    return (
        isinstance(module, nn.Module)
        and hasattr(module, "in_features")
        and hasattr(module, "out_features")
    )


def _is_stock_experts(module: object) -> TypeGuard[nn.Module]:
    return (
        isinstance(module, nn.Module)
        and isinstance(getattr(module, "gate_up_proj", None), Tensor)
        and isinstance(getattr(module, "down_proj", None), Tensor)
    )


def _is_4bit(module: nn.Module) -> bool:
    """True for a 4-bit quantized linear or expert stack (bitsandbytes or mixtune's)."""
    if getattr(module, "is_quantized", False) is True:
        return True
    weight = getattr(module, "weight", None)
    return weight is not None and getattr(weight, "quant_state", None) is not None


def _layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no decoder layers at .model.layers; mixtune adapters "
            "support Mixtral-style MoE and Mistral/Llama-style dense causal LMs"
        )
    return layers


@attrs.define
class _Plan:
    """The modules one spec adapts, gathered before anything is wrapped."""

    linears: dict[str, tuple[str, nn.Module]] = attrs.Factory(dict)  # path -> (target, module)
    experts: dict[str, dict[ExpertProjection, str]] = attrs.Factory(dict)  # path -> proj -> target
    expert_modules: dict[str, nn.Module] = attrs.Factory(dict)
    routers: dict[str, tuple[str, MixtralTopKRouter]] = attrs.Factory(dict)
    skipped: list[CoverageEntry] = attrs.Factory(list)


def _resolve(spec: AdapterSpec, model: nn.Module) -> _Plan:
    layers = _layers(model)
    n_layers = len(layers)
    if spec.layers is not None:
        missing = [i for i in spec.layers if i >= n_layers]
        if missing:
            raise TargetNotFoundError(
                f"layers={spec.layers!r} names layer(s) {missing} but the model has {n_layers} "
                f"layers (0–{n_layers - 1}); fix AdapterSpec.layers"
            )
    is_moe = any(
        is_experts_like(getattr(layer.mlp, "experts", None))
        or _is_stock_experts(getattr(layer.mlp, "experts", None))
        for layer in layers
        if hasattr(layer, "mlp")
    )
    plan = _Plan()
    matched: dict[str, int] = dict.fromkeys(spec.targets, 0)

    def chosen(i: int) -> bool:
        return spec.layers is None or i in spec.layers

    for i, layer in enumerate(layers):
        prefix = f"model.layers.{i}"
        attn = getattr(layer, "self_attn", None)
        mlp = getattr(layer, "mlp", None)
        experts = getattr(mlp, "experts", None)
        for target in spec.targets:
            hits: list[tuple[str, nn.Module, ExpertProjection | None]] = []
            if target in _ATTENTION:
                mod = getattr(attn, target, None)
                if _is_linear(mod):
                    hits.append((f"{prefix}.self_attn.{target}", mod, None))
            elif target in _EXPERT_TARGET or (target in _FFN_TARGET and is_moe):
                proj = _EXPERT_TARGET.get(target) or _FFN_TARGET[target]
                if not is_moe:
                    raise TargetNotFoundError(
                        f"target {target!r} adapts MoE experts but {type(model).__name__} is a "
                        "dense model without experts; use 'gate_proj', 'up_proj', 'down_proj' "
                        "(or the 'mlp' preset) for its MLP"
                    )
                if is_experts_like(experts) or _is_stock_experts(experts):
                    assert isinstance(experts, nn.Module)
                    hits.append((f"{prefix}.mlp.experts", experts, proj))
            elif target in _FFN_TARGET:
                mod = getattr(mlp, target, None)
                if _is_linear(mod):
                    hits.append((f"{prefix}.mlp.{target}", mod, None))
            elif target == "router":
                router = getattr(mlp, "gate", None)
                if isinstance(router, MixtralTopKRouter):
                    hits.append((f"{prefix}.mlp.gate", router, None))
            for path, mod, hit_proj in hits:
                if not chosen(i):
                    plan.skipped.extend(
                        _entries(target, path, mod, hit_proj, i, spec, adapted=False)
                    )
                    continue
                matched[target] += 1
                if hit_proj is not None:
                    plan.experts.setdefault(path, {}).setdefault(hit_proj, target)
                    plan.expert_modules[path] = mod
                elif target == "router":
                    assert isinstance(mod, MixtralTopKRouter)
                    plan.routers[path] = (target, mod)
                else:
                    plan.linears.setdefault(path, (target, mod))
    if "lm_head" in spec.targets:
        head = getattr(model, "lm_head", None)
        if _is_linear(head):
            plan.linears["lm_head"] = ("lm_head", head)
            matched["lm_head"] += 1
    unmatched = [t for t, n in matched.items() if n == 0]
    if unmatched:
        where = f" in layers {spec.layers!r}" if spec.layers is not None else ""
        raise TargetNotFoundError(
            f"target(s) {unmatched!r} matched no module of {type(model).__name__}{where}; "
            "check AdapterSpec.targets and AdapterSpec.layers against the model's modules"
        )
    return plan


def _entries(
    target: str,
    path: str,
    module: nn.Module,
    projection: ExpertProjection | None,
    layer: int | None,
    spec: AdapterSpec,
    *,
    adapted: bool,
) -> list[CoverageEntry]:
    """Coverage rows for one target on one module (one row per expert for experts)."""
    quantized = _is_4bit(module)
    r = spec.r
    if projection is None:
        if isinstance(module, MixtralTopKRouter):
            e, h = int(module.num_experts), int(module.hidden_dim)
            kind: Literal["linear", "router", "expert"] = "router"
            base_shape: tuple[int, ...] = (e, h)
        else:
            kind = "linear"
            base_shape = (int(module.out_features), int(module.in_features))  # type: ignore[arg-type]  # linear-like
        out_f, in_f = base_shape
        return [
            CoverageEntry(
                target=target,
                module=path,
                kind=kind,
                layer=layer,
                expert=None,
                base_shape=base_shape,
                lora_A_shape=(r, in_f) if adapted else None,
                lora_B_shape=(out_f, r) if adapted else None,
                quantized=quantized,
                adapted=adapted,
            )
        ]
    n_exp = int(module.num_experts)  # type: ignore[arg-type]  # experts-like
    h, i = int(module.hidden_dim), int(module.intermediate_dim)  # type: ignore[arg-type]  # experts-like
    in_f, out_f = (i, h) if projection == "down" else (h, i)
    return [
        CoverageEntry(
            target=target,
            module=f"{path}.{projection}_proj",
            kind="expert",
            layer=layer,
            expert=e,
            base_shape=(out_f, in_f),
            lora_A_shape=(r, in_f) if adapted else None,
            lora_B_shape=(out_f, r) if adapted else None,
            quantized=quantized,
            adapted=adapted,
        )
        for e in range(n_exp)
    ]


def _layer_of(path: str) -> int | None:
    parts = path.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers":
        return int(parts[2])
    return None


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def _already_adapted(model: nn.Module) -> bool:
    return any(isinstance(m, (LoraLinear, LoraExperts, LoraRouter)) for m in model.modules())


def _base_is_4bit(model: nn.Module) -> bool:
    return any(_is_4bit(m) for m in model.modules())


def apply_spec(
    spec: AdapterSpec, loaded: SupportsModel, *, seed: int, dtype: torch.dtype
) -> AdaptedModel:
    """Implementation of :meth:`AdapterSpec.apply` (see there)."""
    model = loaded.model
    if _already_adapted(model):
        raise AdapterError(
            "this model already carries mixtune LoRA modules; apply an AdapterSpec to a freshly "
            "loaded model (or use AdaptedModel.load_lora_state_dict to change the factors)"
        )
    # The loaded model's QuantSpec says how it was stored; without one (a
    # model built by hand) look for 4-bit modules.
    declared = getattr(getattr(loaded, "quant", None), "is_4bit", None)
    is_4bit = declared if isinstance(declared, bool) else _base_is_4bit(model)
    if spec.requires_4bit and not is_4bit:
        raise AdapterError(
            "AdapterSpec.qlora needs a 4-bit base, but this model has no 4-bit weights; load it "
            "with load_quantized(..., quant=QuantSpec.nf4()) or use AdapterSpec.lora(...)"
        )
    if not dtype.is_floating_point:
        raise AdapterError(
            f"dtype must be a floating-point dtype for the LoRA factors (got {dtype})"
        )
    plan = _resolve(spec, model)
    generator = torch.Generator().manual_seed(seed)
    scale = spec.scaling
    entries: list[CoverageEntry] = list(plan.skipped)
    lora_modules: dict[str, nn.Module] = {}
    # Creation order fixes which random numbers each factor gets: layers in
    # order, then lm_head, so the same spec and seed always give the same
    # factors.
    ordered = sorted(
        [(p, "linear") for p in plan.linears]
        + [(p, "experts") for p in plan.experts]
        + [(p, "router") for p in plan.routers],
        key=lambda item: (_layer_of(item[0]) is None, _layer_of(item[0]) or 0, item[0]),
    )
    for path, kind in ordered:
        new: nn.Module
        if kind == "linear":
            target, base = plan.linears[path]
            entries.extend(_entries(target, path, base, None, _layer_of(path), spec, adapted=True))
            new = LoraLinear(
                base, r=spec.r, scale=scale, dropout=spec.dropout, generator=generator, dtype=dtype
            )
        elif kind == "experts":
            base = plan.expert_modules[path]
            projections = plan.experts[path]
            for proj in EXPERT_PROJECTIONS:
                if proj in projections:
                    entries.extend(
                        _entries(
                            projections[proj], path, base, proj, _layer_of(path), spec, adapted=True
                        )
                    )
            if not is_experts_like(base):
                base = StockExperts(base)
            new = LoraExperts(
                base,
                projections=tuple(projections),
                r=spec.r,
                scale=scale,
                dropout=spec.dropout,
                generator=generator,
                dtype=dtype,
            )
        else:
            target, router = plan.routers[path]
            entries.extend(
                _entries(target, path, router, None, _layer_of(path), spec, adapted=True)
            )
            new = LoraRouter(
                router,
                r=spec.r,
                scale=scale,
                dropout=spec.dropout,
                generator=generator,
                dtype=dtype,
            )
        # New modules start in train mode; follow the model's current mode.
        new.train(model.training)
        if isinstance(new, LoraRouter):
            _move_hooks(new.base, new)
        _set_submodule(model, path, new)
        lora_modules[path] = new
    for param in model.parameters():
        param.requires_grad_(False)
    for module in lora_modules.values():
        for name, param in module.named_parameters():
            if _is_lora_param(name):
                param.requires_grad_(True)
    entries.sort(key=lambda e: (e.layer is None, e.layer or 0, e.module, e.expert or 0))
    return AdaptedModel(
        model=model,
        spec=spec,
        loaded=loaded,
        coverage=CoverageReport(tuple(entries)),
        lora_modules=lora_modules,
    )


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


def _move_hooks(source: nn.Module, dest: nn.Module) -> None:
    """Move forward hooks from a replaced router to its wrapper.

    transformers installs its router-logit recorders once, on first use; a
    router replaced after that would otherwise drop out of the aux loss.  The
    wrapped base router is never called, so its hooks would never fire.
    """
    for attr in _HOOK_DICTS:
        src = getattr(source, attr, None)
        dst = getattr(dest, attr, None)
        if isinstance(src, dict) and isinstance(dst, dict):
            dst.update(src)
            src.clear()


def _is_lora_param(name: str) -> bool:
    return name.rpartition(".")[2] in ("lora_A", "lora_B")


@attrs.define(eq=False)
class AdaptedModel:
    """A model with mixtune LoRA modules in place, ready for training.

    ``model`` is the loaded model itself, modified in place: the targeted
    modules are wrapped and only the LoRA factors have ``requires_grad``.

    Attributes:
        model: The adapted causal LM.
        spec: The spec that was applied.
        loaded: What it was applied to (the :class:`~mixtune.model.LoadedModel`).
        coverage: Every targeted module/expert and whether it carries LoRA.
        lora_modules: Module path → the mixtune LoRA module at that path.
    """

    model: torch.nn.Module
    spec: AdapterSpec
    loaded: SupportsModel
    coverage: CoverageReport
    lora_modules: dict[str, torch.nn.Module] = attrs.field(repr=False)

    def _lora_params(self) -> Iterator[tuple[str, nn.Parameter]]:
        for path, module in self.lora_modules.items():
            for name, param in module.named_parameters():
                if _is_lora_param(name):
                    yield f"{path}.{name}", param

    def trainable_parameters(self) -> int:
        """How many parameters training updates (the LoRA factors).

        Returns:
            The count of elements of every parameter with ``requires_grad``.
        """
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def lora_state_dict(self) -> dict[str, Tensor]:
        """The LoRA factors, detached, under stable names.

        Names are module paths from the causal LM plus the factor:

        * linears and lm_head: ``model.layers.{i}.self_attn.q_proj.lora_A`` ``(r, in)``,
          ``….lora_B`` ``(out, r)``;
        * experts: ``model.layers.{i}.mlp.experts.{gate|up|down}_proj.lora_A``
          ``(E, r, in)``, ``….lora_B`` ``(E, out, r)``;
        * router: ``model.layers.{i}.mlp.gate.lora_A`` ``(r, H)``, ``….lora_B`` ``(E, r)``.

        Returns:
            Name → tensor (sharing storage with the live factors).
        """
        return {name: param.detach() for name, param in self._lora_params()}

    def load_lora_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Copy factors saved by :meth:`lora_state_dict` into this model.

        Args:
            state_dict: Name → tensor, exactly the names and shapes of
                :meth:`lora_state_dict`.

        Raises:
            AdapterError: Names are missing or unexpected, or shapes differ.
        """
        own = dict(self._lora_params())
        problems: list[str] = []
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if missing:
            problems.append(f"missing: {missing[:5]}{' …' if len(missing) > 5 else ''}")
        if unexpected:
            problems.append(f"unexpected: {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}")
        for name in sorted(set(own) & set(state_dict)):
            if tuple(own[name].shape) != tuple(state_dict[name].shape):
                problems.append(
                    f"{name}: shape {tuple(state_dict[name].shape)} != {tuple(own[name].shape)}"
                )
        if problems:
            raise AdapterError(
                "the LoRA state dict does not fit this adapter (was it saved from the same "
                "AdapterSpec and model?): " + "; ".join(problems)
            )
        with torch.no_grad():
            for name, param in own.items():
                param.copy_(state_dict[name].to(device=param.device, dtype=param.dtype))

    def save_peft(self, directory: str | Path) -> Path:
        """Write the adapter in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``).

        Stock ``peft`` loads it with ``PeftModel.from_pretrained`` on a stock
        transformers Mixtral (or the dense model) and reproduces this model's
        outputs.  Expert factors go to PEFT's ``target_parameters``
        (``mlp.experts.gate_up_proj``/``down_proj``, gate and up fused into
        one rank-2r block), the router to ``mlp.gate.weight``.  The config is
        written with ``lora_dropout=0``: PEFT refuses dropout on parameter
        targets, and dropout only matters while training.

        Args:
            directory: Folder to write (created if needed).

        Returns:
            The folder.

        Raises:
            AdapterError: The folder cannot be written.
        """
        from mixtune.adapter._export import save_peft

        return save_peft(self, Path(directory))

    def merged_state_dict(
        self,
        layout: Literal["original", "fused"] = "original",
        *,
        dtype: torch.dtype | None = None,
    ) -> dict[str, Tensor]:
        """The full model's weights with the LoRA updates merged in, dequantized.

        Every adapted weight becomes ``W + scale · B @ A`` (per expert for
        experts).  ``layout="fused"`` uses transformers' names
        (``mlp.experts.gate_up_proj`` (E, 2I, H), ``mlp.experts.down_proj``,
        ``mlp.gate.weight``); ``layout="original"`` the hub's Mixtral names
        (``block_sparse_moe.experts.{e}.w1/w3/w2.weight``,
        ``block_sparse_moe.gate.weight``).  Dense models have one layout; both
        values give it.

        Args:
            layout: ``"original"`` or ``"fused"``.
            dtype: dtype of the tensors (default: the embeddings' dtype).

        Returns:
            Name → tensor on the CPU, loadable by a stock transformers model.

        Raises:
            AdapterError: ``layout`` is not one of the two.
        """
        from mixtune.adapter._export import merged_state_dict

        return merged_state_dict(self, layout=layout, dtype=dtype)
