"""Split one source shard: the unit of work of ``split``, run by a local process pool or mapped by Ray or Dask.

``split`` makes a release-wide plan first (every tensor's manifest entry, the copies among the
checkpoint's tensors, the per-tensor widths, GPTQ's Hessians), cuts it into one ``ShardJob`` per
source safetensors file, runs ``split_shard`` on each job — independently, in any order, on any
machine that sees the source file and the job's part file — and ``combine`` assembles the
results into the release's weight files, in the source's tensor order, byte for byte as one
process coding the tensors in order would write them.

A job writes the bytes it stores (base codes, scales, offsets, exact tensors, stage payloads) one
after the other into its *part file* and returns a ``ShardResult``: each tensor's completed
manifest entry (sha256, width, whether its codes were corrected) and, per stored array, where
it lies in the part file, with its sha256. ``combine`` needs nothing else: it restores the global
copy rule (a ladder tensor equal to an earlier one, in file order, is stored once: a job only
sees its own shard, so a copy of a tensor of an earlier shard is found here and its pieces
dropped), then feeds the pieces to the release's ``ShardedWriter``s, which copy them from the part
files into their shards.

``run_in_processes`` is the local process pool that runs these jobs, and ``merge``'s per-file jobs.
"""

from __future__ import annotations

import dataclasses
import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_all_start_methods, get_context
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import TypeVar

import torch
from huggingface_hub.utils import tqdm

from ..codecs import progressive
from ..errors import P2UError
from . import format as fmt
from .gptq import corrected_codes as gptq_codes
from .storage import ShardedWriter, TensorReader

BASE_OUTPUT = 0
"""``Piece.output`` of the base folder; stage ``k`` is output ``k``."""
AHEAD_BYTES = 1 << 28
"""Source bytes of the tensors ``split_shard`` codes ahead of the one it writes (beyond that, one tensor at a time)."""
WORKER_MIN_BYTES = 256 * 1024**2
"""By default each worker process gets at least this much source: starting one (a fresh interpreter importing
torch) took 1.5-3 s on a loaded 2-core machine, what the codec takes for 100-200 MB."""


@dataclass
class ShardJob:
    """Everything ``split_shard`` needs to code one source file: picklable, no open handles.

    Args:
        source: the source safetensors file.
        part: the file to write the stored bytes to (created or truncated).
        entries: the file's tensors, in file order, as planned (codec, dtype, shape; sha256 and
            ``alias_of`` when the plan already hashed them).
        widths: the base width of every stored ladder tensor among them.
        spec: the release's ladder (budget width, stage widths, group size).
        hessians: GPTQ's calibration Hessian of each tensor whose base codes it corrects.
        compact_base: entropy-code the base's codes too, not only its scales and offsets (``progressive.encode_base``).
    """

    source: Path
    part: Path
    entries: dict[str, fmt.TensorEntry]
    widths: dict[str, int]
    spec: progressive.Ladder
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    compact_base: bool = False


@dataclass(frozen=True)
class Piece:
    """One array a release stores: in output ``output`` (``BASE_OUTPUT`` or a stage index) under ``name``,
    taken from source tensor ``tensor``, ``size`` bytes at ``offset`` in the job's part file."""

    output: int
    tensor: str
    name: str
    dtype: str
    shape: list[int]
    offset: int
    size: int
    sha256: str


@dataclass
class ShardResult:
    """What ``split_shard`` did with one source file: the completed entries and the pieces, in writing order."""

    part: Path
    entries: dict[str, fmt.TensorEntry]
    pieces: list[Piece]


