"""Codec properties: the ladder nests exactly, packing and entropy coding round-trip, residuals restore every bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from p2u_hub.codecs import entropy, ladder, lossless, progressive


@pytest.fixture(autouse=True, params=["native", "numpy"])
def codec_path(request, monkeypatch) -> str:
    """Every test here runs on the C loops and on the numpy fallback (``P2U_NO_NATIVE=1``)."""
    if request.param == "native" and entropy._native is None:
        pytest.skip("the C extension p2u_hub.codecs._native is not built")
    monkeypatch.setenv("P2U_NO_NATIVE", "1" if request.param == "numpy" else "")
    assert entropy.native_enabled() == (request.param == "native")
    return request.param


def _weights(dtype: torch.dtype, shape=(48, 40), seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 0.05).to(dtype)


@pytest.mark.parametrize("low,high", [(1, 8), (2, 3), (3, 8), (4, 8), (4, 12), (8, 16)])
def test_coarsened_codes_equal_direct_quantization(low: int, high: int):
    groups = ladder.to_groups(_weights(torch.float32) + 0.04, 64)  # shifted: the grid must move, offsets are exercised
    scales, offsets = ladder.base_grid(groups, low)
    assert offsets.abs().max() > 0
    fine = ladder.quantize(groups, scales, offsets, low, high)
    assert torch.equal(ladder.coarsen(fine, high, low), ladder.quantize(groups, scales, offsets, low, low))
    coarse = ladder.coarsen(fine, high, low)
    refinements = ladder.refinement(fine, coarse, low, high)
    assert torch.equal(refinements, fine & ((1 << (high - low)) - 1))  # inside the grid: the low bits
    assert torch.equal(ladder.refine(coarse, refinements, low, high), fine)


@pytest.mark.parametrize("low,high", [(1, 8), (2, 8), (4, 8)])
def test_clipped_weights_escape_the_base_grid_at_the_next_stage(low: int, high: int):
    groups = ladder.to_groups(_weights(torch.float32, (64, 256)), 64)
    groups[:, 0], groups[:, 1] = 0.5, -0.5  # far outside the clipped grid of every group
    scales, offsets = ladder.base_grid(groups, low)
    fine = ladder.quantize(groups, scales, offsets, low, high, headroom=3)
    coarse = ladder.clamp_codes(ladder.coarsen(fine, high, low), low)
    refinements = ladder.refinement(fine, coarse, low, high)
    assert refinements.min() >= 0 and (refinements >= (1 << (high - low))).any()
    assert torch.equal(ladder.refine(coarse, refinements, low, high), fine)
    error = (ladder.dequantize(fine, scales, offsets, low, high) - groups).abs()
    assert torch.all(error <= ladder.level_scales(scales, low, high).unsqueeze(1) / 2 * (1 + 1e-6))


def test_reconstruction_error_is_within_half_a_step_inside_the_grid():
    groups = ladder.to_groups(_weights(torch.float32), 64)
    scales, offsets = ladder.base_grid(groups, 4)
    for bits in (4, 5, 8):
        codes = ladder.quantize(groups, scales, offsets, 4, bits)
        error = (ladder.dequantize(codes, scales, offsets, 4, bits) - groups).abs()
        half_step = ladder.level_scales(scales, 4, bits).unsqueeze(1) / 2
        inside = (codes > -(1 << (bits - 1))) & (codes < (1 << (bits - 1)) - 1)  # clamped (clipped) weights excepted
        assert torch.all(error[inside] <= half_step.expand_as(error)[inside] * (1 + 1e-6)), bits


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_searched_grid_beats_the_symmetric_grid(bits: int):
    groups = ladder.to_groups(_weights(torch.float32, (64, 256)), 64)
    symmetric = ladder.base_scales(groups, bits)
    zero = torch.zeros(groups.shape[0], dtype=torch.int32)
    scales, offsets = ladder.base_grid(groups, bits)

    def error(scales, offsets):
        codes = ladder.quantize(groups, scales, offsets, bits, bits)
        return (ladder.dequantize(codes, scales, offsets, bits, bits) - groups).square().sum(dim=1)

    searched, plain = error(scales, offsets), error(symmetric, zero)
    assert torch.all(searched <= plain)
    assert searched.sum() < 0.8 * plain.sum()


@pytest.mark.parametrize("no_native", ["", "1"])
def test_chosen_scales_keep_scale_mantissa_bits(monkeypatch, no_native: str):
    """A normal scale is ``(1 + j / 16) * 2**e`` (``SCALE_MANTISSA_BITS``), a subnormal one keeps its bits, a saturated one is
    the largest such scale, on both paths."""
    monkeypatch.setenv("P2U_NO_NATIVE", no_native)
    groups = torch.randn(256, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-10, 6, 256).unsqueeze(1)
    scales, _ = ladder.base_grid(groups, 4)
    patterns = scales.view(torch.int16).to(torch.int32)
    normal, subnormal = patterns >= 0x0400, (patterns > 0) & (patterns < 0x0400)
    dropped = (1 << (10 - ladder.SCALE_MANTISSA_BITS)) - 1
    assert normal.any() and torch.all(patterns[normal] & dropped == 0)
    assert (patterns[subnormal] & dropped != 0).any()  # subnormal scales are not rounded
    assert scales.max() == 63488 and torch.all(scales.isfinite())


def test_zero_offsets_reproduce_the_symmetric_grid_of_format_1():
    groups = ladder.to_groups(_weights(torch.float32), 64)
    scales, zero = ladder.base_scales(groups, 4), torch.zeros(groups.shape[0], dtype=torch.int32)
    codes = ladder.quantize(groups, scales, zero, 4, 4)
    step = scales.to(torch.float32).unsqueeze(1)
    assert torch.equal(codes, (groups / step).floor().clamp(-8, 7).to(torch.int32))
    assert torch.equal(ladder.dequantize(codes, scales, zero, 4, 4), (codes.to(torch.float32) + 0.5) * step)


@pytest.mark.parametrize("bits", [1, 3, 4])
def test_offsets_pack_round_trip(bits: int):
    offsets = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (13,), dtype=torch.int32)
    packed = ladder.pack_offsets(offsets, bits)
    assert packed.numel() == 2 * bits  # 13 offsets padded to 16
    assert torch.equal(ladder.unpack_offsets(packed, bits, 13), offsets)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_roundtrip(bits: int):
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (1024,), dtype=torch.int32)
    packed = ladder.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == 1024 * bits // 8
    assert torch.equal(ladder.unpack(packed, bits), codes)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("with_offsets", [False, True])
def test_dequantize_packed_gives_the_bits_of_dequantize(bits: int, with_offsets: bool):
    torch.manual_seed(bits)
    groups = torch.randn(64, 32) * torch.logspace(-30, 4, 64).unsqueeze(1)  # tiny (subnormal products) to large scales
    scales, offsets = ladder.base_grid(groups, bits) if with_offsets else (ladder.base_scales(groups, bits), None)
    grid_offsets = offsets if with_offsets else torch.zeros(64, dtype=torch.int32)
    assert not with_offsets or bits == 1 or offsets.any()  # the asymmetric grid is exercised
    codes = ladder.quantize(groups, scales, grid_offsets, bits, bits)
    expected = ladder.dequantize(codes, scales, grid_offsets, bits, bits)
    actual = ladder.dequantize_packed(ladder.pack(codes, bits), scales, offsets, bits, 32)
    assert actual.dtype == torch.float32 and torch.equal(actual.view(torch.int32), expected.view(torch.int32))


def test_pack_layout_low_nibble_first():
    assert ladder.pack(torch.tensor([-8, 7, 0, 0, 0, 0, 0, 0], dtype=torch.int32), 4)[0].item() == 0xF0


def test_entropy_roundtrip_and_corruption():
    generator = torch.Generator().manual_seed(1)
    contexts = torch.randint(0, 5, (5000,), generator=generator).to(torch.uint8)
    symbols = (torch.randn(5000, generator=generator).abs() * 300 * (contexts.to(torch.float32) + 1)).to(torch.int64)
    stream = entropy.encode(symbols, contexts)
    decoded = entropy.decode(stream, contexts)
    assert decoded.dtype == torch.int32 and torch.equal(decoded.to(torch.int64), symbols)  # 2 planes: int32
    for top, dtype in [(0, torch.uint8), (255, torch.uint8), (1 << 24, torch.int64), ((1 << 24) - 1, torch.int32)]:
        narrow = torch.tensor([top, 0, 1], dtype=torch.int64)
        assert entropy.decode(entropy.encode(narrow, contexts[:3]), contexts[:3]).dtype == dtype, top
    with pytest.raises(entropy.CorruptStreamError):
        entropy.decode(stream[:-3], contexts)
    with pytest.raises(entropy.CorruptStreamError):
        entropy.decode(stream + b"\x00", contexts)


def test_entropy_stream_is_the_same_for_every_integer_dtype_of_the_symbols():
    generator = torch.Generator().manual_seed(2)
    contexts = torch.randint(0, 7, (20_000,), generator=generator).to(torch.uint8)
    symbols = torch.randint(0, 200, (20_000,), generator=generator) * (contexts > 2)  # contexts 0-2: all zero, no plane
    stream = entropy.encode(symbols, contexts)
    for dtype in (torch.uint8, torch.int16, torch.int32):
        assert entropy.encode(symbols.to(dtype), contexts) == stream, dtype
    assert torch.equal(entropy.decode(stream, contexts).to(torch.int64), symbols)


def test_code_lengths_are_huffman_limited_in_depth_and_complete():
    fibonacci = [1, 2]
    while len(fibonacci) < 20:
        fibonacci.append(fibonacci[-1] + fibonacci[-2])
    assert entropy._code_lengths(np.array([1, 1, 2, 3, 5, 0]), 15).tolist() == [4, 4, 3, 2, 1, 0]  # Huffman, unused symbol 0
    for freq, limit in [(np.array([0, *fibonacci, 0, 1]), 15), (np.array(fibonacci[:19]), 7)]:  # Fibonacci: the deepest codes
        assert entropy._code_lengths(freq, 64).max() > limit
        lengths = entropy._code_lengths(freq, limit)
        used = lengths[freq > 0]
        assert used.min() > 0 and used.max() == limit and not lengths[freq == 0].any()
        assert sum(1 << (limit - int(length)) for length in used) == 1 << limit  # Kraft equality: a complete prefix code
        by_frequency = lengths[np.argsort(freq, kind="stable")][freq[np.argsort(freq, kind="stable")] > 0]
        assert (np.diff(by_frequency) <= 0).all()  # a more frequent symbol never has a longer code


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ordered_int_is_monotonic_and_invertible(dtype: torch.dtype):
    values = torch.tensor([float("-inf"), -2.0, -1e-3, -0.0, 0.0, 1e-3, 2.0, float("inf")], dtype=dtype)
    ordered = lossless.ordered_int(values)
    assert torch.all(ordered[1:] > ordered[:-1])
    assert torch.equal(lossless.from_ordered_int(ordered, dtype).view(torch.uint8), values.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("stage_bits", [(), (8,), (6, 8)])
def test_progressive_decode_is_bit_exact_with_special_values(dtype: torch.dtype, stage_bits: tuple[int, ...]):
    weight = _weights(dtype, (33, 70))
    weight[0, :5] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0], dtype=dtype)
    weight[5] = 0.0
    spec = progressive.Ladder(4, stage_bits, 64)
    encoded = progressive.encode(weight, spec)
    rebuilt = progressive.decode(encoded.packed_codes, encoded.scales, encoded.offsets, encoded.deltas, spec, tuple(weight.shape), dtype)
    assert rebuilt.dtype == dtype
    assert torch.equal(rebuilt.view(torch.uint8), weight.view(torch.uint8))


def test_intermediate_stages_reduce_error():
    weight = _weights(torch.float32, (64, 128))
    spec = progressive.Ladder(3, (5, 8), 64)
    encoded = progressive.encode(weight, spec)
    errors = [
        (
            progressive.decode(
                encoded.packed_codes, encoded.scales, encoded.offsets, encoded.deltas[:k], spec, tuple(weight.shape), weight.dtype
            )
            - weight
        )
        .abs()
        .mean()
        .item()
        for k in range(3)
    ]
    assert errors[0] > errors[1] > errors[2] > 0
    base = progressive.dequantize_packed(encoded.packed_codes, encoded.scales, encoded.offsets, spec, tuple(weight.shape), weight.dtype)
    assert base.sub(weight).abs().mean().item() == pytest.approx(errors[0])


@pytest.mark.parametrize(
    "bits,stages,group,message",
    [
        (0, (), 64, "base bits must be between 1 and 8, got 0"), (9, (), 64, "base bits must be between 1 and 8, got 9"),
        (4, (4,), 64, r"must increase.*\[4, 4\]"), (4, (8, 6), 64, r"must increase.*\[4, 8, 6\]"),
        (4, (8,), 60, "positive multiple of 8, got 60"), (4, (17,), 64, r"stay <= 16, got \[4, 17\]"),
    ],
)  # fmt: skip
def test_invalid_ladders_are_refused(bits, stages, group, message):
    with pytest.raises(ValueError, match=message):
        progressive.Ladder(bits, stages, group)


def test_multi_block_tensor_round_trips_and_frames_are_checked():
    spec = progressive.Ladder(3, (8,), 96)
    weight = _weights(torch.bfloat16, (1100, 1000))  # 1.1M elements: two blocks of 10922 groups of 96, the last one short
    encoded = progressive.encode(weight, spec)
    assert int.from_bytes(encoded.deltas[0][:4], "little") == 2
    rebuilt = progressive.decode(
        encoded.packed_codes, encoded.scales, encoded.offsets, encoded.deltas, spec, tuple(weight.shape), weight.dtype
    )
    assert torch.equal(rebuilt.view(torch.uint8), weight.view(torch.uint8))
    with pytest.raises(entropy.CorruptStreamError, match="header says"):
        progressive.decode(
            encoded.packed_codes, encoded.scales, encoded.offsets, [encoded.deltas[0][:-1]], spec, tuple(weight.shape), weight.dtype
        )


@pytest.mark.parametrize("stage_bits", [(8,), (6, 8, 12)])
def test_block_threads_give_the_same_bytes_and_are_configurable(monkeypatch, stage_bits):
    spec = progressive.Ladder(4, stage_bits, 64)
    weight = _weights(torch.float32, (2100, 1024))  # three blocks
    monkeypatch.setenv(progressive.THREADS_VARIABLE, "1")
    serial = progressive.encode(weight, spec)
    for threads in ("3", "7"):  # three threads code a block each; seven (more than the blocks) share out each block's groups
        monkeypatch.setenv(progressive.THREADS_VARIABLE, threads)
        threaded = progressive.encode(weight, spec)
        assert threaded.deltas == serial.deltas
        for field in ("packed_codes", "scales", "offsets"):
            assert torch.equal(getattr(threaded, field), getattr(serial, field))
    rebuilt = progressive.decode(serial.packed_codes, serial.scales, serial.offsets, serial.deltas, spec, tuple(weight.shape), weight.dtype)
    assert torch.equal(rebuilt.view(torch.uint8), weight.view(torch.uint8))
    monkeypatch.setenv(progressive.THREADS_VARIABLE, "zero")
    with pytest.raises(ValueError, match="P2U_CODEC_THREADS must be a positive integer, got 'zero'"):
        progressive.encode(weight, spec)


@pytest.mark.parametrize("bits", range(1, 9))
def test_offsets_of_some_groups_are_those_of_the_whole_tensor(bits: int):
    offsets = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (1003,), generator=torch.Generator().manual_seed(bits), dtype=torch.int32)
    packed = ladder.pack_offsets(offsets, bits)
    groups = torch.tensor([0, 7, 8, 500, 1002])
    assert torch.equal(ladder.offsets_of_groups(packed, bits, groups), offsets[groups])


def _heavy_tailed(shape, seed: int = 0) -> torch.Tensor:
    """Laplace-distributed weights: like trained ones, their codes crowd the grid's centre (Gaussian ones barely do)."""
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.rand(shape, generator=generator) - 0.5
    return -0.02 * uniform.sign() * torch.log1p(-2 * uniform.abs())


