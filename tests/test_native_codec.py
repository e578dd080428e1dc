"""The C loops (``p2u_hub.codecs._native``) and the numpy fallback write and read the same bytes."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch

from p2u_hub.codecs import entropy, ladder, lossless, progressive

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
@pytest.mark.parametrize("base_bits,stage_bits", [(4, (8,)), (3, (5, 8)), (8, (16,)), (2, (10, 16)), (4, ())])
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
        expected = progressive.decode(
            native.packed_codes, native.scales, native.offsets, native.deltas[:stage], spec, tuple(weight.shape), dtype
        )
        monkeypatch.setenv("P2U_NO_NATIVE", "")
        rebuilt = progressive.decode(
            native.packed_codes, native.scales, native.offsets, native.deltas[:stage], spec, tuple(weight.shape), dtype
        )
        assert torch.equal(rebuilt.view(torch.uint8), expected.view(torch.uint8)), stage
    assert torch.equal(rebuilt.view(torch.uint8), weight.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_native_encoder_pads_a_partial_last_group_like_the_fallback(monkeypatch, dtype):
    """A tensor that is not whole groups (the last group zero-padded), on threads that share out its one block."""
    spec = progressive.Ladder(4, (8,), 64)
    weight = _weights(dtype, (999, 7), seed=5)
    weight[0, :3] = torch.tensor([float("nan"), float("inf"), 1e-40]).to(dtype)
    monkeypatch.setenv(progressive.THREADS_VARIABLE, "3")
    monkeypatch.setenv("P2U_NO_NATIVE", "")
    native = progressive.encode(weight, spec)
    monkeypatch.setenv("P2U_NO_NATIVE", "1")
    fallback = progressive.encode(weight, spec)
    assert native.deltas == fallback.deltas
    for field in ("packed_codes", "scales", "offsets"):
        assert torch.equal(getattr(native, field), getattr(fallback, field))


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


def _plane(case: str) -> np.ndarray:
    """Byte planes that take every branch of the encoder: block kinds, a short last block, the 15-bit limit."""
    rng = np.random.default_rng(7)
    skewed = np.minimum(rng.geometric(0.3, 1 << 20), 255).astype(np.uint8)
    fibonacci = [1, 2]
    while len(fibonacci) < 20:
        fibonacci.append(fibonacci[-1] + fibonacci[-2])
    return {
        "one byte": np.array([7], dtype=np.uint8),
        "one value": np.full(5000, 9, dtype=np.uint8),
        "two values": rng.integers(1, 3, 1000).astype(np.uint8),
        "every value once": rng.permutation(256).astype(np.uint8),
        "uniform 1M": rng.integers(0, 256, 1 << 20).astype(np.uint8),
        "skewed 1M": skewed,
        "skewed, short last block": skewed[: 3 * entropy.BLOCK_SYMBOLS + 1001],
        # byte b occurs fibonacci(b + 1) times, 28,655 bytes in one block: with end-of-block, a Huffman code 20 bits deep
        "fibonacci": rng.permutation(np.repeat(np.arange(1, 21, dtype=np.uint8), fibonacci)),
    }[case]


@pytest.mark.parametrize(
    "case", ["one byte", "one value", "two values", "every value once", "uniform 1M", "skewed 1M", "skewed, short last block", "fibonacci"]
)
def test_planes_are_the_same_raw_deflate_on_both_paths_and_every_inflater_reads_them(monkeypatch, case):
    plane = _plane(case)
    symbols, contexts = torch.from_numpy(plane).to(torch.int64), torch.zeros(len(plane), dtype=torch.uint8)
    monkeypatch.setenv("P2U_NO_NATIVE", "")
    stream = entropy.encode(symbols, contexts)
    monkeypatch.setenv("P2U_NO_NATIVE", "1")
    assert entropy.encode(symbols, contexts) == stream
    (length,) = struct.unpack_from("<I", stream, 1)
    packing = entropy._packing(int(plane.max()))  # bytes below 16 share bytes: 2, 4 or 8 to one
    assert stream[0] == packing << 4 | 1 and len(stream) == 5 + length
    assert (packing > 0) == (case in ("one byte", "one value", "two values"))
    stored = entropy._pack_symbols(plane, packing).tobytes() if packing else plane.tobytes()
    coded = stream[5:]
    isal_zlib = pytest.importorskip("isal.isal_zlib")
    for inflater in (zlib, isal_zlib):
        inflate = inflater.decompressobj(-15)
        assert inflate.decompress(coded) == stored and inflate.eof and not inflate.unused_data, inflater.__name__
    reference = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY)
    assert len(coded) <= len(reference.compress(stored) + reference.flush()) * 1.003


@pytest.mark.parametrize("native", ["", "1"])
def test_packed_top_planes_round_trip_and_their_padding_must_be_zero(monkeypatch, native):
    """Sharp top planes are packed 2, 4 or 8 to a byte (the wider planes below them are not); a packed plane whose
    last byte has bits set beyond its symbols, or a packing no encoder writes, is refused by name."""
    monkeypatch.setenv("P2U_NO_NATIVE", native)
    rng = np.random.default_rng(3)
    contexts = torch.from_numpy(rng.integers(0, 4, 10_001).astype(np.uint8))
    top = {0: 1, 1: 3, 2: 15, 3: 16}  # largest top byte per context: packing 3, 2, 1, none
    symbols = torch.from_numpy(rng.integers(0, 1 << 16, 10_001) & ((np.vectorize(top.get)(contexts.numpy()) << 8) | 0xFF))
    stream = entropy.encode(symbols, contexts)
    assert torch.equal(entropy.decode(stream, contexts).to(torch.int64), symbols)
    if not native:  # the C inflater proves packed planes itself: no detour through zlib
        assert entropy._native.inflate_stream(stream, entropy._native.histogram(contexts.numpy())) is not None
    headers, offset = [], 0
    for _ in range(4):  # contexts 0-3
        headers.append(stream[offset])
        lengths = struct.unpack_from(f"<{stream[offset] & 15}I", stream, offset + 1)
        offset += 1 + 4 * len(lengths) + sum(lengths)
    assert headers == [3 << 4 | 2, 2 << 4 | 2, 1 << 4 | 2, 2]
    one = torch.zeros(3, dtype=torch.uint8)  # three 1-bit symbols: five unused bits in the packed byte
    packed = entropy.encode(torch.tensor([1, 0, 1]), one)
    assert packed[0] == 3 << 4 | 1 and torch.equal(entropy.decode(packed, one), torch.tensor([1, 0, 1], dtype=torch.uint8))
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    dirty = deflate.compress(bytes([0b1000_0101])) + deflate.flush()
    with pytest.raises(entropy.CorruptStreamError, match="context 0: the packed plane's last byte has bits set beyond its 3 symbols"):
        entropy.decode(bytes([3 << 4 | 1]) + struct.pack("<I", len(dirty)) + dirty, one)
    with pytest.raises(entropy.CorruptStreamError, match="context 0 packs its top plane 16 to a byte"):
        entropy.decode(bytes([4 << 4 | 1]) + packed[1:], one)


def _native_stream(plane: np.ndarray) -> bytes:
    """The C encoder's stream of one byte plane in one context: a plane count, its length, the raw DEFLATE plane."""
    return entropy._native.encode_stream(plane, 1, np.zeros(len(plane), dtype=np.uint8), entropy.BLOCK_SYMBOLS)


