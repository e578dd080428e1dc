"""Codec throughput on MiniLM's ladder tensors: p2u encode / decode per stage next to ZipNN, one table.

Usage: ``python benchmarks/codec_speed.py [--runs 3] [--dtypes float32 bfloat16] [--source FOLDER] [--profile]``

``--source`` measures another checkpoint folder's tensors instead of MiniLM's (e.g. the 1.1 GB one of
``benchmarks/realistic_checkpoint.py``), each cast to the ``--dtypes``.

Every measurement runs in a fresh interpreter (``--worker``), ``--runs`` times; the table shows
medians. MB/s are of *output* (decode: the rebuilt source-dtype tensors; encode and ZipNN
compress: the source bytes in), per wall second and per CPU second (the machine is shared, so
CPU time is the steadier figure). "decode to stage k" decodes from the base through stage k,
which is what ``upgrade`` to stage k does; encode codes every stage at once, as ``split`` does. The
"tensors on threads" row decodes several tensors at once on ``codec_threads()`` threads, as
``merge`` / ``upgrade`` / ``verify`` do (most tensors are one coding block, so blocks alone leave cores idle).
ZipNN runs with one thread on the same tensors' raw bytes. ``--profile`` adds the top functions by
CPU time of one decode and one encode. The machine load (``uptime``) is printed before and after.
Set ``P2U_NO_NATIVE=1`` to measure the pure-Python fallback, ``P2U_CODEC_THREADS`` for the threads.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from p2u_hub.codecs import progressive
from p2u_hub.core import format as fmt
from p2u_hub.core.storage import TensorReader
from p2u_hub.core.summary import text_table
from p2u_hub.tools.demo import bundled_minilm

SPEC = progressive.Ladder(4, progressive.default_stage_bits(4), 64)


def ladder_tensors(dtype: torch.dtype, source: str | None = None) -> list[torch.Tensor]:
    """The tensors of ``source`` (default MiniLM) that ``split`` ladder-codes (matrices of at least one group), cast to ``dtype``."""
    reader = TensorReader(fmt.weight_files(source or bundled_minilm(), fmt.BASE_WEIGHTS_NAME))
    tensors = (reader.get(name) for name in reader.locations)
    return [tensor.to(dtype) for tensor in tensors if tensor.ndim >= 2 and tensor.numel() >= SPEC.group_size]


def timed(function) -> tuple[float, float]:
    """(wall, CPU) seconds of ``function()``; CPU time covers all threads of this process."""
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(dtype: torch.dtype, source: str | None = None) -> dict[str, tuple[float, float, float]]:
    """{row: (megabytes, wall s, CPU s)} for p2u encode, decode to each stage, ZipNN compress/decompress."""
    tensors = ladder_tensors(dtype, source)
    megabytes = sum(fmt.tensor_bytes(tensor).nbytes for tensor in tensors) / 1e6
    encoded: list[progressive.EncodedTensor] = []
    rows = {"p2u encode (all stages)": (megabytes, *timed(lambda: encoded.extend(progressive.encode(t, SPEC) for t in tensors)))}
    threads = progressive.codec_threads()
    with ThreadPoolExecutor(threads) as blocks, ThreadPoolExecutor(threads) as coders:  # what split does (shards.split_shard)
        rows["p2u encode (all stages), tensors on threads"] = (megabytes, *timed(lambda: list(coders.map(
            lambda tensor: progressive.encode(tensor, SPEC, pool=blocks), tensors
        ))))  # fmt: skip
    for stage in range(1, SPEC.stage_count + 1):
        rows[f"p2u decode to stage {stage}"] = (megabytes, *timed(lambda stage=stage: [
            progressive.decode(e.packed_codes, e.scales, e.offsets, e.deltas[:stage], SPEC, tuple(t.shape), t.dtype)
            for e, t in zip(encoded, tensors)
        ]))  # fmt: skip
    with ThreadPoolExecutor(progressive.codec_threads()) as pool:  # what merge / upgrade do (release.TensorPrefetch)
        rows[f"p2u decode to stage {SPEC.stage_count}, tensors on threads"] = (megabytes, *timed(lambda: list(pool.map(
            lambda pair: progressive.decode(pair[0].packed_codes, pair[0].scales, pair[0].offsets, pair[0].deltas, SPEC,
                                            tuple(pair[1].shape), pair[1].dtype),
            zip(encoded, tensors),
        ))))  # fmt: skip
    import zipnn

    codec = zipnn.ZipNN(input_format="byte", bytearray_dtype=str(dtype).removeprefix("torch."), threads=1)
    raws = [fmt.tensor_bytes(tensor).tobytes() for tensor in tensors]
    packed: list[bytes] = []
    rows["zipnn compress"] = (megabytes, *timed(lambda: packed.extend(codec.compress(bytearray(raw)) for raw in raws)))
    rows["zipnn decompress"] = (megabytes, *timed(lambda: [codec.decompress(data) for data in packed]))
    return rows


def profile(dtype: torch.dtype, top: int = 14) -> None:
    """Print the functions with the most own CPU time in one encode and one full decode, on one thread."""
    os.environ[progressive.THREADS_VARIABLE] = "1"  # cProfile sees only the calling thread
    tensors = ladder_tensors(dtype)
    profiler = cProfile.Profile(time.process_time)
    encoded = profiler.runcall(lambda: [progressive.encode(t, SPEC) for t in tensors])
    print(f"\n== encode {dtype}, own CPU time ==")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)
    profiler = cProfile.Profile(time.process_time)
    profiler.runcall(lambda: [
        progressive.decode(e.packed_codes, e.scales, e.offsets, e.deltas, SPEC, tuple(t.shape), t.dtype) for e, t in zip(encoded, tensors)
    ])  # fmt: skip
    print(f"\n== full decode {dtype}, own CPU time ==")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--source", help="checkpoint folder to measure (default: the bundled MiniLM)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(getattr(torch, args.worker), args.source)))
        return
    source = ["--source", args.source] if args.source else []
    print("load before:", subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip())
    print(f"torch threads {torch.get_num_threads()}, codec threads {progressive.codec_threads()}, "
          f"native loops {progressive.entropy.native_enabled()}, cpus {os.cpu_count()}")  # fmt: skip
    table = []
    for dtype in args.dtypes:
        runs = [
            json.loads(
                subprocess.run([sys.executable, __file__, "--worker", dtype, *source], check=True, capture_output=True, text=True).stdout
            )
            for _ in range(args.runs)
        ]
        decompress = statistics.median(run["zipnn decompress"][2] for run in runs)
        compress = statistics.median(run["zipnn compress"][2] for run in runs)
        for row in runs[0]:
            megabytes = runs[0][row][0]
            wall = statistics.median(run[row][1] for run in runs)
            cpu = statistics.median(run[row][2] for run in runs)
            reference = compress if "encode" in row or "compress" in row else decompress
            table.append([dtype, row, f"{megabytes:.1f}", f"{megabytes / wall:,.0f}", f"{megabytes / cpu:,.0f}", f"{reference / cpu:.2f}"])
    print(f"medians of {args.runs} fresh processes; last column: ZipNN CPU time / this row's CPU time (same runs)")
    print("\n".join(text_table([("dtype", "step", "MB", "MB/s wall", "MB/s CPU", "vs zipnn"), *table])))
    print("load after:", subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip())
    if args.profile:
        for dtype in args.dtypes:
            profile(getattr(torch, dtype))


if __name__ == "__main__":
    main()
