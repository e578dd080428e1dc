"""torch's int4 weight-only CPU matmul (``aten::_weight_int4pack_mm_for_cpu``) for packed linear layers.

The kernel multiplies by a ``(N, K)`` weight it keeps as 4-bit codes ``q`` in its own packed layout,
with per group of ``group_size`` consecutive inputs of each output row a ``(scale, zero)``:
``w = (q - 8) * scale + zero``. A p2u base's groups run over the flattened weight, so for a linear
weight whose row length is a multiple of the group size they are exactly the kernel's groups, and
``ladder.to_int4`` / ``ladder.int4_scales_and_zeros`` map every width up to 4 onto its grid.

The packed layout is the kernel's business and differs by CPU instruction set (AVX-512, AVX2,
none). It is what a layer holds instead of our codes, at the same size for 4-bit ones, so the
codes are read back from it (``unpack``) when the exact base weight is wanted (``dequantize``, a
float32 input). The inverse is learnt from the kernel itself once per process and checked on
random codes (``_layout``); where the layout is not the blocked one it expects, the kernel is not
used at all.

Measured (torch 2.13, one thread, AVX-512): bfloat16 input of 1-8 rows, 0.2-0.7x the time of a
dense bfloat16 ``linear``; 64 rows 1.6x, 2048 rows 2.3x (``MAX_ROWS``); its float32 path is a slow
reference loop (20-80x dense), so float32 inputs take the expand path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

COMPUTE_DTYPES = (torch.bfloat16, torch.float16)
GROUP_SIZES = (32, 64, 128, 256)
CHUNK_ELEMENTS = 1 << 20
"""Weights converted at a time by ``pack_rows``."""
MAX_ROWS = 384
"""Largest input (rows of ``K``) sent to the kernel: its time grows with the rows like a dense matmul's, about
2x it, so beyond 256-512 rows (measured on 1024x4096 and 4096x1024 weights) expanding the weight once is faster."""
_PROBE_ROWS = 128  # a multiple of every block height the kernel uses (16 to 64 rows)


def usable(shape: tuple[int, ...], group_size: int, dtype: torch.dtype) -> bool:
    """Whether a linear weight of ``shape`` computing in ``dtype`` can run on the kernel."""
    if len(shape) != 2 or dtype not in COMPUTE_DTYPES or group_size not in GROUP_SIZES:
        return False
    layout = _layout()
    rows, inputs = shape
    return layout is not None and rows % layout[0] == 0 and inputs % group_size == 0


def pack(codes: torch.Tensor) -> torch.Tensor:
    """The kernel's packed form of int4 codes ``(N, K)`` in ``[0, 16)``: uint8, ``N * K / 2`` bytes."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


