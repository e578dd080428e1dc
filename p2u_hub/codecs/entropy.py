"""Context-grouped entropy coding of non-negative integer symbols.

Symbols are grouped by a context known to both encoder and decoder (the decoder derives
it from data it already has), so each group is a sharper distribution than the whole.
Within a group, symbols are split into little-endian byte planes; each plane is a raw DEFLATE
stream (RFC 1951) of literal-only blocks: Huffman coding of its bytes, no LZ77 matches. The
low planes of wide residuals are near uniform and cost their width (stored blocks); the top
plane carries the skewed part and is where Huffman coding pays. DEFLATE is in every
language's standard library, so the stream can be decoded anywhere (docs/format.md,
"Entropy stream"); any inflater reads it, and any valid raw DEFLATE plane is accepted.

The encoder is this module's own (below, and the same algorithm in ``_native``), not zlib's:
zlib in ``Z_HUFFMAN_ONLY`` mode still runs its match machinery over every byte (~7 ns per
byte); a histogram, a length-limited Huffman code and one table lookup per byte take ~1 ns
in C, and code within ~0.01% of zlib's bytes (blocks of the same size, each the cheapest of
stored, fixed and dynamic, as zlib chooses).

Stream layout, for each context id in increasing order that has at least one symbol:
``u8 packing << 4 | plane_count`` then ``plane_count`` x ``u32le compressed_length``, then the
planes' raw-DEFLATE bytes in plane order (least significant first).

*Packing*: when every byte of a context's top (last) plane fits 4 bits, ``2**packing`` of them
share each byte of that plane (``packing`` 1: 4-bit fields, 2: 2-bit, 3: 1-bit, the narrowest
that holds the plane's largest byte), byte ``i`` at bit ``(i mod 2**packing) * (8 >> packing)``
of packed byte ``i >> packing``, the last packed byte's unused bits 0. Huffman codes spend a
whole number of bits on each byte, at least one: on the sharp top planes (bfloat16 residuals of
an ulp or two, float32 residuals' top bits) that was up to 0.2 bits a symbol above the entropy,
and 1 bit against 0.06 on the sharpest; two to eight fields per byte share that rounding out.
``packing`` 0, a byte per byte, is the only layout before format version 5.

The grouping, the plane split / assembly, the encoder and the inflater of literal-only planes
run in ``_native`` (a C extension built with the package) when it is importable and
``P2U_NO_NATIVE`` is unset or empty; otherwise numpy and zlib do the same work. Both paths
write and read the same bytes.
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import Any

import numpy as np
import torch

_native: Any  # the C module, or None (native_enabled() guards every use)
try:
    from . import _native  # type: ignore[attr-defined,no-redef]  # built by setup.py when a C compiler is there
except ImportError:  # built without a C compiler: the numpy path below does the same work
    _native = None

_PLANE_COUNT = struct.Struct("<B")
_PLANE_LENGTH = struct.Struct("<I")
_PLANE_LENGTHS = [struct.Struct(f"<{count}I") for count in range(9)]  # a context's plane lengths, by plane count


class CorruptStreamError(ValueError):
    """The coded bytes do not decode to the expected number of symbols."""


def native_enabled() -> bool:
    """Whether the C loops run: the extension was built and ``P2U_NO_NATIVE`` is unset or empty."""
    return _native is not None and not os.environ.get("P2U_NO_NATIVE")


# ---- The encoder: Huffman-only raw DEFLATE (RFC 1951), the same bytes as _native.encode_stream ----
#
# A plane is cut into blocks of BLOCK_SYMBOLS bytes (the last one shorter, and final). Each block
# is coded as whichever of a stored, a fixed-code and a dynamic-code block takes the fewest bits
# (ties: stored, then fixed). A dynamic block's literal code covers the 256 byte values and
# end-of-block (HLIT 257); its distance code is two unused codes of length 1 (HDIST 2), as zlib
# writes it, so every inflater accepts the block. Bits are written least significant first, the
# plane's last byte padded with zeros.

BLOCK_SYMBOLS = 32768
"""Bytes per DEFLATE block, at most 65,535 (a stored block's limit). Fresh code tables this often
follow drifting statistics while headers stay ~0.1% of a block; on MiniLM's stages blocks of
16K to 64K bytes code within 0.05% of each other, and 32K (about zlib's) is smallest for float32."""

_END_OF_BLOCK = 256
_LITERALS = 257
_MAX_CODE_BITS = 15
_MAX_LENGTH_CODE_BITS = 7
_LENGTH_CODE_ORDER = np.array([16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15])
_DISTANCE_LENGTHS = np.array([1, 1])


def _code_lengths(freq: np.ndarray, limit: int) -> np.ndarray:
    """Huffman code lengths of ``freq``'s symbols, none longer than ``limit`` (0 for unused symbols).

    Exactly: the used symbols sorted by (frequency, symbol); Huffman's merges on two queues
    (sorted leaves, internal nodes in creation order), each merge taking the two lightest
    nodes, a leaf before a node of equal weight; a leaf's depth is its length. Depths past
    ``limit`` are cut to ``limit``; while Kraft's sum then exceeds 1, one code of length
    ``limit`` goes and the longest code shorter than ``limit`` splits into two one bit longer
    (so the sum ends exactly 1). The resulting count per length is dealt out shortest first
    to the most frequent symbols. A lone used symbol gets length 1.
    """
    used = np.flatnonzero(freq)
    order = used[np.argsort(freq[used], kind="stable")]
    lengths = np.zeros(len(freq), dtype=np.int64)
    if len(order) < 2:
        lengths[order] = 1
        return lengths
    weights = freq[order].tolist()
    n = len(weights)
    node_weight: list[int] = []
    leaf_parent, node_parent = [0] * n, [0] * (n - 1)
    leaf = node = 0
    for k in range(n - 1):
        total = 0
        for _ in range(2):
            if leaf < n and (node >= k or weights[leaf] <= node_weight[node]):
                total += weights[leaf]
                leaf_parent[leaf] = k
                leaf += 1
            else:
                total += node_weight[node]
                node_parent[node] = k
                node += 1
        node_weight.append(total)
    depth = [0] * (n - 1)
    for k in range(n - 3, -1, -1):
        depth[k] = depth[node_parent[k]] + 1
    count = np.bincount(np.minimum([depth[parent] + 1 for parent in leaf_parent], limit), minlength=limit + 1)
    kraft = int(np.sum(count[1:] << (limit - np.arange(1, limit + 1))))
    for _ in range(kraft - (1 << limit)):
        count[limit] -= 1
        shorter = np.flatnonzero(count[1:limit])[-1] + 1
        count[shorter] -= 1
        count[shorter + 1] += 2
    lengths[order[::-1]] = np.repeat(np.arange(limit + 1), count)
    return lengths


def _canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical codes of ``lengths`` (RFC 1951 3.2.2), bit-reversed: DEFLATE sends a code's first bit first."""
    count = np.bincount(lengths, minlength=_MAX_CODE_BITS + 1)
    count[0] = 0
    first = np.zeros(_MAX_CODE_BITS + 2, dtype=np.int64)
    for bits in range(1, _MAX_CODE_BITS + 1):
        first[bits] = (first[bits - 1] + count[bits - 1]) << 1
    order = np.lexsort((np.arange(len(lengths)), lengths))  # by length, then symbol
    start = np.cumsum(np.bincount(lengths)) - np.bincount(lengths)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order)) - start[lengths[order]]
    codes = first[lengths] + rank
    bit = np.arange(_MAX_CODE_BITS)  # bits at or past a code's length are 0: their terms vanish
    reversed_codes = np.sum(((codes[:, None] >> bit) & 1) << np.maximum(lengths[:, None] - 1 - bit, 0), axis=1)
    return reversed_codes * (lengths > 0)


