"""mixtune's LoRA modules: linears, expert stacks and the MoE router.

Each module wraps the frozen base module in place and adds low-rank factors.
The update is always applied as a product of the factors with the
activations, ``scale * (x @ A.T) @ B.T``, never by materialising
``W + B @ A``: for the experts that would be a full copy of every expert's
weights per step.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Protocol, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

from mixtune.kernels import ExpertLoraFactors, grouped_path_available, moe_grouped_forward

__all__ = [
    "ExpertFactors",
    "ExpertsLike",
    "LoraExperts",
    "LoraLinear",
    "LoraRouter",
    "StockExperts",
    "is_experts_like",
]

ExpertProjection = Literal["gate", "up", "down"]
EXPERT_PROJECTIONS: tuple[ExpertProjection, ...] = ("gate", "up", "down")


class ExpertsLike(Protocol):
    """What :class:`LoraExperts` needs from a stack of experts.

    :class:`~mixtune.model.MoEExperts` provides it; so does
    :class:`StockExperts` for transformers' own ``MixtralExperts``.
    """

    num_experts: int
    hidden_dim: int
    intermediate_dim: int
    act_fn: Any

    def project(self, kind: Literal["gate_up", "down"], expert: int, x: Tensor) -> Tensor:
        """``x @ W.T`` for one expert's frozen ``gate_up`` or ``down`` weight."""
        ...

    def weight(
        self, kind: Literal["gate_up", "down"], expert: int, dtype: torch.dtype | None = None
    ) -> Tensor:
        """A dense ``(out, in)`` copy of one expert's weight."""
        ...


_EXPERTS_MEMBERS = ("num_experts", "hidden_dim", "intermediate_dim", "act_fn", "project", "weight")


def is_experts_like(obj: object) -> bool:
    """Whether ``obj`` offers what :class:`ExpertsLike` describes.

    Not ``isinstance(obj, ExpertsLike)``: from Python 3.12 a runtime protocol
    check looks attributes up statically and misses an ``nn.Module``'s
    submodules (``act_fn``), so every ``MoEExperts`` would fail it.

    Args:
        obj: Anything.

    Returns:
        True if every member is present.
    """
    return isinstance(obj, nn.Module) and all(hasattr(obj, m) for m in _EXPERTS_MEMBERS)


class StockExperts(nn.Module):
    """:class:`ExpertsLike` view of transformers' ``MixtralExperts`` (plain 3-D weights).

    Lets the adapter work on a model that was not loaded through
    :func:`~mixtune.model.load_quantized`.

    Args:
        experts: A ``MixtralExperts`` module (``gate_up_proj`` (E, 2I, H),
            ``down_proj`` (E, H, I)).
    """

    is_quantized = False

    def __init__(self, experts: torch.nn.Module) -> None:
        super().__init__()
        self.inner = experts
        dims: Any = experts  # transformers' module is untyped
        self.num_experts = int(dims.num_experts)
        self.hidden_dim = int(dims.hidden_dim)
        self.intermediate_dim = int(dims.intermediate_dim)
        self.act_fn = dims.act_fn

    def _param(self, kind: str) -> Tensor:
        param: Tensor = getattr(self.inner, "gate_up_proj" if kind == "gate_up" else "down_proj")
        return param

    def project(self, kind: Literal["gate_up", "down"], expert: int, x: Tensor) -> Tensor:
        """``x @ W[expert].T`` for the ``gate_up`` or ``down`` weight.

        Args:
            kind: Which weight.
            expert: Expert index.
            x: ``(n, in)`` activations.

        Returns:
            ``(n, out)``.
        """
        return F.linear(x, self._param(kind)[expert])

    def weight(
        self, kind: Literal["gate_up", "down"], expert: int, dtype: torch.dtype | None = None
    ) -> Tensor:
        """A detached ``(out, in)`` copy of one expert's weight.

        Args:
            kind: Which weight.
            expert: Expert index.
            dtype: dtype of the copy (default: the stored dtype).

        Returns:
            The weight.
        """
        w = self._param(kind)[expert].detach()
        return w.to(dtype).clone() if dtype is not None else w.clone()

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """Run the wrapped experts unchanged.

        Args:
            hidden_states: ``(tokens, H)``.
            top_k_index: ``(tokens, k)`` expert indices.
            top_k_weights: ``(tokens, k)`` routing weights.

        Returns:
            ``(tokens, H)``.
        """
        out: Tensor = self.inner(hidden_states, top_k_index, top_k_weights)
        return out


