"""A release as a reader sees it: a base folder, the way to each stage, and tensors rebuilt at a stage.

``merge`` (to disk) and ``upgrade`` (in memory) both rebuild tensors through ``TensorRebuilder``,
so there is one implementation of "base + deltas -> tensor" and of its checks.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import format as fmt
from .codecs import progressive
from .hub import cached_repo_id, download_stage
from .storage import TensorReader

StageSpec = int | str
"""A stage: its index (0 = the base, 1..N = after that delta), ``"base"`` or ``"full"``."""


class Release:
    """A p2u base folder plus where its stages live (local folders or Hub revisions).

    Args:
        base_dir: the base folder (config.json with a p2u quantization_config, manifest, weights).
        repo_id: the Hub repo the base was downloaded from, if any: stages without an explicit
            location are then looked up on that repo's ``p2u/stage-N`` branches (what
            ``hf upload --revision p2u/stage-N`` of a split folder produces). Read from
            the HF cache path when not given.
        token: Hub token for private stage repos; never stored beyond this object.
    """

    def __init__(self, base_dir: str | os.PathLike, *, repo_id: str | None = None, token: str | bool | None = None):
        self.base_dir = Path(base_dir)
        self.repo_id = repo_id or cached_repo_id(self.base_dir)
        self.token = token
        self.qconfig = fmt.read_quantization_config(self.base_dir)
        self.manifest = fmt.read_manifest(self.base_dir)
        if self.manifest.sha256 != self.qconfig.manifest_sha256:
            raise fmt.ChecksumError(
                f"{self.base_dir / fmt.MANIFEST_FILE}: sha256 {self.manifest.sha256} does not match "
                f"manifest_sha256 {self.qconfig.manifest_sha256} in {self.base_dir / fmt.CONFIG_FILE}"
            )

    @classmethod
    def open(cls, path: str | os.PathLike, *, token: str | bool | None = None) -> "Release":
        """Open a release folder (``OUT`` from split, holding ``base/``) or a base folder itself."""
        path = Path(path)
        if (path / fmt.BASE_DIR / fmt.CONFIG_FILE).is_file():
            path = path / fmt.BASE_DIR
        return cls(path, token=token)

    @property
    def stage_count(self) -> int:
        return len(self.qconfig.stages)

    def stage_index(self, stage: StageSpec) -> int:
        """Normalise ``"base"``, ``"full"`` or an int to an index in ``0..stage_count``."""
        if stage == "full":
            return self.stage_count
        if stage == "base":
            return 0
        if isinstance(stage, str) and stage.isdigit():
            stage = int(stage)
        if not isinstance(stage, int) or not 0 <= stage <= self.stage_count:
            raise ValueError(f"stage must be 'base', 'full' or an int in 0..{self.stage_count}, got {stage!r}")
        return stage

    def stage_bits(self, index: int) -> int | None:
        """Integer width reached at stage ``index`` (None once lossless)."""
        return self.qconfig.bits if index == 0 else self.qconfig.stages[index - 1].bits

    def stage_dir(self, index: int) -> Path:
        """The local folder of stage ``index`` (downloading it from the Hub if needed), validated."""
        entry = self.qconfig.stages[index - 1]
        local = self.base_dir / entry.path if entry.path else None
        if local is not None and (local / fmt.STAGE_FILE).is_file():
            folder = local
        elif entry.repo_id is not None or self.repo_id is not None:
            folder = download_stage(entry, default_repo_id=self.repo_id, token=self.token)
        else:
            raise fmt.P2UFormatError(
                f"{entry.name} not found: expected {fmt.STAGE_FILE} in {local} and the config names no Hub repo for it"
            )
        record = fmt.read_stage_record(folder)
        if record.parent != self.manifest.sha256:
            raise fmt.StageMismatchError(
                f"{folder}: {entry.name} belongs to another base (parent {record.parent[:12]}, "
                f"this base's manifest is {self.manifest.sha256[:12]})"
            )
        if record.index != index or record.bits != entry.bits:
            raise fmt.StageMismatchError(
                f"{folder}: expected {entry.name} ({entry.bits or 'lossless'}), found stage {record.index} "
                f"({record.bits or 'lossless'})"
            )
        return folder

    def rebuilder(self, stage: StageSpec) -> "TensorRebuilder":
        index = self.stage_index(stage)
        return TensorRebuilder(self, index, [self.stage_dir(k) for k in range(1, index + 1)])


class TensorRebuilder:
    """Rebuild source tensors at one stage from the base weights and the stage payloads.

    Every payload is checked against its stage record's sha256; at the last stage every
    rebuilt tensor is checked against the manifest's sha256 of the source bytes.
    """

    def __init__(self, release: Release, index: int, stage_dirs: list[Path]):
        self.release = release
        self.index = index
        self.full = index == release.stage_count
        self._base = TensorReader(fmt.weight_files(release.base_dir, fmt.BASE_WEIGHTS_NAME))
        self._stages = [
            (folder, fmt.read_stage_record(folder), TensorReader(fmt.weight_files(folder, fmt.DELTA_WEIGHTS_NAME)))
            for folder in stage_dirs
        ]

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` at this stage, in its source dtype and shape."""
        manifest = self.release.manifest
        entry = manifest.tensors.get(name)
        if entry is None:
            raise KeyError(f"tensor {name!r} is not in {self.release.base_dir / fmt.MANIFEST_FILE}")
        stored_name = entry.alias_of or name
        if entry.codec == fmt.CODEC_EXACT:
            tensor = self._base.get(stored_name)
            self._check_source_bytes(name, tensor, entry)
            return tensor
        deltas = [self._payload(folder, record, reader, stored_name) for folder, record, reader in self._stages]
        offsets = self._base.get(fmt.offsets_key(stored_name)) if manifest.has_offsets else None
        tensor = progressive.decode(
            self._base.get(stored_name), self._base.get(fmt.scales_key(stored_name)), offsets, deltas,
            manifest.tensor_ladder(stored_name), tuple(entry.shape), entry.torch_dtype,
        )  # fmt: skip
        if self.full:
            self._check_source_bytes(name, tensor, entry)
        return tensor

    def verify_payloads(self) -> None:
        """Check every payload of every stage against its sha256: lets a caller fail before changing anything."""
        for folder, record, reader in self._stages:
            for name in record.payloads:
                self._payload(folder, record, reader, name)

    def _payload(self, folder: Path, record: fmt.StageRecord, reader: TensorReader, name: str) -> bytes:
        expected = record.payloads.get(name)
        if expected is None:
            raise fmt.P2UFormatError(f"{folder / fmt.STAGE_FILE}: no payload listed for tensor {name!r}")
        payload = fmt.tensor_bytes(reader.get(name)).tobytes()
        if fmt.sha256_bytes(payload) != expected["sha256"]:
            raise fmt.ChecksumError(f"{folder}: payload of tensor {name!r} fails its sha256 check (corrupt download?)")
        return payload

    def _check_source_bytes(self, name: str, tensor: torch.Tensor, entry: fmt.TensorEntry) -> None:
        if list(tensor.shape) != entry.shape or fmt.DTYPE_NAMES.get(tensor.dtype) != entry.dtype:
            raise fmt.ChecksumError(
                f"tensor {name!r}: rebuilt as {fmt.DTYPE_NAMES.get(tensor.dtype)}{list(tensor.shape)}, "
                f"manifest says {entry.dtype}{entry.shape}"
            )
        if self.full and fmt.tensor_sha256(tensor) != entry.sha256:
            raise fmt.ChecksumError(f"tensor {name!r}: rebuilt bytes do not match the source sha256 in the manifest")