def _one_plane_stream(coded: bytes, size: int) -> tuple[bytes, bytes]:
    """A stream of one context holding one raw DEFLATE plane of ``size`` bytes, and its counts."""
    counts = np.zeros(256, dtype=np.int64)
    counts[0] = size
    return bytes([1]) + struct.pack("<I", len(coded)) + coded, counts.tobytes()


@pytest.mark.parametrize(
    "case", ["one byte", "one value", "two values", "every value once", "uniform 1M", "skewed 1M", "skewed, short last block", "fibonacci"]
)
def test_native_inflater_reads_every_plane_the_encoder_writes(case):
    """Stored, fixed and dynamic blocks, codes up to 15 bits deep (past the lookup table) and entries of several literals."""
    plane = _plane(case)
    stream = _native_stream(plane)
    inflated = entropy._native.inflate_stream(stream, _one_plane_stream(b"", len(plane))[1])
    assert inflated is not None
    widths, planes = inflated
    assert widths[0] == 1 and widths[1:] == bytes(255) and planes == [plane.tobytes()]


def test_native_inflater_reads_zlibs_huffman_only_planes_and_leaves_matches_to_zlib():
    """Another encoder's literal-only DEFLATE is read; a plane with matches goes to zlib, with the same result."""
    plane = np.minimum(np.random.default_rng(3).geometric(0.2, 200_000), 255).astype(np.uint8).tobytes()
    for strategy, native_reads in ((zlib.Z_HUFFMAN_ONLY, True), (zlib.Z_DEFAULT_STRATEGY, False)):
        coder = zlib.compressobj(9, zlib.DEFLATED, -15, 9, strategy)
        stream, counts = _one_plane_stream(coder.compress(plane) + coder.flush(), len(plane))
        assert (entropy._native.inflate_stream(stream, counts) is not None) == native_reads
        assert entropy.inflate_planes(stream, counts)[1] == [plane]


