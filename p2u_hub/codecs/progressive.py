"""One tensor through the whole ladder: base codes and scales, refinement deltas, lossless delta.

``encode`` turns a float tensor into the base payload (packed codes + float16 scales) and
one delta per stage; ``decode`` rebuilds the tensor at any stage from the base payload and
the deltas up to that stage. Both are pure: tensors and bytes in, tensors and bytes out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import entropy, ladder, lossless


@dataclass(frozen=True)
class Ladder:
    """The precision ladder of a release: base width, intermediate widths, group size.

    The last stage is always the lossless one; ``stage_bits`` are the integer stages
    before it, strictly increasing and above ``base_bits``.
    """

    base_bits: int
    stage_bits: tuple[int, ...]
    group_size: int

    def __post_init__(self) -> None:
        if not 2 <= self.base_bits <= 8:
            raise ValueError(f"base bits must be between 2 and 8, got {self.base_bits}")
        widths = (self.base_bits, *self.stage_bits)
        if any(low >= high for low, high in zip(widths, widths[1:])) or widths[-1] > 16:
            raise ValueError(f"stage bits must increase from the base bits and stay <= 16, got {list(widths)}")
        if self.group_size <= 0 or self.group_size % 8:
            raise ValueError(f"group size must be a positive multiple of 8, got {self.group_size}")

    @property
    def top_bits(self) -> int:
        """Width of the finest integer level, on which the lossless stage builds."""
        return self.stage_bits[-1] if self.stage_bits else self.base_bits

    @property
    def stage_count(self) -> int:
        """Integer stages plus the lossless stage."""
        return len(self.stage_bits) + 1

    def widths(self) -> tuple[int, ...]:
        return (self.base_bits, *self.stage_bits)


@dataclass(frozen=True)
class EncodedTensor:
    packed_codes: torch.Tensor  # uint8, the base codes, ``ladder.pack`` layout
    scales: torch.Tensor  # float16, one per group
    deltas: tuple[bytes, ...]  # one per stage, the lossless one last


def encode(weight: torch.Tensor, spec: Ladder) -> EncodedTensor:
    """Quantize ``weight`` onto the ladder and code every stage's delta."""
    groups = ladder.to_groups(weight, spec.group_size)
    scales = ladder.base_scales(groups, spec.base_bits)
    top_codes = ladder.quantize(groups, scales, spec.base_bits, spec.top_bits)
    widths = spec.widths()
    deltas = []
    for low, high in zip(widths, widths[1:]):
        coarse = ladder.coarsen(top_codes, spec.top_bits, low)
        low_bits = ladder.refinement_bits(ladder.coarsen(top_codes, spec.top_bits, high), low, high)
        deltas.append(entropy.encode(low_bits.to(torch.int64), _refinement_contexts(coarse, low)))
    reconstruction = _reconstruct(top_codes, scales, spec, spec.top_bits, weight)
    residual = lossless.residual(weight.contiguous(), reconstruction)
    deltas.append(entropy.encode(residual, _lossless_contexts(reconstruction, scales, spec, weight)))
    base_codes = ladder.coarsen(top_codes, spec.top_bits, spec.base_bits)
    return EncodedTensor(ladder.pack(base_codes, spec.base_bits), scales, tuple(deltas))


def decode(
    packed_codes: torch.Tensor,
    scales: torch.Tensor,
    deltas: list[bytes] | tuple[bytes, ...],
    spec: Ladder,
    shape: tuple[int, ...],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Rebuild a tensor of ``shape``/``dtype`` at stage ``len(deltas)`` (0 = base).

    With all ``spec.stage_count`` deltas the result is bit-identical to the encoded tensor.
    """
    if len(deltas) > spec.stage_count:
        raise ValueError(f"{len(deltas)} deltas given, the ladder has {spec.stage_count} stages")
    codes = ladder.unpack(packed_codes, spec.base_bits).view(-1, spec.group_size)
    widths = spec.widths()
    reached = spec.base_bits
    for (low, high), delta in zip(zip(widths, widths[1:]), deltas):
        low_bits = entropy.decode(delta, _refinement_contexts(codes, low))
        codes = ladder.refine(codes, low_bits, low, high)
        reached = high
    template = torch.empty(shape, dtype=dtype, device="meta")
    reconstruction = _reconstruct(codes, scales, spec, reached, template)
    if len(deltas) < spec.stage_count:
        return reconstruction
    contexts = _lossless_contexts(reconstruction, scales, spec, template)
    return lossless.restore(reconstruction, entropy.decode(deltas[-1], contexts))


def dequantize_packed(packed_codes: torch.Tensor, scales: torch.Tensor, spec: Ladder, shape, dtype) -> torch.Tensor:
    """The base tensor from its packed codes: what a packed layer computes in ``forward``."""
    codes = ladder.unpack(packed_codes, spec.base_bits).view(-1, spec.group_size)
    values = ladder.dequantize(codes, scales.to(codes.device), spec.base_bits, spec.base_bits)
    return values.reshape(-1)[: math.prod(shape)].reshape(shape).to(dtype)


def _reconstruct(codes: torch.Tensor, scales: torch.Tensor, spec: Ladder, bits: int, like: torch.Tensor) -> torch.Tensor:
    values = ladder.dequantize(codes, scales, spec.base_bits, bits)
    return values.reshape(-1)[: like.numel()].reshape(like.shape).to(like.dtype)


def _refinement_contexts(coarse_codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Context of a refinement: the coarse code itself, offset to ``[0, 2**bits)``."""
    return (coarse_codes + (1 << (bits - 1))).to(torch.uint8) if bits <= 8 else _folded(coarse_codes, bits)


def _folded(coarse_codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Wide coarse codes: context is the code's magnitude class (bit length), fitting a uint8."""
    magnitude = torch.where(coarse_codes < 0, -coarse_codes - 1, coarse_codes)
    return (torch.frexp(magnitude.to(torch.float32) + 1).exponent).to(torch.uint8)


def _lossless_contexts(reconstruction: torch.Tensor, scales: torch.Tensor, spec: Ladder, like: torch.Tensor) -> torch.Tensor:
    step = ladder.level_scales(scales, spec.base_bits, spec.top_bits)
    per_element = step.unsqueeze(1).expand(-1, spec.group_size).reshape(-1)[: like.numel()].reshape(like.shape)
    return lossless.contexts(reconstruction, per_element)
