"""Lossless residuals between a float tensor and its ladder reconstruction.

The residual lives in the integer domain of the float bit patterns (docs/format.md,
"Lossless residual"). Each bit pattern is mapped to an *ordered integer* so that
consecutive floats are consecutive integers (``-0.0 -> -1``, ``+0.0 -> 0``; NaN and inf
included, so every pattern round-trips). The residual is
``ord(original) - ord(reconstruction)``: its magnitude is the number of representable floats
between the two values, about ``scale / ulp(reconstruction)``. The coding context is
therefore the exponent of the reconstruction relative to the exponent of the group's
scale, refined by the scale's leading mantissa bits: within one context the residuals share
a range, which the entropy coder learns.
"""

from __future__ import annotations

import numpy as np
import torch

from .entropy import _native, native_enabled

#: float dtype -> (same-width signed int dtype, mantissa bits, exponent bias)
FLOAT_LAYOUTS: dict[torch.dtype, tuple[torch.dtype, int, int]] = {
    torch.float32: (torch.int32, 23, 127),
    torch.float16: (torch.int16, 10, 15),
    torch.bfloat16: (torch.int16, 7, 127),
}

#: Contexts are ``exponent(reconstruction) - exponent(scale)`` clamped to this range.
CONTEXT_MIN, CONTEXT_MAX = -16, 47
STEP_BITS = 2
"""Leading mantissa bits of the scale that refine each lossless context (format version 5 on; 0 before).

The residual's range is ``scale / ulp(reconstruction)``: the relative exponent fixes it within a
factor of 2, the scale's mantissa within 2**(1/4) more. Mixed in one context, ranges of up to twice
the width cost ~0.1 bit a weight (MiniLM bfloat16 lossless stage: 8.78 -> 8.50 MB with 2 bits);
64 exponents times 4 fill the byte a context is."""


def _layout(dtype: torch.dtype) -> tuple[torch.dtype, int, int]:
    try:
        return FLOAT_LAYOUTS[dtype]
    except KeyError:
        raise TypeError(f"no lossless residual for dtype {dtype}; supported: float32, float16, bfloat16") from None


def ordered_int(values: torch.Tensor) -> torch.Tensor:
    """Map float bit patterns to int64 so that the float order is the integer order.

    For a negative pattern the magnitude bits are flipped (``x ^ 0x7f..f``), which gives
    ``-magnitude - 1``; the map is its own inverse on bit patterns.
    """
    bits = _bit_patterns(values)
    sign_fill = bits >> (bits.dtype.itemsize * 8 - 1)
    return torch.from_numpy((bits ^ (sign_fill & np.iinfo(bits.dtype).max)).astype(np.int64))


def from_ordered_int(ordered: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``ordered_int``."""
    int_dtype, _, _ = _layout(dtype)
    bits = ordered.to(int_dtype).numpy()
    sign_fill = bits >> (bits.dtype.itemsize * 8 - 1)
    return torch.from_numpy(bits ^ (sign_fill & np.iinfo(bits.dtype).max)).view(dtype)


def _bit_patterns(values: torch.Tensor) -> np.ndarray:
    """The float bit patterns as a numpy array of the same-width signed integer (C order)."""
    int_dtype, _, _ = _layout(values.dtype)
    return values.contiguous().view(int_dtype).numpy()


def exponent(values: torch.Tensor) -> torch.Tensor:
    """Unbiased binary exponent of each float from its bit pattern (zero/subnormal: ``-bias``)."""
    int_dtype, mantissa_bits, bias = _layout(values.dtype)
    bits = values.contiguous().view(int_dtype).to(torch.int32)
    field = (bits >> mantissa_bits) & ((1 << (torch.iinfo(int_dtype).bits - 1 - mantissa_bits)) - 1)
    return field - bias


def residual(original: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """``ord(original) - ord(reconstruction)`` (both in the source dtype), zigzag-coded to int64 >= 0."""
    if native_enabled():
        coded = np.empty(original.numel(), dtype=np.int64)
        _native.residual(_bit_patterns(original), _bit_patterns(reconstruction), original.element_size(), coded)
        return torch.from_numpy(coded).reshape(original.shape)
    difference = ordered_int(original).numpy() - ordered_int(reconstruction).numpy()
    return torch.from_numpy((difference << 1) ^ (difference >> 63))


def restore(reconstruction: torch.Tensor, coded_residual: torch.Tensor) -> torch.Tensor:
    """Inverse of ``residual`` (``coded_residual``: any integer dtype): the original float tensor, bit for bit."""
    if native_enabled():
        bits = _bit_patterns(reconstruction)
        restored = np.empty_like(bits)
        coded = coded_residual.contiguous().numpy()
        _native.restore(bits, coded, coded.itemsize, reconstruction.element_size(), restored)
        return torch.from_numpy(restored).view(reconstruction.dtype).reshape(reconstruction.shape)
    coded = coded_residual.numpy().astype(np.int64, copy=False)
    difference = (coded >> 1) ^ -(coded & 1)
    ordered = ordered_int(reconstruction).numpy() + difference
    return from_ordered_int(torch.from_numpy(ordered), reconstruction.dtype)


def contexts(reconstruction: torch.Tensor, step: torch.Tensor, step_bits: int) -> torch.Tensor:
    """Coding context per element, uint8: ``exponent(reconstruction) - exponent(step)`` clamped to
    ``[CONTEXT_MIN, CONTEXT_MAX]`` and shifted to start at 0, then ``step_bits`` more bits: the step's
    leading mantissa bits (``STEP_BITS``, or 0 for format versions before 5).

    ``step`` is the float32 scale of the top ladder level, broadcast to the elements.
    """
    if (CONTEXT_MAX - CONTEXT_MIN + 1) << step_bits > 256:
        raise ValueError(f"lossless contexts with {step_bits} step bits do not fit a byte")
    step_patterns = step.to(torch.float32).contiguous().view(torch.int32)
    if native_enabled():
        _, mantissa_bits, bias = _layout(reconstruction.dtype)
        out = np.empty(reconstruction.numel(), dtype=np.uint8)
        _native.contexts(
            _bit_patterns(reconstruction), reconstruction.element_size(), mantissa_bits, bias, step_patterns.numpy(),
            CONTEXT_MIN, CONTEXT_MAX, step_bits, out,
        )  # fmt: skip
        return torch.from_numpy(out).reshape(reconstruction.shape)
    relative = exponent(reconstruction) - exponent(step.to(torch.float32))
    mantissa = (step_patterns & 0x7FFFFF) >> (23 - step_bits)
    return (((relative.clamp(CONTEXT_MIN, CONTEXT_MAX) - CONTEXT_MIN) << step_bits) | mantissa).to(torch.uint8)