def test_native_inflater_accepts_no_stream_that_zlib_reads_otherwise():
    """Fuzzed planes: whatever the C inflater accepts, zlib inflates to the same bytes, ending where it ends.

    Everything else it leaves to zlib (returns None), whose errors name the fault.
    """
    rng = np.random.default_rng(11)
    planes = [_plane("skewed, short last block"), _plane("fibonacci"), _plane("one byte"), _plane("uniform 1M")[:70_000]]
    accepted = refused = 0
    for trial in range(600):
        plane = planes[trial % len(planes)]
        coded = bytearray(_native_stream(plane)[5:])
        how = trial // len(planes) % 3
        if how == 0:  # flip a few bits, mostly early: block headers and code tables
            for _ in range(int(rng.integers(1, 4))):
                position = int(rng.integers(0, min(len(coded), 64 if rng.random() < 0.5 else len(coded))))
                coded[position] ^= 1 << int(rng.integers(8))
        elif how == 1:
            coded = coded[: int(rng.integers(0, len(coded)))]
        else:
            coded += bytes(rng.integers(0, 256, int(rng.integers(1, 4)), dtype=np.uint8))
        size = len(plane) + int(rng.integers(-1, 2)) * (trial % 5 == 0)
        if size < 1:
            continue
        inflated = entropy._native.inflate_stream(*_one_plane_stream(bytes(coded), size))
        if inflated is None:
            refused += 1
            continue
        accepted += 1
        inflater = zlib.decompressobj(-15)
        assert inflater.decompress(bytes(coded)) == inflated[1][0] and len(inflated[1][0]) == size
        assert inflater.eof and not inflater.unused_data
    assert accepted > 50 and refused > 200  # both outcomes were exercised


def _dynamic_block(literal_lengths: dict[int, int], literals: bytes) -> bytes:
    """One final dynamic DEFLATE block, written bit by bit: the literal code's lengths as given (1 or 2
    bits; zlib would refuse an incomplete or over-subscribed code), two distance codes of 1 bit, the
    literals, end of block."""
    bits: list[int] = []

    def put(value: int, count: int) -> None:  # header fields: least significant bit first
        bits.extend((value >> k) & 1 for k in range(count))

    def put_code(code: int, length: int) -> None:  # Huffman codes: most significant bit first
        bits.extend((code >> (length - 1 - k)) & 1 for k in range(length))

    put(1, 1), put(2, 2), put(0, 5), put(1, 5), put(18 - 4, 4)  # final, dynamic, 257 literal and 2 distance codes
    code_length_lengths = {0: 1, 1: 2, 2: 2}  # code-length symbols 0, 1, 2: codes 0, 10, 11
    for symbol in (16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1):
        put(code_length_lengths.get(symbol, 0), 3)
    code_length_codes = {0: (0, 1), 1: (2, 2), 2: (3, 2)}
    for length in [literal_lengths.get(symbol, 0) for symbol in range(257)] + [1, 1]:
        put_code(*code_length_codes[length])
    codes, code = {}, 0
    for length in (1, 2):  # canonical codes, shortest first, then by symbol
        for symbol in sorted(s for s, n in literal_lengths.items() if n == length):
            codes[symbol] = (code, length)
            code += 1
        code <<= 1
    for symbol in [*literals, 256]:
        put_code(*codes[symbol])
    bits += [0] * (-len(bits) % 8)
    return bytes(sum(bit << k for k, bit in enumerate(bits[i : i + 8])) for i in range(0, len(bits), 8))


