"""QuantSpec validation and the 4-bit storage (Packed4bit) round trip."""

from __future__ import annotations

import math

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixtune.errors import ConfigError
from mixtune.model import Packed4bit, QuantSpec
from tests.strategies import matrix_shapes, quant_specs


def test_named_constructors() -> None:
    assert QuantSpec.nf4() == QuantSpec()
    assert QuantSpec.fp4(double_quant=False).method == "fp4"
    none = QuantSpec.none()
    assert not none.is_4bit
    assert QuantSpec.nf4().is_4bit
    assert attrs.evolve(QuantSpec.nf4(), block_size=128).block_size == 128


def test_spec_reports_all_problems_at_once() -> None:
    with pytest.raises(ConfigError, match="4 problems") as info:
        QuantSpec(method="int3", double_quant="yes", compute_dtype=torch.int8, block_size=100)  # type: ignore[arg-type]
    fields = " ".join(info.value.problems)
    for name in ("method", "double_quant", "compute_dtype", "block_size"):
        assert name in fields


def test_spec_none_rejects_4bit_only_options() -> None:
    with pytest.raises(ConfigError, match="quantize_lm_head"):
        attrs.evolve(QuantSpec.none(), quantize_lm_head=True)


def test_spec_is_frozen() -> None:
    spec = QuantSpec.nf4()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        spec.block_size = 128  # type: ignore[misc]


@pytest.mark.parametrize("method", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_round_trip_error_is_small(method: str, double_quant: bool) -> None:
    spec = QuantSpec(method=method, double_quant=double_quant, compute_dtype=torch.float32)  # type: ignore[arg-type]
    packed = Packed4bit(3, (96, 64), spec)
    weights = [torch.randn(96, 64) * 0.02 for _ in range(3)]
    for i, w in enumerate(weights):
        packed.store(i, w)
    for i, w in enumerate(weights):
        back = packed.dequantize(i)
        assert back.shape == w.shape
        assert back.dtype == torch.float32
        rel = (back - w).norm() / w.norm()
        # 16 levels per block: ~10% relative RMS error for Gaussian weights.
        assert 0.0 < rel < 0.2, rel
    # Experts are quantized independently: storing one leaves the others alone.
    before = packed.dequantize(0)
    packed.store(1, torch.randn(96, 64))
    torch.testing.assert_close(packed.dequantize(0), before, rtol=0, atol=0)


def test_nf4_beats_fp4_on_gaussian_weights() -> None:
    w = torch.randn(256, 128)
    errs = {}
    for method in ("nf4", "fp4"):
        packed = Packed4bit(1, (256, 128), QuantSpec(method=method, compute_dtype=torch.float32))  # type: ignore[arg-type]
        packed.store(0, w)
        errs[method] = float((packed.dequantize(0) - w).norm())
    assert errs["nf4"] < errs["fp4"]


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("block_size", [64, 128])
def test_storage_bytes_match_independent_count(double_quant: bool, block_size: int) -> None:
    count, rows, cols = 4, 128, 96
    packed = Packed4bit(
        count, (rows, cols), QuantSpec.nf4(double_quant=double_quant, block_size=block_size)
    )
    numel = rows * cols
    blocks = math.ceil(numel / block_size)
    if double_quant:
        # uint8 scales + per matrix: float32 scales of the scales (one per 256) + offset; one code book.
        expected = count * (numel // 2 + blocks + 4 * math.ceil(blocks / 256) + 4) + 256 * 4
    else:
        expected = count * (numel // 2 + 4 * blocks)
    assert packed.nbytes() == expected


def test_store_rejects_wrong_shape() -> None:
    packed = Packed4bit(1, (8, 64), QuantSpec.nf4())
    with pytest.raises(ValueError, match="shape"):
        packed.store(0, torch.zeros(64, 8))


def test_packed_needs_a_4bit_spec() -> None:
    with pytest.raises(ConfigError, match="4-bit"):
        Packed4bit(1, (8, 64), QuantSpec.none())


@settings(max_examples=40, deadline=None)
@given(
    spec=quant_specs(), shape=matrix_shapes, scale=st.floats(1e-3, 10.0), seed=st.integers(0, 2**16)
)
def test_round_trip_error_is_bounded_by_each_blocks_scale(
    spec: QuantSpec, shape: tuple[int, int], scale: float, seed: int
) -> None:
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale
    packed = Packed4bit(1, shape, spec)
    packed.store(0, weight)
    back = packed.dequantize(0)
    assert back.shape == weight.shape
    flat_w, flat_b = weight.flatten(), back.flatten()
    pad = -flat_w.numel() % spec.block_size
    blocks_w = torch.nn.functional.pad(flat_w, (0, pad)).view(-1, spec.block_size)
    blocks_b = torch.nn.functional.pad(flat_b, (0, pad)).view(-1, spec.block_size)
    absmax = blocks_w.abs().amax(-1, keepdim=True)
    # Half the widest gap between adjacent 4-bit levels (fp4: 0.17 of the block
    # scale, nf4: 0.15), plus slack for the 8-bit quantized scales.
    bound = 0.26 * absmax * (1.02 if spec.double_quant else 1.0) + 1e-6
    assert bool(((blocks_b - blocks_w).abs() <= bound).all())
    # The block maximum survives up to its scale's precision.
    peak = blocks_b.abs().amax(-1, keepdim=True)
    assert torch.allclose(peak, absmax, rtol=0.02 if spec.double_quant else 1e-3)


@settings(max_examples=30, deadline=None)
@given(
    spec=quant_specs(),
    shape=st.sampled_from([(7, 10), (48, 96), (128, 256), (130, 258)]),
    data=st.data(),
)
def test_dequantize_range_equals_each_matrix_dequantized_alone(
    spec: QuantSpec, shape: tuple[int, int], data: st.DataObject
) -> None:
    # (128, 256) and (130, 258) hold more than 256 blocks of 64, so the
    # scales span several nested blocks; (7, 10) and (130, 258) are padded.
    count = 4
    packed = Packed4bit(count, shape, spec)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    for i in range(count):
        packed.store(i, torch.randn(*shape, generator=gen) * (i + 1))
    start = data.draw(st.integers(0, count - 1))
    stop = data.draw(st.integers(start + 1, count))
    got = packed.dequantize_range(start, stop)
    want = torch.stack([packed.dequantize(i) for i in range(start, stop)])
    assert got.shape == (stop - start, *shape)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("bounds", [(0, 0), (2, 1), (-1, 1), (0, 4)])
def test_dequantize_range_rejects_bad_ranges(bounds: tuple[int, int]) -> None:
    packed = Packed4bit(3, (8, 64), QuantSpec.nf4())
    with pytest.raises(IndexError, match=r"outside \[0, 3\)"):
        packed.dequantize_range(*bounds)
