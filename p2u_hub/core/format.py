"""The on-disk format of a progressive release: every file name, tensor name and metadata key.

A release is a *base* folder (a complete Hugging Face model folder whose ``config.json``
carries a ``quantization_config`` with ``quant_method: "p2u"``) and one folder per delta
stage. ``docs/format.md`` is the human-readable version of this module; keep them in step.

Nothing outside this module spells a file name or a JSON key of the format.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..codecs.progressive import Ladder
from ..errors import ChecksumError, P2UFormatError, StageMismatchError, UnsafePathError  # noqa: F401  (Checksum-, StageMismatchError: re-exported)

# The errors above are re-exported: format.py was their home before errors.py, and callers import them from here.

FORMAT_VERSION = 7
"""2 adds ``base_sha256`` to the manifest; 3 adds per-group grid offsets and per-tensor base widths; 4 adds
``corrected`` tensors (base codes chosen by error compensation, signed first-stage refinements); 5 packs sharp top
planes of the entropy streams and refines the lossless contexts by the scale's mantissa (smaller stages); 6
lets the base store its codes and scales entropy-coded (``split`` codes the scales, the codes with ``compact_base``);
7 lets it store the grid offsets entropy-coded too (``split`` does). Every older version is still read: version 1
without the checksum, versions 1-2 with offsets 0 and one width."""
GRID_OFFSETS_VERSION = 3
"""First format version with per-group grid offsets and per-tensor base widths."""
CORRECTED_CODES_VERSION = 4
"""First format version whose ladder tensors may be ``corrected`` (``p2u split --gptq``)."""
STEP_CONTEXTS_VERSION = 5
"""First format version whose lossless contexts carry the scale's leading mantissa bits (``lossless.STEP_BITS``)."""
CODED_BASE_VERSION = 6
"""First format version whose base may store a ladder tensor's codes and scales entropy-coded (``progressive.encode_base``)."""
CODED_OFFSETS_VERSION = 7
"""First format version whose base may store a ladder tensor's grid offsets entropy-coded (``progressive.encode_base``)."""
MIN_FORMAT_VERSION = 1
QUANT_METHOD = "p2u"

CONFIG_FILE = "config.json"
P2U_FILE_PREFIX = "p2u_"
"""Every file p2u adds to a model folder starts with this; merge leaves them out of the plain checkpoint."""
MANIFEST_FILE = "p2u_manifest.json"
STAGE_FILE = "p2u_stage.json"
SOURCE_README_FILE = "source_README.md"
README_FILE = "README.md"
EVAL_FILE = "p2u_eval.json"
EVAL_FORMAT = "p2u-eval"
EVAL_FORMAT_VERSION = 1
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
"""A quantized tensor ``N`` is stored in the base as ``N`` (its codes: packed uint8, or from CODED_BASE_VERSION on an
entropy stream) and ``N`` + this suffix (its scales: float16, or from CODED_BASE_VERSION on an entropy stream)."""
OFFSETS_SUFFIX = "_p2u_offsets"
"""... and ``N`` + this suffix (packed per-group grid offsets, uint8, from GRID_OFFSETS_VERSION on; from
CODED_OFFSETS_VERSION on they may be an entropy stream)."""

CODEC_LADDER = "ladder"
CODEC_EXACT = "exact"
STAGE_KIND_INTEGER = "integer"
STAGE_KIND_LOSSLESS = "lossless"

SUPPORTED_FLOAT_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2": torch.float8_e5m2,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "C64": torch.complex64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
"""Every safetensors dtype torch can hold, by its safetensors name (as ``safetensors.torch`` maps them)."""
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

MAX_ELEMENTS = 1 << 48
"""No tensor of a release may declare more elements: a sanity bound checked before any size arithmetic.
The real bounds come later, before allocating: the base codes' stored size must match the declared shape."""
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_REVISION = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_./-]{0,199}")
HF_CACHE_SNAPSHOTS = "snapshots"
HF_CACHE_REPO_PREFIX = "models--"