@pytest.mark.parametrize(
    "lengths,valid",
    [({65: 1, 66: 2, 256: 2}, True), ({65: 1, 256: 2}, False), ({65: 1, 66: 1, 256: 1}, False)],
    ids=["complete", "incomplete", "over-subscribed"],
)
def test_native_inflater_leaves_codes_zlib_refuses_to_zlib(lengths, valid):
    """A literal code that is incomplete or over-subscribed still decodes these literals, but zlib refuses it
    (ISA-L reads the incomplete one): the C inflater leaves such streams to the inflaters."""
    coded = _dynamic_block(lengths, b"AAA")
    stream, counts = _one_plane_stream(coded, 3)
    assert (entropy._native.inflate_stream(stream, counts) is not None) == valid
    if valid:
        assert entropy.inflate_planes(stream, counts)[1] == [b"AAA"] == [zlib.decompress(coded, -15)]
    else:
        with pytest.raises(zlib.error, match="invalid literal/lengths set"):
            zlib.decompress(coded, -15)


def test_native_inflater_agrees_with_zlib_on_fuzzed_streams_of_many_planes():
    """Planes inflate two at a time: a fuzzed stream of several contexts and widths is either refused or
    inflated to exactly what zlib gives for every plane."""
    rng = np.random.default_rng(5)
    contexts = torch.from_numpy(rng.integers(0, 6, 60_000).astype(np.uint8))
    symbols = torch.from_numpy(np.minimum(rng.geometric(0.01, 60_000), 70_000)) * (contexts.to(torch.int64) + 1)
    stream = entropy.encode(symbols, contexts)
    counts = entropy._native.histogram(contexts.numpy())
    assert entropy._native.inflate_stream(stream, counts) == entropy._read_stream(stream, np.frombuffer(counts, dtype=np.int64))
    accepted = refused = 0
    for _ in range(300):
        mutated = bytearray(stream)
        for _ in range(int(rng.integers(1, 3))):
            mutated[int(rng.integers(0, len(mutated)))] ^= 1 << int(rng.integers(8))
        inflated = entropy._native.inflate_stream(bytes(mutated), counts)
        if inflated is None:
            refused += 1
            continue
        accepted += 1
        assert inflated == entropy._read_stream(bytes(mutated), np.frombuffer(counts, dtype=np.int64))
    assert accepted > 30 and refused > 30


def test_native_inflater_wants_the_counts_of_256_contexts():
    with pytest.raises(ValueError, match="256 native int64"):
        entropy._native.inflate_stream(b"", bytes(8))


@pytest.mark.parametrize("case,block_type", [("one byte", 1), ("uniform 1M", 0), ("skewed 1M", 2)])
def test_each_block_is_the_cheapest_of_stored_fixed_and_dynamic(case, block_type):
    """A lone byte is cheapest with the fixed code, noise stored, skewed bytes with their own code."""
    plane = _plane(case)
    coded = _native_stream(plane)[5:]
    assert coded[0] & 1 == (len(plane) <= entropy.BLOCK_SYMBOLS) and (coded[0] >> 1) & 3 == block_type