def _run_length_code(lengths: np.ndarray) -> list[tuple[int, int, int]]:
    """(symbol, extra bits, extra value) of the code-length alphabet for ``lengths`` (RFC 1951 3.2.7).

    Per run of equal lengths: zeros as 18s of 138 (11 to 138 while at least 11 remain), then a
    17 (3 to 10); another length as itself once, then 16s of up to 6 repeats (at least 3); what
    is left of a run is written plainly.
    """
    items = []
    values = lengths.tolist()
    i = 0
    while i < len(values):
        value, run = values[i], 1
        while i + run < len(values) and values[i + run] == value:
            run += 1
        i += run
        if value == 0:
            while run >= 11:
                items.append((18, 7, min(run, 138) - 11))
                run -= min(run, 138)
            if run >= 3:
                items.append((17, 3, run - 3))
                run = 0
        else:
            items.append((value, 0, 0))
            run -= 1
            while run >= 3:
                items.append((16, 2, min(run, 6) - 3))
                run -= min(run, 6)
        items += [(value, 0, 0)] * run
    return items


def _fixed_literal_code() -> tuple[np.ndarray, np.ndarray]:
    """Codes (bit-reversed) and lengths of the 256 bytes and end-of-block in DEFLATE's fixed code (RFC 1951 3.2.6)."""
    lengths = np.array([8] * 144 + [9] * 112 + [7] * 24 + [8] * 8)
    return _canonical_codes(lengths)[:_LITERALS], lengths[:_LITERALS]


