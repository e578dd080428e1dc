"""One tensor through the whole ladder: base codes and scales, refinement deltas, lossless delta.

``encode`` turns a float tensor into the base payload (packed codes, float16 scales, packed
group offsets) and
one delta per stage; ``decode`` rebuilds the tensor at any stage from the base payload and
the deltas up to that stage; ``encode_base`` / ``decode_base`` turn the codes, scales and offsets into
what a base file stores (entropy streams where shorter) and back. All are pure: tensors and
bytes in, tensors and bytes out.

Deltas are coded in *blocks* of ``block_groups(group_size)`` consecutive groups (about 2**20
elements), each an independent entropy stream, so coding memory is bounded by the block,
not the tensor: decoding a large embedding needs the output tensor plus one block's
temporaries per thread. Blocks are coded on ``codec_threads()`` threads (``$P2U_CODEC_THREADS``,
default one per CPU) with torch at one intra-op thread meanwhile; a tensor with fewer blocks than threads
is encoded block by block with each block's groups, then its stages, shared out among the threads. A delta is ``u32le block_count``, ``block_count`` x ``u32le length``, then the
blocks' streams in order.
"""

from __future__ import annotations

import itertools
import math
import os
import queue
import struct
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from . import entropy, ladder, lossless

BLOCK_ELEMENTS = 1 << 20
TOP_HEADROOM = 3
"""Top integer codes may reach 8 times the base grid's range: the stages carry the weights the base grid
clips (a clipping ratio >= 0.5 and the offset's rounding keep them within 4 times), so clipping costs the
intermediate stages no precision and the lossless stage no bytes."""
_U32 = struct.Struct("<I")


THREADS_VARIABLE = "P2U_CODEC_THREADS"
"""Environment variable: threads that code one tensor's blocks (default: ``os.cpu_count()``)."""


def codec_threads() -> int:
    """Threads for a tensor's blocks: ``$P2U_CODEC_THREADS`` when set, else one per CPU."""
    value = os.environ.get(THREADS_VARIABLE, "")
    if not value:
        return os.cpu_count() or 1
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{THREADS_VARIABLE} must be a positive integer, got {value!r}")
    return int(value)


