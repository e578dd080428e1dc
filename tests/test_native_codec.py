"""The C loops (``p2u_hub.codecs._native``) and the numpy fallback write and read the same bytes."""

from __future__ import annotations

import pytest
import torch

from p2u_hub.codecs import entropy, progressive

pytestmark = pytest.mark.skipif(entropy._native is None, reason="the C extension p2u_hub.codecs._native is not built")


def _weights(dtype: torch.dtype, shape: tuple[int, int], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 0.05).to(dtype)


def _awkward_weights(dtype: torch.dtype) -> torch.Tensor:
    """Normal weights plus NaN, infinities, signed zeros, subnormals and huge values, over two blocks."""
    weight = _weights(dtype, (1030, 1024), seed=3)
    weight[0, :8] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1e-40, -1e-40, 3e38]).to(dtype)
    weight[1] = 0.0
    weight[2, :100] = torch.finfo(dtype).tiny / 4
    return weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("base_bits,stage_bits", [(4, (8,)), (3, (5, 8)), (8, (16,))])
def test_native_and_numpy_paths_write_and_read_the_same_bytes(monkeypatch, dtype, base_bits, stage_bits):
    spec = progressive.Ladder(base_bits, stage_bits, 64)
    weight = _awkward_weights(dtype)
    monkeypatch.setenv("P2U_NO_NATIVE", "")
    native = progressive.encode(weight, spec)
    monkeypatch.setenv("P2U_NO_NATIVE", "1")
    fallback = progressive.encode(weight, spec)
    assert native.deltas == fallback.deltas
    assert torch.equal(native.packed_codes, fallback.packed_codes) and torch.equal(native.scales, fallback.scales)
    for stage in range(spec.stage_count + 1):
        monkeypatch.setenv("P2U_NO_NATIVE", "1")
        expected = progressive.decode(native.packed_codes, native.scales, native.offsets, native.deltas[:stage], spec, tuple(weight.shape), dtype)
        monkeypatch.setenv("P2U_NO_NATIVE", "")
        rebuilt = progressive.decode(native.packed_codes, native.scales, native.offsets, native.deltas[:stage], spec, tuple(weight.shape), dtype)
        assert torch.equal(rebuilt.view(torch.uint8), expected.view(torch.uint8)), stage
    assert torch.equal(rebuilt.view(torch.uint8), weight.view(torch.uint8))


def test_entropy_paths_agree_on_wide_symbols_and_every_context(monkeypatch):
    generator = torch.Generator().manual_seed(4)
    contexts = torch.randint(0, 256, (70_000,), generator=generator).to(torch.uint8)
    widths = (contexts.to(torch.int64) % 64).clamp(max=62)  # symbols of up to 62 bits: all 8 planes
    symbols = torch.randint(0, 1 << 62, (70_000,), generator=generator) >> (62 - widths)
    symbols[contexts == 7] = 0  # a context whose symbols are all zero: no plane at all
    monkeypatch.setenv("P2U_NO_NATIVE", "")
    stream = entropy.encode(symbols, contexts)
    monkeypatch.setenv("P2U_NO_NATIVE", "1")
    assert entropy.encode(symbols, contexts) == stream
    assert torch.equal(entropy.decode(stream, contexts), symbols)
    monkeypatch.setenv("P2U_NO_NATIVE", "")
    assert torch.equal(entropy.decode(stream, contexts), symbols)
    with pytest.raises(entropy.CorruptStreamError, match="trailing"):
        entropy.decode(stream + b"\x00", contexts)