def _kaiming_uniform(shape: tuple[int, ...], fan_in: int, generator: torch.Generator) -> Tensor:
    # The bound nn.Linear uses (kaiming_uniform_ with a=sqrt(5)): 1/sqrt(fan_in).
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


class LoraLinear(nn.Module):
    """``base(x) + scale * B(A(dropout(x)))`` around a frozen linear.

    ``base`` may be an ``nn.Linear`` or a quantized linear (anything with
    ``in_features``/``out_features`` whose call maps ``(..., in)`` to
    ``(..., out)``).

    Args:
        base: The frozen linear.
        r: Rank.
        scale: Factor on the update (``alpha / r``).
        dropout: Dropout probability on the LoRA input.
        generator: Source of the ``A`` initialisation.
        dtype: dtype of the factors.

    Attributes:
        lora_A: ``(r, in)`` factor, Kaiming-uniform at init.
        lora_B: ``(out, r)`` factor, zero at init.
    """

    def __init__(
        self,
        base: torch.nn.Module,
        *,
        r: int,
        scale: float,
        dropout: float,
        generator: torch.Generator,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.base = base
        self.in_features = int(base.in_features)  # type: ignore[arg-type]  # nn.Module attribute
        self.out_features = int(base.out_features)  # type: ignore[arg-type]  # nn.Module attribute
        self.r = r
        self.scale = scale
        self.dropout = _dropout(dropout)
        device = _device_of(base)
        a = _kaiming_uniform((r, self.in_features), self.in_features, generator)
        self.lora_A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))

    def delta(self, x: Tensor) -> Tensor:
        """The LoRA branch alone, ``scale * B(A(dropout(x)))``, in the factors' dtype.

        Args:
            x: ``(..., in)`` activations.

        Returns:
            ``(..., out)``.
        """
        h = self.dropout(x).to(self.lora_A.dtype)
        return F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scale

    def forward(self, x: Tensor) -> Tensor:
        """Base output plus the LoRA update.

        Args:
            x: ``(..., in)`` activations.

        Returns:
            ``(..., out)`` in the base output's dtype.
        """
        out: Tensor = self.base(x)
        return out + self.delta(x).to(out.dtype)

    def delta_weight(self) -> Tensor:
        """``scale * B @ A`` as a dense ``(out, in)`` tensor (for merging).

        Returns:
            The weight update.
        """
        return (self.lora_B @ self.lora_A) * self.scale


