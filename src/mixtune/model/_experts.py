"""``MoEExperts``: a drop-in for transformers' ``MixtralExperts`` with 4-bit storage.

``BitsAndBytesConfig(load_in_4bit=True)`` only replaces ``nn.Linear`` layers,
and transformers 5 keeps the experts of a Mixtral layer in two fused 3-D
parameters, so a "4-bit" Mixtral keeps about 96% of its weights in bf16. This
module stores each expert's ``gate_up`` and ``down`` matrices in bitsandbytes'
4-bit format instead (or plainly, for ``QuantSpec.none()``) and runs the same
routing loop as the stock module.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from mixtune.kernels import (
    ExpertStack,
    experts_per_chunk,
    grouped_path_available,
    moe_grouped_forward,
)
from mixtune.model._quant import Packed4bit, QuantSpec, dequant_linear

__all__ = ["ExpertKind", "MoEExperts"]

ExpertKind = Literal["gate_up", "down"]


def _activation(name: str) -> nn.Module:
    from transformers.activations import ACT2FN

    act: nn.Module = ACT2FN[name]
    return act


class MoEExperts(nn.Module):
    """The experts of one Mixtral MoE block, optionally stored in 4 bits.

    Forward has the signature of transformers' ``MixtralExperts.forward``, so
    it replaces ``model.model.layers[i].mlp.experts`` as is. The base weights
    are frozen: gradients reach the input (and, through it, LoRA factors an
    adapter adds around :meth:`project`), never the stored weights.

    Expert ``e``'s ``gate_up`` matrix is ``(2·intermediate, hidden)`` with the
    gate rows first, then the up rows (``w1`` then ``w3`` in the hub's original
    layout); ``down`` is ``(hidden, intermediate)`` (``w2``).

    Args:
        num_experts: Number of experts.
        hidden_dim: Model width.
        intermediate_dim: Expert width.
        quant: Storage; ``QuantSpec.none()`` keeps plain ``dtype`` parameters.
        hidden_act: Activation name as in the transformers config.
        dtype: dtype of plain (unquantized) weights.
        device: Where storage is allocated.

    Example:
        >>> import torch
        >>> from mixtune.model import MoEExperts, QuantSpec
        >>> experts = MoEExperts(4, 64, 128, quant=QuantSpec.nf4(compute_dtype=torch.float32))
        >>> experts.is_quantized, experts.num_experts
        (True, 4)
    """

    gate_up_proj: nn.Parameter
    down_proj: nn.Parameter
    grouped: bool
    dequant_chunk_bytes: int

    def __init__(
        self,
        num_experts: int,
        hidden_dim: int,
        intermediate_dim: int,
        *,
        quant: QuantSpec,
        hidden_act: str = "silu",
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        # Where the device has a grouped GEMM (CUDA, bf16) the forward sorts
        # tokens by expert and runs one grouped product per projection;
        # ``grouped = False`` forces the per-expert loop (the reference path).
        self.grouped = True
        # On the grouped path 4-bit experts are dequantized a few at a time,
        # in forward and again in backward, never kept: this bounds the
        # bf16 copy that exists at once (512 MiB = two Mixtral-8x7B experts'
        # gate_up matrices).
        self.dequant_chunk_bytes = 512 * 2**20
        self.num_experts = num_experts
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.quant = quant
        self.hidden_act = hidden_act
        self.act_fn = _activation(hidden_act)
        self.gate_up: Packed4bit | None = None
        self.down: Packed4bit | None = None
        if quant.is_4bit:
            self.gate_up = Packed4bit(
                num_experts, (2 * intermediate_dim, hidden_dim), quant, device=device
            )
            self.down = Packed4bit(
                num_experts, (hidden_dim, intermediate_dim), quant, device=device
            )
        else:
            self.gate_up_proj = nn.Parameter(
                torch.zeros(
                    num_experts, 2 * intermediate_dim, hidden_dim, dtype=dtype, device=device
                ),
                requires_grad=False,
            )
            self.down_proj = nn.Parameter(
                torch.zeros(num_experts, hidden_dim, intermediate_dim, dtype=dtype, device=device),
                requires_grad=False,
            )

    @classmethod
    def from_config(
        cls,
        config: Any,
        *,
        quant: QuantSpec,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> MoEExperts:
        """Empty experts sized from a ``MixtralConfig``.

        Args:
            config: A transformers ``MixtralConfig`` (or any config with
                ``num_local_experts``, ``hidden_size``, ``intermediate_size``,
                ``hidden_act``).
            quant: Storage spec.
            dtype: dtype of plain weights.
            device: Where storage is allocated.

        Returns:
            The module, weights zero until :meth:`set_weight` fills them.
        """
        return cls(
            int(config.num_local_experts),
            int(config.hidden_size),
            int(config.intermediate_size),
            quant=quant,
            hidden_act=str(config.hidden_act),
            dtype=dtype,
            device=device,
        )

    @classmethod
    def from_experts(cls, experts: nn.Module, *, quant: QuantSpec) -> MoEExperts:
        """Convert a transformers ``MixtralExperts`` (fused 3-D parameters).

        Args:
            experts: Module with ``gate_up_proj`` (E, 2I, H) and ``down_proj``
                (E, H, I) tensors and an ``act_fn``.
            quant: Storage spec.

        Returns:
            A new module on the same device as ``experts.gate_up_proj``.
        """
        gate_up = experts.get_parameter("gate_up_proj")
        down = experts.get_parameter("down_proj")
        num_experts, two_i, hidden = gate_up.shape
        config = getattr(experts, "config", None)
        act = str(getattr(config, "hidden_act", "silu"))
        new = cls(
            int(num_experts),
            int(hidden),
            int(two_i) // 2,
            quant=quant,
            hidden_act=act,
            dtype=gate_up.dtype,
            device=gate_up.device,
        )
        for e in range(int(num_experts)):
            new.set_weight("gate_up", e, gate_up[e])
            new.set_weight("down", e, down[e])
        return new

    @property
    def is_quantized(self) -> bool:
        """Whether the weights are stored in 4 bits."""
        return self.gate_up is not None

    def _shape(self, kind: ExpertKind) -> tuple[int, int]:
        if kind == "gate_up":
            return (2 * self.intermediate_dim, self.hidden_dim)
        if kind == "down":
            return (self.hidden_dim, self.intermediate_dim)
        raise ValueError(f"kind must be 'gate_up' or 'down', got {kind!r}")

    def _packed(self, kind: ExpertKind) -> Packed4bit:
        packed = self.gate_up if kind == "gate_up" else self.down
        assert packed is not None
        return packed

    def _plain(self, kind: ExpertKind) -> nn.Parameter:
        return self.gate_up_proj if kind == "gate_up" else self.down_proj

    def _check(self, kind: ExpertKind, expert: int) -> None:
        self._shape(kind)
        if not 0 <= expert < self.num_experts:
            raise IndexError(f"expert {expert} out of range for {self.num_experts} experts")

    def set_weight(self, kind: ExpertKind, expert: int, weight: torch.Tensor) -> None:
        """Store (quantizing if 4-bit) one expert's matrix.

        Args:
            kind: ``"gate_up"`` ((2I, H), gate rows first) or ``"down"`` ((H, I)).
            expert: Expert index.
            weight: The matrix, any float dtype, any device.

        Raises:
            ValueError: If ``kind`` or the shape is wrong.
            IndexError: If ``expert`` is out of range.
        """
        self._check(kind, expert)
        shape = self._shape(kind)
        if tuple(weight.shape) != shape:
            raise ValueError(
                f"{kind} weight of expert {expert} must have shape {shape}, got {tuple(weight.shape)}"
            )
        if self.is_quantized:
            self._packed(kind).store(expert, weight)
        else:
            with torch.no_grad():
                self._plain(kind)[expert].copy_(weight)

    def weight(
        self, kind: ExpertKind, expert: int, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """A dequantized copy of one expert's matrix, shaped ``(out, in)``.

        Args:
            kind: ``"gate_up"`` or ``"down"``.
            expert: Expert index.
            dtype: Result dtype (default: compute dtype if 4-bit, else the
                stored dtype).

        Returns:
            A new tensor, detached from the module.

        Raises:
            ValueError: If ``kind`` is wrong.
            IndexError: If ``expert`` is out of range.
        """
        self._check(kind, expert)
        if self.is_quantized:
            return self._packed(kind).dequantize(expert, dtype)
        plain = self._plain(kind)[expert].detach()
        return plain.to(dtype or plain.dtype, copy=True)

    def stacked_weight(self, kind: ExpertKind, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Every expert's matrix of one kind as one ``(E, out, in)`` tensor, frozen.

        4-bit storage is dequantized expert by expert into a single new
        buffer (one expert's temporary at a time); plain storage returns the
        parameter itself, detached, cast only if ``dtype`` differs.

        Args:
            kind: ``"gate_up"`` or ``"down"``.
            dtype: Result dtype (default: compute dtype if 4-bit, else stored).

        Returns:
            The ``(E, out, in)`` stack.

        Raises:
            ValueError: If ``kind`` is wrong.
        """
        self._check(kind, 0)
        if not self.is_quantized:
            plain = self._plain(kind).detach()
            return plain if dtype in (None, plain.dtype) else plain.to(dtype)
        return self._packed(kind).dequantize_range(0, self.num_experts, dtype)

    def grouped_sources(self, dtype: torch.dtype) -> tuple[ExpertStack, ExpertStack, int | None]:
        """The frozen weights as the grouped path takes them, and its chunk size.

        4-bit storage gives functions that dequantize a range of experts on
        demand, with as many experts per chunk as fit
        ``dequant_chunk_bytes``; plain storage gives the (detached)
        parameters themselves and no chunking.

        Args:
            dtype: Compute dtype of the activations.

        Returns:
            ``(gate_up, down, chunk_experts)`` for
            :func:`mixtune.kernels.moe_grouped_forward`.
        """
        if not self.is_quantized:
            return self.stacked_weight("gate_up", dtype), self.stacked_weight("down", dtype), None
        gate_up, down = self._packed("gate_up"), self._packed("down")

        def gate_up_range(start: int, stop: int) -> torch.Tensor:
            return gate_up.dequantize_range(start, stop, dtype)

        def down_range(start: int, stop: int) -> torch.Tensor:
            return down.dequantize_range(start, stop, dtype)

        per_expert = gate_up.numel * torch.empty((), dtype=dtype).element_size()
        chunk = experts_per_chunk(per_expert, self.dequant_chunk_bytes, self.num_experts)
        return gate_up_range, down_range, chunk

    def project(self, kind: ExpertKind, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Apply one expert's ``gate_up`` or ``down`` matrix: ``x @ W.T``.

        Args:
            kind: ``"gate_up"`` ((n, H) → (n, 2I)) or ``"down"`` ((n, I) → (n, H)).
            expert: Expert index.
            x: Input rows.

        Returns:
            Output rows in ``x``'s dtype. For 4-bit storage the weight is
            dequantized for this call and recomputed in backward, not saved.

        Raises:
            ValueError: If ``kind`` is wrong.
            IndexError: If ``expert`` is out of range.
        """
        self._check(kind, expert)
        if self.is_quantized:
            return dequant_linear(x, self._packed(kind), expert)
        weight = self._plain(kind)[expert]
        return torch.nn.functional.linear(x.to(weight.dtype), weight).to(x.dtype)

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """One expert's MLP: ``down(act(gate(x)) * up(x))``.

        Args:
            expert: Expert index.
            x: ``(n, hidden)`` rows routed to it.

        Returns:
            ``(n, hidden)``.
        """
        gate, up = self.project("gate_up", expert, x).chunk(2, dim=-1)
        return self.project("down", expert, self.act_fn(gate) * up)

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        """Route each token to its top-k experts and sum their weighted outputs.

        Args:
            hidden_states: ``(tokens, hidden)``.
            top_k_index: ``(tokens, k)`` expert ids.
            top_k_weights: ``(tokens, k)`` routing weights.

        Returns:
            ``(tokens, hidden)``.
        """
        if self.grouped and grouped_path_available(hidden_states):
            gate_up, down, chunk = self.grouped_sources(hidden_states.dtype)
            return moe_grouped_forward(
                hidden_states,
                top_k_index,
                top_k_weights,
                gate_up,
                down,
                self.act_fn,
                num_experts=self.num_experts,
                chunk_experts=chunk,
            )
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hits = torch.unique(top_k_index).tolist()
        for expert in hits:
            if not 0 <= expert < self.num_experts:
                continue  # transformers uses num_experts as a "dropped token" sentinel
            token_idx, slot = torch.where(top_k_index == expert)
            y = self.expert_forward(expert, hidden_states[token_idx])
            y = y * top_k_weights[token_idx, slot, None].to(y.dtype)
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
            f"intermediate_dim={self.intermediate_dim}, method={self.quant.method}"
        )
