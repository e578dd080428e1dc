"""The on-disk format of a progressive release: every file name, tensor name and metadata key.

A release is a *base* folder (a complete Hugging Face model folder whose ``config.json``
carries a ``quantization_config`` with ``quant_method: "p2u"``) and one folder per delta
stage. ``docs/format.md`` is the human-readable version of this module; keep them in step.

Nothing outside this module spells a file name or a JSON key of the format.
"""

from __future__ import annotations

import hashlib
import math
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .codecs.progressive import Ladder

FORMAT_VERSION = 3
GRID_OFFSETS_VERSION = 3
"""First format version with per-group grid offsets and per-tensor base widths (older bases read as offset 0, one width)."""
QUANT_METHOD = "p2u"

CONFIG_FILE = "config.json"
P2U_FILE_PREFIX = "p2u_"
"""Every file p2u adds to a model folder starts with this; merge leaves them out of the plain checkpoint."""
MANIFEST_FILE = "p2u_manifest.json"
STAGE_FILE = "p2u_stage.json"
SOURCE_README_FILE = "source_README.md"
README_FILE = "README.md"
EVAL_FILE = "p2u_eval.json"
"""Per-stage quality measured by ``p2u eval``; kept in the base folder, beside the card that quotes it."""
QUALITY_PLOT_FILE = "p2u_quality.png"
ALLOCATION_FILE = "p2u_allocation.json"
"""How split chose the base widths (method, budget, measured losses): a report beside the manifest, not read to load."""
BASE_WEIGHTS_NAME = "model"
DELTA_WEIGHTS_NAME = "delta"
BASE_DIR = "base"
LOAD_MODE_PACKED = "packed"
"""Quantized weights stay packed in memory and are expanded in each forward: the low-memory choice."""
LOAD_MODE_DENSE = "dense"
"""Quantized weights are expanded once at load: the fast-forward choice."""
LOAD_MODES = (LOAD_MODE_PACKED, LOAD_MODE_DENSE)
DEFAULT_LOAD_MODE = LOAD_MODE_PACKED

SCALES_SUFFIX = "_p2u_scales"
"""A quantized tensor ``N`` is stored in the base as ``N`` (packed uint8 codes) and ``N`` + this suffix (float16 scales)."""
OFFSETS_SUFFIX = "_p2u_offsets"
"""... and ``N`` + this suffix (packed per-group grid offsets, uint8), from GRID_OFFSETS_VERSION on."""

CODEC_LADDER = "ladder"
CODEC_EXACT = "exact"
STAGE_KIND_INTEGER = "integer"
STAGE_KIND_LOSSLESS = "lossless"

SUPPORTED_FLOAT_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


class P2UFormatError(ValueError):
    """A release folder or file does not follow the p2u format (names the file or tensor at fault)."""


class StageMismatchError(P2UFormatError):
    """A stage does not belong to this base, or stages were applied out of order."""


class ChecksumError(P2UFormatError):
    """Bytes on disk or rebuilt in memory do not match the sha256 recorded in the manifest."""


def stage_dir_name(index: int) -> str:
    """Folder (and branch suffix) of stage ``index``, counted from 1: ``stage-1``, ``stage-2``, ..."""
    return f"stage-{index}"


def stage_name(index: int) -> str:
    """Name of stage ``index`` in reports (``p2u inspect``, ``p2u_eval.json``, cards): ``base`` for 0, else its folder name."""
    return BASE_DIR if index == 0 else stage_dir_name(index)


def scales_key(name: str) -> str:
    return name + SCALES_SUFFIX


def offsets_key(name: str) -> str:
    return name + OFFSETS_SUFFIX


def shard_file_name(prefix: str, index: int, count: int) -> str:
    """``model.safetensors`` for one shard, ``model-00001-of-00003.safetensors`` otherwise (as transformers)."""
    return f"{prefix}.safetensors" if count == 1 else f"{prefix}-{index:05d}-of-{count:05d}.safetensors"