_FIXED_CODES, _FIXED_LENGTHS = _fixed_literal_code()


def _block_bits(block: np.ndarray, final: bool, position: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """The values and bit counts, in writing order, of one DEFLATE block of the bytes ``block``, and whether it is stored.

    A stored block's bits are its header; its bytes follow them unchanged.
    ``position`` is the plane's bit count so far (a stored block pads to a byte boundary).
    The block is stored, fixed-code or dynamic-code, whichever is fewest bits (ties: stored, then
    fixed). Dynamic: HLIT 257, HDIST 2, HCLEN the code-length code lengths in RFC order up to
    the last nonzero one (at least 4), the code-length code limited to 7 bits, of the run-length
    coded literal lengths then (separately) the distance lengths [1, 1].
    """
    freq = np.bincount(block, minlength=_LITERALS)
    freq[_END_OF_BLOCK] = 1
    lengths = _code_lengths(freq, _MAX_CODE_BITS)
    header = _run_length_code(lengths) + _run_length_code(_DISTANCE_LENGTHS)
    symbols = np.array([symbol for symbol, _, _ in header])
    length_lengths = _code_lengths(np.bincount(symbols, minlength=len(_LENGTH_CODE_ORDER)), _MAX_LENGTH_CODE_BITS)
    ordered = length_lengths[_LENGTH_CODE_ORDER]
    hclen = max(4, int(np.flatnonzero(ordered)[-1]) + 1)
    extra_bits = np.array([bits for _, bits, _ in header])
    dynamic = 3 + 5 + 5 + 4 + 3 * hclen + int(length_lengths[symbols].sum() + extra_bits.sum()) + int(freq @ lengths)
    fixed = 3 + int(freq @ _FIXED_LENGTHS)
    stored = 3 + (-(position + 3) % 8) + 32 + 8 * len(block)
    if stored <= min(fixed, dynamic):  # the header, padded to a byte boundary, then the bytes as they are
        return np.array([int(final), 0, len(block), ~len(block) & 0xFFFF]), np.array([3, -(position + 3) % 8, 16, 16]), True
    if fixed <= dynamic:
        head_values, head_bits = [int(final) | 1 << 1], [3]
        codes, lengths = _FIXED_CODES, _FIXED_LENGTHS
    else:
        length_codes = _canonical_codes(length_lengths)
        head_values = [int(final) | 2 << 1, 1 << 5 | (hclen - 4) << 10, *ordered[:hclen].tolist()]
        head_bits = [3, 14] + [3] * hclen
        for symbol, bits, extra in header:
            head_values += [int(length_codes[symbol]), extra]
            head_bits += [int(length_lengths[symbol]), bits]
        codes = _canonical_codes(lengths)
    literals = np.append(block, _END_OF_BLOCK)
    return np.concatenate([head_values, codes[literals]]), np.concatenate([head_bits, lengths[literals]]), False


def _pack_bits(values: np.ndarray, bits: np.ndarray) -> bytes:
    """Concatenate ``values[i]`` of ``bits[i]`` bits each (<= 16), least significant bit first, zero-padded to bytes.

    No two values share a bit, so a 32-bit word is the sum of every value's part in it: each
    value, shifted to its offset in its word, reaches into at most the next word; one
    ``bincount`` per word sums them (exactly: float64 holds 32-bit sums).
    """
    position = np.cumsum(bits) - bits
    shifted = values.astype(np.uint64) << (position & 31).astype(np.uint64)
    size = (int(position[-1] + bits[-1]) + 7) // 8
    word = position >> 5
    words = np.bincount(word, weights=(shifted & np.uint64(0xFFFFFFFF)).astype(np.float64), minlength=size // 4 + 2)
    words += np.bincount(word + 1, weights=(shifted >> np.uint64(32)).astype(np.float64), minlength=size // 4 + 2)
    return words.astype("<u4").tobytes()[:size]


def _deflate(plane: np.ndarray) -> bytes:
    """Raw DEFLATE of one byte plane (uint8, at least one byte), as _native.encode_stream codes it."""
    out = bytearray()
    values, bits = [], []
    position = 0  # bits written so far
    for start in range(0, len(plane), BLOCK_SYMBOLS):
        block = plane[start : start + BLOCK_SYMBOLS]
        block_values, block_bits, stored = _block_bits(block, start + BLOCK_SYMBOLS >= len(plane), position)
        values.append(block_values)
        bits.append(block_bits)
        position += int(block_bits.sum())
        if stored:  # the bits so far end on a byte boundary
            out += _pack_bits(np.concatenate(values), np.concatenate(bits)) + block.tobytes()
            values, bits = [], []
            position += 8 * len(block)
    if values:
        out += _pack_bits(np.concatenate(values), np.concatenate(bits))
    return bytes(out)


def _decompress(data, expected: int) -> bytes:
    """Inflate at most ``expected + 1`` bytes: a stream that would grow past its declared size stops there.

    Without the bound, a few MB of crafted DEFLATE would inflate to GBs before the size check.
    """
    stream = zlib.decompressobj(-15)
    try:
        raw = stream.decompress(data, expected + 1)
    except zlib.error as error:
        raise CorruptStreamError(f"DEFLATE stream does not decode ({error})") from None
    if len(raw) > expected:
        raise CorruptStreamError(f"DEFLATE stream holds more than the {expected} symbols expected")
    if len(raw) != expected or not stream.eof or stream.unconsumed_tail or stream.unused_data:
        raise CorruptStreamError(f"DEFLATE stream holds {len(raw)} symbols and does not end there; expected {expected}")
    return raw


MAX_SYMBOLS_PER_BYTE = 8 * 1032
"""The most symbols one byte of a stream can stand for: DEFLATE's largest ratio (a 258-byte match in 2 bits, 1,032
bytes a byte) times the 8 one-bit fields of a packed byte (``check_room``)."""


def check_room(stream_length: int, count: int, what: str) -> None:
    """Refuse ``count`` symbols from a stream of ``stream_length`` bytes before buffers of ``count`` are allocated.

    A count read from untrusted metadata (a manifest's shape) could otherwise claim terabytes for a few bytes of
    stream; no stream holds more than ``MAX_SYMBOLS_PER_BYTE`` symbols a byte.

    Raises:
        CorruptStreamError: ``count`` is more than such a stream can hold.
    """
    if count > stream_length * MAX_SYMBOLS_PER_BYTE:
        raise CorruptStreamError(f"{what} stored as a stream of {stream_length} bytes cannot hold {count} symbols")


def _context_keys(contexts: torch.Tensor) -> np.ndarray:
    keys = contexts.reshape(-1).numpy()
    if keys.dtype != np.uint8:
        raise TypeError(f"contexts must be uint8 (radix-sortable), got {keys.dtype}")
    return keys


def _group_order(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stable permutation that sorts elements by context, and the count per context."""
    return np.argsort(keys, kind="stable"), np.bincount(keys, minlength=256)


def encode(symbols: torch.Tensor, contexts: torch.Tensor) -> bytes:
    """Code non-negative integer ``symbols`` grouped by uint8 ``contexts`` (same shape).

    Any integer dtype gives the same stream (planes are the values' bytes); narrower symbols are
    read faster (int32 instead of int64 saves ~1 ns per symbol in C).
    """
    keys = _context_keys(contexts)
    values = symbols.reshape(-1).numpy()
    if native_enabled():
        return _native.encode_stream(values, values.itemsize, keys, BLOCK_SYMBOLS)
    order, counts = _group_order(keys)
    ordered = values[order].astype("<u8", copy=False)
    widths, packings, coded = [], [], []
    for start, stop in zip(np.cumsum(counts) - counts, np.cumsum(counts)):
        if start == stop:
            continue
        group = ordered[start:stop]
        largest = int(group.max())
        widths.append((largest.bit_length() + 7) // 8)
        packings.append(_packing(largest >> (8 * widths[-1] - 8)) if widths[-1] else 0)
        planes = group.view(np.uint8).reshape(-1, 8)
        coded += [_deflate(np.ascontiguousarray(planes[:, p])) for p in range(widths[-1] - 1)]
        if widths[-1]:  # all zero: no plane
            top = planes[:, widths[-1] - 1]
            coded.append(_deflate(_pack_symbols(top, packings[-1]) if packings[-1] else np.ascontiguousarray(top)))
    return _write_stream(widths, packings, coded)


def _packing(largest: int) -> int:
    """How many top-plane bytes up to ``largest`` a packed byte holds, as a power of two (0: too wide to pack)."""
    return 3 if largest < 2 else 2 if largest < 4 else 1 if largest < 16 else 0


def _packed_size(count: int, packing: int) -> int:
    """Bytes of a plane of ``count`` bytes packed ``2**packing`` to a byte."""
    return -(-count >> packing)


def _field_shifts(packing: int) -> np.ndarray:
    """Where each field of a packed byte starts: ``2**packing`` fields of ``8 >> packing`` bits, lowest first."""
    return np.arange(0, 8, 8 >> packing, dtype=np.uint8)


def _pack_symbols(symbols: np.ndarray, packing: int) -> np.ndarray:
    """A plane's uint8 ``symbols`` (its bytes) packed ``2**packing`` to a byte (the module docstring's layout)."""
    padded = np.zeros(_packed_size(symbols.size, packing) << packing, dtype=np.uint8)
    padded[: symbols.size] = symbols
    return np.bitwise_or.reduce(padded.reshape(-1, 1 << packing) << _field_shifts(packing), axis=1).astype(np.uint8)


def _unpack_symbols(packed: bytes, count: int, packing: int, context: int) -> bytes:
    """Inverse of ``_pack_symbols``: ``count`` symbols a byte each; the last byte's unused bits must be 0."""
    fields = np.frombuffer(packed, dtype=np.uint8)[:, None] >> _field_shifts(packing)
    symbols = (fields & ((1 << (8 >> packing)) - 1)).reshape(-1)
    if symbols[count:].any():
        raise CorruptStreamError(f"context {context}: the packed plane's last byte has bits set beyond its {count} symbols")
    return symbols[:count].tobytes()


def _write_stream(widths: list[int], packings: list[int], coded: list[bytes]) -> bytes:
    """The stream from each present context's plane count and packing and all coded planes in stream order."""
    out = bytearray()
    planes = iter(coded)
    for width, packing in zip(widths, packings):
        group = [next(planes) for _ in range(width)]
        out += _PLANE_COUNT.pack(packing << 4 | width)
        for data in group:
            out += _PLANE_LENGTH.pack(len(data))
        for data in group:
            out += data
    return bytes(out)


def decode(stream: bytes | memoryview, contexts: torch.Tensor) -> torch.Tensor:
    """Inverse of ``encode``: the symbols, shaped like ``contexts``.

    Their dtype is the narrowest of uint8, int32 and int64 that holds the widest context's
    byte planes (1, 3 and 8 planes): most symbols fit one byte, and narrow ones move less memory.

    Raises:
        CorruptStreamError: the stream is truncated, has trailing bytes or does not
            decode to one symbol per context entry.
    """
    keys = _context_keys(contexts)
    if native_enabled():
        counts = _native.histogram(keys)
        widths, planes = inflate_planes(stream, counts)
        symbols = np.empty(keys.size, dtype=_symbol_dtype(max(widths)))
        _native.join_planes(planes, counts, widths, keys, symbols, symbols.itemsize)
    else:
        order, counts = _group_order(keys)
        widths, planes = _read_stream(stream, counts)
        ordered = np.zeros(keys.size, dtype="<u8")
        start = 0
        arrays = iter(planes)
        for context in np.flatnonzero(counts):
            stop = start + int(counts[context])
            for plane_index in range(widths[context]):
                ordered[start:stop] |= np.frombuffer(next(arrays), dtype=np.uint8).astype("<u8") << np.uint64(8 * plane_index)
            start = stop
        symbols = np.empty(keys.size, dtype=_symbol_dtype(max(widths)))
        symbols[order] = ordered.view(np.int64).astype(symbols.dtype, copy=False)
    return torch.from_numpy(symbols).reshape(contexts.shape)


def inflate_planes(stream: bytes | memoryview, counts: bytes) -> tuple[bytes, list[bytes]]:
    """Each context's plane count (256 bytes) and its inflated planes in stream order, for the C loops.

    ``counts`` is the histogram of the decoder's contexts as the C loops return it (256 native
    int64): it bounds every plane's inflated size. ``_native.inflate_stream`` inflates the whole
    stream in one call without the GIL when it can prove every plane (the literal-only blocks
    this module writes); any other stream, valid or not, is inflated plane by plane by zlib,
    which decodes any raw DEFLATE and names what is wrong with the rest.

    Raises:
        CorruptStreamError: the stream does not parse or a plane does not hold its context's count.
    """
    if native_enabled() and (inflated := _native.inflate_stream(stream, counts)) is not None:
        return inflated
    return _read_stream(stream, np.frombuffer(counts, dtype=np.int64))


def _symbol_dtype(plane_count: int) -> np.dtype:
    """uint8 up to one byte plane, int32 up to three, else int64 (the type torch handles for each)."""
    return np.dtype(np.uint8 if plane_count <= 1 else np.int32 if plane_count <= 3 else np.int64)


def _read_stream(stream: bytes | memoryview, counts: np.ndarray) -> tuple[bytes, list[bytes]]:
    """Each context's plane count (256 bytes) and the inflated planes in stream order, checked against ``counts``.

    Plain Python ints and one ``struct`` call per context: a block has about a hundred planes, and
    the per-plane bookkeeping cost as much as a tenth of inflating them.
    """
    widths = bytearray(256)
    planes = []
    view = memoryview(stream)
    end = len(view)
    sizes = counts.tolist()
    offset = 0
    for context in np.flatnonzero(counts).tolist():
        if offset >= end:
            raise CorruptStreamError("stream is truncated")
        plane_count, packing = view[offset] & 15, view[offset] >> 4
        if plane_count > 8:
            raise CorruptStreamError(f"context {context} claims {plane_count} byte planes; symbols have at most 8")
        if packing > 3 or (packing and not plane_count):
            raise CorruptStreamError(f"context {context} packs its top plane {1 << packing} to a byte in {plane_count} planes")
        widths[context] = plane_count
        offset += _PLANE_COUNT.size
        try:
            lengths = _PLANE_LENGTHS[plane_count].unpack_from(view, offset)
        except struct.error:
            raise CorruptStreamError("stream is truncated") from None
        offset += plane_count * _PLANE_LENGTH.size
        for index, length in enumerate(lengths):
            stop = offset + length
            if stop > end:
                raise CorruptStreamError("stream is truncated")
            if packing and index == plane_count - 1:
                packed = _decompress(view[offset:stop], _packed_size(sizes[context], packing))
                planes.append(_unpack_symbols(packed, sizes[context], packing, context))
            else:
                planes.append(_decompress(view[offset:stop], sizes[context]))
            offset = stop
    if offset != end:
        raise CorruptStreamError(f"stream has {end - offset} unexpected trailing bytes")
    return bytes(widths), planes