@contextmanager
def _one_torch_thread():
    """Run torch ops single-threaded in this thread and in the block threads it starts.

    The codec's torch ops are element-wise passes over one block; torch's intra-op threads
    (one per core by default) gain little there, and on top of one thread per block they
    oversubscribe the cores. On a shared 2-core machine they tripled the codec's CPU time
    (MiniLM fp32 encode 1.8 -> 5.7 CPU s: idle OpenMP workers spin). torch reads the setting
    per thread (threads started meanwhile take it; a thread already serving a model keeps its
    own), and it is restored on the way out.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _map_blocks(function, count: int) -> list:
    """``[function(i) for i in range(count)]``, on ``codec_threads()`` threads.

    The heavy steps (the C loops, inflate, numpy, torch) release the GIL; a single block or a
    single thread runs inline, where a thread pool only costs.
    """
    workers = min(count, codec_threads())
    if workers == 1:
        return [function(index) for index in range(count)]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(function, range(count)))


def block_groups(group_size: int) -> int:
    """Groups per coding block: ``max(1, 2**20 // group_size)``."""
    return max(1, BLOCK_ELEMENTS // group_size)


DEFAULT_STAGE_BITS = 8
"""The intermediate integer stage added by default: a base below 8 bits, then 8 bits, then lossless."""


def default_stage_bits(base_bits: int) -> tuple[int, ...]:
    """The default intermediate widths for a base of ``base_bits``: 8 when the base is narrower, else none."""
    return (DEFAULT_STAGE_BITS,) if base_bits < DEFAULT_STAGE_BITS else ()


@dataclass(frozen=True)
class Ladder:
    """The precision ladder of a release: base width, intermediate widths, group size.

    The last stage is always the lossless one; ``stage_bits`` are the integer stages
    before it, strictly increasing and above ``base_bits``. ``corrected``: the base codes were
    chosen by error compensation and need not be the weight's own bins, so the first stage codes
    signed corrections (``ladder.refinement``).
    """

    base_bits: int
    stage_bits: tuple[int, ...]
    group_size: int
    corrected: bool = False
    context_step_bits: int = lossless.STEP_BITS
    """The scale's mantissa bits in each lossless context (``lossless.STEP_BITS``; 0 in format versions before 5)."""

    def __post_init__(self) -> None:
        if not 1 <= self.base_bits <= 8:
            raise ValueError(f"base bits must be between 1 and 8, got {self.base_bits}")
        widths = (self.base_bits, *self.stage_bits)
        if any(low >= high for low, high in zip(widths, widths[1:])) or widths[-1] > 16:
            raise ValueError(f"stage bits must increase from the base bits and stay <= 16, got {list(widths)}")
        if self.group_size <= 0 or self.group_size % 8:
            raise ValueError(f"group size must be a positive multiple of 8, got {self.group_size}")
        if self.context_step_bits not in (0, lossless.STEP_BITS):
            raise ValueError(f"lossless contexts take 0 or {lossless.STEP_BITS} step bits, got {self.context_step_bits}")

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
    offsets: torch.Tensor  # uint8, one offset per group, ``ladder.pack_offsets`` layout
    deltas: tuple[bytes, ...]  # one per stage, the lossless one last


def encode(weight: torch.Tensor, spec: Ladder, base_codes: torch.Tensor | None = None, pool: Executor | None = None) -> EncodedTensor:
    """Quantize ``weight`` onto the ladder and code every stage's delta, block by block.

    ``base_codes`` (int32, one per element of ``weight``, only with ``spec.corrected``) replace the
    weight's own base bins: codes chosen by error compensation (``p2u_hub.core.gptq.corrected_codes``) on
    the grid ``ladder.base_grid`` picks. The stages above still carry the weight's own codes.

    ``pool``: code the blocks there, one task each, an executor shared by tensors coded at once (``split``
    codes the next tensors while it writes one: most tensors are a single block). Without it the blocks
    get ``codec_threads()`` threads of this call's own, which also share out a tensor of fewer blocks than
    threads.
    """
    if (base_codes is not None) != spec.corrected:
        raise ValueError("base codes are given exactly when the ladder is corrected")
    flat = weight.detach().reshape(-1)
    codes = None if base_codes is None else base_codes.reshape(-1)
    ranges = _block_ranges(flat.numel(), spec.group_size)

    threads = codec_threads()

    def encode_block(index: int, block_pool: ThreadPoolExecutor | None = None):
        start, stop = ranges[index]
        with _one_torch_thread():  # on a shared pool's thread too
            return _encode_block(flat[start:stop], spec, None if codes is None else codes[start:stop], block_pool)

    with _one_torch_thread():
        if pool is not None:
            blocks = list(pool.map(encode_block, range(len(ranges))))
        elif len(ranges) < threads and _native_encodes(flat.dtype, codes):  # blocks alone would leave cores idle
            with ThreadPoolExecutor(threads) as own_pool:
                blocks = [encode_block(index, own_pool) for index in range(len(ranges))]
        else:
            blocks = _map_blocks(encode_block, len(ranges))
        stage_streams = [[deltas[stage] for *_, deltas in blocks] for stage in range(spec.stage_count)]
        offsets = ladder.pack_offsets(torch.cat([offsets for _, _, offsets, _ in blocks]), spec.base_bits)
        return EncodedTensor(
            torch.cat([packed for packed, *_ in blocks]), torch.cat([scales for _, scales, *_ in blocks]), offsets,
            tuple(_frame(streams) for streams in stage_streams),
        )  # fmt: skip


def decode(
    packed_codes: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    deltas: Sequence[bytes | memoryview],
    spec: Ladder,
    shape: tuple[int, ...],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Rebuild a tensor of ``shape``/``dtype`` at stage ``len(deltas)`` (0 = base).

    With all ``spec.stage_count`` deltas the result is bit-identical to the encoded tensor.
    ``offsets`` are the packed group offsets; None reads a base of format versions 1-2, whose
    offsets are all 0.

    Raises:
        entropy.CorruptStreamError: a delta does not parse or decode.
    """
    if len(deltas) > spec.stage_count:
        raise ValueError(f"{len(deltas)} deltas given, the ladder has {spec.stage_count} stages")
    numel = math.prod(shape)
    ranges = _block_ranges(numel, spec.group_size)
    block_deltas = [_unframe(delta, len(ranges)) for delta in deltas]
    output = torch.empty(numel, dtype=dtype)
    group_offsets = _group_offsets(offsets, spec, ladder.group_count(numel, spec.group_size))
    bytes_per_group = spec.group_size * spec.base_bits // 8

    def decode_block(index: int) -> None:
        start, stop = ranges[index]
        first, last = start // spec.group_size, ladder.group_count(stop, spec.group_size)
        if _native_decodes(dtype, scales[first:last], spec):
            _decode_block_native(
                output[start:stop], packed_codes[first * bytes_per_group : last * bytes_per_group], scales[first:last],
                group_offsets[first:last], [blocks[index] for blocks in block_deltas], spec,
            )  # fmt: skip
            return
        output[start:stop] = _decode_block(
            packed_codes[first * bytes_per_group : last * bytes_per_group], scales[first:last],
            group_offsets[first:last], [blocks[index] for blocks in block_deltas], spec, stop - start, dtype,
        )  # fmt: skip

    with _one_torch_thread():
        _map_blocks(decode_block, len(ranges))  # memory: one block's temporaries per thread beyond the output
    return output.reshape(shape)


def _block_ranges(numel: int, group_size: int) -> list[tuple[int, int]]:
    """Element ranges ``[start, stop)`` of the coding blocks (whole groups; the last one may be short)."""
    step = block_groups(group_size) * group_size
    return [(start, min(start + step, numel)) for start in range(0, numel, step)] or [(0, 0)]


def _frame(streams: list[bytes]) -> bytes:
    """The delta: block count, stream lengths, streams; one join, so each stream's bytes are copied once."""
    return b"".join([struct.pack(f"<{len(streams) + 1}I", len(streams), *map(len, streams)), *streams])


def _unframe(delta: bytes | memoryview, expected_blocks: int) -> list[bytes | memoryview]:
    try:
        (count,) = _U32.unpack_from(delta, 0)
        if count != expected_blocks:
            raise entropy.CorruptStreamError(f"delta has {count} blocks, the tensor has {expected_blocks}")
        lengths = [_U32.unpack_from(delta, _U32.size * (1 + i))[0] for i in range(count)]
    except struct.error:
        raise entropy.CorruptStreamError("delta header is truncated") from None
    offset = _U32.size * (1 + count)
    if offset + sum(lengths) != len(delta):
        raise entropy.CorruptStreamError(f"delta holds {len(delta) - offset} stream bytes, its header says {sum(lengths)}")
    streams = []
    for length in lengths:
        streams.append(delta[offset : offset + length])
        offset += length
    return streams


def _group_offsets(offsets: torch.Tensor | None, spec: Ladder, groups: int) -> torch.Tensor:
    """The int32 offset of every group (all 0 for a base without offsets)."""
    if offsets is None:
        return torch.zeros(groups, dtype=torch.int32)
    if entropy.native_enabled():  # the same codes as ladder.unpack, without its int64 temporaries
        unpacked = torch.empty(offsets.numel() * 8 // spec.base_bits, dtype=torch.int32)
        entropy._native.unpack_codes(offsets.numpy(), spec.base_bits, unpacked.numpy())
        return unpacked[:groups]
    return ladder.unpack_offsets(offsets, spec.base_bits, groups)


def _encode_block(
    weight: torch.Tensor, spec: Ladder, chosen: torch.Tensor | None, pool: ThreadPoolExecutor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[bytes]]:
    """Base codes, scales, offsets (unpacked) and stage deltas of one block (a 1-D run of whole groups).

    ``pool``: threads the C loops of a plain ladder spread this block over (None: this one; the torch path uses one).
    """
    if _native_encodes(weight.dtype, chosen):
        with _scratch() as arrays:
            return _encode_block_native(weight, spec, pool, arrays)
    groups = ladder.to_groups(weight, spec.group_size)
    scales, offsets = ladder.base_grid(groups, spec.base_bits)
    top_bits = spec.top_bits
    headroom = TOP_HEADROOM if spec.stage_bits else 0
    if chosen is not None and not spec.stage_bits:  # the base is the top level: its codes are the chosen ones
        top_codes = _padded_codes(chosen, spec.group_size)
    else:
        top_codes = ladder.quantize(groups, scales, offsets, spec.base_bits, top_bits, headroom)
    if chosen is None:
        base_codes = ladder.clamp_codes(ladder.coarsen(top_codes, top_bits, spec.base_bits), spec.base_bits)
    else:
        base_codes = _padded_codes(chosen, spec.group_size)
    widths = spec.widths()
    deltas = []
    coarse = base_codes
    for low, high in zip(widths, widths[1:]):
        fine = ladder.coarsen(top_codes, top_bits, high)
        refinements = ladder.refinement(fine, coarse, low, high, spec.corrected and low == spec.base_bits)
        deltas.append(entropy.encode(refinements, _refinement_contexts(coarse, low)))
        coarse = fine
    reconstruction = _reconstruct(top_codes, scales, offsets, spec, top_bits, weight)
    residual = lossless.residual(weight.contiguous(), reconstruction)
    deltas.append(entropy.encode(residual, _lossless_contexts(reconstruction, scales, spec, weight)))
    return ladder.pack(base_codes, spec.base_bits), scales, offsets, deltas


def _native_encodes(dtype: torch.dtype, chosen: torch.Tensor | None) -> bool:
    """Whether ``_encode_block_native`` codes a block: C loops on, a float dtype they know, codes not chosen (GPTQ)."""
    return chosen is None and entropy.native_enabled() and dtype in _NATIVE_DTYPES


_SCRATCH: queue.SimpleQueue[dict] = queue.SimpleQueue()
"""Encoder work arrays of finished blocks, for the next ones: ``{(name, dtype): tensor}``, one dict per block in flight."""


@contextmanager
def _scratch():
    """A dict of work arrays that a block may use and grow (``_work_array``), given back for the next block.

    A block's arrays are ~26 bytes per element; freshly allocated, each page of them costs a page fault
    (glibc returns freed blocks this large to the system), which took ~15% of the encoder's CPU time and more
    with threads. Kept, they cost their memory: one block's arrays per thread that ever coded one at once.
    """
    try:
        arrays = _SCRATCH.get_nowait()
    except queue.Empty:
        arrays = {}
    try:
        yield arrays
    finally:
        _SCRATCH.put(arrays)


def _work_array(arrays: dict, name: str, count: int, dtype: torch.dtype) -> torch.Tensor:
    """The first ``count`` elements of work array ``name`` (uninitialised), grown when too short."""
    array = arrays.get((name, dtype))
    if array is None or array.numel() < count:
        array = arrays[name, dtype] = torch.empty(count, dtype=dtype)
    return array[:count]


def _encode_block_native(
    weight: torch.Tensor, spec: Ladder, pool: ThreadPoolExecutor | None, arrays: dict
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[bytes]]:
    """``_encode_block`` of a plain ladder in the C loops: the same grids, codes, symbols and contexts, so the same bytes.

    Per run of groups, one pass chooses the grids; one quantizes the top codes; one packs the base codes and gives
    the first stage's refinements and contexts (the stored base codes); one per later stage gives its coarse codes
    and refinements; one gives the lossless contexts and residuals, reconstructing in the decoder's own loop, so the
    encoder's contexts are the decoder's by construction. The runs are independent, and so are the stages' streams
    once every symbol is known: both spread over ``pool``'s threads (the C loops release the GIL). Work arrays
    come from ``arrays`` (``_scratch``); residuals of 16-bit dtypes are int32, not int64.
    """
    native = entropy._native
    group_size, top_bits, numel = spec.group_size, spec.top_bits, weight.numel()
    count = ladder.group_count(numel, group_size)
    codes_count = count * group_size
    groups = _work_array(arrays, "groups", codes_count, torch.float32)  # ladder.to_groups, without a fresh array
    groups[:numel] = weight.reshape(-1)
    groups[numel:] = 0.0
    groups = groups.view(count, group_size)
    headroom = TOP_HEADROOM if spec.stage_bits else 0
    dtype_code, bits_dtype = _NATIVE_DTYPES[weight.dtype]
    scales, offsets = torch.empty(count, dtype=ladder.SCALE_DTYPE), torch.empty(count, dtype=torch.int32)
    top = _work_array(arrays, "top", codes_count, torch.int32)
    packed = torch.empty(codes_count // 8 * spec.base_bits, dtype=torch.uint8)
    refinements = [_work_array(arrays, f"refinements {stage}", codes_count, torch.int32) for stage in range(len(spec.stage_bits))]
    contexts = [_work_array(arrays, f"contexts {stage}", codes_count, torch.uint8) for stage in range(max(1, len(spec.stage_bits)))]
    coarse = _work_array(arrays, "coarse", codes_count, torch.int32) if len(spec.stage_bits) > 1 else top  # stages after the first
    original = weight.contiguous().view(bits_dtype)
    residuals = _work_array(arrays, "residuals", numel, torch.int64 if weight.element_size() == 4 else torch.int32)
    lossless_contexts = _work_array(arrays, "lossless contexts", numel, torch.uint8)
    run = map if pool is None else pool.map
    step = max(1, -(-count // (1 if pool is None else codec_threads())))  # groups per run: one per thread of the pool

    def symbols(part: int) -> None:
        first, last = part * step, min(count, (part + 1) * step)
        codes, elements = slice(first * group_size, last * group_size), slice(first * group_size, min(last * group_size, weight.numel()))
        scales[first:last], offsets[first:last] = ladder.base_grid(groups[first:last], spec.base_bits)
        scale_bits, group_offsets = scales[first:last].view(torch.int16).numpy(), offsets[first:last].numpy()
        native.quantize_groups(
            groups[first:last].numpy(), group_size, scale_bits, group_offsets, spec.base_bits, top_bits, headroom, top[codes].numpy()
        )
        native.base_stage(
            top[codes].numpy(), top_bits, spec.base_bits, spec.widths()[1] if spec.stage_bits else spec.base_bits,
            packed[first * group_size // 8 * spec.base_bits : last * group_size // 8 * spec.base_bits].numpy(),
            contexts[0][codes].numpy(), refinements[0][codes].numpy() if spec.stage_bits else None,
        )  # fmt: skip
        for stage, (low, high) in enumerate(itertools.pairwise(spec.stage_bits), start=1):
            native.stage_refinements(top[codes].numpy(), top_bits, low, high, coarse[codes].numpy(), refinements[stage][codes].numpy())
            native.refinement_contexts(coarse[codes].numpy(), low, contexts[stage][codes].numpy())
        native.lossless_symbols(
            top[codes].numpy(), scale_bits, group_offsets, spec.base_bits, top_bits, group_size, dtype_code,
            original[elements].numpy(), lossless_contexts[elements].numpy(), residuals[elements].numpy(),
            lossless.CONTEXT_MIN, lossless.CONTEXT_MAX, spec.context_step_bits,
        )  # fmt: skip

    list(run(symbols, range(max(1, -(-count // step)))))
    streams = [*zip(refinements, contexts), (residuals, lossless_contexts)][::-1]  # the lossless one, the largest, starts first
    deltas = list(run(lambda stream: entropy.encode(*stream), streams))[::-1]
    return packed, scales, offsets, deltas


def _padded_codes(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """Chosen base codes of one block as ``(groups, group_size)`` int32, the padding at code 0."""
    padding = -codes.numel() % group_size
    return torch.nn.functional.pad(codes.to(torch.int32), (0, padding)).view(-1, group_size)


def _decode_block(
    packed_codes: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    deltas: list[bytes | memoryview],
    spec: Ladder,
    numel: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    codes = ladder.unpack(packed_codes, spec.base_bits).view(-1, spec.group_size)
    widths = spec.widths()
    reached = spec.base_bits
    for (low, high), delta in zip(zip(widths, widths[1:]), deltas):
        refinements = entropy.decode(delta, _refinement_contexts(codes, low))
        codes = ladder.refine(codes, refinements, low, high, spec.corrected and low == spec.base_bits)
        reached = high
    template = torch.empty(numel, dtype=dtype, device="meta")
    reconstruction = _reconstruct(codes, scales, offsets, spec, reached, template)
    if len(deltas) < spec.stage_count:
        return reconstruction
    contexts = _lossless_contexts(reconstruction, scales, spec, template)
    return lossless.restore(reconstruction, entropy.decode(deltas[-1], contexts))


_HALF_EXPONENT = 0x7C00
"""The exponent field of a float16 bit pattern (a scale's)."""
_NATIVE_DTYPES = {torch.float32: (0, torch.int32), torch.bfloat16: (1, torch.int16), torch.float16: (2, torch.int16)}
"""Source dtypes the C block decoder writes: its dtype code and the same-width integer type of the output's bits."""


def _native_decodes(dtype: torch.dtype, scales: torch.Tensor, spec: Ladder) -> bool:
    """Whether ``_decode_block_native`` decodes this block: C loops on, a float dtype it knows, finite scales,
    and a plain ladder.

    Non-finite scales (a release no ``split`` writes) stay on the torch path, whose casts of NaN
    differ between its own scalar and vector loops; the C decoder assumes finite reconstructions.
    A corrected ladder (``split --gptq``: signed first-stage refinements, ``ladder.refine``) has no
    C loop yet and decodes on the torch path too.
    """
    if spec.corrected or not entropy.native_enabled() or dtype not in _NATIVE_DTYPES:
        return False
    exponents = scales.view(torch.int16).numpy() & _HALF_EXPONENT  # float16 scales; all ones: inf or NaN
    return not (exponents == _HALF_EXPONENT).any()  # numpy: ~10x faster than torch.isfinite on float16


def _decode_block_native(
    output: torch.Tensor,
    packed_codes: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    deltas: list[bytes | memoryview],
    spec: Ladder,
) -> None:
    """``_decode_block`` in the C loops, written into ``output`` (the block's slice of the tensor): the same bits.

    With one refinement stage to decode (the default ladder), one pass over stretches of the block
    that stay in the L1 cache unpacks the base codes, refines them from the stage's inflated planes
    and dequantizes them into ``output`` while it computes the lossless contexts and their
    histogram: no block-wide int32 codes, and the stage's plane sizes (the histogram of its
    contexts, the base codes) are counted from the packed bytes. Otherwise one pass unpacks the
    codes, one per refinement stage raises them in place and one dequantizes. The last pass adds
    the residuals in place. No argsort, no scatter, no int64 temporaries (memory: the lossless
    contexts and each stage's symbols per block, plus int32 codes beyond one stage).
    """
    native = entropy._native
    dtype_code, bits_dtype = _NATIVE_DTYPES[output.dtype]
    values = output.view(bits_dtype).numpy()
    stages = min(len(deltas), len(spec.stage_bits))
    full = len(deltas) == spec.stage_count
    lossless_contexts = torch.empty(output.numel() if full else 0, dtype=torch.uint8).numpy()
    bounds = (lossless.CONTEXT_MIN, lossless.CONTEXT_MAX, spec.context_step_bits)
    scale_bits, group_offsets = scales.view(torch.int16).numpy(), offsets.contiguous().numpy()
    if stages == 1:
        packed = packed_codes.numpy()
        counts = native.packed_contexts(packed, spec.base_bits)
        counts = native.decode_refined(
            packed, spec.base_bits, counts, *entropy.inflate_planes(deltas[0], counts), spec.stage_bits[0], scale_bits,
            group_offsets, spec.top_bits, spec.group_size, dtype_code, values, lossless_contexts if full else None, *bounds,
        )  # fmt: skip
    else:
        codes = torch.empty(scales.numel() * spec.group_size, dtype=torch.int32).numpy()
        native.unpack_codes(packed_codes.numpy(), spec.base_bits, codes)
        contexts = torch.empty(codes.size, dtype=torch.uint8).numpy()
        widths = spec.widths()
        for (low, high), delta in zip(itertools.pairwise(widths[: stages + 1]), deltas):
            counts = native.refinement_contexts(codes, low, contexts)
            native.refine(codes, contexts, counts, *entropy.inflate_planes(delta, counts), low, high)
        counts = native.reconstruct(
            codes, scale_bits, group_offsets, spec.base_bits, widths[stages], spec.top_bits, spec.group_size, dtype_code, values,
            lossless_contexts if full else None, *bounds,
        )  # fmt: skip
    if full:
        native.restore_planes(values, lossless_contexts, counts, *entropy.inflate_planes(deltas[-1], counts), output.element_size())


def dequantize_packed(
    packed_codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, spec: Ladder, shape, dtype
) -> torch.Tensor:
    """The base tensor from its packed codes and offsets: what a packed layer computes in ``forward``."""
    groups = scales.numel()
    group_offsets = None if offsets is None else _group_offsets(offsets, spec, groups)
    values = ladder.dequantize_packed(packed_codes, scales, group_offsets, spec.base_bits, spec.group_size)
    return values.reshape(-1)[: math.prod(shape)].reshape(shape).to(dtype)


def encode_base(
    packed_codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, spec: Ladder, code_codes: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The codes, scales and offsets as a base of format 7 on stores them: each an entropy stream (uint8) where that is shorter.

    Raw, a ``b``-wide base spends ``b`` bits a code, 16 a scale and ``b`` an offset, yet the codes
    of a group crowd around its grid's centre, which its offset sets, the scales' sign and exponent
    bytes take few values (``ladder.SCALE_MANTISSA_BITS``), and most offsets are 0 or 1 (MiniLM, 4
    bits: 3.72 bits a code, 4.7 bits a scale, 2.3 bits an offset). The codes (unsigned, padding included) are coded in the stage
    payloads' blocks, each code in the context of its group's unsigned offset, so blocks decode in
    parallel; the scales' float16 bit patterns form one stream of one context, the unsigned offsets
    another. A stream is never as long as the raw array it replaces (a small tensor's may be
    longer: the raw one is kept), so ``decode_base`` tells them apart by length and dtype.

    ``code_codes=False`` keeps the codes raw (``split``'s default): decoding them costs ~2.5 ns of CPU a
    weight on the path to a usable model (MiniLM: +0.06 s; a 1.1 GB model: +1.6 s at 1000 MB/s), for
    5-7% fewer base bytes; the scales and offsets are 1/64 of that work.
    """
    groups = scales.numel()
    one_context = torch.zeros(groups, dtype=torch.uint8)
    patterns = scales.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    stored_scales = _shorter(entropy.encode(patterns, one_context), scales)
    unsigned_offsets = _offset_contexts(offsets, spec, groups)
    stored_offsets = _shorter(entropy.encode(unsigned_offsets, one_context), offsets)
    if not code_codes:
        return packed_codes, stored_scales, stored_offsets
    unsigned = ladder.unpack_unsigned(packed_codes, spec.base_bits)
    size = spec.group_size
    ranges = _block_ranges(groups * size, size)

    def encode_block(index: int) -> bytes:
        start, stop = ranges[index]
        return entropy.encode(unsigned[start:stop], unsigned_offsets[start // size : stop // size].repeat_interleave(size))

    with _one_torch_thread():
        coded_codes = _frame(_map_blocks(encode_block, len(ranges)))
    return _shorter(coded_codes, packed_codes), stored_scales, stored_offsets


def _shorter(stream: bytes, raw: torch.Tensor) -> torch.Tensor:
    """The coded ``stream`` as a uint8 tensor where it takes fewer bytes than ``raw``, else ``raw``."""
    return byte_tensor(stream) if len(stream) < raw.numel() * raw.element_size() else raw


def decode_base(
    stored_codes: torch.Tensor, stored_scales: torch.Tensor, stored_offsets: torch.Tensor, spec: Ladder, numel: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``encode_base``: the packed codes, the float16 scales and the packed offsets of a tensor of ``numel`` elements.

    Raises:
        entropy.CorruptStreamError: see ``decode_base_codes``, ``decode_base_scales`` and ``decode_base_offsets``.
    """
    groups = ladder.group_count(numel, spec.group_size)
    offsets = decode_base_offsets(stored_offsets, spec, groups)
    return decode_base_codes(stored_codes, offsets, spec, numel), decode_base_scales(stored_scales, groups), offsets


def decode_base_offsets(stored_offsets: torch.Tensor, spec: Ladder, groups: int) -> torch.Tensor:
    """The packed offsets of ``groups`` groups as a base stores them: uint8 offsets of the packed size are the
    packed offsets, shorter ones a stream.

    Raises:
        entropy.CorruptStreamError: longer offsets, a stream that does not parse, or holds an offset out of range
            or (``entropy.check_room``) cannot hold ``groups`` offsets.
    """
    size = ladder.offsets_bytes(groups, spec.base_bits)
    if stored_offsets.dtype != torch.uint8 or stored_offsets.numel() > size:
        raise entropy.CorruptStreamError(f"offsets stored as {stored_offsets.dtype}[{stored_offsets.numel()}] for {size} packed bytes")
    if stored_offsets.numel() == size:
        return stored_offsets
    entropy.check_room(stored_offsets.numel(), groups, "offsets")
    unsigned = entropy.decode(_stream_bytes(stored_offsets), torch.zeros(groups, dtype=torch.uint8))
    if unsigned.numel() and int(unsigned.max()) >> spec.base_bits:
        raise entropy.CorruptStreamError(f"an offset is wider than the tensor's {spec.base_bits} bits")
    return ladder.pack_offsets(unsigned.to(torch.int32) - (1 << (spec.base_bits - 1)), spec.base_bits)


def decode_base_scales(stored_scales: torch.Tensor, groups: int) -> torch.Tensor:
    """The float16 scales of ``groups`` groups as a base stores them: float16 scales are the scales, uint8
    ones a stream (of fewer bytes than the scales take).

    Raises:
        entropy.CorruptStreamError: anything else, a stream that does not parse, a value above 16 bits, or a
            stream that cannot hold ``groups`` scales (``entropy.check_room``).
    """
    if stored_scales.dtype == ladder.SCALE_DTYPE and stored_scales.numel() == groups:
        return stored_scales
    if stored_scales.dtype != torch.uint8 or stored_scales.numel() >= groups * ladder.SCALE_DTYPE.itemsize:
        raise entropy.CorruptStreamError(f"scales stored as {stored_scales.dtype}[{stored_scales.numel()}] for {groups} groups")
    entropy.check_room(stored_scales.numel(), groups, "scales")
    patterns = entropy.decode(_stream_bytes(stored_scales), torch.zeros(groups, dtype=torch.uint8))
    if patterns.numel() and int(patterns.max()) > 0xFFFF:
        raise entropy.CorruptStreamError("a scale is wider than 16 bits")
    return torch.from_numpy(patterns.numpy().astype(np.uint16)).view(ladder.SCALE_DTYPE)


def decode_base_codes(stored_codes: torch.Tensor, offsets: torch.Tensor, spec: Ladder, numel: int) -> torch.Tensor:
    """The packed codes of a tensor of ``numel`` elements as a base stores them: uint8 codes of the packed
    size are the packed codes, shorter ones a stream.

    Raises:
        entropy.CorruptStreamError: longer codes, a stream that does not parse or a code out of range.
    """
    groups = ladder.group_count(numel, spec.group_size)
    bytes_per_group = spec.group_size * spec.base_bits // 8
    if stored_codes.dtype != torch.uint8 or stored_codes.numel() > groups * bytes_per_group:
        raise entropy.CorruptStreamError(
            f"codes stored as {stored_codes.dtype}[{stored_codes.numel()}] for {groups * bytes_per_group} packed bytes"
        )
    if stored_codes.numel() == groups * bytes_per_group:
        return stored_codes
    contexts = _offset_contexts(offsets, spec, groups)
    packed = torch.empty(groups * bytes_per_group, dtype=torch.uint8)
    ranges = _block_ranges(numel, spec.group_size)
    streams = _unframe(_stream_bytes(stored_codes), len(ranges))

    def decode_block(index: int) -> None:
        start, stop = ranges[index]
        first, last = start // spec.group_size, ladder.group_count(stop, spec.group_size)
        block_contexts, target = contexts[first:last], packed[first * bytes_per_group : last * bytes_per_group]
        if entropy.native_enabled():  # the planes packed group by group: no per-code contexts
            counts = (np.bincount(block_contexts.numpy(), minlength=256) * spec.group_size).astype(np.int64).tobytes()
            widths, planes = entropy.inflate_planes(streams[index], counts)
            widest = 256 if max(widths) > 1 else entropy._native.pack_groups(
                planes, counts, widths, block_contexts.numpy(), spec.group_size, spec.base_bits, target.numpy()
            )  # fmt: skip
        else:
            unsigned = entropy.decode(streams[index], block_contexts.repeat_interleave(spec.group_size))
            widest = int(unsigned.max()) if unsigned.numel() else 0
            if widest >> spec.base_bits == 0:
                target.copy_(ladder.pack_unsigned(unsigned, spec.base_bits))
        if widest >> spec.base_bits:
            raise entropy.CorruptStreamError(f"a code is wider than the tensor's {spec.base_bits} bits")

    with _one_torch_thread():
        _map_blocks(decode_block, len(streams))
    return packed


def byte_tensor(data: bytes) -> torch.Tensor:
    """``data`` as a 1-D uint8 tensor, as safetensors stores a coded stream."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def _stream_bytes(stream: torch.Tensor) -> memoryview:
    """The bytes of a 1-D uint8 tensor, without a copy."""
    return stream.contiguous().numpy().data


def _offset_contexts(offsets: torch.Tensor, spec: Ladder, groups: int) -> torch.Tensor:
    """The context of each group's codes in a coded base: its unsigned offset ``o + 2**(b-1)`` (uint8)."""
    return (_group_offsets(offsets, spec, groups) + (1 << (spec.base_bits - 1))).to(torch.uint8)


def base_reconstruction(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``weight`` as a ``bits``-wide base would hold it (same shape and dtype), without coding anything.

    What split's width allocation measures a width by; it uses the same grid search as ``encode``.
    """
    groups = ladder.to_groups(weight, group_size)
    scales, offsets = ladder.base_grid(groups, bits)
    codes = ladder.quantize(groups, scales, offsets, bits, bits)
    return _reconstruct(codes, scales, offsets, Ladder(bits, (), group_size), bits, weight)


def _reconstruct(
    codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, spec: Ladder, bits: int, like: torch.Tensor
) -> torch.Tensor:
    values = ladder.dequantize(codes, scales, offsets, spec.base_bits, bits)
    return values.reshape(-1)[: like.numel()].reshape(like.shape).to(like.dtype)


def _refinement_contexts(coarse_codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Context of a refinement: the coarse code itself, offset to ``[0, 2**bits)`` (codes beyond a clamped
    base's range, at a stage above the first, take the nearest end)."""
    if bits > 8:
        return _folded(coarse_codes, bits)
    return (coarse_codes + (1 << (bits - 1))).clamp(0, (1 << bits) - 1).to(torch.uint8)


def _folded(coarse_codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Wide coarse codes: context is the code's magnitude class (bit length), fitting a uint8."""
    magnitude = torch.where(coarse_codes < 0, -coarse_codes - 1, coarse_codes)
    return (torch.frexp(magnitude.to(torch.float32) + 1).exponent).to(torch.uint8)


def _lossless_contexts(reconstruction: torch.Tensor, scales: torch.Tensor, spec: Ladder, like: torch.Tensor) -> torch.Tensor:
    step = ladder.level_scales(scales, spec.base_bits, spec.top_bits)
    per_element = step.unsqueeze(1).expand(-1, spec.group_size).reshape(-1)[: like.numel()].reshape(like.shape)
    return lossless.contexts(reconstruction, per_element, spec.context_step_bits)
