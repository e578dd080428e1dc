"""Codec properties: the ladder nests exactly, packing and entropy coding round-trip, residuals restore every bit."""

from __future__ import annotations

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


@pytest.mark.parametrize("low,high", [(2, 3), (3, 8), (4, 8), (4, 12), (8, 16)])
def test_coarsened_codes_equal_direct_quantization(low: int, high: int):
    groups = ladder.to_groups(_weights(torch.float32), 64)
    scales = ladder.base_scales(groups, low)
    fine = ladder.quantize(groups, scales, low, high)
    assert torch.equal(ladder.coarsen(fine, high, low), ladder.quantize(groups, scales, low, low))
    refined = ladder.refine(ladder.coarsen(fine, high, low), ladder.refinement_bits(fine, low, high), low, high)
    assert torch.equal(refined, fine)


def test_reconstruction_error_is_within_half_a_step_at_every_width():
    groups = ladder.to_groups(_weights(torch.float32), 64)
    scales = ladder.base_scales(groups, 4)
    for bits in (4, 5, 8):
        error = (ladder.dequantize(ladder.quantize(groups, scales, 4, bits), scales, 4, bits) - groups).abs()
        half_step = ladder.level_scales(scales, 4, bits).unsqueeze(1) / 2
        assert torch.all(error <= half_step * (1 + 1e-6)), bits


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_roundtrip(bits: int):
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (1024,), dtype=torch.int32)
    packed = ladder.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == 1024 * bits // 8
    assert torch.equal(ladder.unpack(packed, bits), codes)


@pytest.mark.parametrize("bits", range(2, 9))
def test_dequantize_packed_gives_the_bits_of_dequantize(bits: int):
    torch.manual_seed(bits)
    groups = torch.randn(64, 32) * torch.logspace(-30, 4, 64).unsqueeze(1)  # tiny (subnormal products) to large scales
    scales = ladder.base_scales(groups, bits)
    codes = ladder.quantize(groups, scales, bits, bits)
    expected = ladder.dequantize(codes, scales, bits, bits)
    actual = ladder.dequantize_packed(ladder.pack(codes, bits), scales, bits, 32)
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
    rebuilt = progressive.decode(encoded.packed_codes, encoded.scales, encoded.deltas, spec, tuple(weight.shape), dtype)
    assert rebuilt.dtype == dtype
    assert torch.equal(rebuilt.view(torch.uint8), weight.view(torch.uint8))


def test_intermediate_stages_reduce_error():
    weight = _weights(torch.float32, (64, 128))
    spec = progressive.Ladder(3, (5, 8), 64)
    encoded = progressive.encode(weight, spec)
    errors = [
        (progressive.decode(encoded.packed_codes, encoded.scales, encoded.deltas[:k], spec, tuple(weight.shape), weight.dtype) - weight).abs().mean().item()
        for k in range(3)
    ]
    assert errors[0] > errors[1] > errors[2] > 0
    base = progressive.dequantize_packed(encoded.packed_codes, encoded.scales, spec, tuple(weight.shape), weight.dtype)
    assert base.sub(weight).abs().mean().item() == pytest.approx(errors[0])


@pytest.mark.parametrize(
    "bits,stages,group,message",
    [
        (1, (), 64, "base bits must be between 2 and 8, got 1"), (9, (), 64, "base bits must be between 2 and 8, got 9"),
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
    rebuilt = progressive.decode(encoded.packed_codes, encoded.scales, encoded.deltas, spec, tuple(weight.shape), weight.dtype)
    assert torch.equal(rebuilt.view(torch.uint8), weight.view(torch.uint8))
    with pytest.raises(entropy.CorruptStreamError, match="header says"):
        progressive.decode(encoded.packed_codes, encoded.scales, [encoded.deltas[0][:-1]], spec, tuple(weight.shape), weight.dtype)


def test_block_threads_give_the_same_bytes_and_are_configurable(monkeypatch):
    spec = progressive.Ladder(4, (8,), 64)
    weight = _weights(torch.float32, (2100, 1024))  # three blocks
    monkeypatch.setenv(progressive.THREADS_VARIABLE, "1")
    serial = progressive.encode(weight, spec)
    monkeypatch.setenv(progressive.THREADS_VARIABLE, "3")
    assert progressive.encode(weight, spec).deltas == serial.deltas
    rebuilt = progressive.decode(serial.packed_codes, serial.scales, serial.deltas, spec, tuple(weight.shape), weight.dtype)
    assert torch.equal(rebuilt.view(torch.uint8), weight.view(torch.uint8))
    monkeypatch.setenv(progressive.THREADS_VARIABLE, "zero")
    with pytest.raises(ValueError, match="P2U_CODEC_THREADS must be a positive integer, got 'zero'"):
        progressive.encode(weight, spec)
