"""4-bit weight storage shared by mixtune's quantized modules.

:class:`QuantSpec` says how base weights are stored; :class:`Packed4bit` holds a
stack of equally shaped matrices in bitsandbytes' blockwise 4-bit format (one
quantization state per matrix, so each expert is quantized on its own); and
:func:`dequant_linear` is the matmul against such a matrix that recomputes the
dequantized weight in backward instead of keeping it alive between passes.

Everything is stored in plain tensors registered as buffers, never in
bitsandbytes' ``Params4bit``/``QuantState`` objects: buffers move with
``module.to()``, show up in ``state_dict()`` and are counted by the census, and
nothing is repacked behind our back (``Linear4bit`` on CPU repacks its weight
during an eval forward, after which backward passes lose their gradient).
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, Literal

import attrs
import torch
from torch import nn

from mixtune.errors import ConfigError, QuantizationUnavailableError

__all__ = ["Packed4bit", "QuantSpec", "bnb_functional", "dequant_linear", "require_4bit"]

QuantMethod = Literal["nf4", "fp4", "none"]

# Block sizes bitsandbytes' blockwise 4-bit kernels accept.
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# bitsandbytes quantizes the absmax statistics in blocks of 256 (double quantization).
NESTED_BLOCK_SIZE = 256
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@attrs.frozen
class QuantSpec:
    """How the frozen base weights of a model are stored.

    Build one with :meth:`nf4`, :meth:`fp4` or :meth:`none`; change a field
    with :func:`attrs.evolve`. Every problem of a spec is reported at once.

    Attributes:
        method: ``"nf4"`` (4-bit NormalFloat), ``"fp4"`` (4-bit float) or
            ``"none"`` (keep the weights in the load dtype, for plain LoRA).
        double_quant: Also quantize the per-block scales (saves ~0.37 bit per
            weight). Ignored (must be False) for ``"none"``.
        compute_dtype: dtype the 4-bit weights are dequantized to for matmuls.
        block_size: Number of weights sharing one scale.
        quantize_embeddings: Store the input embedding table in 4 bits too.
        quantize_lm_head: Store the output projection in 4 bits too.

    Raises:
        ConfigError: Listing every invalid field.
    """

    method: QuantMethod = "nf4"
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16
    block_size: int = 64
    quantize_embeddings: bool = False
    quantize_lm_head: bool = False

    def __attrs_post_init__(self) -> None:
        problems: list[str] = []
        if self.method not in ("nf4", "fp4", "none"):
            problems.append(f"method={self.method!r}: must be 'nf4', 'fp4' or 'none'")
        for name in ("double_quant", "quantize_embeddings", "quantize_lm_head"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                problems.append(f"{name}={value!r}: must be True or False")
        if self.compute_dtype not in _FLOAT_DTYPES:
            problems.append(
                f"compute_dtype={self.compute_dtype!r}: must be torch.bfloat16, torch.float16 or torch.float32"
            )
        if isinstance(self.block_size, bool) or self.block_size not in BLOCK_SIZES:
            problems.append(
                f"block_size={self.block_size!r}: must be one of {', '.join(map(str, BLOCK_SIZES))}"
            )
        if self.method == "none":
            for name in ("double_quant", "quantize_embeddings", "quantize_lm_head"):
                if getattr(self, name) is True:
                    problems.append(
                        f"{name}=True has no effect with method='none'; use QuantSpec.nf4() or set it to False"
                    )
        if problems:
            raise ConfigError(problems)

    @classmethod
    def nf4(
        cls,
        *,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        block_size: int = 64,
        quantize_embeddings: bool = False,
        quantize_lm_head: bool = False,
    ) -> QuantSpec:
        """4-bit NormalFloat storage, the QLoRA default.

        Args:
            double_quant: Quantize the per-block scales too.
            compute_dtype: dtype of the dequantized weight in matmuls.
            block_size: Weights per scale.
            quantize_embeddings: Store the embedding table in 4 bits.
            quantize_lm_head: Store the lm_head in 4 bits.

        Returns:
            The spec.

        Raises:
            ConfigError: If any argument is invalid (all listed at once).

        Example:
            >>> from mixtune.model import QuantSpec
            >>> QuantSpec.nf4(double_quant=False).block_size
            64
        """
        return cls(
            "nf4", double_quant, compute_dtype, block_size, quantize_embeddings, quantize_lm_head
        )

    @classmethod
    def fp4(
        cls,
        *,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        block_size: int = 64,
        quantize_embeddings: bool = False,
        quantize_lm_head: bool = False,
    ) -> QuantSpec:
        """4-bit float storage.

        Args:
            double_quant: Quantize the per-block scales too.
            compute_dtype: dtype of the dequantized weight in matmuls.
            block_size: Weights per scale.
            quantize_embeddings: Store the embedding table in 4 bits.
            quantize_lm_head: Store the lm_head in 4 bits.

        Returns:
            The spec.

        Raises:
            ConfigError: If any argument is invalid (all listed at once).
        """
        return cls(
            "fp4", double_quant, compute_dtype, block_size, quantize_embeddings, quantize_lm_head
        )

    @classmethod
    def none(cls, *, compute_dtype: torch.dtype = torch.bfloat16) -> QuantSpec:
        """No quantization: weights stay in the load dtype (plain LoRA).

        Args:
            compute_dtype: Kept for symmetry; matmuls run in the weight dtype.

        Returns:
            The spec.

        Raises:
            ConfigError: If ``compute_dtype`` is not a float dtype.
        """
        return cls("none", False, compute_dtype, 64, False, False)

    @property
    def is_4bit(self) -> bool:
        """Whether this spec stores weights in 4 bits."""
        return self.method != "none"


def bnb_functional() -> ModuleType:
    """Import ``bitsandbytes.functional``, turning failure into a typed error.

    Returns:
        The module.

    Raises:
        QuantizationUnavailableError: If bitsandbytes cannot be imported.
    """
    try:
        import bitsandbytes.functional as bnb_f
    except Exception as exc:  # a broken install raises more than ImportError
        raise QuantizationUnavailableError(
            f"4-bit storage needs bitsandbytes, which failed to import ({type(exc).__name__}: {exc}); "
            "install it with `pip install bitsandbytes>=0.50` or load without quantization "
            "with quant=QuantSpec.none()"
        ) from exc
    return bnb_f


def require_4bit(quant: QuantSpec, device: torch.device) -> None:
    """Check that bitsandbytes can quantize and dequantize on ``device``.

    A tiny round trip is run there, so an unsupported device fails now, with
    the fix, rather than halfway through a load.

    Args:
        quant: The spec to check; nothing is done for ``method="none"``.
        device: Where the weights will live.

    Raises:
        QuantizationUnavailableError: If bitsandbytes is missing or cannot run
            its 4-bit kernels on ``device``.
    """
    if not quant.is_4bit:
        return
    probe = Packed4bit(1, (quant.block_size, 2), quant, device=device)
    try:
        weight = torch.linspace(-1.0, 1.0, 2 * quant.block_size, device=device).view(-1, 2)
        probe.store(0, weight)
        back = probe.dequantize(0, torch.float32)
        ok = bool(torch.isfinite(back).all()) and back.shape == weight.shape
    except QuantizationUnavailableError:
        raise
    except Exception as exc:
        raise QuantizationUnavailableError(
            f"bitsandbytes cannot run {quant.method} quantization on device {device} "
            f"({type(exc).__name__}: {exc}); load on a supported device (CPU or CUDA) or "
            "without quantization with quant=QuantSpec.none()"
        ) from exc
    if not ok:
        raise QuantizationUnavailableError(
            f"bitsandbytes' {quant.method} round trip on device {device} gave a wrong result; "
            "load on a supported device (CPU or CUDA) or use quant=QuantSpec.none()"
        )


class Packed4bit(nn.Module):
    """A stack of ``count`` matrices of one ``shape``, each stored in 4 bits.

    Each matrix is quantized independently with
    ``bitsandbytes.functional.quantize_4bit`` (so experts never share scales)
    and its pieces are kept in buffers: ``data`` (two weights per byte),
    ``absmax`` (one scale per block; uint8 under double quantization) and, with
    double quantization, ``absmax2``/``offset``/``code2`` (the scales' own
    scales, their mean and the 8-bit code book).

    Args:
        count: Number of matrices (experts; 1 for a linear layer).
        shape: ``(out_features, in_features)`` of each matrix.
        quant: A 4-bit spec.
        device: Where the buffers are allocated.

    Raises:
        ConfigError: If ``quant`` is not a 4-bit spec.
    """

    data: torch.Tensor
    absmax: torch.Tensor
    _storage_dtypes: dict[str, torch.dtype]
    absmax2: torch.Tensor
    offset: torch.Tensor
    code2: torch.Tensor

    def __init__(
        self,
        count: int,
        shape: tuple[int, int],
        quant: QuantSpec,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not quant.is_4bit:
            raise ConfigError(f"Packed4bit needs a 4-bit QuantSpec, got method={quant.method!r}")
        self.count = count
        self.shape = (int(shape[0]), int(shape[1]))
        self.quant = quant
        numel = self.shape[0] * self.shape[1]
        blocks = math.ceil(numel / quant.block_size)
        # Matrices are stored flat and zero-padded to whole blocks: bitsandbytes'
        # CPU kernel dequantizes a partial last block with the wrong scale.
        # Real model widths are multiples of the block size, so this costs nothing there.
        self.padded = blocks * quant.block_size
        self.register_buffer(
            "data", torch.zeros(count, self.padded // 2, dtype=torch.uint8, device=device)
        )
        absmax_dtype = torch.uint8 if quant.double_quant else torch.float32
        self.register_buffer(
            "absmax", torch.zeros(count, blocks, dtype=absmax_dtype, device=device)
        )
        self._storage_dtypes = {"data": torch.uint8, "absmax": absmax_dtype}
        if quant.double_quant:
            blocks2 = math.ceil(blocks / NESTED_BLOCK_SIZE)
            self.register_buffer(
                "absmax2", torch.zeros(count, blocks2, dtype=torch.float32, device=device)
            )
            self.register_buffer("offset", torch.zeros(count, dtype=torch.float32, device=device))
            self.register_buffer("code2", torch.zeros(256, dtype=torch.float32, device=device))

    def raw(self, name: str) -> torch.Tensor:
        """Storage tensor ``name`` in its own dtype (uint8 nibbles, uint8/fp32 scales).

        Sharding with FSDP2 may hold the uint8 tensors as a float view of the
        same bytes (``mixtune.recipe.make_4bit_shardable``: older FSDP2 cannot
        make parameters of integer dtype); this views them back.

        Args:
            name: ``"data"``, ``"absmax"``, ``"absmax2"``, ``"offset"`` or ``"code2"``.

        Returns:
            The tensor, or a view of it, in the dtype it was created with.
        """
        tensor: torch.Tensor = getattr(self, name)
        want = self._storage_dtypes.get(name, tensor.dtype)
        return tensor if tensor.dtype == want else tensor.view(want)

    @property
    def numel(self) -> int:
        """Weights in one matrix."""
        return self.shape[0] * self.shape[1]

    def store(self, index: int, weight: torch.Tensor) -> None:
        """Quantize ``weight`` and store it as matrix ``index``.

        Args:
            index: Which matrix (expert) to overwrite.
            weight: ``shape``-shaped float tensor, on any device (it is moved
                to the buffers' device first, so quantization runs there).

        Raises:
            ValueError: If the shape is wrong.
            QuantizationUnavailableError: If bitsandbytes is missing.
        """
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"expected a weight of shape {self.shape}, got {tuple(weight.shape)}")
        bnb_f = bnb_functional()
        source = weight.detach().to(self.data.device)
        if source.dtype not in _FLOAT_DTYPES:
            source = source.float()
        flat = source.reshape(-1)
        if self.padded > flat.numel():
            flat = torch.nn.functional.pad(flat, (0, self.padded - flat.numel()))
        packed, state = bnb_f.quantize_4bit(
            flat.contiguous(),
            blocksize=self.quant.block_size,
            compress_statistics=self.quant.double_quant,
            quant_type=self.quant.method,
        )
        with torch.no_grad():
            self.raw("data")[index].copy_(packed.reshape(-1))
            self.raw("absmax")[index].copy_(state.absmax.reshape(-1))
            if self.quant.double_quant:
                self.absmax2[index].copy_(state.state2.absmax.reshape(-1))
                self.offset[index].copy_(state.offset.reshape(()))
                self.code2.copy_(state.state2.code)

    def quant_state(self, index: int, dtype: torch.dtype) -> Any:
        """bitsandbytes' ``QuantState`` for matrix ``index`` (views, no copies).

        Args:
            index: Which matrix.
            dtype: dtype ``dequantize_4bit`` should produce.

        Returns:
            A ``bitsandbytes.functional.QuantState``.
        """
        bnb_f = bnb_functional()
        state2 = None
        offset = None
        if self.quant.double_quant:
            state2 = bnb_f.QuantState(
                absmax=self.absmax2[index],
                code=self.code2,
                blocksize=NESTED_BLOCK_SIZE,
                dtype=torch.float32,
            )
            offset = self.offset[index]
        return bnb_f.QuantState(
            absmax=self.raw("absmax")[index],
            shape=torch.Size([self.padded]),
            blocksize=self.quant.block_size,
            quant_type=self.quant.method,
            dtype=dtype,
            offset=offset,
            state2=state2,
        )

    def dequantize(self, index: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A fresh dequantized copy of matrix ``index``.

        Args:
            index: Which matrix.
            dtype: Result dtype (default: the spec's compute dtype).

        Returns:
            A ``shape``-shaped tensor on the buffers' device.
        """
        dtype = dtype or self.quant.compute_dtype
        # bitsandbytes dequantizes to 16/32-bit floats only; others go through float32.
        kernel_dtype = dtype if dtype in _FLOAT_DTYPES else torch.float32
        bnb_f = bnb_functional()
        out: torch.Tensor = bnb_f.dequantize_4bit(
            self.raw("data")[index].view(-1, 1), self.quant_state(index, kernel_dtype)
        )
        out = out.reshape(-1)[: self.numel].view(self.shape)
        return out.to(dtype) if out.dtype != dtype else out

    def dequantize_range(
        self, start: int, stop: int, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Matrices ``start`` to ``stop - 1`` dequantized together, as one new stack.

        One kernel call covers the whole range, written straight into the
        result (no per-matrix temporary and copy).  Under double quantization
        the blocks' scales are first decoded here for the whole range
        (``code2[absmax] * absmax2 + offset``, the order bitsandbytes uses),
        since bitsandbytes' nested state holds one matrix's offset only.

        Args:
            start: First matrix.
            stop: One past the last matrix.
            dtype: Result dtype (default: the spec's compute dtype).

        Returns:
            A ``(stop - start, *shape)`` tensor on the buffers' device.

        Raises:
            IndexError: If the range is empty or outside ``[0, count)``.
        """
        if not 0 <= start < stop <= self.count:
            raise IndexError(f"matrix range [{start}, {stop}) is outside [0, {self.count})")
        dtype = dtype or self.quant.compute_dtype
        kernel_dtype = dtype if dtype in _FLOAT_DTYPES else torch.float32
        bnb_f = bnb_functional()
        count = stop - start
        absmax = self.raw("absmax")[start:stop]
        if self.quant.double_quant:
            blocks = absmax.shape[1]
            scales = self.absmax2[start:stop].repeat_interleave(NESTED_BLOCK_SIZE, dim=1)
            absmax = self.code2[absmax.long()] * scales[:, :blocks] + self.offset[start:stop, None]
        state = bnb_f.QuantState(
            absmax=absmax.reshape(-1).float().contiguous(),
            shape=torch.Size([count * self.padded]),
            blocksize=self.quant.block_size,
            quant_type=self.quant.method,
            dtype=kernel_dtype,
        )
        data = self.raw("data")[start:stop]
        flat: torch.Tensor = bnb_f.dequantize_4bit(data.reshape(-1, 1), state)
        stack = flat.view(count, self.padded)
        if self.padded != self.numel:
            stack = stack[:, : self.numel].contiguous()
        stack = stack.view(count, *self.shape)
        return stack.to(dtype) if stack.dtype != dtype else stack

    def nbytes(self) -> int:
        """Bytes held (packed weights plus quantization state), as buffers or parameters."""
        held = [*self.parameters(recurse=False), *self.buffers(recurse=False)]
        return sum(t.numel() * t.element_size() for t in held)

    def extra_repr(self) -> str:
        return f"count={self.count}, shape={self.shape}, method={self.quant.method}, double_quant={self.quant.double_quant}"


class _DequantLinear(torch.autograd.Function):
    """``x @ W.T`` against a 4-bit matrix, frozen; only ``x`` gets a gradient.

    The dequantized weight is a temporary in forward and recomputed in
    backward, so a layer holds only its 4-bit bytes between the two passes.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, packed: Packed4bit, index: int, dtype: torch.dtype
    ) -> torch.Tensor:
        ctx.packed = packed
        ctx.index = index
        ctx.dtype = dtype
        return torch.nn.functional.linear(x, packed.dequantize(index, dtype))

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        weight = ctx.packed.dequantize(ctx.index, ctx.dtype)
        return grad_out.to(weight.dtype) @ weight, None, None, None


def dequant_linear(x: torch.Tensor, packed: Packed4bit, index: int) -> torch.Tensor:
    """Multiply ``x`` by matrix ``index`` of ``packed`` (transposed, like ``F.linear``).

    The matmul runs in the spec's compute dtype; the result has ``x``'s dtype.
    The base weight is frozen: gradients flow to ``x`` only, and the weight is
    dequantized again in backward rather than saved.

    Args:
        x: ``(..., in_features)``.
        packed: The 4-bit storage.
        index: Which matrix.

    Returns:
        ``(..., out_features)``.
    """
    dtype = packed.quant.compute_dtype
    out: torch.Tensor = _DequantLinear.apply(x.to(dtype), packed, index, dtype)  # type: ignore[no-untyped-call]
    return out.to(x.dtype)