@pytest.mark.parametrize(
    "arguments,message",
    [((1, 0), "blocks hold 1 to 65535 symbols, got 0"), ((1, 65536), "got 65536"), ((3, 4096), "symbol width must be 1, 2, 4 or 8")],
)
def test_encode_stream_refuses_bad_widths_and_block_sizes(arguments, message):
    itemsize, block_symbols = arguments
    with pytest.raises(ValueError, match=message):
        entropy._native.encode_stream(bytes(12), itemsize, bytes(4 if itemsize == 3 else 12), block_symbols)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_reconstruction_rounds_like_torch_over_every_scale_magnitude(dtype):
    """The C dequantize + cast gives torch's bits, float16 overflow to inf and subnormals included."""
    generator = torch.Generator().manual_seed(5)
    groups, group_size = 4096, 64
    scales = torch.arange(0, 0x7C00, 0x7C00 // groups, dtype=torch.int32)[:groups].to(torch.int16).view(torch.float16)
    codes = torch.randint(-(1 << 14), 1 << 14, (groups, group_size), dtype=torch.int32, generator=generator)
    offsets = torch.randint(-8, 8, (groups,), dtype=torch.int32, generator=generator)
    expected = ladder.dequantize(codes, scales, offsets, 4, 12).reshape(-1).to(dtype)
    dtype_code, bits_dtype = progressive._NATIVE_DTYPES[dtype]
    rebuilt = torch.empty_like(expected)
    contexts = torch.empty(expected.numel(), dtype=torch.uint8)
    entropy._native.reconstruct(
        codes.numpy(), scales.view(torch.int16).numpy(), offsets.numpy(), 4, 12, 12, group_size, dtype_code,
        rebuilt.view(bits_dtype).numpy(), contexts.numpy(), lossless.CONTEXT_MIN, lossless.CONTEXT_MAX, lossless.STEP_BITS,
    )  # fmt: skip
    assert torch.equal(rebuilt.view(bits_dtype), expected.view(bits_dtype))
    step = ladder.level_scales(scales, 4, 12).unsqueeze(1).expand(-1, group_size).reshape(-1)
    assert torch.equal(contexts, lossless.contexts(expected, step, lossless.STEP_BITS))
    assert (contexts & 3).unique().tolist() == [0, 1, 2, 3]  # the step's two leading mantissa bits, all four values
    if dtype == torch.float16:
        assert torch.isinf(expected).any() and (expected.abs() < torch.finfo(dtype).tiny).any()


def test_non_finite_scales_decode_on_the_torch_path_with_the_same_bits(monkeypatch):
    spec = progressive.Ladder(4, (8,), 64)
    weight = _weights(torch.bfloat16, (64, 256), seed=6)
    encoded = progressive.encode(weight, spec)
    scales = encoded.scales.clone()
    scales[3] = float("inf")
    scales[5] = float("nan")
    decoded = {}
    for native in ("", "1"):  # the base and the 8-bit stage (the lossless contexts change with the scales)
        monkeypatch.setenv("P2U_NO_NATIVE", native)
        decoded[native] = [
            progressive.decode(encoded.packed_codes, scales, encoded.offsets, encoded.deltas[:stage], spec, (64, 256), torch.bfloat16)
            for stage in (0, 1)
        ]
    for native, fallback in zip(decoded[""], decoded["1"]):
        assert torch.equal(native.view(torch.int16), fallback.view(torch.int16))
        assert torch.isnan(native).any() and torch.isinf(native).any()


def _adversarial_groups(group_size: int, seed: int) -> torch.Tensor:
    """Groups that take every branch of the grid search: steps from subnormal to saturated, NaN and infinities
    (read as 0), all zero, constant, signed zeros, a range that overflows float32, and equal errors (ties)."""
    generator = torch.Generator().manual_seed(seed)
    groups = torch.randn(600, group_size, generator=generator) * torch.logspace(-44, 38, 600).unsqueeze(1)
    groups[:40] = torch.randint(-8, 8, (40, group_size), generator=generator) * 0.25  # on-grid weights: many equal errors
    groups[40:60] = torch.randint(-3, 4, (20, 1), generator=generator) * 0.5  # constant groups: zero clipped step
    groups[60] = 0.0
    groups[61] = -0.0
    groups[62, ::2], groups[62, 1::2] = 3e38, -3e38  # max - min overflows to inf: saturated scales
    groups[63] = float("nan")
    groups[64, :4] = torch.tensor([float("nan"), float("inf"), float("-inf"), 1.0])
    groups[65:70, 0] = float("inf")
    groups[70:80] *= torch.finfo(torch.float32).tiny  # float32 subnormal weights
    groups[80:90] = groups[80:90].abs() + 1.0  # all positive: the grid must move, clamped offsets
    return groups


@pytest.mark.parametrize("group_size", [8, 64])
@pytest.mark.parametrize("bits", range(1, 9))
def test_c_grid_choice_is_the_reference_paths_bit_for_bit(monkeypatch, bits, group_size):
    """``_native.choose_grids`` picks the same float16 scales and offsets as the torch candidates + numpy sums."""
    groups = _adversarial_groups(group_size, seed=bits)
    monkeypatch.setenv("P2U_NO_NATIVE", "")
    native = ladder.base_grid(groups, bits)
    monkeypatch.setenv("P2U_NO_NATIVE", "1")
    fallback = ladder.base_grid(groups, bits)
    assert torch.equal(native[0].view(torch.int16), fallback[0].view(torch.int16))
    assert torch.equal(native[1], fallback[1])
    scales, offsets = native
    assert (offsets != 0).any() and (offsets == -(1 << (bits - 1))).any()  # asymmetric and clamped grids were chosen
    assert scales[62] == 63488 and scales[60] == 0 and scales[63] == 0  # saturated: float16's largest 4-bit mantissa
    assert (scales != ladder.base_scales(groups, bits)).any()  # clipped candidates win somewhere


@pytest.mark.parametrize("base_bits,bits,headroom", [(4, 8, 3), (1, 1, 0), (3, 5, 0), (8, 16, 3), (2, 10, 0)])
def test_c_quantize_gives_ladder_quantize_codes(base_bits, bits, headroom):
    """The encoder's C quantizer rounds like torch: NaN to the offset, infinities to the clamp, zero steps, clamped offsets."""
    groups = _adversarial_groups(64, seed=bits)
    groups[64, 4:8] = torch.tensor([float("inf"), float("-inf"), 3e38, -3e38])  # beside finite weights: a non-zero step
    scales, offsets = ladder.base_grid(groups, base_bits)
    offsets[300:310] = torch.tensor([-(1 << (base_bits - 1)), (1 << (base_bits - 1)) - 1] * 5)  # extreme offsets
    groups[300:310, :2] = torch.tensor([float("inf"), float("-inf")])  # +-limit plus an extreme offset: inside the clamp
    scales[110:115] = 0.0
    expected = ladder.quantize(groups, scales, offsets, base_bits, bits, headroom)
    codes = torch.empty_like(expected)
    entropy._native.quantize_groups(
        groups.numpy(), 64, scales.view(torch.int16).numpy(), offsets.numpy(), base_bits, bits, headroom, codes.numpy()
    )
    assert torch.equal(codes, expected)
    assert codes.max() == (1 << (bits - 1 + headroom)) - 1 and codes.min() == -(1 << (bits - 1 + headroom))  # the clamp acts


_F32, _I32, _U16 = np.float32, np.int32, np.uint16


@pytest.mark.parametrize(
    "function,arguments,message",
    [
        ("choose_grids", (np.zeros(10, _F32), 4, 4, np.ones(11, _F32), 4, np.zeros(2, _U16), np.zeros(2, _I32)), "do not make groups of 4"),
        ("choose_grids", (np.zeros(8, _F32), 8, 9, np.ones(11, _F32), 4, np.zeros(1, _U16), np.zeros(1, _I32)), "at 1 to 8 bits"),
        ("choose_grids", (np.zeros(8, _F32), 8, 4, np.ones(12, _F32), 4, np.zeros(1, _U16), np.zeros(1, _I32)), "at most 11"),
        ("choose_grids", (np.zeros(16, _F32), 8, 4, np.ones(11, _F32), 4, np.zeros(1, _U16), np.zeros(2, _I32)), "each of 2 groups"),
        ("choose_grids", (np.zeros(8, _F32), 8, 4, np.ones(11, _F32), 11, np.zeros(1, _U16), np.zeros(1, _I32)), "0 to 10 mantissa bits"),
        ("quantize_groups", (np.zeros(16, _F32), 8, np.zeros(2, _U16), np.zeros(2, _I32), 4, 3, 0, np.zeros(16, _I32)), "at 3 bits"),
        ("quantize_groups", (np.zeros(16, _F32), 8, np.zeros(2, _U16), np.zeros(1, _I32), 4, 8, 3, np.zeros(16, _I32)), "each of the 2"),
        ("quantize_groups", (np.zeros(16, _F32), 8, np.zeros(2, _U16), np.zeros(2, _I32), 4, 8, 3, np.zeros(15, _I32)), "each of the 2"),
        ("base_stage", (np.zeros(8, _I32), 8, 4, 8, np.zeros(4, np.uint8), np.zeros(8, np.uint8), None), "no 4-bit base with a stage to 8"),
        ("base_stage", (np.zeros(8, _I32), 8, 4, 8, np.zeros(3, np.uint8), np.zeros(8, np.uint8), np.zeros(8, _I32)), "need 4 packed"),
        ("base_stage", (np.zeros(8, _I32), 8, 4, 8, np.zeros(4, np.uint8), np.zeros(8, np.uint8), np.zeros(7, _I32)), "hold 28 and 32"),
        (
            "lossless_symbols",
            (np.zeros(8, _I32), np.zeros(1, _U16), np.zeros(1, _I32), 4, 8, 8, 1, np.zeros(8, np.int16), np.zeros(8, np.uint8))
            + (np.zeros(8, np.int64), -16, 47, 2),
            "one 4-byte residual each",
        ),
        (
            "lossless_symbols",
            (np.zeros(8, _I32), np.zeros(1, _U16), np.zeros(1, _I32), 4, 8, 8, 1, np.zeros(8, np.int16), np.zeros(8, np.uint8))
            + (np.zeros(8, np.uint32), -16, 47, 3),
            "lossless contexts \\[-16, 47\\] with 3 step bits do not fit a byte",
        ),
        (
            "lossless_symbols",
            (np.zeros(8, _I32), np.zeros(1, _U16), np.zeros(1, _I32), 4, 8, 8, 0, np.zeros(9, _F32), np.zeros(9, np.uint8))
            + (np.zeros(9, np.int64), -16, 47, 2),
            "9 elements need whole groups",
        ),
        ("stage_refinements", (np.zeros(8, _I32), 8, 4, 9, np.zeros(8, _I32), np.zeros(8, _I32)), "from 4 to 9 bits of 8-bit"),
        ("stage_refinements", (np.zeros(8, _I32), 8, 4, 8, np.zeros(7, _I32), np.zeros(8, _I32)), "of one length"),
    ],
)
def test_encoder_loops_refuse_buffers_that_do_not_fit(function, arguments, message):
    with pytest.raises(ValueError, match=message):
        getattr(entropy._native, function)(*arguments)


@pytest.mark.parametrize("bits", range(1, 9))
def test_packed_contexts_count_the_refinement_contexts_of_the_unpacked_codes(bits):
    """The fused decoder bounds the first stage's planes by this histogram, counted before any code is unpacked."""
    generator = torch.Generator().manual_seed(bits)
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (8 * 999,), dtype=torch.int32, generator=generator)
    packed = ladder.pack(codes, bits)
    contexts = torch.empty(codes.numel(), dtype=torch.uint8)
    expected = entropy._native.refinement_contexts(codes.numpy(), bits, contexts.numpy())
    assert entropy._native.packed_contexts(packed.numpy(), bits) == expected
    with pytest.raises(ValueError, match="not whole 3-bit codes"):
        entropy._native.packed_contexts(packed[:1].numpy(), 3)