def index_file_name(prefix: str) -> str:
    return f"{prefix}.safetensors.index.json"


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw little-endian bytes, as safetensors stores them."""
    return sha256_bytes(tensor_bytes(tensor))


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def canonical_json(obj: Any) -> bytes:
    """The exact bytes written for every JSON file of the format: sorted keys, 2-space indent."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as canonical JSON atomically (temp file, then rename): a reader never sees half a file."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(canonical_json(obj))
    os.replace(temporary, path)


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise P2UFormatError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise P2UFormatError(f"{path}: not valid JSON ({error})") from None


@dataclass
class TensorEntry:
    """One source tensor: where it came from and how the base stores it."""

    shape: list[int]
    dtype: str  # safetensors dtype name of the source: F32, F16, BF16, ...
    codec: str  # CODEC_LADDER or CODEC_EXACT
    sha256: str  # of the source bytes
    alias_of: str | None = None  # a tied/shared tensor: stored once, under this name
    bits: int | None = None  # base width of a stored ladder tensor (None: the ladder's base_bits, format < 3)

    def to_json(self) -> dict:
        entry = {"shape": self.shape, "dtype": self.dtype, "codec": self.codec, "sha256": self.sha256}
        if self.alias_of is not None:
            entry["alias_of"] = self.alias_of
        if self.bits is not None:
            entry["bits"] = self.bits
        return entry

    @property
    def torch_dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype]


@dataclass
class StageEntry:
    """One delta stage as the base sees it: what it raises precision to and where it lives."""

    index: int
    bits: int | None  # None for the lossless stage
    path: str | None = None  # relative to the base folder (a local release)
    repo_id: str | None = None  # a published release
    revision: str | None = None
    commit: str | None = None

    @property
    def name(self) -> str:
        return stage_dir_name(self.index)

    @property
    def kind(self) -> str:
        return STAGE_KIND_LOSSLESS if self.bits is None else STAGE_KIND_INTEGER

    def to_json(self) -> dict:
        entry: dict[str, Any] = {"name": self.name, "index": self.index, "kind": self.kind, "bits": self.bits}
        for key in ("path", "repo_id", "revision", "commit"):
            if getattr(self, key) is not None:
                entry[key] = getattr(self, key)
        return entry

    @classmethod
    def from_json(cls, data: dict) -> "StageEntry":
        return cls(
            index=int(data["index"]), bits=data.get("bits"), path=data.get("path"),
            repo_id=data.get("repo_id"), revision=data.get("revision"), commit=data.get("commit"),
        )  # fmt: skip


@dataclass
class SourceFile:
    """A safetensors file of the source checkpoint: its metadata and tensor order, so merge rebuilds it."""

    metadata: dict[str, str] | None
    tensors: list[str]


