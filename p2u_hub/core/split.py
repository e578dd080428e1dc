"""Split a transformers checkpoint into a low-bit base folder and delta stage folders.

Streaming: tensors are read one at a time with ``safe_open`` and each output folder holds at
most one shard in memory. Everything is written under a temporary folder and renamed into
place when complete.
"""

from __future__ import annotations

import fnmatch
import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import cast

import torch
from huggingface_hub.utils import tqdm

from ..codecs import progressive
from . import allocation, shards
from . import format as fmt
from .gptq import input_hessians
from .storage import DEFAULT_MAX_SHARD_BYTES, ShardedWriter, TensorReader, atomic_output_dir, safetensors_header, visible_files

STAGE_SHARDS = 32
"""By default a stage is cut into shards of 1/32 of the source's size (at least ``MIN_STAGE_SHARD_BYTES``), so that
an upgrade decodes the first shards while the next ones download: the work left after the last byte arrives is that of
about one shard."""
MIN_STAGE_SHARD_BYTES = 4 * 1024**2
"""Smaller shards would add a request per few MB for little more overlap."""

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
OTHER_WEIGHT_SUFFIXES = (*PICKLE_SUFFIXES, ".h5", ".msgpack", ".onnx", ".ot", ".gguf")


def split(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    bits: int = 4,
    group_size: int = 64,
    stages: Sequence[int] | None = None,
    keep: Sequence[str] = (),
    uniform: bool = False,
    sensitivity: str = "auto",
    gptq: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    workers: int | None = None,
    map_shards: Callable[[list[shards.ShardJob]], list[shards.ShardResult]] | None = None,
    stage_shard_bytes: int | None = None,
    compact_base: bool = False,
    overwrite: bool = False,
    token: str | bool | None = None,
) -> Path:
    """Split a checkpoint into ``output/base`` and ``output/stage-1`` ... ``output/stage-N``.

    Args:
        source: a local checkpoint folder (config.json + safetensors), or a Hub repo id with
            an optional ``@revision`` (downloaded with ``snapshot_download``).
        output: the release folder to create.
        bits: the base's budget: it takes at most the bytes of a uniform ``bits``-wide base
            (2-8), spread over the tensors by sensitivity (``p2u_hub.core.allocation``); with
            ``uniform`` every tensor is ``bits`` wide.
        group_size: weights per float16 scale (a multiple of 8).
        stages: widths of the intermediate integer stages; a final lossless stage is always added.
            Default: ``DEFAULT_STAGE_BITS`` (8) when ``bits`` is below it, else none.
        keep: glob patterns of tensor names kept exact in the base (e.g. ``"*embed*"``).
        uniform: one width for every tensor instead of a per-tensor allocation.
        sensitivity: how the allocation measures tensors: ``"calibration"`` (run the model on
            the bundled calibration text), ``"weights"`` (data-free weight error) or ``"auto"``
            (calibration when the model can be run here and has at most
            ``allocation.CALIBRATION_MAX_PARAMETERS`` quantized weights, else uniform widths:
            the data-free allocation can be worse than one width, e.g. for a tied LM head).
        gptq: choose the base codes of linear layers by GPTQ error compensation on the bundled
            calibration text (``p2u_hub.core.gptq``): a better base for a larger first stage.
        max_shard_bytes: largest safetensors shard written.
        workers: processes coding the source's safetensors files in parallel (default: one per
            CPU, at most one per file and per 256 MiB of source: ``shards.default_workers``). The
            release is the same bytes whatever the count. With more than one, a script calling
            ``split`` needs the ``if __name__ == "__main__":`` guard (``shards.map_shards``).
        map_shards: runs ``shards.split_shard`` on every job and returns the results in the
            jobs' order, instead of the local pool (``workers`` is then unused): e.g. over a Ray or
            Dask cluster whose machines see the source and ``output``'s parent folder at the same
            paths (docs/scale.md).
        stage_shard_bytes: largest shard of a stage's weight files; default ``default_stage_shard_bytes``
            of the source's size (smaller shards let an upgrade decode while the rest downloads).
        compact_base: entropy-code the base's codes as well as its scales and offsets (docs/format.md, "Base weights"):
            a base 5-7% smaller, whose codes take ~2.5 ns a weight of CPU to decode when it loads
            (MiniLM: +0.06 s; a 1.1 GB model: +1.6 s at 1000 MB/s). For metered links; off by default.
        overwrite: replace ``output`` if it exists.
        token: Hub token for a private source repo (default: the usual HF_TOKEN / login).

    Returns:
        The release folder.

    Raises:
        P2UFormatError: the source is not a safetensors checkpoint, a file is corrupt or a
            tensor has an unsupported dtype (the message names the file or tensor), or
            ``sensitivity="calibration"`` or ``gptq`` and the model cannot be run.
    """
    from .hub import resolve_source

    source_dir, source_repo, source_revision = resolve_source(source, token=token)
    if stages is None:
        stages = progressive.default_stage_bits(bits)
    spec = progressive.Ladder(bits, tuple(stages), group_size)
    if sensitivity not in allocation.METHODS:
        raise ValueError(f"sensitivity must be one of {allocation.METHODS}, got {sensitivity!r}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    weight_files, index_file, index_metadata = source_weight_files(source_dir)
    reader = TensorReader(weight_files)
    tensors, source_files = _plan(reader, keep, group_size)
    if not _uniform_widths(tensors, uniform, sensitivity):
        _find_copies(reader, tensors)  # the allocation must know which tensors are stored once
    widths, allocation_record = _choose_widths(source_dir, reader, tensors, spec, uniform, sensitivity)
    hessians = _input_hessians(source_dir, widths) if gptq else {}
    if stage_shard_bytes is None:
        stage_shard_bytes = default_stage_shard_bytes(sum(file.stat().st_size for file in weight_files), max_shard_bytes)
    with atomic_output_dir(output, overwrite=overwrite, is_replaceable=fmt.is_release_folder) as work:
        base_dir = work / fmt.BASE_DIR
        base = ShardedWriter(base_dir, fmt.BASE_WEIGHTS_NAME, max_shard_bytes)
        deltas = [
            ShardedWriter(work / fmt.stage_dir_name(k), fmt.DELTA_WEIGHTS_NAME, stage_shard_bytes) for k in range(1, spec.stage_count + 1)
        ]
        parts = Path(tempfile.mkdtemp(prefix=".", dir=work))  # the workers' part files, removed once copied into the shards
        jobs = _shard_jobs(reader, tensors, widths, spec, hessians, parts, compact_base)
        if map_shards is None:
            results = shards.map_shards(jobs, workers or shards.default_workers(weight_files))
        else:
            results = map_shards(jobs)
        base_sha256, payloads = shards.combine(results, tensors, [base, *deltas])
        base.close()
        manifest = fmt.Manifest(
            spec, tensors, source_files, index_file, index_metadata, source_repo, source_revision, base_sha256
        )  # fmt: skip
        fmt.write_json(base_dir / fmt.MANIFEST_FILE, manifest.to_json())
        fmt.write_json(base_dir / fmt.ALLOCATION_FILE, allocation_record)
        _copy_non_weight_files(source_dir, base_dir)
        stage_entries = []
        for k, (writer, record) in enumerate(zip(deltas, payloads), start=1):
            writer.close()
            stage_bits = spec.stage_bits[k - 1] if k <= len(spec.stage_bits) else None
            fmt.write_json(writer.folder / fmt.STAGE_FILE, fmt.StageRecord(k, stage_bits, manifest.sha256, record).to_json())
            stage_entries.append(fmt.StageEntry(k, stage_bits, path=f"../{fmt.stage_dir_name(k)}"))
        qconfig = fmt.QuantizationConfig(bits, group_size, manifest.sha256, stage_entries)
        fmt.write_quantization_config(base_dir, qconfig)
        shutil.rmtree(parts)
    return Path(output)


def _shard_jobs(
    reader: TensorReader, tensors: dict[str, fmt.TensorEntry], widths: dict[str, int], spec: progressive.Ladder,
    hessians: dict[str, torch.Tensor], parts: Path, compact_base: bool,
) -> list[shards.ShardJob]:  # fmt: skip
    """The release-wide plan cut into one job per source file (``p2u_hub.core.shards``), each with a part file in ``parts``."""
    by_file: dict[Path, list[str]] = {}
    for name, file in reader.locations.items():
        by_file.setdefault(file, []).append(name)
    return [
        shards.ShardJob(
            file,
            parts / f"{number}",
            {name: tensors[name] for name in names},
            {name: widths[name] for name in names if name in widths},
            spec,
            {name: hessians[name] for name in names if name in hessians},
            compact_base,
        )
        for number, (file, names) in enumerate(by_file.items())
    ]


def default_stage_shard_bytes(source_bytes: int, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> int:
    """Largest stage shard ``split`` writes by default: ``source_bytes / STAGE_SHARDS``, within ``MIN_STAGE_SHARD_BYTES``..``max_shard_bytes``."""
    return min(max_shard_bytes, max(MIN_STAGE_SHARD_BYTES, source_bytes // STAGE_SHARDS))


def _input_hessians(source_dir: Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The calibration Hessians of the linear layers among ``names``; refuses a model it cannot run."""
    hessians = input_hessians(source_dir, names)
    if not hessians:
        raise fmt.P2UFormatError(f"{source_dir}: cannot run this model's linear layers on the calibration text; split without --gptq")
    return hessians


def _plan(reader: TensorReader, keep: Sequence[str], group_size: int) -> tuple[dict[str, fmt.TensorEntry], dict[str, fmt.SourceFile]]:
    """Every source tensor's manifest entry (codec, dtype, shape) and the source file layout, in file order.

    Read from the safetensors headers alone: checksums (and so aliases) come when a tensor's bytes
    are read, by ``_find_copies`` or by the encoding pass, so that each tensor is read once.
    """
    tensors: dict[str, fmt.TensorEntry] = {}
    source_files: dict[str, fmt.SourceFile] = {}
    for name, file in reader.locations.items():
        if file.name not in source_files:
            source_files[file.name] = fmt.SourceFile(_file_metadata(file), [])
        source_files[file.name].tensors.append(name)
        tensors[name] = _describe(name, cast(dict, reader.header(name)), file, keep, group_size)  # listed: it has a header
    return tensors, source_files


def _uniform_widths(tensors: dict[str, fmt.TensorEntry], uniform: bool, method: str) -> bool:
    """Whether every tensor gets the same width whatever tensors turn out to be copies (then none need reading first).

    "auto" counts copies not yet found as tensors of their own: above the calibration bound with
    them, it gives uniform widths (a checkpoint with duplicated tensors just at the bound may get
    uniform widths where it was calibrated when copies were found first).
    """
    quantized = sum(entry.numel for entry in tensors.values() if entry.codec == fmt.CODEC_LADDER)
    return uniform or (method == "auto" and quantized > allocation.CALIBRATION_MAX_PARAMETERS)


def _find_copies(reader: TensorReader, tensors: dict[str, fmt.TensorEntry]) -> None:
    """Hash the ladder tensors that could be copies of one another (same dtype and shape) and mark copies ``alias_of``."""
    shapes = Counter((entry.dtype, tuple(entry.shape)) for entry in tensors.values() if entry.codec == fmt.CODEC_LADDER)
    candidates = [
        name for name, entry in tensors.items() if entry.codec == fmt.CODEC_LADDER and shapes[entry.dtype, tuple(entry.shape)] > 1
    ]
    copies: dict[tuple, str] = {}
    for name in tqdm(candidates, desc="p2u split: finding copies", unit="tensor"):
        tensors[name].sha256 = fmt.tensor_sha256(reader.get(name))
        shards.mark_copy(name, tensors[name], copies)


def _choose_widths(
    source_dir: Path, reader: TensorReader, tensors: dict[str, fmt.TensorEntry], spec: progressive.Ladder,
    uniform: bool, method: str,
) -> tuple[dict[str, int], dict]:  # fmt: skip
    """The base width of every stored ladder tensor, and the record of how it was chosen (``fmt.ALLOCATION_FILE``)."""
    numels = {name: math.prod(entry.shape) for name, entry in tensors.items() if entry.codec == fmt.CODEC_LADDER and entry.alias_of is None}
    uniform_record = {"method": allocation.METHOD_UNIFORM, "bits": spec.base_bits}
    if uniform:
        return dict.fromkeys(numels, spec.base_bits), uniform_record
    widths = allocation.candidate_widths(spec.stage_bits)
    measured = None
    if method == allocation.METHOD_CALIBRATION or (method == "auto" and sum(numels.values()) <= allocation.CALIBRATION_MAX_PARAMETERS):
        with tqdm(total=len(numels), desc="p2u split: calibrating", unit="tensor") as bar:
            measured = allocation.calibration_sensitivity(
                source_dir, numels, allocation.measured_widths(widths, spec.base_bits), spec.group_size, on_tensor=bar.update
            )
        if measured is None and method == allocation.METHOD_CALIBRATION:
            raise fmt.P2UFormatError(f"{source_dir}: cannot run this model on the calibration text; use --sensitivity weights")
    if measured is None and method == "auto":  # the data-free widths can be far worse than uniform ones (SmolLM2, docs/cli.md)
        allocation.logger.warning(
            "p2u split: no calibration for this model; every tensor gets --bits (--sensitivity weights allocates data-free)"
        )
        return dict.fromkeys(numels, spec.base_bits), uniform_record
    used = allocation.METHOD_CALIBRATION if measured is not None else allocation.METHOD_WEIGHTS
    if measured is None:
        measured = {
            name: allocation.weight_sensitivity(reader.get(name), allocation.measured_widths(widths, spec.base_bits), spec.group_size)
            for name in tqdm(numels, desc="p2u split: measuring", unit="tensor")
        }
    measured = {name: allocation.extrapolate(by_width, widths) for name, by_width in measured.items()}
    budget = allocation.uniform_budget(numels.values(), spec.base_bits, spec.group_size)
    chosen = allocation.allocate(measured, numels, budget, spec.group_size, spec.base_bits)
    record = {
        "method": used,
        "bits": spec.base_bits,
        "measured_widths": list(allocation.measured_widths(widths, spec.base_bits)),
        "budget_bytes": budget,
        "bytes": sum(allocation.base_bytes(numels[name], bits, spec.group_size) for name, bits in chosen.items()),
        "sensitivity": {name: {str(bits): float(f"{loss:.4g}") for bits, loss in by_width.items()} for name, by_width in measured.items()},
    }
    return chosen, record


def _describe(name: str, header: dict, file: Path, keep: Sequence[str], group_size: int) -> fmt.TensorEntry:
    """Decide the codec of one tensor from its header entry: weight matrices are quantized, the rest kept exact.

    The checksum is left empty, to be filled when the tensor is read.
    """
    dtype_name, shape = header["dtype"], list(header["shape"])
    dtype = fmt.SAFETENSORS_DTYPES[dtype_name]  # the header is validated: its dtype is known
    is_matrix = len(shape) >= 2 and math.prod(shape) >= group_size
    if dtype.is_floating_point and dtype not in fmt.SUPPORTED_FLOAT_DTYPES and is_matrix:
        raise fmt.P2UFormatError(
            f"{file}: tensor {name!r} is {dtype_name}; p2u quantizes float32, float16 and bfloat16 weights "
            f"(convert the checkpoint, or keep this tensor exact with --keep '{name}')"
        )
    quantize = dtype in fmt.SUPPORTED_FLOAT_DTYPES and is_matrix and not any(fnmatch.fnmatchcase(name, pattern) for pattern in keep)
    codec = fmt.CODEC_LADDER if quantize else fmt.CODEC_EXACT
    return fmt.TensorEntry(shape, dtype_name, codec, "")


def _file_metadata(path: Path) -> dict[str, str] | None:
    return safetensors_header(path).get("__metadata__")


def source_weight_files(source_dir: Path) -> tuple[list[Path], str | None, dict | None]:
    """The safetensors files of a checkpoint folder, refusing pickle-only checkpoints with a fix."""
    if not (source_dir / fmt.CONFIG_FILE).is_file():
        raise fmt.P2UFormatError(f"{source_dir}: no config.json; p2u splits transformers checkpoint folders")
    indexes = sorted(source_dir.glob("*.safetensors.index.json"))
    if indexes:
        index = fmt.read_json(indexes[0])
        prefix = indexes[0].name[: -len(".safetensors.index.json")]
        return fmt.weight_files(source_dir, prefix), indexes[0].name, index.get("metadata")
    files = sorted(source_dir.glob("*.safetensors"))
    if files:
        return files, None, None
    pickles = sorted(p.name for p in source_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise fmt.P2UFormatError(
            f"{source_dir / pickles[0]}: pickle checkpoints are not read (they can run code). Convert to "
            "safetensors first: load with transformers and call model.save_pretrained(folder), which writes "
            "model.safetensors"
        )
    raise fmt.P2UFormatError(f"{source_dir}: no *.safetensors weight files found")


def _copy_non_weight_files(source_dir: Path, base_dir: Path) -> None:
    """Copy tokenizer, configs and the rest; the source README is kept aside for the model card."""
    for relative in visible_files(source_dir):
        path = source_dir / relative
        if path.name.endswith((".safetensors", ".safetensors.index.json")) or path.suffix in OTHER_WEIGHT_SUFFIXES:
            continue
        if relative == Path(fmt.CONFIG_FILE):
            target = base_dir / fmt.CONFIG_FILE
        elif relative == Path("README.md"):
            target = base_dir / fmt.SOURCE_README_FILE
        else:
            target = base_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
