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
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import torch

_PLANE_COUNT = struct.Struct("<B")
_PLANE_LENGTH = struct.Struct("<I")


class CorruptStreamError(ValueError):
    """The coded bytes do not decode to the expected number of symbols."""


def _compress(plane: np.ndarray) -> bytes:
    coder = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY)
    return coder.compress(plane.tobytes()) + coder.flush()


def _decompress(data: bytes, expected: int) -> np.ndarray:
    """Inflate at most ``expected + 1`` bytes: a stream that would grow past its declared size stops there.

    Without the bound, a few MB of crafted DEFLATE would inflate to GBs before the size check.
    """
    inflater = zlib.decompressobj(-15)
    try:
        raw = inflater.decompress(data, expected + 1)
    except zlib.error as error:
        raise CorruptStreamError(f"DEFLATE stream does not decode ({error})") from None
    if len(raw) > expected:
        raise CorruptStreamError(f"DEFLATE stream holds more than the {expected} symbols expected")
    if len(raw) != expected or not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        raise CorruptStreamError(f"DEFLATE stream holds {len(raw)} symbols and does not end there; expected {expected}")
    return np.frombuffer(raw, dtype=np.uint8)


def _group_order(contexts: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Stable permutation that sorts elements by context, and the count per context."""
    keys = contexts.reshape(-1).numpy()
    if keys.dtype != np.uint8:
        raise TypeError(f"contexts must be uint8 (radix-sortable), got {keys.dtype}")
    order = np.argsort(keys, kind="stable")
    counts = np.bincount(keys, minlength=int(keys.max(initial=0)) + 1)
    return order, counts


def encode(symbols: torch.Tensor, contexts: torch.Tensor) -> bytes:
    """Code non-negative int64 ``symbols`` grouped by uint8 ``contexts`` (same shape)."""
    order, counts = _group_order(contexts)
    ordered = symbols.reshape(-1).numpy()[order].astype("<u8", copy=False)
    out = bytearray()
    start = 0
    for count in counts[counts > 0]:
        group = ordered[start : start + count]
        start += count
        top = int(group.max())
        plane_count = (top.bit_length() + 7) // 8
        planes = group.view(np.uint8).reshape(-1, 8)
        coded = [_compress(np.ascontiguousarray(planes[:, p])) for p in range(plane_count)]
        out += _PLANE_COUNT.pack(plane_count)
        for data in coded:
            out += _PLANE_LENGTH.pack(len(data))
        for data in coded:
            out += data
    return bytes(out)


def decode(stream: bytes, contexts: torch.Tensor) -> torch.Tensor:
    """Inverse of ``encode``: int64 symbols shaped like ``contexts``.

    Raises:
        CorruptStreamError: the stream is truncated, has trailing bytes or does not
            decode to one symbol per context entry.
    """
    order, counts = _group_order(contexts)
    ordered = np.zeros(order.size, dtype="<u8")
    view = memoryview(stream)
    offset = start = 0
    try:
        for count in counts[counts > 0]:
            (plane_count,) = _PLANE_COUNT.unpack_from(view, offset)
            if plane_count > 8:
                raise CorruptStreamError(f"{plane_count} byte planes declared; symbols have at most 8")
            offset += _PLANE_COUNT.size
            lengths = [_PLANE_LENGTH.unpack_from(view, offset + i * _PLANE_LENGTH.size)[0] for i in range(plane_count)]
            offset += plane_count * _PLANE_LENGTH.size
            group = np.zeros(count, dtype="<u8")
            for plane_index, length in enumerate(lengths):
                if offset + length > len(stream):
                    raise CorruptStreamError("stream is truncated")
                plane = _decompress(view[offset : offset + length], int(count))
                group |= plane.astype("<u8") << np.uint64(8 * plane_index)
                offset += length
            ordered[start : start + count] = group
            start += count
    except struct.error:
        raise CorruptStreamError("stream is truncated") from None
    if offset != len(stream):
        raise CorruptStreamError(f"stream has {len(stream) - offset} unexpected trailing bytes")
    symbols = np.empty_like(ordered)
    symbols[order] = ordered
    return torch.from_numpy(symbols.view(np.int64)).reshape(contexts.shape)