def split_shard(job: ShardJob, on_tensor: Callable[[], object] | None = None) -> ShardResult:
    """Code every tensor of one source file onto the ladder, writing what the release stores to ``job.part``.

    Reads each tensor once; a ladder tensor whose bytes equal an earlier one of this file is
    marked ``alias_of`` and not coded (``combine`` finds the copies across files). ``on_tensor``
    is called after each tensor (a progress bar).

    The next tensors are coded while one is written, their blocks sharing ``codec_threads()``
    threads: most tensors are a single coding block, and coded one at a time they left the
    other cores idle (MiniLM bfloat16 on 2 cores: 170-180 MB/s, tensors ahead 233-248 MB/s).
    The part file is the same: tensors are read, hashed and written in file order. Memory: at
    most ``2 * codec_threads()`` tensors and ``AHEAD_BYTES`` of source ahead of the one written
    (always one), with their codings.

    Raises:
        P2UFormatError: the file or a tensor cannot be read.
    """
    reader = TensorReader([job.source])
    entries = {name: dataclasses.replace(entry) for name, entry in job.entries.items()}  # the job stays as planned
    pieces: list[Piece] = []
    copies: dict[tuple, str] = {}
    threads = progressive.codec_threads()
    ahead: deque[tuple[str, Future | torch.Tensor | None, int]] = deque()  # name, its coding or exact tensor, its bytes
    with (
        job.part.open("wb") as part,
        ThreadPoolExecutor(threads, thread_name_prefix="p2u-split-blocks") as blocks,
        ThreadPoolExecutor(threads, thread_name_prefix="p2u-split-tensors") as coders,
    ):

        def store(output: int, tensor: str, name: str, array: torch.Tensor, sha256: str | None = None) -> None:
            data = fmt.tensor_bytes(array)
            digest = sha256 or fmt.sha256_bytes(data)
            pieces.append(Piece(output, tensor, name, fmt.DTYPE_NAMES[array.dtype], list(array.shape), part.tell(), len(data), digest))
            part.write(data)

        def write_oldest() -> None:
            name, work, _ = ahead.popleft()
            if isinstance(work, torch.Tensor):
                store(BASE_OUTPUT, name, name, work, entries[name].sha256)
            elif work is not None:
                encoded, stored_base = work.result()
                _store_encoded(name, encoded, stored_base, store)
            if on_tensor is not None:
                on_tensor()

        for name, entry in entries.items():
            work = None if entry.alias_of is not None else _start_tensor(name, entry, reader, job, copies, coders, blocks)
            ahead.append((name, work, entry.numel * entry.torch_dtype.itemsize if work is not None else 0))
            while len(ahead) > 1 and (len(ahead) > 2 * threads or sum(size for *_, size in ahead) > AHEAD_BYTES):
                write_oldest()
        while ahead:
            write_oldest()
    return ShardResult(job.part, entries, pieces)


def _start_tensor(
    name: str, entry: fmt.TensorEntry, reader: TensorReader, job: ShardJob, copies: dict[tuple, str],
    coders: ThreadPoolExecutor, blocks: ThreadPoolExecutor,
) -> Future | torch.Tensor | None:  # fmt: skip
    """Read and hash one tensor (in file order: the copy rule), then start its coding.

    Returns the tensor itself for an exact one, the future ``EncodedTensor`` of a ladder tensor
    (its blocks coded on ``blocks``), None for a copy of an earlier tensor.
    """
    tensor = reader.get(name)
    if not entry.sha256:  # read here for the first time: the one read of this tensor
        entry.sha256 = fmt.tensor_sha256(tensor)
        if mark_copy(name, entry, copies):
            return None
    if entry.codec == fmt.CODEC_EXACT:
        return tensor
    entry.bits = job.widths[name]
    return coders.submit(_encode_tensor, name, tensor, entry, job, blocks)


def _encode_tensor(
    name: str, tensor: torch.Tensor, entry: fmt.TensorEntry, job: ShardJob, blocks: ThreadPoolExecutor
) -> tuple[progressive.EncodedTensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One ladder tensor's stage payloads and its codes, scales and offsets as the base stores them (GPTQ's codes first where the plan has its Hessian)."""
    spec, bits = job.spec, job.widths[name]
    codes = None if name not in job.hessians else gptq_codes(tensor, job.hessians[name], bits, spec.group_size)
    entry.corrected = codes is not None
    spec = dataclasses.replace(spec, base_bits=bits, corrected=entry.corrected)
    encoded = progressive.encode(tensor, spec, codes, blocks)
    return encoded, progressive.encode_base(encoded.packed_codes, encoded.scales, encoded.offsets, spec, job.compact_base)


def _store_encoded(
    name: str, encoded: progressive.EncodedTensor, stored_base: tuple[torch.Tensor, torch.Tensor, torch.Tensor], store
) -> None:
    """Store one ladder tensor's base arrays (codes, scales and offsets as ``encode_base`` stores them) and its stage payloads."""
    codes, scales, offsets = stored_base
    store(BASE_OUTPUT, name, name, codes)
    store(BASE_OUTPUT, name, fmt.scales_key(name), scales)
    store(BASE_OUTPUT, name, fmt.offsets_key(name), offsets)
    for stage, delta in enumerate(encoded.deltas, start=1):
        store(stage, name, name, progressive.byte_tensor(delta))


def content_key(entry: fmt.TensorEntry) -> tuple:
    return entry.sha256, entry.dtype, tuple(entry.shape)


def mark_copy(name: str, entry: fmt.TensorEntry, copies: dict[tuple, str]) -> bool:
    """Mark a ladder tensor with the bytes of one met before as its alias (stored once); record it otherwise."""
    if entry.codec != fmt.CODEC_LADDER:
        return False
    owner = copies.setdefault(content_key(entry), name)
    if owner != name:
        entry.alias_of = owner
    return owner != name


