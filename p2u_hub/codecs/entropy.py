"""Context-grouped entropy coding of non-negative integer symbols.

Symbols are grouped by a context known to both encoder and decoder (the decoder derives
it from data it already has), so each group is a sharper distribution than the whole.
Within a group, symbols are split into little-endian byte planes; each plane is coded
with DEFLATE in Huffman-only mode (RFC 1951, raw stream, ``Z_HUFFMAN_ONLY``). The
low planes of wide residuals are near uniform and cost their width; the top plane carries
the skewed part and is where Huffman coding pays. DEFLATE is in every language's
standard library, so the stream can be decoded anywhere (docs/format.md, "Entropy stream").

Stream layout, for each context id in increasing order that has at least one symbol:
``u8 plane_count`` then ``plane_count`` x ``u32le compressed_length``, then the planes'
raw-DEFLATE bytes in plane order (least significant first).

The grouping and the plane split / assembly run in ``_native`` (a C extension built with the
package) when it is importable and ``P2U_NO_NATIVE`` is unset or empty, and planes inflate
with ISA-L when ``isal`` is installed; otherwise numpy and zlib do the same work. Both paths
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
_isal_zlib: Any
try:
    from . import _native  # type: ignore[attr-defined,no-redef]  # built by setup.py when a C compiler is there
except ImportError:  # built without a C compiler: the numpy path below does the same work
    _native = None
try:  # ISA-L inflates the same raw DEFLATE ~1.8x faster than zlib (extra "fast"); encoding stays zlib
    from isal import isal_zlib as _isal_zlib  # type: ignore[no-redef]
except ImportError:
    _isal_zlib = None

_PLANE_COUNT = struct.Struct("<B")
_PLANE_LENGTH = struct.Struct("<I")
_PLANE_LENGTHS = [struct.Struct(f"<{count}I") for count in range(9)]  # a context's plane lengths, by plane count


class CorruptStreamError(ValueError):
    """The coded bytes do not decode to the expected number of symbols."""


def native_enabled() -> bool:
    """Whether the C loops run: the extension was built and ``P2U_NO_NATIVE`` is unset or empty."""
    return _native is not None and not os.environ.get("P2U_NO_NATIVE")


def _compress(plane) -> bytes:
    coder = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY)
    return coder.compress(plane) + coder.flush()


def _decompress(data, expected: int, inflater=zlib) -> bytes:
    """Inflate at most ``expected + 1`` bytes: a stream that would grow past its declared size stops there.

    Without the bound, a few MB of crafted DEFLATE would inflate to GBs before the size check.
    ``inflater`` is ``zlib`` or ``isal.isal_zlib`` (same raw DEFLATE, same ``decompressobj`` API).
    """
    stream = inflater.decompressobj(-15)
    try:
        raw = stream.decompress(data, expected + 1)
    except inflater.error as error:
        raise CorruptStreamError(f"DEFLATE stream does not decode ({error})") from None
    if len(raw) > expected:
        raise CorruptStreamError(f"DEFLATE stream holds more than the {expected} symbols expected")
    if len(raw) != expected or not stream.eof or stream.unconsumed_tail or stream.unused_data:
        raise CorruptStreamError(f"DEFLATE stream holds {len(raw)} symbols and does not end there; expected {expected}")
    return raw


def _context_keys(contexts: torch.Tensor) -> np.ndarray:
    keys = contexts.reshape(-1).numpy()
    if keys.dtype != np.uint8:
        raise TypeError(f"contexts must be uint8 (radix-sortable), got {keys.dtype}")
    return keys


def _group_order(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stable permutation that sorts elements by context, and the count per context."""
    return np.argsort(keys, kind="stable"), np.bincount(keys, minlength=256)


def encode(symbols: torch.Tensor, contexts: torch.Tensor) -> bytes:
    """Code non-negative int64 ``symbols`` grouped by uint8 ``contexts`` (same shape)."""
    keys = _context_keys(contexts)
    values = symbols.reshape(-1).numpy()
    if native_enabled():
        counts, widths, planes = _native.split_planes(values, values.itemsize, keys)
        counts = np.frombuffer(counts, dtype=np.int64)
        sizes = [int(counts[context]) for context in np.flatnonzero(counts) for _ in range(widths[context])]
        offsets = np.cumsum([0, *sizes]).tolist()
        view = memoryview(planes)
        coded = [_compress(view[offsets[i] : offsets[i + 1]]) for i in range(len(sizes))]
        return _write_stream([widths[context] for context in np.flatnonzero(counts)], coded)
    order, counts = _group_order(keys)
    ordered = values[order].astype("<u8", copy=False)
    widths, coded = [], []
    for start, stop in zip(np.cumsum(counts) - counts, np.cumsum(counts)):
        if start == stop:
            continue
        group = ordered[start:stop]
        widths.append((int(group.max()).bit_length() + 7) // 8)
        planes = group.view(np.uint8).reshape(-1, 8)
        coded += [_compress(np.ascontiguousarray(planes[:, p])) for p in range(widths[-1])]
    return _write_stream(widths, coded)


def _write_stream(widths: list[int], coded: list[bytes]) -> bytes:
    """The stream from each present context's plane count and all coded planes in stream order."""
    out = bytearray()
    planes = iter(coded)
    for width in widths:
        group = [next(planes) for _ in range(width)]
        out += _PLANE_COUNT.pack(width)
        for data in group:
            out += _PLANE_LENGTH.pack(len(data))
        for data in group:
            out += data
    return bytes(out)


def decode(stream: bytes, contexts: torch.Tensor) -> torch.Tensor:
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
        widths, planes = _read_stream(stream, np.frombuffer(counts, dtype=np.int64), _isal_zlib or zlib)
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


def inflate_planes(stream: bytes, counts: bytes) -> tuple[bytes, list[bytes]]:
    """Each context's plane count (256 bytes) and its inflated planes in stream order, for the C loops.

    ``counts`` is the histogram of the decoder's contexts as the C loops return it (256 native
    int64): it bounds every plane's inflated size. ISA-L inflates when installed.

    Raises:
        CorruptStreamError: the stream does not parse or a plane does not hold its context's count.
    """
    return _read_stream(stream, np.frombuffer(counts, dtype=np.int64), _isal_zlib or zlib)


def _symbol_dtype(plane_count: int) -> np.dtype:
    """uint8 up to one byte plane, int32 up to three, else int64 (the type torch handles for each)."""
    return np.dtype(np.uint8 if plane_count <= 1 else np.int32 if plane_count <= 3 else np.int64)


def _read_stream(stream: bytes, counts: np.ndarray, inflater=zlib) -> tuple[bytes, list[bytes]]:
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
        plane_count = view[offset]
        if plane_count > 8:
            raise CorruptStreamError(f"context {context} claims {plane_count} byte planes; symbols have at most 8")
        widths[context] = plane_count
        offset += _PLANE_COUNT.size
        try:
            lengths = _PLANE_LENGTHS[plane_count].unpack_from(view, offset)
        except struct.error:
            raise CorruptStreamError("stream is truncated") from None
        offset += plane_count * _PLANE_LENGTH.size
        for length in lengths:
            stop = offset + length
            if stop > end:
                raise CorruptStreamError("stream is truncated")
            planes.append(_decompress(view[offset:stop], sizes[context], inflater))
            offset = stop
    if offset != end:
        raise CorruptStreamError(f"stream has {end - offset} unexpected trailing bytes")
    return bytes(widths), planes