@dataclass
class Manifest:
    """Everything needed to rebuild the source: the ladder, every tensor, the source file layout.

    Its sha256 (of the canonical JSON bytes) identifies the base; every stage records it as
    its parent, so a stage can never be applied to another base.
    """

    ladder: Ladder
    tensors: dict[str, TensorEntry]
    source_files: dict[str, SourceFile]
    source_index_file: str | None = None  # e.g. model.safetensors.index.json, when the source was sharded
    source_index_metadata: dict | None = None  # its ``metadata`` block
    source_repo: str | None = None
    source_revision: str | None = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        return {
            "format": QUANT_METHOD,
            "format_version": self.format_version,
            "ladder": {
                "base_bits": self.ladder.base_bits,
                "stage_bits": list(self.ladder.stage_bits),
                "group_size": self.ladder.group_size,
            },
            "source": {
                "repo_id": self.source_repo,
                "revision": self.source_revision,
                "index_file": self.source_index_file,
                "index_metadata": self.source_index_metadata,
                "files": {name: {"metadata": f.metadata, "tensors": f.tensors} for name, f in self.source_files.items()},
            },
            "tensors": {name: entry.to_json() for name, entry in self.tensors.items()},
        }

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    @property
    def sha256(self) -> str:
        return sha256_bytes(self.to_bytes())

    @classmethod
    def from_json(cls, data: dict, origin: str) -> "Manifest":
        try:
            if data["format"] != QUANT_METHOD:
                raise P2UFormatError(f"{origin}: not a p2u manifest (format {data['format']!r})")
            if data["format_version"] > FORMAT_VERSION:
                raise P2UFormatError(
                    f"{origin}: format version {data['format_version']} is newer than this p2u-hub "
                    f"understands ({FORMAT_VERSION}); upgrade p2u-hub"
                )
            ladder = Ladder(data["ladder"]["base_bits"], tuple(data["ladder"]["stage_bits"]), data["ladder"]["group_size"])
            tensors = {
                name: TensorEntry(list(t["shape"]), t["dtype"], t["codec"], t["sha256"], t.get("alias_of"), t.get("bits"))
                for name, t in data["tensors"].items()
            }
            source = data["source"]
            files = {name: SourceFile(f["metadata"], list(f["tensors"])) for name, f in source["files"].items()}
            return cls(
                ladder, tensors, files, source.get("index_file"), source.get("index_metadata"),
                source.get("repo_id"), source.get("revision"), int(data["format_version"]),
            )  # fmt: skip
        except (KeyError, TypeError) as error:
            raise P2UFormatError(f"{origin}: malformed manifest (missing or bad field {error})") from None

    @property
    def has_offsets(self) -> bool:
        """Whether quantized tensors carry grid offsets (older bases: every offset is 0)."""
        return self.format_version >= GRID_OFFSETS_VERSION

    def tensor_ladder(self, name: str) -> Ladder:
        """The ladder of stored tensor ``name``: its own base width, the release's stages and group size."""
        bits = self.tensors[name].bits
        if bits is None:
            return self.ladder
        return Ladder(bits, self.ladder.stage_bits, self.ladder.group_size)

    def stored_tensors(self) -> dict[str, TensorEntry]:
        """Tensors stored under their own name (aliases point at one of these)."""
        return {name: entry for name, entry in self.tensors.items() if entry.alias_of is None}

    def quantized_tensors(self) -> dict[str, TensorEntry]:
        return {n: e for n, e in self.stored_tensors().items() if e.codec == CODEC_LADDER}

    def source_bytes(self) -> int:
        """Bytes of all source tensors, aliases included (what the original download carries)."""
        return sum(math.prod(e.shape) * SAFETENSORS_DTYPES[e.dtype].itemsize for e in self.tensors.values())

    def quantized_weight_count(self) -> int:
        return sum(math.prod(e.shape) for e in self.quantized_tensors().values())


def read_manifest(base_dir: str | os.PathLike) -> Manifest:
    path = Path(base_dir) / MANIFEST_FILE
    return Manifest.from_json(read_json(path), str(path))


