"""What a release costs: bytes and bits per weight of the base and of every stage (``p2u inspect``).

A stage's ``bytes`` are the bytes a user downloads for it that the source download does not
also carry: its safetensors files (headers included) and its p2u JSON (manifest or stage
record). Tokenizer and config files are left out on both sides, so ``bytes / source_bytes``
compares weights with weights.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from . import format as fmt
from .release import Release


def summarize(path: str | os.PathLike, *, token: str | bool | None = None) -> dict:
    """The ``p2u inspect --json`` object of a release (or base) folder.

    Returns:
        ``{"source_bytes", "parameters", "ladder", "stages": [{"name", "kind", "bits",
        "bytes", "bits_per_weight", "cumulative_bytes", "fraction_of_source"}], "total_bytes",
        "total_fraction", "widths"}``, the base first. ``widths`` is ``{"method", "average_bits",
        "tensors": {name: {"bits", "weights", "sensitivity"}}}``: each stored quantized tensor's
        base width and, when split measured it, its loss at that width (``p2u_hub.core.allocation``).
    """
    release = Release.open(path, token=token)
    manifest = release.manifest
    source_bytes = manifest.source_bytes()
    parameters = sum(math.prod(entry.shape) for entry in manifest.tensors.values())
    folders: list[tuple[str, str, int | None, Path, str, str]] = [
        (fmt.BASE_DIR, "base", release.qconfig.bits, release.base_dir, fmt.BASE_WEIGHTS_NAME, fmt.MANIFEST_FILE)
    ]
    for entry in release.qconfig.stages:
        folder = release.stage_dir(entry.index)
        folders.append((entry.name, entry.kind, entry.bits, folder, fmt.DELTA_WEIGHTS_NAME, fmt.STAGE_FILE))
    stages = []
    cumulative = 0
    for name, kind, bits, folder, prefix, record_file in folders:
        size = _weight_bytes(folder, prefix) + (folder / record_file).stat().st_size
        cumulative += size
        stages.append({
            "name": name, "kind": kind, "bits": bits, "bytes": size,
            "bits_per_weight": round(8 * size / parameters, 4),
            "cumulative_bytes": cumulative, "fraction_of_source": round(size / source_bytes, 4),
        })  # fmt: skip
    return {
        "source_bytes": source_bytes,
        "parameters": parameters,
        "ladder": {
            "base_bits": manifest.ladder.base_bits,
            "stage_bits": list(manifest.ladder.stage_bits),
            "group_size": manifest.ladder.group_size,
        },
        "stages": stages,
        "total_bytes": cumulative,
        "total_fraction": round(cumulative / source_bytes, 4),
        "widths": _widths(manifest, release.base_dir / fmt.ALLOCATION_FILE),
    }


def _widths(manifest: fmt.Manifest, allocation_file: Path) -> dict:
    allocation = fmt.read_json(allocation_file) if allocation_file.is_file() else {}
    sensitivity = allocation.get("sensitivity", {})
    tensors = {}
    for name, entry in manifest.quantized_tensors().items():
        bits = manifest.tensor_ladder(name).base_bits
        tensors[name] = {"bits": bits, "weights": math.prod(entry.shape)}
        if name in sensitivity:
            tensors[name]["sensitivity"] = sensitivity[name][str(bits)]
    weights = sum(t["weights"] for t in tensors.values())
    average = sum(t["bits"] * t["weights"] for t in tensors.values()) / weights if weights else 0.0
    return {"method": allocation.get("method", "uniform"), "average_bits": round(average, 4), "tensors": tensors}


def format_table(summary: dict) -> str:
    """A readable table of ``summarize``'s result (what ``p2u inspect`` prints without ``--json``)."""
    rows = [("stage", "kind", "bits", "bytes", "bits/weight", "% of source", "cumulative %")]
    for stage in summary["stages"]:
        rows.append((
            stage["name"], stage["kind"], str(stage["bits"] or "-"), f"{stage['bytes']:,}",
            f"{stage['bits_per_weight']:.3f}", f"{100 * stage['fraction_of_source']:.1f}",
            f"{100 * stage['cumulative_bytes'] / summary['source_bytes']:.1f}",
        ))  # fmt: skip
    rows.append(("source", "", "", f"{summary['source_bytes']:,}", "", "100.0", ""))
    widths = summary["widths"]
    tensor_rows = [("tensor", "weights", "base bits", "sensitivity")]
    for name, tensor in widths["tensors"].items():
        loss = tensor.get("sensitivity")
        tensor_rows.append((name, f"{tensor['weights']:,}", str(tensor["bits"]), "-" if loss is None else f"{loss:.3g}"))
    heading = f"base widths ({widths['method']}; {widths['average_bits']:.2f} bits per quantized weight on average):"
    return "\n".join([*text_table(rows), "", heading, *text_table(tensor_rows)])


def text_table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Lines of a plain-text table: the first row is the header, first column left-aligned, others right."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = [
        "  ".join(cell.rjust(width) if column else cell.ljust(width) for column, (cell, width) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return lines


def _weight_bytes(folder: Path, prefix: str) -> int:
    return sum(path.stat().st_size for path in fmt.weight_files(folder, prefix)) + sum(
        path.stat().st_size for path in folder.glob(fmt.index_file_name(prefix))
    )
