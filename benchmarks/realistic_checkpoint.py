"""Is the tiled-from-MiniLM Llama checkpoint realistic? Its bytes under zstd, ZipNN and p2u next to MiniLM's.

Usage: ``python benchmarks/realistic_checkpoint.py --folder /tmp/llama-minilm-1gb [--gb 1.1] [--dtype bfloat16]
[--noise-gb 0.2] [--workdir /tmp/w]``

Writes (unless it exists) a Llama-shaped checkpoint of at least ``--gb`` GB whose tensors are tiled
from all-MiniLM-L6-v2's trained weights (``write_synthetic_llama(weights="minilm")``), and a
``--noise-gb`` N(0, 0.02) one for contrast, then prints, for MiniLM in the same dtype, the tiled
checkpoint and the noise one: zstd-3 and ZipNN ratios (compressed / source bytes) and the p2u
release's byte ratios (base, every stage, total; ``split --uniform``, 4-bit base, 8-bit stage,
lossless). Bytes alone hardly tell trained weights from noise in bf16 (both land near 0.66 under
ZipNN), so it also prints what does: the excess kurtosis of the weights and the spread (coefficient
of variation) of the per-group ranges over 64-weight groups, medians over the matrices: the grid's
scales follow these. One JSON line ends the output. Run it on a quiet machine (``uptime`` is printed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
from safetensors.torch import load_file, save_file

from p2u_hub import split
from p2u_hub.core.storage import TensorReader
from p2u_hub.core.summary import summarize, text_table
from p2u_hub.tools.bench import write_synthetic_llama, zipnn_reference, zstd_reference
from p2u_hub.tools.demo import bundled_minilm

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def minilm_in(dtype: torch.dtype, work: Path) -> Path:
    """MiniLM with its floating tensors cast to ``dtype`` (the folder as shipped when float32)."""
    source = bundled_minilm()
    if dtype == torch.float32:
        return source
    folder = work / "minilm"
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(source / "model.safetensors")
    save_file({name: t.to(dtype) if t.is_floating_point() else t for name, t in tensors.items()}, folder / "model.safetensors")
    return folder


def statistics(checkpoint: Path, group_size: int = 64) -> dict:
    """Median over the matrices of their weights' excess kurtosis and of the coefficient of variation of their group ranges."""
    reader = TensorReader(sorted(checkpoint.glob("*.safetensors")))
    kurtosis, spread = [], []
    for name in reader.locations:
        tensor = reader.get(name)
        if tensor.dim() != 2 or not tensor.is_floating_point() or tensor.numel() % group_size:
            continue
        values = tensor.double().reshape(-1)
        centred = values - values.mean()
        groups = values.reshape(-1, group_size)
        ranges = groups.amax(dim=1) - groups.amin(dim=1)
        kurtosis.append(float((centred**4).mean() / (centred**2).mean() ** 2 - 3))
        spread.append(float(ranges.std() / ranges.mean()))
    return {"excess_kurtosis": round(median(kurtosis), 2), "group_range_cv": round(median(spread), 3)}


def ratios(checkpoint: Path, work: Path) -> dict:
    """zstd, ZipNN and p2u byte ratios of one checkpoint."""
    files = sorted(checkpoint.glob("*.safetensors"))
    zstd, zipnn = zstd_reference(files, work), zipnn_reference(files)
    start = time.perf_counter()
    release = split(checkpoint, work / "release", uniform=True, overwrite=True)
    split_s = time.perf_counter() - start
    summary = summarize(release)
    shutil.rmtree(release)
    return {
        **statistics(checkpoint),
        "source_bytes": summary["source_bytes"],
        "zstd": zstd["ratio"],
        "zipnn": zipnn["ratio"],
        "p2u": {stage["name"]: stage["fraction_of_source"] for stage in summary["stages"]} | {"total": summary["total_fraction"]},
        "p2u_vs_zipnn": round(summary["total_fraction"] / zipnn["ratio"], 4) if zipnn["ratio"] else None,
        "split_s": round(split_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True, help="the tiled checkpoint (written if missing)")
    parser.add_argument("--gb", type=float, default=1.1)
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--noise-gb", type=float, default=0.2, help="size of the N(0, 0.02) contrast (0: skip)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    if not args.folder.exists():
        start = time.perf_counter()
        write_synthetic_llama(args.folder, args.gb, weights="minilm", dtype=dtype)
        print(f"wrote {args.folder} in {time.perf_counter() - start:.1f} s")
    with tempfile.TemporaryDirectory(dir=args.workdir) as temporary:
        work = Path(temporary)
        checkpoints = {f"MiniLM {args.dtype}": minilm_in(dtype, work), f"tiled from MiniLM ({args.gb} GB)": args.folder}
        if args.noise_gb:
            checkpoints[f"N(0, 0.02) noise ({args.noise_gb} GB)"] = write_synthetic_llama(work / "noise", args.noise_gb, dtype=dtype)
        results = {label: ratios(folder, work) for label, folder in checkpoints.items()}
    stages = sorted({name for result in results.values() for name in result["p2u"]} - {"total"})
    rows = [
        (
            "checkpoint",
            "MB",
            "kurtosis",
            "range CV",
            "zstd-3",
            "ZipNN",
            *(f"p2u {name}" for name in stages),
            "p2u total",
            "p2u / ZipNN",
            "split s",
        )
    ]
    for label, result in results.items():
        rows.append(
            (
                label, f"{result['source_bytes'] / 1e6:,.0f}", f"{result['excess_kurtosis']:.2f}", f"{result['group_range_cv']:.3f}",
                f"{result['zstd']:.3f}", f"{result['zipnn']:.3f}",
                *(f"{result['p2u'][name]:.3f}" for name in stages), f"{result['p2u']['total']:.3f}",
                f"{result['p2u_vs_zipnn']:.3f}", f"{result['split_s']}",
            )
        )  # fmt: skip
    print("\n".join(text_table(rows)))
    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print(json.dumps({"dtype": args.dtype, "results": results}))


if __name__ == "__main__":
    main()