@dataclass
class QuantizationConfig:
    """The ``quantization_config`` block of a base's config.json: what transformers sees."""

    bits: int
    group_size: int
    manifest_sha256: str
    stages: list[StageEntry]
    load_mode: str = DEFAULT_LOAD_MODE
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        return {
            "quant_method": QUANT_METHOD,
            "bits": self.bits,
            "group_size": self.group_size,
            "format_version": self.format_version,
            "manifest_sha256": self.manifest_sha256,
            "load_mode": self.load_mode,
            "stages": [stage.to_json() for stage in self.stages],
        }

    @classmethod
    def from_json(cls, data: dict, origin: str) -> "QuantizationConfig":
        if data.get("quant_method") != QUANT_METHOD:
            raise P2UFormatError(f"{origin}: quantization_config is not a p2u one (quant_method {data.get('quant_method')!r})")
        try:
            if int(data["format_version"]) > FORMAT_VERSION:
                raise P2UFormatError(f"{origin}: format version {data['format_version']} is newer than this p2u-hub; upgrade p2u-hub")
            load_mode = data.get("load_mode", DEFAULT_LOAD_MODE)
            if load_mode not in LOAD_MODES:
                raise P2UFormatError(f"{origin}: load_mode must be one of {LOAD_MODES}, got {load_mode!r}")
            return cls(
                bits=int(data["bits"]), group_size=int(data["group_size"]), manifest_sha256=data["manifest_sha256"],
                stages=[StageEntry.from_json(s) for s in data["stages"]], load_mode=load_mode,
                format_version=int(data["format_version"]),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, P2UFormatError):
                raise
            raise P2UFormatError(f"{origin}: malformed p2u quantization_config ({error!r})") from None


def read_quantization_config(base_dir: str | os.PathLike) -> QuantizationConfig:
    path = Path(base_dir) / CONFIG_FILE
    config = read_json(path)
    if "quantization_config" not in config:
        raise P2UFormatError(f"{path}: no quantization_config; this is not a p2u base folder")
    return QuantizationConfig.from_json(config["quantization_config"], str(path))


def write_quantization_config(base_dir: str | os.PathLike, qconfig: QuantizationConfig) -> None:
    """Rewrite config.json with ``qconfig`` (atomic: temp file then rename), leaving other keys as they are."""
    path = Path(base_dir) / CONFIG_FILE
    config = read_json(path)
    config["quantization_config"] = qconfig.to_json()
    write_json(path, config)


@dataclass
class StageRecord:
    """``p2u_stage.json`` of a stage folder: which base it extends and the checksum of every payload."""

    index: int
    bits: int | None
    parent: str  # sha256 of the base manifest
    payloads: dict[str, dict] = field(default_factory=dict)  # tensor name -> {"sha256", "bytes"}
    format_version: int = FORMAT_VERSION

    @property
    def kind(self) -> str:
        return STAGE_KIND_LOSSLESS if self.bits is None else STAGE_KIND_INTEGER

    def to_json(self) -> dict:
        return {
            "format": "p2u-stage",
            "format_version": self.format_version,
            "name": stage_dir_name(self.index),
            "index": self.index,
            "kind": self.kind,
            "bits": self.bits,
            "parent": self.parent,
            "tensors": self.payloads,
        }

    @classmethod
    def from_json(cls, data: dict, origin: str) -> "StageRecord":
        try:
            if data["format"] != "p2u-stage":
                raise P2UFormatError(f"{origin}: not a p2u stage record (format {data['format']!r})")
            if data["format_version"] > FORMAT_VERSION:
                raise P2UFormatError(f"{origin}: format version {data['format_version']} is newer than this p2u-hub; upgrade p2u-hub")
            return cls(int(data["index"]), data["bits"], data["parent"], dict(data["tensors"]), int(data["format_version"]))
        except (KeyError, TypeError) as error:
            raise P2UFormatError(f"{origin}: malformed stage record (missing or bad field {error})") from None

    def payload_bytes(self) -> int:
        return sum(int(p["bytes"]) for p in self.payloads.values())


def read_stage_record(stage_dir: str | os.PathLike) -> StageRecord:
    path = Path(stage_dir) / STAGE_FILE
    return StageRecord.from_json(read_json(path), str(path))


def weight_files(folder: str | os.PathLike, prefix: str) -> list[Path]:
    """The safetensors files of ``prefix`` in ``folder``, in shard order (via the index when sharded)."""
    folder = Path(folder)
    index = folder / index_file_name(prefix)
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise P2UFormatError(f"{index}: no weight_map")
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        files = [folder / f"{prefix}.safetensors"]
    for file in files:
        if not file.is_file():
            raise P2UFormatError(f"{file}: weight file missing")
    return files