def plain_name(name: object, origin: str, what: str = "file name") -> str:
    """``name`` if it is a relative POSIX path of plain components (no ``..``, absolute path, backslash or NUL).

    Every file name a release declares goes through this before it is joined to a folder, so
    a crafted manifest cannot make a reader or writer touch a file outside that folder.
    """
    if (
        not isinstance(name, str) or not name or len(name) > 1024 or name.startswith("/") or "\\" in name
        or "\x00" in name or any(part in ("", ".", "..") for part in name.split("/"))
    ):  # fmt: skip
        raise UnsafePathError(f"{origin}: {what} {name!r} is not a plain relative name inside its folder")
    return name


def check_revision(revision: object, origin: str) -> str:
    """A Hub revision (branch, tag or commit) that is safe to hand to huggingface_hub: no ``..``, ``\\``, NUL, leading ``/``."""
    if (
        not isinstance(revision, str)
        or not _REVISION.fullmatch(revision)
        or ".." in revision
        or "//" in revision
        or revision.endswith(("/", ".lock"))
    ):
        raise UnsafePathError(f"{origin}: revision {revision!r} is not a valid branch, tag or commit name")
    return revision


def _trusted_root(folder: Path) -> Path:
    """Where files of ``folder`` may really live: the folder itself, or for an HF cache snapshot its repo's cache folder.

    The HF cache stores a snapshot's files as symlinks into the repo's ``blobs/``; anywhere else
    a symlink in a release is refused, since it could make merge copy or push upload any file.
    """
    for parent in (folder, *folder.parents):
        if parent.parent.name == HF_CACHE_SNAPSHOTS and parent.parent.parent.name.startswith(HF_CACHE_REPO_PREFIX):
            return parent.parent.parent
    return folder


def release_file(folder: str | os.PathLike, name: str, origin: str | None = None) -> Path:
    """``folder / name`` for a file name a release declares, refusing names and symlinks that leave ``folder``."""
    folder = Path(folder)
    path = folder / plain_name(name, origin or str(folder))
    root = _trusted_root(folder)
    if root == folder:
        for step in (folder / Path(*name.split("/")[: depth + 1]) for depth in range(name.count("/") + 1)):
            if step.is_symlink():
                raise UnsafePathError(f"{step}: symlinks are not allowed in a release")
    elif path.exists() and not path.resolve().is_relative_to(root.resolve()):
        raise UnsafePathError(f"{path}: symlink points outside {root}")
    return path


def refuse_symlinks(folder: str | os.PathLike) -> None:
    """Refuse a release folder holding any symlink (before push uploads what they point at)."""
    for path in Path(folder).rglob("*"):
        if path.is_symlink():
            raise UnsafePathError(f"{path}: symlinks are not allowed in a release")