def test_fused_decoder_rejects_planes_and_buffers_that_do_not_fit_its_codes():
    """Crafted counts, planes or sizes raise before the loop, so no cursor leaves its plane and no buffer is overrun."""
    spec = progressive.Ladder(4, (8,), 64)
    weight = _weights(torch.bfloat16, (64, 256), seed=7)
    encoded = progressive.encode(weight, spec)
    packed, native = encoded.packed_codes.numpy(), entropy._native
    offsets = progressive._group_offsets(encoded.offsets, spec, encoded.scales.numel()).numpy()
    stream = progressive._unframe(encoded.deltas[0], 1)[0]
    counts = native.packed_contexts(packed, 4)
    widths, planes = entropy.inflate_planes(stream, counts)
    out = torch.empty(weight.numel(), dtype=torch.int16).numpy()

    def decode(counts=counts, widths=widths, planes=planes, packed=packed, out=out):
        scale_bits = encoded.scales.view(torch.int16).numpy()
        return native.decode_refined(packed, 4, counts, widths, planes, 8, scale_bits, offsets, 8, 64, 1, out, None, -16, 47, 2)

    decode()
    expected = progressive.decode(
        encoded.packed_codes, encoded.scales, encoded.offsets, encoded.deltas[:1], spec, (64, 256), torch.bfloat16
    )
    assert torch.equal(torch.from_numpy(out), expected.view(torch.int16).reshape(-1))
    shifted = torch.frombuffer(bytearray(counts), dtype=torch.int64)
    first = int(shifted.nonzero()[0])
    shifted[first] -= 1
    shifted[first + 1] += 1
    with pytest.raises(ValueError, match="missing or not"):  # the true planes do not have the forged sizes
        decode(counts=shifted.numpy().tobytes())
    assert widths[first] == widths[first + 1] == 1
    with pytest.raises(ValueError, match="histogram is not the counts"):  # planes sized for the forged counts
        forged = [bytes(len(plane) + (index == 1) - (index == 0)) for index, plane in enumerate(planes)]
        decode(counts=shifted.numpy().tobytes(), planes=forged)
    with pytest.raises(ValueError, match="outputs"):
        decode(packed=packed[:-32])
    with pytest.raises(ValueError, match="outputs"):
        decode(out=torch.empty(weight.numel() + 64, dtype=torch.int16).numpy())