@pytest.mark.parametrize("bits", range(1, 9))
def test_coded_base_round_trips_and_is_never_longer_than_the_raw_arrays(bits: int):
    spec = progressive.Ladder(bits, (9,) if bits == 8 else (8,), 64)
    large, small = _heavy_tailed((1100, 1000)), _heavy_tailed((2, 64))  # two coding blocks; one group of two rows
    for weight in (large, small):
        encoded = progressive.encode(weight, spec)
        raw = (encoded.packed_codes, encoded.scales, encoded.offsets)
        stored = progressive.encode_base(*raw, spec)
        for array, raw_array in zip(stored, raw):
            assert array.dtype in (torch.uint8, raw_array.dtype) and array.nbytes <= raw_array.nbytes
        decoded = progressive.decode_base(*stored, spec, weight.numel())
        assert all(torch.equal(array.view(torch.uint8), raw_array.view(torch.uint8)) for array, raw_array in zip(decoded, raw))
        raw_codes, same_scales, same_offsets = progressive.encode_base(*raw, spec, code_codes=False)
        assert raw_codes is encoded.packed_codes and torch.equal(same_scales, stored[1]) and torch.equal(same_offsets, stored[2])
        codes, scales, offsets = stored
        if weight is large:  # a real saving: streams (1-bit codes are two near-even halves: they stay raw)
            assert (codes.numel() < encoded.packed_codes.numel()) == (bits > 1) and scales.dtype == torch.uint8
            assert offsets.numel() < encoded.offsets.numel()
        else:  # a stream would be longer: the raw arrays are kept
            assert codes is encoded.packed_codes and scales is encoded.scales and offsets is encoded.offsets


