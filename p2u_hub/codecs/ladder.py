"""Nested integer ladder: group-wise mid-rise quantization whose low-bit codes are bit
prefixes of the high-bit codes.

Arithmetic (see docs/format.md, "Ladder"):

* A tensor is flattened (row-major), zero-padded to a multiple of ``group_size`` and cut
  into groups of ``group_size`` consecutive elements.
* Each group has one scale for the base width ``b``: ``s_b = fp16(absmax / (2**(b-1) - 0.5))``.
  A width ``h >= b`` uses ``s_h = s_b * 2**-(h-b)`` (exact in float32).
* Codes are mid-rise: ``v_h = clamp(floor(w / s_h), -2**(h-1), 2**(h-1) - 1)`` and the
  reconstruction is ``(v_h + 0.5) * s_h``. Every bin at width ``l`` is the union of
  ``2**(h-l)`` bins at width ``h``, so ``v_l = v_h >> (h-l)`` (arithmetic shift) exactly,
  and raising ``l`` to ``h`` needs only the ``h-l`` low bits ``v_h & (2**(h-l) - 1)``.
  This is the Matryoshka / Double Rounding ladder ``q_low = round(q_high / 2**(h-l))``
  written for a mid-rise grid, where floor replaces round and no clipping is ever needed.
* Dequantization is one float32 multiply of exact operands, so it gives the same bits on
  every IEEE-754 machine; the lossless stage relies on that.
"""

from __future__ import annotations

import numpy as np
import torch

SCALE_DTYPE = torch.float16
_SCALE_MAX = torch.finfo(SCALE_DTYPE).max


def group_count(numel: int, group_size: int) -> int:
    """Number of groups a tensor of ``numel`` elements is cut into (the last one padded)."""
    return -(-numel // group_size)


def to_groups(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Flatten ``weight`` to float32, zero-pad it and view it as ``(groups, group_size)``."""
    flat = weight.detach().reshape(-1).to(torch.float32)
    padding = group_count(flat.numel(), group_size) * group_size - flat.numel()
    if padding:
        flat = torch.nn.functional.pad(flat, (0, padding))
    return flat.view(-1, group_size)


def base_scales(groups: torch.Tensor, bits: int) -> torch.Tensor:
    """One float16 scale per group so that the outermost base level sits on the group's absmax.

    Non-finite weights are ignored when taking the absmax (the lossless stage restores
    them); scales saturate at the float16 maximum instead of becoming infinite.
    """
    finite = torch.nan_to_num(groups, nan=0.0, posinf=0.0, neginf=0.0)
    absmax = finite.abs().amax(dim=1)
    scales = absmax / (2.0 ** (bits - 1) - 0.5)
    return scales.clamp(max=_SCALE_MAX).to(SCALE_DTYPE)


def level_scales(scales: torch.Tensor, base_bits: int, bits: int) -> torch.Tensor:
    """Float32 scale of width ``bits`` derived exactly from the base scales: ``s_b * 2**-(bits-b)``."""
    return scales.to(torch.float32) * (2.0 ** (base_bits - bits))


def quantize(groups: torch.Tensor, scales: torch.Tensor, base_bits: int, bits: int) -> torch.Tensor:
    """Signed mid-rise codes of width ``bits`` (int32, shape of ``groups``)."""
    step = level_scales(scales, base_bits, bits).unsqueeze(1)
    ratio = torch.where(step > 0, groups / step, torch.zeros_like(groups))
    limit = 2.0 ** (bits - 1)
    ratio = torch.nan_to_num(ratio, nan=0.0, posinf=limit, neginf=-limit)
    return ratio.floor().clamp(-limit, limit - 1).to(torch.int32)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, base_bits: int, bits: int) -> torch.Tensor:
    """Float32 reconstruction ``(v + 0.5) * s_bits`` of signed codes of width ``bits``."""
    step = level_scales(scales, base_bits, bits).unsqueeze(1)
    return (codes.to(torch.float32) + 0.5) * step


def coarsen(codes: torch.Tensor, from_bits: int, to_bits: int) -> torch.Tensor:
    """Codes of width ``to_bits`` from codes of width ``from_bits``: an arithmetic right shift."""
    return codes >> (from_bits - to_bits)


def refinement_bits(codes: torch.Tensor, from_bits: int, to_bits: int) -> torch.Tensor:
    """The ``to_bits - from_bits`` low bits that raise ``coarsen(codes, to_bits, from_bits)`` to ``codes``."""
    return codes & ((1 << (to_bits - from_bits)) - 1)


def refine(coarse: torch.Tensor, low_bits: torch.Tensor, from_bits: int, to_bits: int) -> torch.Tensor:
    """Inverse of ``refinement_bits``: append ``low_bits`` below the coarse codes."""
    return (coarse << (to_bits - from_bits)) | low_bits.to(coarse.dtype)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed ``bits``-wide codes (``bits <= 8``) into a little-endian bit stream.

    Codes are offset to unsigned (``v + 2**(bits-1)``); code ``i`` occupies stream bits
    ``[i*bits, (i+1)*bits)``, bit ``k`` of the stream being bit ``k % 8`` of byte ``k // 8``.
    So 8 codes fill exactly ``bits`` bytes, and for ``bits=4`` code ``2j`` is the low nibble
    of byte ``j``.
    """
    unsigned = (codes.reshape(-1).numpy() + (1 << (bits - 1))).astype(np.uint8)
    bit_matrix = np.unpackbits(unsigned[:, None], axis=1, bitorder="little")[:, :bits]
    return torch.from_numpy(np.packbits(bit_matrix.reshape(-1), bitorder="little"))


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack``: signed int32 codes, 8 for every ``bits`` bytes.

    Pure torch so that packed weights can be expanded on any device inside ``forward``.
    """
    return unpack_unsigned(packed, bits).reshape(-1).to(torch.int32) - (1 << (bits - 1))


def unpack_unsigned(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The stored unsigned codes ``v + 2**(bits-1)``, flat: uint8 when ``bits`` divides 8 (byte-wide ops only), else int64."""
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed.reshape(-1, 1) >> shifts) & ((1 << bits) - 1)).reshape(-1)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    words = (packed.reshape(-1, bits).to(torch.int64) << byte_shifts).sum(dim=1, keepdim=True)
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * bits
    return ((words >> shifts) & ((1 << bits) - 1)).reshape(-1)


def dequantize_packed(packed: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``dequantize`` at the base width straight from packed codes: float32, shape ``(groups, group_size)``.

    The same bits as ``dequantize(unpack(...))``: ``u - (2**(bits-1) - 0.5)`` equals ``v + 0.5``
    exactly in float32, and the one multiply is the same. It skips the signed int32 codes, about
    5x faster, which is what a packed layer pays in every forward.
    """
    values = unpack_unsigned(packed, bits).view(-1, group_size).to(torch.float32)
    return values.sub_((1 << (bits - 1)) - 0.5).mul_(scales.to(torch.float32).unsqueeze(1))