def _integer(value: object, origin: str, what: str, low: int = 0, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise P2UFormatError(f"{origin}: {what} must be an integer in {bounds}, got {value!r}")
    return value


def _sha256(value: object, origin: str, what: str) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise P2UFormatError(f"{origin}: {what} must be a lowercase hex sha256, got {value!r}")
    return value


def _mapping(value: object, origin: str, what: str) -> dict:
    if not isinstance(value, dict):
        raise P2UFormatError(f"{origin}: {what} must be a JSON object, got {type(value).__name__}")
    return value


def _format_version(value: object, origin: str) -> int:
    version = _integer(value, origin, "format_version", 1)
    if version > FORMAT_VERSION:
        raise P2UFormatError(
            f"{origin}: format version {version} is newer than this p2u-hub understands ({FORMAT_VERSION}); upgrade p2u-hub"
        )
    return version


def _ladder(data: object, origin: str) -> Ladder:
    data = _mapping(data, origin, "ladder")
    stage_bits = data.get("stage_bits")
    if not isinstance(stage_bits, list):
        raise P2UFormatError(f"{origin}: ladder stage_bits must be a list, got {stage_bits!r}")
    try:
        return Ladder(
            _integer(data.get("base_bits"), origin, "ladder base_bits", 2, 8),
            tuple(_integer(bits, origin, "ladder stage_bits", 3, 16) for bits in stage_bits),
            _integer(data.get("group_size"), origin, "ladder group_size", 8, 1 << 20),
        )
    except ValueError as error:
        if isinstance(error, P2UFormatError):
            raise
        raise P2UFormatError(f"{origin}: {error}") from None


def stage_dir_name(index: int) -> str:
    """Folder (and branch suffix) of stage ``index``, counted from 1: ``stage-1``, ``stage-2``, ..."""
    return f"stage-{index}"


def stage_branch(index: int) -> str:
    """Hub branch of stage ``index``: ``p2u-stage-1`` ... (what ``hf upload --revision`` should use).

    No slash: mirrors (olah) and ``HfFileSystem`` paths (``repo@branch/file``) cannot route
    branch names holding one.
    """
    return f"p2u-{stage_dir_name(index)}"


def legacy_stage_branch(index: int) -> str:
    """Stage branch of releases pushed before format version 2 (``p2u/stage-1``); readers still look there."""
    return f"p2u/{stage_dir_name(index)}"


def is_release_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a release written by ``split``: it holds ``base/p2u_manifest.json``."""
    return (Path(folder) / BASE_DIR / MANIFEST_FILE).is_file()


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
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")  # type: ignore[arg-type]  # numpy arrays are buffers


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
    corrected: bool = False  # base codes chosen by error compensation (format 4+): the first stage's refinements are signed

    def to_json(self) -> dict:
        entry: dict[str, Any] = {"shape": self.shape, "dtype": self.dtype, "codec": self.codec, "sha256": self.sha256}
        if self.alias_of is not None:
            entry["alias_of"] = self.alias_of
        if self.bits is not None:
            entry["bits"] = self.bits
        if self.corrected:
            entry["corrected"] = True
        return entry

    @property
    def torch_dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @classmethod
    def from_json(cls, data: object, origin: str) -> TensorEntry:
        data = _mapping(data, origin, "tensor entry")
        shape = data.get("shape")
        if not isinstance(shape, list) or len(shape) > 8:
            raise P2UFormatError(f"{origin}: shape must be a list of at most 8 sizes, got {shape!r}")
        shape = [_integer(size, origin, "shape", 0, MAX_ELEMENTS) for size in shape]
        if math.prod(shape) > MAX_ELEMENTS:
            raise P2UFormatError(f"{origin}: shape {shape} declares more than 2**48 elements")
        dtype, codec, alias_of = data.get("dtype"), data.get("codec"), data.get("alias_of")
        if dtype not in SAFETENSORS_DTYPES:
            raise P2UFormatError(f"{origin}: dtype {dtype!r} is not one of {sorted(SAFETENSORS_DTYPES)}")
        if codec not in (CODEC_LADDER, CODEC_EXACT):
            raise P2UFormatError(f"{origin}: codec {codec!r} is not {CODEC_LADDER!r} or {CODEC_EXACT!r}")
        if codec == CODEC_LADDER and dtype not in SUPPORTED_FLOAT_DTYPES.values():
            raise P2UFormatError(f"{origin}: a {CODEC_LADDER!r} tensor must be F32, F16 or BF16, not {dtype}")
        if alias_of is not None and not isinstance(alias_of, str):
            raise P2UFormatError(f"{origin}: alias_of must be a tensor name, got {alias_of!r}")
        bits = data.get("bits")
        if bits is not None:
            bits = _integer(bits, origin, "bits", 1, 8)
        corrected = data.get("corrected", False)
        if not isinstance(corrected, bool):
            raise P2UFormatError(f"{origin}: corrected must be true or false, got {corrected!r}")
        return cls(shape, dtype, codec, _sha256(data.get("sha256"), origin, "sha256"), alias_of, bits, corrected)


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
    def from_json(cls, data: object, origin: str) -> StageEntry:
        data = _mapping(data, origin, "a stage entry")
        index = _integer(data.get("index"), origin, "stage index", 1, 64)
        bits = data.get("bits")
        entry = cls(index=index, bits=None if bits is None else _integer(bits, origin, f"bits of stage {index}", 3, 16))
        where = f"{origin}: stage {index}"
        if data.get("path") is not None:
            path = data["path"]
            plain_name(path[len("../") :] if isinstance(path, str) and path.startswith("../") else path, where, "path")
            entry.path = path
        if data.get("repo_id") is not None:
            if not isinstance(data["repo_id"], str) or not data["repo_id"] or ".." in data["repo_id"] or data["repo_id"].count("/") > 1:
                raise UnsafePathError(f"{where}: repo_id {data['repo_id']!r} is not a Hub repo id")
            entry.repo_id = data["repo_id"]
        if data.get("revision") is not None:
            entry.revision = check_revision(data["revision"], where)
        if data.get("commit") is not None:
            if not isinstance(data["commit"], str) or not _COMMIT.fullmatch(data["commit"]):
                raise UnsafePathError(f"{where}: commit {data['commit']!r} is not a 40-digit hex commit id")
            entry.commit = data["commit"]
        return entry


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
    base_sha256: dict[str, str] | None = None  # every tensor of the base weights -> sha256 of its stored bytes (v2)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        data = {
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
        if self.base_sha256 is not None:
            data["base_sha256"] = self.base_sha256
        return data

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    @property
    def sha256(self) -> str:
        return sha256_bytes(self.to_bytes())

    @classmethod
    def from_json(cls, data: object, origin: str) -> Manifest:
        """Parse and validate a manifest: types, sizes, names and cross references, before anything uses it."""
        data = _mapping(data, origin, "the manifest")
        if data.get("format") != QUANT_METHOD:
            raise P2UFormatError(f"{origin}: not a p2u manifest (format {data.get('format')!r})")
        version = _format_version(data.get("format_version"), origin)
        ladder = _ladder(data.get("ladder"), origin)
        if version < STEP_CONTEXTS_VERSION:
            ladder = dataclasses.replace(ladder, context_step_bits=0)
        tensors = {}
        for name, entry in _mapping(data.get("tensors"), origin, "tensors").items():
            tensors[name] = TensorEntry.from_json(entry, f"{origin}: tensor {name!r}")
        for name, entry in tensors.items():
            owner = tensors.get(entry.alias_of) if entry.alias_of is not None else entry
            if (
                owner is None
                or owner.alias_of is not None
                or (owner.shape, owner.dtype, owner.codec) != (entry.shape, entry.dtype, entry.codec)
            ):
                raise P2UFormatError(
                    f"{origin}: tensor {name!r} is an alias of {entry.alias_of!r}, which is no stored tensor of its shape and dtype"
                )
        source = _mapping(data.get("source"), origin, "source")
        files: dict[str, SourceFile] = {}
        listed: set[str] = set()
        for file_name, file in _mapping(source.get("files"), origin, "source files").items():
            where = f"{origin}: source file {file_name!r}"
            if "/" in plain_name(file_name, origin, "source file name"):
                raise UnsafePathError(f"{origin}: source file name {file_name!r} must be a file of the checkpoint folder, not a path")
            file = _mapping(file, where, "source file")
            metadata, names = file.get("metadata"), file.get("tensors")
            if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
                raise P2UFormatError(f"{where}: metadata must be an object of strings")
            if not isinstance(names, list) or any(name not in tensors or name in listed for name in names):
                raise P2UFormatError(f"{where}: tensors must list tensors of the manifest, each once")
            listed.update(names)
            files[file_name] = SourceFile(metadata, list(names))
        if listed != set(tensors):
            raise P2UFormatError(f"{origin}: tensors {sorted(set(tensors) - listed)[:3]} are in no source file")
        index_file, index_metadata = source.get("index_file"), source.get("index_metadata")
        if index_file is not None:
            plain_name(index_file, origin, "source index_file")
        if index_metadata is not None:
            _mapping(index_metadata, origin, "source index_metadata")
        for key in ("repo_id", "revision"):
            if source.get(key) is not None and not isinstance(source[key], str):
                raise P2UFormatError(f"{origin}: source {key} must be a string")
        base_sha256 = data.get("base_sha256")
        if base_sha256 is not None:
            base_sha256 = {
                name: _sha256(digest, origin, f"base_sha256 of {name!r}")
                for name, digest in _mapping(base_sha256, origin, "base_sha256").items()
            }
        elif version >= 2:
            raise P2UFormatError(f"{origin}: format version {version} requires base_sha256")
        for name, entry in tensors.items():
            if entry.bits is not None:
                if version < GRID_OFFSETS_VERSION or entry.codec != CODEC_LADDER:
                    raise P2UFormatError(
                        f"{origin}: tensor {name!r} has a base width, which only ladder tensors of format {GRID_OFFSETS_VERSION}+ have"
                    )
                if ladder.stage_bits and entry.bits >= ladder.stage_bits[0]:
                    raise P2UFormatError(
                        f"{origin}: tensor {name!r} has base width {entry.bits}, not below the first stage's {ladder.stage_bits[0]} bits"
                    )
            if entry.corrected and (version < CORRECTED_CODES_VERSION or entry.bits is None or entry.alias_of is not None):
                raise P2UFormatError(
                    f"{origin}: tensor {name!r} is corrected, which only stored ladder tensors with a base width of format {CORRECTED_CODES_VERSION}+ are"
                )
        return cls(
            ladder, tensors, files, index_file, index_metadata, source.get("repo_id"), source.get("revision"),
            base_sha256, version,
        )  # fmt: skip

    @property
    def has_offsets(self) -> bool:
        """Whether quantized tensors carry grid offsets (older bases: every offset is 0)."""
        return self.format_version >= GRID_OFFSETS_VERSION

    @property
    def coded_base(self) -> bool:
        """Whether the base may store codes and scales entropy-coded (``progressive.encode_base``), not only packed and raw."""
        return self.format_version >= CODED_BASE_VERSION

    @property
    def coded_offsets(self) -> bool:
        """Whether the base may store grid offsets entropy-coded too (``progressive.encode_base``), not only packed."""
        return self.format_version >= CODED_OFFSETS_VERSION

    def tensor_ladder(self, name: str) -> Ladder:
        """The ladder of stored tensor ``name``: its own base width, the release's stages and group size."""
        entry = self.tensors[name]
        if entry.bits is None:
            return self.ladder
        return dataclasses.replace(self.ladder, base_bits=entry.bits, corrected=entry.corrected)

    def stored_tensors(self) -> dict[str, TensorEntry]:
        """Tensors stored under their own name (aliases point at one of these)."""
        return {name: entry for name, entry in self.tensors.items() if entry.alias_of is None}

    def quantized_tensors(self) -> dict[str, TensorEntry]:
        return {n: e for n, e in self.stored_tensors().items() if e.codec == CODEC_LADDER}

    def source_bytes(self) -> int:
        """Bytes of all source tensors, aliases included (what the original download carries)."""
        return sum(math.prod(e.shape) * SAFETENSORS_DTYPES[e.dtype].itemsize for e in self.tensors.values())


def read_manifest(base_dir: str | os.PathLike) -> Manifest:
    path = release_file(base_dir, MANIFEST_FILE)
    manifest = Manifest.from_json(read_json(path), str(path))
    if manifest.base_sha256 is None:
        warnings.warn(
            f"{path}: format version 1 records no checksums of the base weights; they are not verified "
            "(split the source again with this p2u-hub to get them)",
            stacklevel=2,
        )
    return manifest


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
    def from_json(cls, data: object, origin: str) -> QuantizationConfig:
        data = _mapping(data, origin, "quantization_config")
        if data.get("quant_method") != QUANT_METHOD:
            raise P2UFormatError(f"{origin}: quantization_config is not a p2u one (quant_method {data.get('quant_method')!r})")
        where = f"{origin}: quantization_config"
        version = _format_version(data.get("format_version"), where)
        load_mode = data.get("load_mode", DEFAULT_LOAD_MODE)
        if load_mode not in LOAD_MODES:
            raise P2UFormatError(f"{where}: load_mode must be one of {LOAD_MODES}, got {load_mode!r}")
        bits = _integer(data.get("bits"), where, "bits", 2, 8)
        group_size = _integer(data.get("group_size"), where, "group_size", 8, 1 << 20)
        if group_size % 8:
            raise P2UFormatError(f"{where}: group_size must be a multiple of 8, got {group_size}")
        stages = data.get("stages")
        if not isinstance(stages, list) or not 1 <= len(stages) <= 64:
            raise P2UFormatError(f"{where}: stages must be a list of 1 to 64 stage objects, got {stages!r}")
        entries = [StageEntry.from_json(stage, where) for stage in stages]
        if [entry.index for entry in entries] != list(range(1, len(entries) + 1)) or entries[-1].bits is not None:
            raise P2UFormatError(f"{where}: stages must be numbered 1..{len(entries)}, the last one lossless")
        return cls(
            bits=bits, group_size=group_size, manifest_sha256=_sha256(data.get("manifest_sha256"), where, "manifest_sha256"),
            stages=entries, load_mode=load_mode, format_version=version,
        )  # fmt: skip

    def check_ladder(self, ladder: Ladder, origin: str) -> None:
        """Refuse a config whose widths or group size differ from the manifest's ladder (the manifest is hashed, the config is not)."""
        declared = (self.bits, tuple(stage.bits for stage in self.stages[:-1]), self.group_size)
        if declared != (ladder.base_bits, ladder.stage_bits, ladder.group_size):
            raise P2UFormatError(
                f"{origin}: quantization_config (bits {self.bits}, stages {list(declared[1])}, group_size "
                f"{self.group_size}) does not match the manifest's ladder {ladder}"
            )


def read_quantization_config(base_dir: str | os.PathLike) -> QuantizationConfig:
    path = release_file(base_dir, CONFIG_FILE)
    config = read_json(path)
    if not isinstance(config, dict) or "quantization_config" not in config:
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
    def from_json(cls, data: object, origin: str) -> StageRecord:
        data = _mapping(data, origin, "the stage record")
        if data.get("format") != "p2u-stage":
            raise P2UFormatError(f"{origin}: not a p2u stage record (format {data.get('format')!r})")
        version = _format_version(data.get("format_version"), origin)
        index = _integer(data.get("index"), origin, "index", 1, 64)
        bits = data.get("bits")
        bits = None if bits is None else _integer(bits, origin, "bits", 3, 16)
        payloads = {}
        for name, payload in _mapping(data.get("tensors"), origin, "tensors").items():
            where = f"{origin}: payload of tensor {name!r}"
            payload = _mapping(payload, where, "payload")
            payloads[name] = {
                "sha256": _sha256(payload.get("sha256"), where, "sha256"),
                "bytes": _integer(payload.get("bytes"), where, "bytes"),
            }
        return cls(index, bits, _sha256(data.get("parent"), origin, "parent"), payloads, version)


def read_stage_record(stage_dir: str | os.PathLike) -> StageRecord:
    path = release_file(stage_dir, STAGE_FILE)
    return StageRecord.from_json(read_json(path), str(path))


def weight_map(folder: str | os.PathLike, prefix: str) -> dict[str, Path] | None:
    """Tensor name -> file of ``prefix`` in ``folder``, from its index (None when unsharded); the files need not exist yet.

    A reader fetching shards one by one learns from it which shard holds a tensor before the
    shard is there; the shard's own header stays the authority on what it holds.
    """
    folder = Path(folder)
    index = release_file(folder, index_file_name(prefix))
    if not index.is_file():
        return None
    index_data = read_json(index)
    names = index_data.get("weight_map") if isinstance(index_data, dict) else None
    if not isinstance(names, dict) or not all(isinstance(name, str) for name in names.values()):
        raise P2UFormatError(f"{index}: no weight_map of tensor names to file names")
    files = {name: release_file(folder, name, str(index)) for name in set(names.values())}
    return {tensor: files[name] for tensor, name in names.items()}


def weight_files(folder: str | os.PathLike, prefix: str) -> list[Path]:
    """The safetensors files of ``prefix`` in ``folder``, in shard order (via the index when sharded)."""
    folder = Path(folder)
    shards = weight_map(folder, prefix)
    files = sorted(set(shards.values())) if shards is not None else [release_file(folder, f"{prefix}.safetensors")]
    for file in files:
        if not file.is_file():
            raise P2UFormatError(f"{file}: weight file missing")
    return files
