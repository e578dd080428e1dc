"""Nested integer ladder: group-wise mid-rise quantization on an asymmetric, clipped grid whose
low-bit codes are bit prefixes of the high-bit codes.

Arithmetic (see docs/format.md, "The ladder"):

* A tensor is flattened (row-major), zero-padded to a multiple of ``group_size`` and cut
  into groups of ``group_size`` consecutive elements.
* Each group has a float16 scale ``s_b`` for the base width ``b`` and an integer *offset*
  ``o`` in ``[-2**(b-1), 2**(b-1))`` (in base steps) that moves the grid towards the group's
  weights: an asymmetric grid. A width ``h >= b`` uses ``s_h = s_b * 2**-(h-b)`` and the
  offset ``o * 2**(h-b)`` (both exact).
* Codes are mid-rise: ``v_h = floor(w / s_h + o * 2**(h-b))`` and the reconstruction is
  ``(v_h - o * 2**(h-b) + 0.5) * s_h``. Every bin at width ``l`` is the union of ``2**(h-l)``
  bins at width ``h``, so ``v_l = v_h >> (h-l)`` (arithmetic shift) exactly: the Matryoshka /
  Double Rounding ladder ``q_low = round(q_high / 2**(h-l))`` written for a mid-rise grid.
  The base codes are clamped to ``[-2**(b-1), 2**(b-1))``; the top codes have headroom
  beyond it, so raising ``l`` to ``h`` needs the ``h-l`` low bits of ``v_h``, plus, for the
  few weights the base clamped, how far outside they lie (``refinement``).
* ``s_b`` and ``o`` are chosen per group by a search (``base_grid``) minimising the squared
  weight error at the base width: the grid may clip a few outlying weights in the base, which
  the first stage puts back. Only the base grid is searched; every higher width derives from
  it, which is what keeps the ladder nested.
* Dequantization is exact or correctly rounded float32 arithmetic, so it gives the same bits
  on every IEEE-754 machine; the lossless stage relies on that. With every offset 0 and the
  absmax scale the grid is the symmetric one of format versions 1-2, bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from .entropy import _native, native_enabled

SCALE_DTYPE = torch.float16
SCALE_MANTISSA_BITS = 4
"""Mantissa bits (of float16's 10) a scale ``base_grid`` chooses keeps: a normal scale is ``(1 + j / 16) * 2**e``, within
3.2% of the candidate value it rounds (a subnormal one, a few tiny groups', keeps its bits).

Why: the grid search's clip ratios are 5% apart, so finer scales buy the base almost nothing (MiniLM fp32,
4-bit budget: relative squared weight error of the base 1.6834e-2 with full float16 scales, 1.6863e-2 with
4 bits), while every dropped bit saves bytes twice: ~42 KB in the scales' stream and, measured rather than
modelled, ~65 KB in the lossless stage (MiniLM fp32, ``--compact-base``: scales 465 -> 210 KB, lossless stage
53.06 -> 52.67 MB, 0.64 MB or 0.84% of the release; 3 bits would save 0.09 MB more at 2.8% more weight error).
Readers take any float16 scale."""
_SCALE_MAX_PATTERN = 0x7BFF & -(1 << (10 - SCALE_MANTISSA_BITS))
"""The largest float16 with ``SCALE_MANTISSA_BITS`` mantissa bits (63488 at 4): where scales saturate."""
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))
"""Fractions of a group's weight range the base grid search tries to cover (1.0 down to 0.5)."""
_FLOAT32_RATIOS = np.array(CLIP_RATIOS, dtype=np.float32)
"""The ratios as torch multiplies a float32 tensor by them: rounded to float32 first."""


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
    """Symmetric float16 scales (offset 0): the outermost base level sits on the group's absmax (to the scale's precision).

    The grid of format versions 1-2, and the first candidate of ``base_grid``. Non-finite
    weights are ignored (the lossless stage restores them); scales saturate at the largest
    scale (``_to_scale``) instead of becoming infinite.
    """
    absmax = _finite(groups).abs().amax(dim=1)
    return _to_scale(absmax / (2.0 ** (bits - 1) - 0.5))


def base_grid(groups: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the float16 scale and integer offset of the base grid with the least squared error.

    Candidates (each scale rounded to ``SCALE_MANTISSA_BITS``): the symmetric absmax grid (so the result is
    never worse than it), and for every ratio ``r`` in ``CLIP_RATIOS`` a grid of ``2**bits`` steps covering ``r`` times the group's
    range ``[min, max]``, centred on the range's middle with the offset rounded down and up
    (both: the choice also sets the sign of the group's mean error, which the output sums up,
    and trying both gains about 0.008 of MiniLM's 4-bit cosine over rounding to nearest). The
    error is measured at the base width on the group's finite weights (``_grid_errors``); among
    equal errors the earlier candidate wins.

    With the C loops on, ``_native.choose_grids`` does all of it in one pass per group, about 5x faster; this
    torch and numpy path is the reference it matches bit for bit (float32 ratios, every operation rounded on
    its own, the same sums in the same order).

    Returns:
        ``(scales, offsets)``: float16 and int32, one per group.
    """
    if native_enabled():
        scales = torch.empty(groups.shape[0], dtype=SCALE_DTYPE)
        offsets = torch.empty(groups.shape[0], dtype=torch.int32)
        _native.choose_grids(
            groups.contiguous().numpy(), groups.shape[1], bits, _FLOAT32_RATIOS, SCALE_MANTISSA_BITS,
            scales.view(torch.int16).numpy(), offsets.numpy(),
        )  # fmt: skip
        return scales, offsets
    finite = _finite(groups)
    low, high = finite.amin(dim=1), finite.amax(dim=1)
    candidate_scales = [base_scales(groups, bits)]
    candidate_offsets = [torch.zeros(groups.shape[0], dtype=torch.int32)]
    limit = 2 ** (bits - 1)
    for ratio in CLIP_RATIOS:
        scales = _to_scale((high - low) * ratio / 2.0**bits)
        step = scales.to(torch.float32)
        centre = torch.where(step > 0, -(high + low) / (2 * step), torch.zeros_like(step))
        for offsets in (centre.floor(), centre.ceil()):
            candidate_scales.append(scales)
            candidate_offsets.append(offsets.clamp(-limit, limit - 1).to(torch.int32))
    scales, offsets = torch.stack(candidate_scales), torch.stack(candidate_offsets)
    best = _grid_errors(finite, scales.to(torch.float32), offsets, bits).argmin(dim=0, keepdim=True)  # the first minimum
    return scales.gather(0, best)[0], offsets.gather(0, best)[0]


def _finite(groups: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(groups, nan=0.0, posinf=0.0, neginf=0.0)


def _to_scale(values: torch.Tensor) -> torch.Tensor:
    """Non-negative float32 values as scales: saturated at float16's maximum, rounded to the nearest float16 (even on
    ties), then a normal one to the nearest ``SCALE_MANTISSA_BITS``-bit mantissa (up on ties) and saturated again."""
    patterns = values.clamp(max=torch.finfo(SCALE_DTYPE).max).to(SCALE_DTYPE).view(torch.int16).to(torch.int32)
    dropped = 10 - SCALE_MANTISSA_BITS
    rounded = ((patterns + ((1 << dropped) >> 1)) >> dropped << dropped).clamp(max=_SCALE_MAX_PATTERN)
    return torch.where(patterns >= 0x0400, rounded, patterns).to(torch.int16).view(SCALE_DTYPE)


def _grid_errors(groups: torch.Tensor, steps: torch.Tensor, offsets: torch.Tensor, bits: int) -> torch.Tensor:
    """Squared error of quantizing each group (``groups``: finite float32, one row each) on each candidate grid.

    ``steps`` (float32) and ``offsets`` (int32) have one row per candidate and one column per group;
    so has the float32 result. Per weight ``w``, in float32: ``r = o + w * (1 / s)``, the code
    ``floor(clamp(r))`` at the base width, ``d = (code + 0.5) - r``; the ``d * d`` are summed in weight
    order and the sum times ``s * s`` is the error (in units of the step, half the passes of quantize +
    dequantize); a zero step reconstructs 0 and costs the sum of ``w * w``. Every operation is rounded
    on its own and each sum runs in weight order, so ``_native.choose_grids`` gives the same bits and
    the same grids.
    """
    errors = torch.empty(steps.shape, dtype=torch.float32)
    weights, low, high = groups.numpy(), np.float32(-(2 ** (bits - 1))), np.float32(2 ** (bits - 1) - 1)
    with np.errstate(over="ignore"):  # huge weights: an infinite error, which never wins
        squares = np.cumsum(weights * weights, axis=1, dtype=np.float32)[:, -1]
        for row, (step, offset) in enumerate(zip(steps.numpy(), offsets.numpy().astype(np.float32))):
            inverse = np.divide(np.float32(1), step, out=np.zeros_like(step), where=step > 0)
            ratio = offset[:, None] + weights * inverse[:, None]
            difference = (np.floor(np.clip(ratio, low, high)) + np.float32(0.5)) - ratio
            sums = np.cumsum(difference * difference, axis=1, dtype=np.float32)[:, -1]
            errors[row] = torch.from_numpy(np.where(step > 0, sums * (step * step), squares))
    return errors


def level_scales(scales: torch.Tensor, base_bits: int, bits: int) -> torch.Tensor:
    """Float32 scale of width ``bits`` derived exactly from the base scales: ``s_b * 2**-(bits-b)``."""
    return scales.to(torch.float32) * (2.0 ** (base_bits - bits))


def level_offsets(offsets: torch.Tensor, base_bits: int, bits: int) -> torch.Tensor:
    """Offset of width ``bits`` in its own steps, as an int32 column: ``o * 2**(bits-b)``."""
    return (offsets.to(torch.int32) << (bits - base_bits)).unsqueeze(1)


def quantize(
    groups: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, base_bits: int, bits: int, headroom: int = 0
) -> torch.Tensor:
    """Signed mid-rise codes of width ``bits`` (int32, shape of ``groups``).

    ``headroom`` widens the clamp to ``2**(bits-1+headroom)``: codes beyond the grid's own range,
    for weights the base grid clips, which a stage above the base can still carry (``refinement``).
    """
    step = level_scales(scales, base_bits, bits).unsqueeze(1)
    ratio = torch.where(step > 0, groups / step, torch.zeros_like(groups))
    limit = 2.0 ** (bits - 1 + headroom)
    ratio = torch.nan_to_num(ratio, nan=0.0, posinf=limit, neginf=-limit) + level_offsets(offsets, base_bits, bits)
    return ratio.floor().clamp(-limit, limit - 1).to(torch.int32)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, base_bits: int, bits: int) -> torch.Tensor:
    """Float32 reconstruction ``(v - o_bits + 0.5) * s_bits`` of signed codes of width ``bits``."""
    step = level_scales(scales, base_bits, bits).unsqueeze(1)
    return ((codes - level_offsets(offsets, base_bits, bits)).to(torch.float32) + 0.5) * step


def coarsen(codes: torch.Tensor, from_bits: int, to_bits: int) -> torch.Tensor:
    """Codes of width ``to_bits`` from codes of width ``from_bits``: an arithmetic right shift."""
    return codes >> (from_bits - to_bits)


def clamp_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes limited to the range of width ``bits``: the base codes of top codes with headroom."""
    return codes.clamp(-(1 << (bits - 1)), (1 << (bits - 1)) - 1)


def refinement(fine: torch.Tensor, coarse: torch.Tensor, from_bits: int, to_bits: int, corrected: bool = False) -> torch.Tensor:
    """What raises ``coarse`` codes to ``fine`` ones: ``d = fine - (coarse << k)``, ``k = to_bits - from_bits``.

    Inside the coarse grid ``d`` is the ``k`` low bits of ``fine`` (``0 <= d < 2**k``). A weight the
    coarse grid clamped has ``d >= 2**k`` (above the top bin) or ``d < 0`` (below the bottom bin,
    whose coarse code is ``-2**(from_bits-1)``); a negative ``d`` is sent as ``2**k - 1 - d``, which
    only the bottom bin can hold, so every value is a non-negative integer and the low-bit case is
    unchanged.

    ``corrected`` coarse codes were chosen by error compensation (``p2u_hub.core.gptq``) and may lie in
    any bin, so ``d`` outside ``[0, 2**k)`` can have either sign in every bin: it is sent
    interleaved, ``2**k + 2*(d - 2**k)`` above and ``2**k + 2*(-1 - d) + 1`` below.
    """
    step = to_bits - from_bits
    difference = fine - (coarse << step)
    if corrected:
        above = ((difference - (1 << step)) << 1) + (1 << step)
        below = ((-1 - difference) << 1) + (1 << step) + 1
        return torch.where(difference < 0, below, torch.where(difference >= (1 << step), above, difference))
    return torch.where(difference < 0, (1 << step) - 1 - difference, difference)


def refine(coarse: torch.Tensor, refinements: torch.Tensor, from_bits: int, to_bits: int, corrected: bool = False) -> torch.Tensor:
    """Inverse of ``refinement``: the fine codes."""
    step = to_bits - from_bits
    refinements = refinements.to(coarse.dtype)
    if corrected:
        beyond = refinements - (1 << step)
        outside = torch.where(beyond & 1 == 0, (beyond >> 1) + (1 << step), -1 - (beyond >> 1))
        return (coarse << step) + torch.where(refinements >= (1 << step), outside, refinements)
    below = (refinements >= (1 << step)) & (coarse == -(1 << (from_bits - 1)))
    return (coarse << step) + torch.where(below, (1 << step) - 1 - refinements, refinements)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed ``bits``-wide codes (``bits <= 8``) into a little-endian bit stream.

    Codes are offset to unsigned (``v + 2**(bits-1)``); code ``i`` occupies stream bits
    ``[i*bits, (i+1)*bits)``, bit ``k`` of the stream being bit ``k % 8`` of byte ``k // 8``.
    So 8 codes fill exactly ``bits`` bytes, and for ``bits=4`` code ``2j`` is the low nibble
    of byte ``j``; the last byte of a count that is not a multiple of 8 is zero-padded.
    """
    return pack_unsigned(codes.reshape(-1) + (1 << (bits - 1)), bits)


def pack_unsigned(unsigned: torch.Tensor, bits: int) -> torch.Tensor:
    """``pack`` of stored unsigned codes ``u = v + 2**(bits-1)`` (any integer dtype): the same bytes.

    Byte-wide torch ops when ``bits`` divides 8; other widths build one 64-bit word per 8 codes and
    cut it into its ``bits`` bytes (a bit matrix through numpy was 10x slower: 0.3 s for MiniLM's
    3- and 5-bit tensors, the whole of loading a coded base). Also how a layer gives back the codes
    it holds in another layout.
    """
    flat = unsigned.reshape(-1)
    count = flat.numel()
    padding = -count % 8
    if 8 % bits == 0:
        per_byte = 8 // bits
        fields = torch.nn.functional.pad(flat.to(torch.uint8), (0, padding)).reshape(-1, per_byte)
        packed = fields[:, 0].clone()
        for index in range(1, per_byte):
            packed |= fields[:, index] << (index * bits)
        return packed[: -(-count * bits // 8)]
    codes = torch.nn.functional.pad(flat.to(torch.int64), (0, padding)).reshape(-1, 8)
    words = (codes << (torch.arange(8, dtype=torch.int64, device=codes.device) * bits)).sum(dim=1, keepdim=True)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=codes.device) * 8
    return ((words >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)[: -(-count * bits // 8)]


def pack_offsets(offsets: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack one offset per group like codes of width ``bits``, zero-padded to a multiple of 8 offsets."""
    padding = -offsets.numel() % 8
    return pack(torch.nn.functional.pad(offsets.reshape(-1).to(torch.int32), (0, padding)), bits)


def offsets_bytes(groups: int, bits: int) -> int:
    """Stored size of ``pack_offsets`` for ``groups`` groups: whole runs of 8 offsets, ``bits`` bytes each."""
    return group_count(groups, 8) * bits


def offsets_of_groups(packed: torch.Tensor, bits: int, groups: torch.Tensor) -> torch.Tensor:
    """The int32 offsets of the given ``groups`` only: their runs of 8 are unpacked, not the whole tensor's."""
    runs = unpack(packed.view(-1, bits)[groups // 8], bits).view(-1, 8)
    return runs[torch.arange(groups.numel(), device=groups.device), groups % 8]


def unpack_offsets(packed: torch.Tensor, bits: int, groups: int) -> torch.Tensor:
    """Inverse of ``pack_offsets``: the int32 offsets of ``groups`` groups."""
    return unpack(packed, bits)[:groups]


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


def dequantize_packed(packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """``dequantize`` at the base width straight from packed codes: float32, shape ``(groups, group_size)``.

    The same bits as ``dequantize(unpack(...))``: ``u - (2**(bits-1) - 0.5 + o)`` equals ``v - o + 0.5``
    exactly in float32 (small integers and halves), and the one multiply is the same. It skips the
    signed int32 codes, about 5x faster, which is what a packed layer pays in every forward.
    ``offsets`` (int32 per group) is None for bases without offsets (format versions 1-2).
    """
    return dequantize_unsigned(unpack_unsigned(packed, bits).view(-1, group_size), scales, offsets, bits)


def dequantize_unsigned(unsigned: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, bits: int) -> torch.Tensor:
    """``dequantize`` at the base width from the stored unsigned codes ``u``, shape ``(groups, group_size)``: float32.

    Computes ``(u - (2**(bits-1) - 0.5 + o)) * s``, the arithmetic ``dequantize_packed`` documents.
    """
    values = unsigned.to(torch.float32)
    shift = torch.full((values.shape[0], 1), (1 << (bits - 1)) - 0.5, device=values.device)
    if offsets is not None:
        shift += offsets.to(device=values.device, dtype=torch.float32).unsqueeze(1)
    return values.sub_(shift).mul_(scales.to(device=values.device, dtype=torch.float32).unsqueeze(1))


INT4_MIDPOINT = 8
"""The code an int4 matmul kernel subtracts before scaling: ``w = (q - 8) * scale + zero``, ``q`` in ``[0, 16)``."""


def to_int4(unsigned: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored unsigned codes of width ``bits <= 4`` as int4 kernel codes ``q = u - 2**(bits-1) + 8`` (int32).

    ``q - 8`` is the signed code ``v``, so a narrower width sits in the middle of the 16 levels exactly
    (2-bit codes become 6..9): one kernel serves every width up to 4.
    """
    return unsigned.to(torch.int32) + (INT4_MIDPOINT - (1 << (bits - 1)))


def from_int4(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``to_int4`` for uint8 kernel codes: the stored unsigned codes, uint8 (byte-wide ops only)."""
    return codes - (INT4_MIDPOINT - (1 << (bits - 1)))


def int4_scales_and_zeros(scales: torch.Tensor, offsets: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Per group, the ``(scale, zero)`` of ``w = (q - 8) * scale + zero`` that gives our grid's weights, in ``dtype``.

    With ``q - 8 = v`` (``to_int4``), ``(v - o + 0.5) * s = (q - 8) * s + (0.5 - o) * s``: scale ``s`` and zero
    ``(0.5 - o) * s``, exact in float32 (an 11-bit scale times a half-integer of magnitude at most 8.5), then rounded
    once to ``dtype``: so the kernel's weights are within that rounding of ``dequantize``'s, not bit-equal.
    Shape ``(groups, 2)`` (the last axis: scale, zero).
    """
    step = scales.to(torch.float32)
    centre = torch.full_like(step, 0.5) if offsets is None else 0.5 - offsets.to(torch.float32)
    return torch.stack((step, centre * step), dim=-1).to(dtype)