def pack_rows(nibbles_of_rows: Callable[[int, int], torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    """``pack`` of a ``shape`` weight given as nibbles, a few rows at a time: the same bytes, with byte-wide ops only.

    ``nibbles_of_rows(start, stop)`` gives rows ``[start, stop)`` as ``(stop - start, K / 2)`` uint8, two codes
    per byte in row order, the even column's in the low nibble: how a 4-bit base stores its codes, so
    those load with no unpacking. The kernel's blocks of rows are independent and stored one after the
    other, so runs of whole blocks are converted in order (about ``CHUNK_ELEMENTS`` weights at a time,
    which also keeps the temporaries small). Why not the kernel's own conversion op: it takes int32
    codes (8 times the packed size) and took 3.9 s of a 4.3 s load of a 557M-weight base, whose
    conversion this does in about 0.5 s; ``_layout`` checks on random codes that both give the same bytes.
    """
    rows, inputs = shape
    block, positions = _known_layout()
    step = max(block, CHUNK_ELEMENTS // inputs // block * block)
    packed = torch.empty(rows, inputs // 2, dtype=torch.uint8)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        packed[start:stop] = _to_kernel_layout(nibbles_of_rows(start, stop), block, positions)
    return packed


def _to_kernel_layout(nibbles: torch.Tensor, block: int, positions: torch.Tensor) -> torch.Tensor:
    """Row-ordered nibbles ``(N, K / 2)`` in the kernel's layout: per block of rows, per input column, the
    block's codes two per byte, row ``i`` at nibble ``positions[i]`` (so nibble ``n`` holds row ``inverse[n]``)."""
    rows, half = nibbles.shape
    inverse = torch.argsort(positions)
    by_row = nibbles.reshape(rows // block, block, half)
    low_rows, high_rows = by_row.index_select(1, inverse[0::2]), by_row.index_select(1, inverse[1::2])
    even = (low_rows & 15) | (high_rows << 4)  # column 2j: the low nibbles of both rows' bytes
    odd = (low_rows >> 4) | (high_rows & 0xF0)  # column 2j + 1: their high nibbles
    columns = torch.stack((even, odd), dim=-1).view(rows // block, block // 2, 2 * half)
    return columns.transpose(1, 2).reshape(rows, half)


def unpack(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of ``pack``: the codes ``(N, K)``, uint8. Pure tensor ops: works on any device."""
    return _unpack(packed, shape, *_known_layout())


def scales_and_zeros(grid: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-group ``(scale, zero)`` pairs in our order ``(N * K / g, 2)`` as the kernel takes them: ``(K / g, N, 2)``."""
    return grid.view(rows, -1, 2).transpose(0, 1).contiguous()


def matmul(input: torch.Tensor, packed: torch.Tensor, group_size: int, grid: torch.Tensor) -> torch.Tensor:
    """``input @ weight.T`` for an input of any leading shape (its last axis: ``K``), in the input's dtype."""
    output = torch.ops.aten._weight_int4pack_mm_for_cpu(input.reshape(-1, input.shape[-1]).contiguous(), packed, group_size, grid)
    return output.view(*input.shape[:-1], output.shape[-1])


@functools.cache
def _layout() -> tuple[int, torch.Tensor] | None:
    """Block height ``B`` of the kernel's layout and, per row of a block, its nibble within a block's input column.

    Every CPU variant of torch 2.x stores blocks of ``B`` output rows; within a block, input column
    ``k`` is ``B / 2`` bytes holding the ``B`` rows' codes in an order of its own. Row and column
    indices packed as codes reveal ``B`` and that order; random codes must then round-trip through
    ``unpack``, and ``pack_rows``'s conversion must give the kernel's bytes.
    None (kernel unused) if the op is missing or the layout is another.
    """
    rows, inputs = _PROBE_ROWS, 32
    row = torch.arange(rows).unsqueeze(1).expand(rows, inputs)
    column = torch.arange(inputs).unsqueeze(0).expand(rows, inputs)
    try:
        row_of = _nibbles(pack(row % 16)) + 16 * _nibbles(pack(row // 16))
        column_of = _nibbles(pack(column % 16)) + 16 * _nibbles(pack(column // 16))
    except (RuntimeError, AttributeError, NotImplementedError):  # no such op in this torch build
        return None
    block = int(column_of.ne(0).to(torch.int64).argmax())  # the first nibble of input column 1
    if block == 0 or rows % block or not torch.equal(row_of[:block].sort().values, torch.arange(block)):
        return None
    positions = torch.argsort(row_of[:block])
    codes = torch.randint(0, 16, (2 * rows, 4 * inputs), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed, nibbles = pack(codes), codes[:, 0::2] | (codes[:, 1::2] << 4)
    same = torch.equal(_unpack(packed, (2 * rows, 4 * inputs), block, positions), codes)
    return (block, positions) if same and torch.equal(_to_kernel_layout(nibbles, block, positions), packed) else None


def _known_layout() -> tuple[int, torch.Tensor]:
    """``_layout()`` where the kernel is in use (``usable`` said so)."""
    layout = _layout()
    if layout is None:
        raise RuntimeError("torch's int4 CPU kernel is not usable in this build; check cpu_int4.usable first")
    return layout


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(-1).to(torch.int64)


def _unpack(packed: torch.Tensor, shape: tuple[int, int], block: int, positions: torch.Tensor) -> torch.Tensor:
    rows, inputs = shape
    nibbles = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(rows // block, inputs, block)
    by_position = nibbles.permute(2, 0, 1).contiguous()  # whole-row copies: 40x faster than indexing the last axis
    return by_position[positions.to(packed.device)].permute(1, 0, 2).reshape(rows, inputs)