@pytest.mark.parametrize("width", [2, 4])
def test_symbol_readers_reject_contexts_whose_histogram_is_not_the_counts(width):
    """The readers check their pointers as they go: contexts crowding into one small run raise, with no read past the store."""
    n = 100_000
    symbols = torch.arange(n, dtype=torch.int64) % 251 * 65537  # three planes: 4-byte runs
    contexts = (torch.arange(n) % 7).to(torch.uint8)
    stream = entropy.encode(symbols, contexts)
    counts = entropy._native.histogram(contexts.numpy())
    widths, planes = entropy.inflate_planes(stream, counts)
    values = torch.zeros(n, dtype=torch.int16 if width == 2 else torch.int32)
    crowded = torch.full((n,), 6, dtype=torch.uint8)  # nearly every element reads the last run, of n / 7 symbols
    crowded[:6] = torch.arange(6, dtype=torch.uint8)
    with pytest.raises(ValueError, match="histogram is not the counts"):
        entropy._native.restore_planes(values.numpy(), crowded.numpy(), counts, widths, planes, width)
    codes = torch.zeros(n, dtype=torch.int32)
    with pytest.raises(ValueError, match="histogram is not the counts"):
        entropy._native.refine(codes.numpy(), crowded.numpy(), counts, widths, planes, 4, 8)
    unread = contexts.clone()
    unread[0] = 9  # a context without a run: its pointer passes its end at once
    with pytest.raises(ValueError, match="histogram is not the counts"):
        entropy._native.restore_planes(values.numpy(), unread.numpy(), counts, widths, planes, width)
    values.zero_()  # the failed calls left what they had restored
    entropy._native.restore_planes(values.numpy(), contexts.numpy(), counts, widths, planes, width)
    restored = entropy.decode(stream, contexts)
    expected = lossless.restore(torch.zeros_like(values).view(torch.float16 if width == 2 else torch.float32), restored)
    assert torch.equal(values, expected.view(values.dtype))
