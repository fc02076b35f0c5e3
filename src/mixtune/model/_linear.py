"""``QuantLinear``: a frozen linear layer with 4-bit weight storage.

Used for attention projections, dense MLPs and optionally ``lm_head``. It
shares :class:`~mixtune.model.Packed4bit` storage with the experts, so the
census and the adapter see one format, and it never repacks its weight (the
trap of bitsandbytes' ``Linear4bit`` on CPU, where an eval forward under
``no_grad`` can change the layout and leave later backward passes without a
gradient).
"""

from __future__ import annotations

import torch
from torch import nn

from mixtune.model._quant import Packed4bit, QuantSpec, dequant_linear

__all__ = ["QuantEmbedding", "QuantLinear"]


class QuantLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored in 4 bits and frozen.

    Only the input receives a gradient; the bias (if any) stays high
    precision and frozen too.

    Args:
        in_features: Input width.
        out_features: Output width.
        quant: A 4-bit spec.
        bias: Whether the layer has a bias.
        dtype: dtype of the bias.
        device: Where storage is allocated.

    Example:
        >>> import torch
        >>> from mixtune.model import QuantLinear, QuantSpec
        >>> layer = QuantLinear(64, 32, quant=QuantSpec.nf4(compute_dtype=torch.float32))
        >>> layer(torch.randn(2, 64)).shape
        torch.Size([2, 32])
    """

    bias: nn.Parameter | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        quant: QuantSpec,
        bias: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.quant = quant
        self.packed = Packed4bit(1, (out_features, in_features), quant, device=device)
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, quant: QuantSpec) -> QuantLinear:
        """Quantize an ``nn.Linear``.

        Args:
            linear: The layer to copy.
            quant: A 4-bit spec.

        Returns:
            A new layer on ``linear``'s device.
        """
        new = cls(
            linear.in_features,
            linear.out_features,
            quant=quant,
            bias=linear.bias is not None,
            dtype=linear.weight.dtype,
            device=linear.weight.device,
        )
        new.set_weight(linear.weight)
        if linear.bias is not None:
            new.set_bias(linear.bias)
        return new

    @property
    def is_quantized(self) -> bool:
        """Whether the weight is stored in 4 bits (always, for this class)."""
        return True

    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize and store the weight.

        Args:
            weight: ``(out_features, in_features)`` float tensor.

        Raises:
            ValueError: If the shape is wrong.
        """
        self.packed.store(0, weight)

    def set_bias(self, bias: torch.Tensor) -> None:
        """Copy the bias.

        Args:
            bias: ``(out_features,)``.

        Raises:
            ValueError: If the layer has no bias or the shape is wrong.
        """
        if self.bias is None:
            raise ValueError("this QuantLinear was built without a bias")
        if tuple(bias.shape) != (self.out_features,):
            raise ValueError(
                f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}"
            )
        with torch.no_grad():
            self.bias.copy_(bias)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A dequantized copy of the weight, ``(out_features, in_features)``.

        Args:
            dtype: Result dtype (default: the spec's compute dtype).

        Returns:
            A new tensor, detached.
        """
        return self.packed.dequantize(0, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer.

        Args:
            x: ``(..., in_features)``.

        Returns:
            ``(..., out_features)`` in ``x``'s dtype.
        """
        y = dequant_linear(x, self.packed, 0)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, method={self.quant.method}"
        )


class QuantEmbedding(nn.Module):
    """An embedding table stored in 4 bits (``QuantSpec.quantize_embeddings``).

    Lookups dequantize the table (in compute dtype) for the call; nothing
    receives a gradient through the table.

    Args:
        num_embeddings: Vocabulary size.
        embedding_dim: Width.
        quant: A 4-bit spec.
        padding_idx: Kept for reference (the stored row is used as is).
        device: Where storage is allocated.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        quant: QuantSpec,
        padding_idx: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.quant = quant
        self.packed = Packed4bit(1, (num_embeddings, embedding_dim), quant, device=device)

    @property
    def is_quantized(self) -> bool:
        """Whether the table is stored in 4 bits (always, for this class)."""
        return True

    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize and store the table.

        Args:
            weight: ``(num_embeddings, embedding_dim)``.

        Raises:
            ValueError: If the shape is wrong.
        """
        self.packed.store(0, weight)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A dequantized copy of the table.

        Args:
            dtype: Result dtype (default: compute dtype).

        Returns:
            ``(num_embeddings, embedding_dim)``.
        """
        return self.packed.dequantize(0, dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Look up rows.

        Args:
            input_ids: Integer ids of any shape.

        Returns:
            ``(*input_ids.shape, embedding_dim)`` in compute dtype.
        """
        return torch.nn.functional.embedding(input_ids, self.dequantize())

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, method={self.quant.method}"
