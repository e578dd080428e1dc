"""Lossless residuals between a float tensor and its ladder reconstruction.

The residual lives in the integer domain of the float bit patterns (docs/format.md,
"Lossless residual"). Each bit pattern is mapped to an *ordered integer* so that
consecutive floats are consecutive integers (``-0.0 -> -1``, ``+0.0 -> 0``; NaN and inf
included, so every pattern round-trips). The residual is
``ord(original) - ord(reconstruction)``: its magnitude is the number of representable floats
between the two values, about ``scale / ulp(reconstruction)``. The coding context is
therefore the exponent of the reconstruction relative to the exponent of the group's
scale: within one context the residuals share a range, which the entropy coder learns.
"""

from __future__ import annotations

import numpy as np
import torch

#: float dtype -> (same-width signed int dtype, mantissa bits, exponent bias)
FLOAT_LAYOUTS: dict[torch.dtype, tuple[torch.dtype, int, int]] = {
    torch.float32: (torch.int32, 23, 127),
    torch.float16: (torch.int16, 10, 15),
    torch.bfloat16: (torch.int16, 7, 127),
}

#: Contexts are ``exponent(reconstruction) - exponent(scale)`` clamped to this range.
CONTEXT_MIN, CONTEXT_MAX = -16, 47


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
    int_dtype, _, _ = _layout(values.dtype)
    bits = values.contiguous().view(int_dtype).numpy()
    sign_fill = bits >> (bits.dtype.itemsize * 8 - 1)
    return torch.from_numpy((bits ^ (sign_fill & np.iinfo(bits.dtype).max)).astype(np.int64))


def from_ordered_int(ordered: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``ordered_int``."""
    int_dtype, _, _ = _layout(dtype)
    bits = ordered.to(int_dtype).numpy()
    sign_fill = bits >> (bits.dtype.itemsize * 8 - 1)
    return torch.from_numpy(bits ^ (sign_fill & np.iinfo(bits.dtype).max)).view(dtype)


def exponent(values: torch.Tensor) -> torch.Tensor:
    """Unbiased binary exponent of each float from its bit pattern (zero/subnormal: ``-bias``)."""
    int_dtype, mantissa_bits, bias = _layout(values.dtype)
    bits = values.contiguous().view(int_dtype).to(torch.int32)
    field = (bits >> mantissa_bits) & ((1 << (torch.iinfo(int_dtype).bits - 1 - mantissa_bits)) - 1)
    return field - bias


def residual(original: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """``ord(original) - ord(reconstruction)`` (both in the source dtype), zigzag-coded to int64 >= 0."""
    difference = ordered_int(original).numpy() - ordered_int(reconstruction).numpy()
    return torch.from_numpy((difference << 1) ^ (difference >> 63))


def restore(reconstruction: torch.Tensor, coded_residual: torch.Tensor) -> torch.Tensor:
    """Inverse of ``residual``: the original float tensor, bit for bit."""
    coded = coded_residual.numpy()
    difference = (coded >> 1) ^ -(coded & 1)
    ordered = ordered_int(reconstruction).numpy() + difference
    return from_ordered_int(torch.from_numpy(ordered), reconstruction.dtype)


def contexts(reconstruction: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Coding context per element: ``exponent(reconstruction) - exponent(step)``, clamped, as uint8.

    ``step`` is the float32 scale of the top ladder level, broadcast to the elements.
    The result is shifted to start at 0 so it can index an array of groups.
    """
    relative = exponent(reconstruction) - exponent(step.to(torch.float32))
    return (relative.clamp(CONTEXT_MIN, CONTEXT_MAX) - CONTEXT_MIN).to(torch.uint8)