def test_coded_base_refuses_codes_scales_and_offsets_out_of_range():
    spec = progressive.Ladder(3, (8,), 64)
    weight = _heavy_tailed((64, 64))
    encoded = progressive.encode(weight, spec)
    groups = encoded.scales.numel()
    contexts = progressive._offset_contexts(encoded.offsets, spec, groups).repeat_interleave(64)
    wide_codes = progressive.byte_tensor(progressive._frame([entropy.encode(torch.full((weight.numel(),), 9), contexts)]))
    with pytest.raises(entropy.CorruptStreamError, match="a code is wider than the tensor's 3 bits"):
        progressive.decode_base(wide_codes, encoded.scales, encoded.offsets, spec, weight.numel())
    two_planes = progressive.byte_tensor(progressive._frame([entropy.encode(torch.full((weight.numel(),), 300), contexts)]))
    with pytest.raises(entropy.CorruptStreamError, match="a code is wider than the tensor's 3 bits"):
        progressive.decode_base(two_planes, encoded.scales, encoded.offsets, spec, weight.numel())
    wide_scales = progressive.byte_tensor(entropy.encode(torch.full((groups,), 70000), torch.zeros(groups, dtype=torch.uint8)))
    with pytest.raises(entropy.CorruptStreamError, match="a scale is wider than 16 bits"):
        progressive.decode_base(encoded.packed_codes, wide_scales, encoded.offsets, spec, weight.numel())
    too_long = torch.zeros(2 * groups, dtype=torch.uint8)  # as many bytes as the raw scales: never a stream
    with pytest.raises(entropy.CorruptStreamError, match=rf"scales stored as torch.uint8\[{2 * groups}\] for {groups} groups"):
        progressive.decode_base(encoded.packed_codes, too_long, encoded.offsets, spec, weight.numel())
    longer = torch.zeros(encoded.packed_codes.numel() + 1, dtype=torch.uint8)
    with pytest.raises(entropy.CorruptStreamError, match="codes stored as"):
        progressive.decode_base(longer, encoded.scales, encoded.offsets, spec, weight.numel())
    wide_offsets = progressive.byte_tensor(entropy.encode(torch.full((groups,), 8), torch.zeros(groups, dtype=torch.uint8)))
    with pytest.raises(entropy.CorruptStreamError, match="an offset is wider than the tensor's 3 bits"):
        progressive.decode_base(encoded.packed_codes, encoded.scales, wide_offsets, spec, weight.numel())
    longer_offsets = torch.zeros(encoded.offsets.numel() + 1, dtype=torch.uint8)
    with pytest.raises(entropy.CorruptStreamError, match=rf"offsets stored as torch.uint8\[{encoded.offsets.numel() + 1}\]"):
        progressive.decode_base(encoded.packed_codes, encoded.scales, longer_offsets, spec, weight.numel())