def combine(
    results: Sequence[ShardResult], tensors: dict[str, fmt.TensorEntry], writers: Sequence[ShardedWriter]
) -> tuple[dict[str, str], list[dict[str, dict]]]:
    """Put the shards' results together: complete ``tensors`` and hand every stored piece to its writer, in order.

    ``results`` come in source file order and ``writers`` are the base's then each stage's. A
    ladder tensor whose bytes equal an earlier tensor's (in file order, across files) becomes its
    alias and its pieces are dropped. The writers copy the pieces from the part files when they
    close (the part files must stay until then).

    Returns:
        The base's ``base_sha256`` (every stored base array) and, per stage, its payload records
        (``{"sha256", "bytes"}`` per tensor).
    """
    copies: dict[tuple, str] = {}
    for result in results:
        for name, entry in result.entries.items():
            tensors[name] = entry
            if mark_copy(name, entry, copies):  # every ladder tensor is hashed by now
                entry.bits, entry.corrected = None, False  # an alias has its owner's width
    base_sha256: dict[str, str] = {}
    payloads: list[dict[str, dict]] = [{} for _ in writers[1:]]
    for result in results:
        for piece in result.pieces:
            if tensors[piece.tensor].alias_of is not None:
                continue
            writers[piece.output].add_stored(piece.name, piece.dtype, piece.shape, result.part, piece.offset, piece.size)
            if piece.output == BASE_OUTPUT:
                base_sha256[piece.name] = piece.sha256
            else:
                payloads[piece.output - 1][piece.name] = {"sha256": piece.sha256, "bytes": piece.size}
    return base_sha256, payloads


def default_workers(files: Sequence[Path]) -> int:
    """Worker processes for ``files``: one per CPU, at most one per file and per ``WORKER_MIN_BYTES`` of source."""
    size = sum(file.stat().st_size for file in files)
    return max(1, min(os.cpu_count() or 1, len(files), size // WORKER_MIN_BYTES))


def map_shards(jobs: Sequence[ShardJob], workers: int) -> list[ShardResult]:
    """``[split_shard(job) for job in jobs]``, on ``workers`` processes (``run_in_processes``; in this one when 1)."""
    if workers == 1 or len(jobs) <= 1:
        total = sum(len(job.entries) for job in jobs)
        with tqdm(total=total, desc="p2u split", unit="tensor") as bar:
            return [split_shard(job, on_tensor=bar.update) for job in jobs]
    return run_in_processes(split_shard, jobs, workers, "p2u split")


Job = TypeVar("Job")
Result = TypeVar("Result")


def run_in_processes(
    function: Callable[[Job], Result], jobs: Sequence[Job], workers: int, what: str, progress: bool = True
) -> list[Result]:
    """``[function(job) for job in jobs]`` on a pool of ``workers`` processes (at most one per job), in the jobs' order.

    The pool that ``split`` and ``merge`` run their per-file jobs on. In one process each
    tensor's blocks are coded on ``codec_threads()`` threads; in a pool, the threads are shared
    out among the workers (one each on a machine with as many cores as workers), so processes
    and threads do not oversubscribe the cores. Workers are not forked from this process (a fork
    of a process whose torch/OpenMP threads already ran can hang): ``forkserver`` where the
    platform has it, which imports ``function``'s module once and forks the workers from that
    clean process (0.1 s a pool, against 3-6 s for ``spawn``, which starts and imports torch in
    each worker, on a loaded 2-core machine), else ``spawn``. Either way a script calling
    ``split`` or ``merge`` with workers needs the usual ``if __name__ == "__main__":`` guard.

    The first failure (in the jobs' order) is raised here once the jobs already running have ended
    (those not started are dropped). ``what`` names the work in the progress bar and in the error
    raised when a worker process dies.

    Raises:
        P2UError: a worker process died (killed, or out of memory).
    """
    workers = min(workers, len(jobs))
    threads = max(1, progressive.codec_threads() // workers)
    context = _start_method(function.__module__)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_set_threads, initargs=(threads,)) as pool:
        futures = [pool.submit(function, job) for job in jobs]
        try:
            return [future.result() for future in tqdm(futures, desc=f"{what} ({workers} workers)", unit="file", disable=not progress)]
        except BrokenProcessPool as error:
            raise P2UError(f"{what}: a worker process died ({error}); killed, or out of memory? Try fewer workers") from None
        finally:
            for future in futures:
                future.cancel()  # those not started yet, after a failure: the pool then waits for the running ones only


def _start_method(preload: str) -> BaseContext:
    """``forkserver`` preloading module ``preload`` where available, else ``spawn`` (``run_in_processes`` says why)."""
    if "forkserver" not in get_all_start_methods():
        return get_context("spawn")
    context = get_context("forkserver")
    context.set_forkserver_preload([preload])
    return context


def _set_threads(threads: int) -> None:
    """Pool initializer: this worker's share of the cores, for the codec's block threads and for torch (GPTQ)."""
    os.environ[progressive.THREADS_VARIABLE] = str(threads)
    torch.set_num_threads(threads)