class ExpertFactors(nn.Module):
    """Per-expert LoRA factors for one projection of an expert stack.

    Args:
        num_experts: E.
        in_features: Input width of the projection.
        out_features: Output width of the projection.
        r: Rank.
        generator: Source of the ``A`` initialisation.
        device: Where the factors live.
        dtype: dtype of the factors.

    Attributes:
        lora_A: ``(E, r, in)``, Kaiming-uniform per expert at init.
        lora_B: ``(E, out, r)``, zero at init.
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        r: int,
        *,
        generator: torch.Generator,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        a = _kaiming_uniform((num_experts, r, in_features), in_features, generator)
        self.lora_A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.lora_B = nn.Parameter(
            torch.zeros(num_experts, out_features, r, device=device, dtype=dtype)
        )

    def product(self, expert: int, x: Tensor) -> Tensor:
        """``(x @ A[e].T) @ B[e].T`` (unscaled) in the factors' dtype.

        Args:
            expert: Expert index.
            x: ``(n, in)`` activations (already through dropout).

        Returns:
            ``(n, out)``.
        """
        h = x.to(self.lora_A.dtype)
        return (h @ self.lora_A[expert].t()) @ self.lora_B[expert].t()


class LoraExperts(nn.Module):
    """LoRA on every expert of a frozen expert stack, as per-expert low-rank pairs.

    Same call signature as transformers' ``MixtralExperts``.  Tokens are
    grouped by expert; for expert ``e`` with tokens ``x``::

        gate_up = base.project("gate_up", e, x) + [scale·B_g A_g x ; scale·B_u A_u x]
        h = act(gate) * up
        y = base.project("down", e, h) + scale·B_d A_d h

    and ``y`` weighted by the routing weight is added back at the tokens'
    rows.  Dropout applies to the LoRA inputs only (one mask per projection).
    Only the projections in ``projections`` get factors.

    Args:
        base: The frozen experts (:class:`ExpertsLike`).
        projections: Which of ``"gate"``, ``"up"``, ``"down"`` to adapt.
        r: Rank.
        scale: Factor on the update.
        dropout: Dropout probability on the LoRA inputs.
        generator: Source of the ``A`` initialisation.
        dtype: dtype of the factors.

    Attributes:
        gate_proj: :class:`ExpertFactors` (A (E, r, H), B (E, I, r)) or None.
        up_proj: Same shapes, or None.
        down_proj: :class:`ExpertFactors` (A (E, r, I), B (E, H, r)) or None.
    """

    def __init__(
        self,
        base: torch.nn.Module,
        *,
        projections: tuple[Literal["gate", "up", "down"], ...],
        r: int,
        scale: float,
        dropout: float,
        generator: torch.Generator,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if not is_experts_like(base):  # pragma: no cover - guarded by the caller
            raise TypeError(f"{type(base).__name__} is not an experts module")
        self.base = base
        experts = cast(ExpertsLike, base)
        self.num_experts = int(experts.num_experts)
        self.hidden_dim = int(experts.hidden_dim)
        self.intermediate_dim = int(experts.intermediate_dim)
        self.r = r
        self.scale = scale
        self.projections = tuple(p for p in EXPERT_PROJECTIONS if p in projections)
        device = _device_of(base)
        e, h, i = self.num_experts, self.hidden_dim, self.intermediate_dim
        shapes = {"gate": (h, i), "up": (h, i), "down": (i, h)}
        for proj in EXPERT_PROJECTIONS:
            factors: ExpertFactors | None = None
            if proj in self.projections:
                fan_in, fan_out = shapes[proj]
                factors = ExpertFactors(
                    e, fan_in, fan_out, r, generator=generator, device=device, dtype=dtype
                )
            self.add_module(f"{proj}_proj", factors)
        self.dropouts = nn.ModuleDict({p: _dropout(dropout) for p in self.projections})
        # CUDA + bf16: one grouped GEMM per projection over expert-sorted
        # tokens; False forces the per-expert loop (the reference path).
        self.grouped = True

    def _grouped_ok(self, hidden_states: Tensor) -> bool:
        # The grouped path needs the whole (E, out, in) stack of the base.
        return hasattr(self.base, "grouped_sources") and grouped_path_available(hidden_states)

    def _grouped_forward(
        self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
    ) -> Tensor:
        """Sort tokens by expert once; each projection is one grouped product.

        4-bit base experts are dequantized a chunk of experts at a time, in
        forward and again in backward (see
        :func:`mixtune.kernels.moe_grouped_forward`), never kept between the
        passes.  LoRA stays low-rank (grouped ``x Aᵀ`` then ``Bᵀ``).
        """
        base: Any = self.base
        dtype = hidden_states.dtype
        factors: dict[str, tuple[Tensor, Tensor]] = {}
        for proj in self.projections:
            pair = self.factors(proj)
            if pair is not None:
                factors[proj] = (pair.lora_A, pair.lora_B)
        first = self.dropouts[self.projections[0]] if self.projections else None
        dropout = getattr(first, "p", 0.0)
        lora = ExpertLoraFactors(
            factors=factors, scaling=self.scale, dropout=float(dropout), training=self.training
        )
        gate_up, down, chunk = base.grouped_sources(dtype)
        return moe_grouped_forward(
            hidden_states,
            top_k_index,
            top_k_weights,
            gate_up,
            down,
            base.act_fn,
            lora,
            num_experts=self.num_experts,
            chunk_experts=chunk,
        )

    def factors(self, projection: Literal["gate", "up", "down"]) -> ExpertFactors | None:
        """The factors of one projection, or None if it is not adapted.

        Args:
            projection: ``"gate"``, ``"up"`` or ``"down"``.

        Returns:
            The factors or None.
        """
        mod = getattr(self, f"{projection}_proj")
        return mod if isinstance(mod, ExpertFactors) else None

    def _delta(self, projection: ExpertProjection, expert: int, x: Tensor) -> Tensor | None:
        factors = self.factors(projection)
        if factors is None:
            return None
        return factors.product(expert, self.dropouts[projection](x)) * self.scale

    def expert_forward(self, expert: int, x: Tensor) -> Tensor:
        """One expert's adapted MLP on its tokens.

        Args:
            expert: Expert index.
            x: ``(n, H)`` tokens routed to it.

        Returns:
            ``(n, H)`` before the routing weight.
        """
        base = cast(ExpertsLike, self.base)
        gate_up = base.project("gate_up", expert, x)
        gate, up = gate_up.chunk(2, dim=-1)
        d_gate = self._delta("gate", expert, x)
        if d_gate is not None:
            gate = gate + d_gate.to(gate.dtype)
        d_up = self._delta("up", expert, x)
        if d_up is not None:
            up = up + d_up.to(up.dtype)
        h = base.act_fn(gate) * up
        out: Tensor = base.project("down", expert, h)
        d_down = self._delta("down", expert, h)
        if d_down is not None:
            out = out + d_down.to(out.dtype)
        return out

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """Mix the adapted experts' outputs as ``MixtralExperts`` does.

        Args:
            hidden_states: ``(tokens, H)``.
            top_k_index: ``(tokens, k)`` chosen experts.
            top_k_weights: ``(tokens, k)`` routing weights.

        Returns:
            ``(tokens, H)`` in the input's dtype.
        """
        if self.grouped and self._grouped_ok(hidden_states):
            return self._grouped_forward(hidden_states, top_k_index, top_k_weights)
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # (E, k, tokens) membership; only experts that got tokens run.
            # One spare class, as in transformers: expert-parallel code marks
            # tokens of experts that live elsewhere with index E.
            mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            mask = mask[: self.num_experts]
            hit = (mask.sum(dim=(-1, -2)) > 0).nonzero().flatten().tolist()
        for expert in hit:
            top_k_pos, token_idx = torch.where(mask[expert])
            y = self.expert_forward(expert, hidden_states[token_idx])
            y = y * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, y.to(final.dtype))
        return final


class LoraRouter(MixtralTopKRouter):
    """LoRA on the router logits of a ``MixtralTopKRouter``.

    ``logits = x W.T + scale · B(A(dropout(x)))``, then the same softmax,
    top-k and renormalisation as ``MixtralTopKRouter``.  It subclasses the
    router so transformers still records its logits for the auxiliary loss.

    Args:
        base: The frozen router.
        r: Rank.
        scale: Factor on the update.
        dropout: Dropout probability on the LoRA input.
        generator: Source of the ``A`` initialisation.
        dtype: dtype of the factors.

    Attributes:
        lora_A: ``(r, H)``.
        lora_B: ``(E, r)``, zero at init.
    """

    def __init__(
        self,
        base: torch.nn.Module,
        *,
        r: int,
        scale: float,
        dropout: float,
        generator: torch.Generator,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        # Not MixtralTopKRouter.__init__: that allocates a fresh weight from a
        # config; the base router keeps its own.
        nn.Module.__init__(self)
        self.base = base
        router: Any = base  # transformers' module is untyped
        self.top_k = int(router.top_k)
        self.num_experts = int(router.num_experts)
        self.hidden_dim = int(router.hidden_dim)
        self.r = r
        self.scale = scale
        self.dropout = _dropout(dropout)
        device = router.weight.device
        a = _kaiming_uniform((r, self.hidden_dim), self.hidden_dim, generator)
        self.lora_A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.num_experts, r, device=device, dtype=dtype))

    def delta_weight(self) -> Tensor:
        """``scale * B @ A`` as a dense ``(E, H)`` tensor.

        Returns:
            The weight update.
        """
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Adapted logits, then the base router's top-k selection.

        Args:
            hidden_states: ``(..., H)``.

        Returns:
            ``(router_logits, router_scores, router_indices)`` as
            ``MixtralTopKRouter`` returns them.
        """
        x = hidden_states.reshape(-1, self.hidden_dim)
        logits = F.linear(x, self.base.get_parameter("weight"))
        h = self.dropout(x).to(self.lora_A.dtype)
        logits = logits + (F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scale).to(
            logits.dtype
        )
        probs = torch.softmax(logits.float(), dim=-1)
        top_value, top_index = torch.topk(probs, self.top_k, dim=-1)
        top_value = top_value / top_value.sum(dim=-1, keepdim=True)
        return logits, top_value, top_index


def _device_of(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")
