"""A release as a reader sees it: a base folder, the way to each stage, and tensors rebuilt at a stage.

``merge`` (to disk) and ``upgrade`` (in memory) both rebuild tensors through ``TensorRebuilder``,
so there is one implementation of "base + deltas -> tensor" and of its checks.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, ThreadPoolExecutor, wait
from contextlib import closing
from pathlib import Path
from typing import Generic, TypeVar

import torch
from huggingface_hub.utils import tqdm

from ..codecs import ladder as ladder_codec
from ..codecs import progressive
from ..codecs.entropy import CorruptStreamError
from ..codecs.progressive import Ladder
from ..errors import P2UError
from . import format as fmt
from .hub import cached_repo_id, check_repo_id, download_file, download_stage
from .storage import TensorReader

logger = logging.getLogger(__name__)

StageSpec = int | str
"""A stage: its index (0 = the base, 1..N = after that delta), ``"base"`` or ``"full"``."""
StoredCodes = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
"""How the base stores a ladder tensor: packed codes, float16 scales, packed offsets (None before format 3)."""


class Release:
    """A p2u base folder plus where its stages live (local folders or Hub revisions).

    Args:
        base_dir: the base folder (config.json with a p2u quantization_config, manifest, weights).
        repo_id: the Hub repo the base was downloaded from, if any: stages without an explicit
            location are then looked up on that repo's ``p2u-stage-N`` branches (what
            ``hf upload --revision p2u-stage-N`` of a split folder produces; ``p2u/stage-N``
            of older releases is still found). Read from
            the HF cache path when not given.
        token: Hub token for private stage repos; never stored beyond this object.
        qconfig: the base's quantization_config, when the caller has parsed it already (the
            transformers loader has); read from the base's config.json otherwise.
        stage_lookups: Hub stage folders being fetched already (``hub.look_up_stages``), by stage
            index; a lookup that failed is made again, and reports its error.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike,
        *,
        repo_id: str | None = None,
        token: str | bool | None = None,
        qconfig: fmt.QuantizationConfig | None = None,
        stage_lookups: Mapping[int, Future[Path]] | None = None,
    ):
        self.base_dir = Path(base_dir)
        self.repo_id = repo_id or cached_repo_id(self.base_dir)
        if self.repo_id is not None:
            check_repo_id(self.repo_id, str(self.base_dir))
        self.token = token
        self.qconfig = qconfig if qconfig is not None else fmt.read_quantization_config(self.base_dir)
        self.manifest = fmt.read_manifest(self.base_dir)  # validated as it is parsed; a newer version is named first
        manifest_path = fmt.release_file(self.base_dir, fmt.MANIFEST_FILE)
        if fmt.sha256_bytes(manifest_path.read_bytes()) != self.qconfig.manifest_sha256:
            raise fmt.ChecksumError(
                f"{manifest_path}: sha256 does not match manifest_sha256 {self.qconfig.manifest_sha256} in "
                f"{self.base_dir / fmt.CONFIG_FILE}"
            )
        self.qconfig.check_ladder(self.manifest.ladder, str(self.base_dir / fmt.CONFIG_FILE))
        self._stages: dict[int, tuple[Path, fmt.StageRecord]] = {}  # checked stages: each record is read once
        self._stage_lookups = dict(stage_lookups or {})

    def reopened(self, token: str | bool | None) -> Release:
        """This release with its config and manifest as parsed, its stages looked up afresh and fetched with ``token``.

        The base is checked once, when loaded; stages are read again, so that a retry sees a stage
        repaired (or downloaded) since an earlier attempt.
        """
        release = copy.copy(self)
        release.token = token
        release._stages, release._stage_lookups = {}, {}
        return release

    @classmethod
    def open(cls, path: str | os.PathLike, *, token: str | bool | None = None) -> Release:
        """Open a release folder (``OUT`` from split, holding ``base/``) or a base folder itself."""
        path = Path(path)
        if fmt.is_release_folder(path):
            path = path / fmt.BASE_DIR
        elif (path / fmt.STAGE_FILE).is_file():
            raise fmt.P2UFormatError(
                f"{path}: a delta stage folder, not a release; give the release folder ({path.parent}) or its base folder"
            )
        elif not (path / fmt.CONFIG_FILE).is_file():
            raise fmt.P2UFormatError(
                f"{path}: not a p2u release (no {fmt.BASE_DIR}/{fmt.MANIFEST_FILE}) nor a base folder (no {fmt.CONFIG_FILE})"
            )
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
        if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage <= self.stage_count:
            raise fmt.P2UFormatError(f"stage must be 'base', 'full' or an int in 0..{self.stage_count}, got {stage!r}")
        return stage

    def stage_bits(self, index: int) -> int | None:
        """Integer width reached at stage ``index`` (None once lossless)."""
        return self.qconfig.bits if index == 0 else self.qconfig.stages[index - 1].bits

    def stage_label(self, index: int) -> str:
        """``stage-2 (lossless)``, ``stage-1 (8-bit)``: what a progress bar or a message calls stage ``index``."""
        bits = self.stage_bits(index)
        return f"{fmt.stage_name(index)} ({f'{bits}-bit' if bits else 'lossless'})"

    def stage_dir(self, index: int) -> Path:
        """The local folder of stage ``index`` with all its files (downloading them from the Hub if needed), validated."""
        folder, record = self.stage(index)
        for file in StageShards(folder, record).files:
            download_file(folder, file.relative_to(folder).as_posix(), token=self.token)
        return folder

    def download_stages(self, stage: StageSpec = "full") -> list[Path]:
        """Every file of the stages up to ``stage`` made local, in the order an upgrade rebuilds from them; their folders.

        The files come as ``TensorRebuilder.start_downloads`` fetches them (the first tensors' files
        first, ``DOWNLOADS_AT_ONCE`` at a time, into the HF cache), so an upgrade started meanwhile
        finds each file there, or waits for its download (huggingface_hub locks it) and decodes
        right behind it, instead of fetching in an order of its own. Nothing is checked here:
        whoever decodes checks every payload.
        """
        rebuilder = self.rebuilder(stage)
        with closing(rebuilder):
            rebuilder.start_downloads(self.manifest.tensors)
            rebuilder.verify_payloads()
        return [shards.folder for shards in rebuilder.stages]

    def stage(self, index: int) -> tuple[Path, fmt.StageRecord]:
        """The local folder of stage ``index`` and its record, checked against this base.

        A stage on the Hub is a snapshot folder holding its record and shard index: the weight
        files come later (``TensorRebuilder.start_downloads``, ``stage_dir``). The record is read
        and checked once per release; later calls return it as it was.
        """
        if index in self._stages:
            return self._stages[index]
        entry = self.qconfig.stages[index - 1]
        local = self._local_stage(entry)
        if local is not None and (local / fmt.STAGE_FILE).is_file():
            folder, record = local, fmt.read_stage_record(local)
        elif entry.repo_id is not None or self.repo_id is not None:
            looked_up = self._looked_up(index)
            if looked_up is None:
                folder = download_stage(entry, default_repo_id=self.repo_id, token=self.token)
                looked_up = folder, fmt.read_stage_record(folder)
            folder, record = looked_up
        else:
            raise fmt.P2UFormatError(
                f"{entry.name} not found: expected {fmt.STAGE_FILE} in {local} and the config names no Hub repo for it"
            )
        if record.parent != self.qconfig.manifest_sha256:
            raise fmt.StageMismatchError(
                f"{folder}: {entry.name} belongs to another base (parent {record.parent[:12]}, "
                f"this base's manifest is {self.manifest.sha256[:12]})"
            )
        if record.index != index or record.bits != entry.bits:
            raise fmt.StageMismatchError(
                f"{folder}: expected {entry.name} ({entry.bits or 'lossless'}), found stage {record.index} ({record.bits or 'lossless'})"
            )
        self._stages[index] = folder, record
        return folder, record

    def _looked_up(self, index: int) -> tuple[Path, fmt.StageRecord] | None:
        """The folder and record of stage ``index`` from a lookup started earlier (waiting for it); None if there was
        none, it failed, or it found a stage of another base.

        A lookup is a hint: started before transformers names the repo being loaded, it may have used
        the name saved in the base's ``config.json`` (``look_up_stages``), another release's perhaps.
        """
        lookup = self._stage_lookups.pop(index, None)
        if lookup is None or lookup.exception() is not None:
            return None
        folder = lookup.result()
        try:
            record = fmt.read_stage_record(folder)
        except P2UError:
            return None
        return (folder, record) if record.parent == self.qconfig.manifest_sha256 else None

    def _local_stage(self, entry: fmt.StageEntry) -> Path | None:
        """The folder of a stage given by ``path`` (``../stage-k`` or a subfolder), kept inside the release folder."""
        if entry.path is None:
            return None
        root = self.base_dir.parent if entry.path.startswith("../") else self.base_dir
        return fmt.release_file(root, entry.path.removeprefix("../"), f"{self.base_dir / fmt.CONFIG_FILE}: {entry.name} path")

    def rebuilder(self, stage: StageSpec) -> TensorRebuilder:
        """A ``TensorRebuilder`` at ``stage``, the record of every stage up to it fetched and checked against this base.

        The records are fetched side by side (each is a few requests for a small file: in turn,
        they would leave the link idle); the first stage that fails, in order, raises.
        """
        index = self.stage_index(stage)
        with ThreadPoolExecutor(max(index, 1), thread_name_prefix="p2u-stage") as pool:
            stages = list(pool.map(self.stage, range(1, index + 1)))
        return TensorRebuilder(self, index, stages)


def verify(path: str | os.PathLike, *, token: str | bool | None = None) -> Release:
    """Rebuild every tensor of a release at full precision and check it against the manifest's sha256.

    What ``p2u verify`` runs, and what ``push`` runs before uploading anything, so a corrupt
    release is refused before it reaches the Hub.

    Args:
        path: a release folder (holding ``base/``) or a base folder whose config locates its stages.
        token: Hub token for stages on private repos.

    Returns:
        The verified release.

    Raises:
        ChecksumError: a payload or a rebuilt tensor fails its sha256 check (the message names it).
        P2UFormatError: a file is missing or corrupt.
    """
    release = Release.open(path, token=token)
    rebuilder = release.rebuilder("full")
    with closing(TensorPrefetch(rebuilder, rebuilder.start_downloads(release.manifest.tensors))) as ahead:
        for name in tqdm(release.manifest.tensors, desc="p2u verify", unit="tensor"):
            ahead.get(name)
    return release


class TensorRebuilder:
    """Rebuild source tensors at one stage from the base weights and the stage payloads.

    Every payload is checked against its stage record's sha256; at the last stage every
    rebuilt tensor is checked against the manifest's sha256 of the source bytes. The stage
    files come in the background (``start_downloads``) and a tensor is rebuilt as soon as the
    files holding its payloads are there, while later ones still download. Each payload is read
    and hashed once: a ``verify`` download may keep the ones it checked for ``tensor``.
    """

    def __init__(self, release: Release, index: int, stages: list[tuple[Path, fmt.StageRecord]]):
        self.release = release
        self.index = index
        self.full = index == release.stage_count
        self.stages = [StageShards(folder, record) for folder, record in stages]
        self._verified: dict[tuple[int, str], memoryview] = {}  # (stage position, tensor) -> payload checked on arrival
        self._keep: Collection[str] = ()
        self._keep_bytes = self._kept = self._dropped = 0
        self._verified_lock = threading.Lock()  # kept by the check thread, taken by the rebuild threads
        self._downloads: StageDownloads | None = None
        self._starting = threading.Lock()

    def tensor(self, name: str, stored: StoredCodes | None = None) -> torch.Tensor:
        """Tensor ``name`` at this stage, in its source dtype and shape.

        Every base tensor read is checked against the manifest's ``base_sha256`` (format 2) and
        every payload against its stage record, and declared sizes against stored ones, before
        anything is decoded: a corrupt or crafted release fails here with the file and tensor named.
        ``stored`` gives the base codes, scales and offsets already in memory, checked when they
        were loaded (a loaded model holds them): they are then not read from disk again. Waits
        for the stage files holding the payloads of ``name`` (starting the downloads if needed).
        """
        manifest = self.release.manifest
        entry = manifest.tensors.get(name)
        if entry is None:
            raise fmt.P2UFormatError(f"tensor {name!r} is not in {self.release.base_dir / fmt.MANIFEST_FILE}")
        stored_name = entry.alias_of or name
        if entry.codec == fmt.CODEC_EXACT:
            tensor = self._base_tensor(stored_name, entry.dtype, entry.shape)
            self._check_source_bytes(name, tensor, entry, always=True)
            return tensor
        spec = manifest.tensor_ladder(stored_name)
        codes, scales, offsets = stored if stored is not None else self._stored_codes(stored_name, entry, spec)
        deltas = [self._payload(position, stored_name) for position in range(len(self.stages))]
        try:
            tensor = progressive.decode(codes, scales, offsets, deltas, spec, tuple(entry.shape), entry.torch_dtype)
        except CorruptStreamError as error:
            folder = self.stages[-1].folder if self.stages else self.release.base_dir
            raise fmt.P2UFormatError(f"{folder}: payload of tensor {stored_name!r} does not decode ({error})") from None
        self._check_source_bytes(name, tensor, entry)
        logger.debug("tensor %r rebuilt at %s", name, self.release.stage_label(self.index))
        return tensor

    @property
    def held_payload_bytes(self) -> int:
        """Bytes of payloads checked on arrival and kept for ``tensor``, not decoded yet."""
        with self._verified_lock:
            return sum(len(payload) for payload in self._verified.values())

    def largest_stage_shard(self) -> int:
        """Bytes of payloads in the largest stage weight file: the memory an upgrade may hold beyond its final model."""
        return max((shards.payload_bytes(file) for shards in self.stages for file in shards.files), default=0)

    def start_downloads(self, order: Iterable[str], *, verify: bool = False, keep: Collection[str] = (), keep_bytes: int = 0) -> list[str]:
        """Fetch the stage files in a background thread, first the files of the first tensors in ``order``.

        With ``verify``, each file is checked as it arrives (its header, and every payload in it
        against its sha256): ``verify_payloads`` then waits for all of them. The payloads of
        tensors in ``keep`` are kept for ``tensor`` (which then neither reads nor hashes them again)
        while they total at most ``keep_bytes``; the others are dropped once checked, and read and
        checked again when decoded, so memory stays bounded for any release.

        Returns:
            ``order`` sorted (stably) by when the last file a tensor needs arrives: rebuilding in
            that order never waits for a file while a tensor whose files are there could be rebuilt.
        """
        order = list(order)
        rank: dict[tuple[int, Path], int] = {}
        needs: dict[str, list[tuple[int, Path]]] = {}
        for name in order:
            entry = self.release.manifest.tensors.get(name)
            if entry is None or entry.codec != fmt.CODEC_LADDER:
                continue
            stored = entry.alias_of or name
            needs[name] = [(position, shards.planned[stored]) for position, shards in enumerate(self.stages) if stored in shards.planned]
            for key in needs[name]:
                rank.setdefault(key, len(rank))
        for position, shards in enumerate(self.stages):  # files no tensor of ``order`` needs come last, still checked
            for file in shards.files:
                rank.setdefault((position, file), len(rank))
        self._keep, self._keep_bytes = set(keep), keep_bytes
        with self._starting:
            if self._downloads is None:
                check = self._check_file if verify else None
                files = sorted(rank, key=rank.__getitem__)
                self._downloads = StageDownloads(self.stages, files, self.release.token, check, self._large_tensor_of_files(needs))
        return sorted(order, key=lambda name: max((rank[key] for key in needs.get(name, ())), default=-1))

    def _large_tensor_of_files(self, needs: dict[str, list[tuple[int, Path]]]) -> dict[tuple[int, Path], str]:
        """The files of each tensor whose payloads are more than ``1 / DOWNLOADS_AT_ONCE`` of all stage bytes, to that tensor (``LinkShare``)."""
        payloads = [shards.record.payloads for shards in self.stages]
        total = sum(payload["bytes"] for stage in payloads for payload in stage.values())
        large: dict[tuple[int, Path], str] = {}
        for name, files in needs.items():
            entry = self.release.manifest.tensors[name]
            stored = entry.alias_of or name
            if sum(stage[stored]["bytes"] for stage in payloads if stored in stage) * DOWNLOADS_AT_ONCE > total:
                for file in files:
                    large.setdefault(file, name)
        return large

    def verify_payloads(self) -> None:
        """Wait until every stage file has arrived and every payload is checked: lets a caller fail before changing anything.

        Raises what a download or a check raised: ``StageUnavailableError``, ``ChecksumError``, ``P2UFormatError``.
        """
        self._started().wait()
        if self._dropped:
            logger.info(
                "%s: %.1f MB of payloads beyond the %.1f MB kept in memory are read and checked again when decoded",
                self.release.base_dir, self._dropped / 1e6, self._keep_bytes / 1e6,
            )  # fmt: skip

    def close(self) -> None:
        """Stop downloading (after the file in flight) and fail the rebuilds still waiting for a file."""
        if self._downloads is not None:
            self._downloads.close()

    def _started(self) -> StageDownloads:
        """The downloads, started in the manifest's order if no caller gave one."""
        if self._downloads is None:
            self.start_downloads(self.release.manifest.tensors)
        assert self._downloads is not None
        return self._downloads

    def _check_file(self, position: int, reader: TensorReader) -> None:
        """Check every payload of one arrived stage file, keeping those ``tensor`` will want (``start_downloads``)."""
        record = self.stages[position].record
        for name in reader.locations:
            if name not in record.payloads:
                continue
            payload = self._read_payload(position, name, reader)
            if name in self._keep and self._kept + len(payload) <= self._keep_bytes:
                with self._verified_lock:
                    self._verified[position, name] = payload
                self._kept += len(payload)
            elif name in self._keep:
                self._dropped += len(payload)

    def _stored_codes(self, name: str, entry: fmt.TensorEntry, spec: Ladder) -> StoredCodes:
        """The codes, scales and offsets (None before format 3) of ladder tensor ``name``, read from the base and checked."""
        manifest = self.release.manifest
        groups = ladder_codec.group_count(entry.numel, spec.group_size)
        offsets_name, scales_name = fmt.offsets_key(name), fmt.scales_key(name)
        offsets = None
        if manifest.has_offsets:
            raw_shape = [ladder_codec.offsets_bytes(groups, spec.base_bits)]
            offsets = self._base_tensor(offsets_name, "U8", None if manifest.coded_offsets else raw_shape)
        if manifest.coded_base:
            assert offsets is not None  # a coded base has offsets
            declared = self._base.header(scales_name)
            scales_dtype = "U8" if declared is not None and declared["dtype"] == "U8" else fmt.DTYPE_NAMES[ladder_codec.SCALE_DTYPE]
            stored_codes, stored_scales = self._base_tensor(name, "U8"), self._base_tensor(scales_name, scales_dtype)
            try:
                return progressive.decode_base(stored_codes, stored_scales, offsets, spec, entry.numel)
            except CorruptStreamError as error:
                raise fmt.P2UFormatError(
                    f"{self._base.locations[name]}: the base codes, scales or offsets of tensor {name!r} do not decode ({error})"
                ) from None
        codes = self._base_tensor(name, "U8", [groups * spec.group_size * spec.base_bits // 8])
        scales = self._base_tensor(scales_name, fmt.DTYPE_NAMES[ladder_codec.SCALE_DTYPE], [groups])
        return codes, scales, offsets

    @functools.cached_property
    def _base(self) -> TensorReader:
        """The base weights, opened at the first tensor read from them (an upgrade of a loaded model reads none)."""
        return TensorReader(fmt.weight_files(self.release.base_dir, fmt.BASE_WEIGHTS_NAME))

    def _base_tensor(self, name: str, dtype: str, shape: list[int] | None = None) -> torch.Tensor:
        """A tensor of the base weights, refused unless its dtype, shape and sha256 are the ones recorded.

        ``shape`` None: any 1-D length (a coded base's codes, scales or offsets, which ``progressive.decode_base`` checks).
        """
        declared = self._base.header(name)
        if declared is not None and (
            declared["dtype"] != dtype or (declared["shape"] != shape if shape is not None else len(declared["shape"]) != 1)
        ):
            raise fmt.P2UFormatError(
                f"{self._base.locations[name]}: tensor {name!r} is stored as {declared['dtype']}{declared['shape']}, "
                f"the manifest implies {dtype}{shape if shape is not None else '[n]'}"
            )
        tensor = self._base.get(name)
        expected = self.release.manifest.base_sha256
        if expected is not None and fmt.tensor_sha256(tensor) != expected.get(name):
            raise fmt.ChecksumError(f"{self._base.locations[name]}: tensor {name!r} fails its base_sha256 check (corrupt file?)")
        return tensor

    def _payload(self, position: int, name: str) -> memoryview:
        """The payload of tensor ``name`` in the stage at ``position``, once its file is there: kept when checked, else read and checked."""
        shards = self.stages[position]
        if name not in shards.record.payloads:
            raise fmt.P2UFormatError(f"{shards.folder / fmt.STAGE_FILE}: no payload listed for tensor {name!r}")
        reader = self._started().reader(position, name)  # waits for the file (and, with ``verify``, its check)
        with self._verified_lock:
            kept = self._verified.pop((position, name), None)
        return kept if kept is not None else self._read_payload(position, name, reader)

    def _read_payload(self, position: int, name: str, reader: TensorReader) -> memoryview:
        """Payload ``name`` of the stage at ``position`` read from ``reader``, refused unless its size and sha256 are the recorded ones."""
        shards = self.stages[position]
        expected = shards.record.payloads[name]
        declared = reader.header(name)
        if declared is not None and (declared["dtype"], declared["shape"]) != ("U8", [expected["bytes"]]):
            raise fmt.ChecksumError(
                f"{reader.locations[name]}: payload of tensor {name!r} is {declared['dtype']}{declared['shape']}, "
                f"{fmt.STAGE_FILE} says U8[{expected['bytes']}]"
            )
        payload = reader.read_bytes(name)
        if fmt.sha256_bytes(payload) != expected["sha256"]:
            raise fmt.ChecksumError(f"{shards.folder}: payload of tensor {name!r} fails its sha256 check (corrupt download?)")
        return payload

    def _check_source_bytes(self, name: str, tensor: torch.Tensor, entry: fmt.TensorEntry, always: bool = False) -> None:
        if list(tensor.shape) != entry.shape or fmt.DTYPE_NAMES.get(tensor.dtype) != entry.dtype:
            raise fmt.ChecksumError(
                f"tensor {name!r}: rebuilt as {fmt.DTYPE_NAMES.get(tensor.dtype)}{list(tensor.shape)}, "
                f"manifest says {entry.dtype}{entry.shape}"
            )
        if (self.full or always) and fmt.tensor_sha256(tensor) != entry.sha256:
            raise fmt.ChecksumError(f"tensor {name!r}: rebuilt bytes do not match the source sha256 in the manifest")


class StageShards:
    """The weight files of one stage and, before they have all arrived, which one holds each payload.

    The shard index (or, unsharded, the one file) says where each payload should be, so a reader
    can wait for just that file; the file's own validated header is what is read.
    """

    def __init__(self, folder: Path, record: fmt.StageRecord):
        self.folder = folder
        self.record = record
        planned = fmt.weight_map(folder, fmt.DELTA_WEIGHTS_NAME)
        if planned is None:
            single = fmt.release_file(folder, fmt.shard_file_name(fmt.DELTA_WEIGHTS_NAME, 1, 1))
            self.planned, self.files = dict.fromkeys(record.payloads, single), [single]
        else:
            self.planned, self.files = planned, sorted(set(planned.values()))

    def payload_bytes(self, file: Path) -> int:
        """Bytes of the recorded payloads the index places in ``file``."""
        return sum(payload["bytes"] for name, payload in self.record.payloads.items() if self.planned.get(name) == file)


DOWNLOADS_AT_ONCE = 4
"""Stage files downloading at a time (``LinkShare``). Each costs a few requests and client work before and after its
bytes (round trips on the Hub; a few ms on loopback, more while the model loads beside them): with several in flight
the link stays busy between files."""


Key = TypeVar("Key", bound=Hashable)


class LinkShare(Generic[Key]):
    """Which files may start downloading: in order, ``at_once`` at a time, except that the files of a group share the link only with each other.

    ``TensorRebuilder.start_downloads`` makes a group of the files of a tensor whose payloads are
    more than ``1 / at_once`` of all the stage bytes. Shared ``at_once`` ways, such a tensor's
    files arrive last, and decoding it is all that is left once the link goes quiet; on their
    own, they arrive early and it decodes while the smaller files download (MiniLM fp32: 35 MB of
    65.5 MB of stages are the word embeddings'; at 100 MB/s ``p2u bench`` measured 0.04 s of
    decoding left after the download with its largest file alone, 0.15 s without, and the full
    model in 1.21 s against 1.32 s). Its files of every stage download together: the tensor
    decodes only once all have come, and one after the other the link would idle between them
    (each file's requests; ~25 ms on loopback while the model loads). The other files share the
    link, so that each one's requests overlap another's bytes (a round trip or more per file on
    the Hub).
    """

    def __init__(self, order: list[Key], groups: Mapping[Key, Hashable], at_once: int):
        self._waiting = deque(order)
        self._groups = groups
        self._at_once = at_once
        self._running: set[Key] = set()

    def admit(self) -> list[Key]:
        """The files to start now (in order), each counted as running until ``finished``."""
        admitted = []
        while self._waiting and len(self._running) < self._at_once:
            key = self._waiting[0]
            if self._running and {self._groups.get(running) for running in self._running} != {self._groups.get(key)}:
                break  # a group's file waits for the link to empty; nothing else joins a group
            self._running.add(self._waiting.popleft())
            admitted.append(key)
        return admitted

    def finished(self, key: Key) -> None:
        self._running.discard(key)


class StageDownloads:
    """The weight files of a rebuilder's stages, fetched in order by a background thread (``DOWNLOADS_AT_ONCE`` at a time).

    A file is ready once it is local and its header read, and, with ``check``, once ``check``
    has run on it (in a second thread, so the next download is not held up). The first failure
    fails every file not ready yet: whoever waits for one gets that error.
    """

    def __init__(
        self, stages: list[StageShards], files: list[tuple[int, Path]], token: str | bool | None,
        check: Callable[[int, TensorReader], None] | None, groups: Mapping[tuple[int, Path], str],
    ):  # fmt: skip
        self._stages = stages
        self._groups = groups  # files that share the link only with each other: a large tensor's (LinkShare)
        self._token = token
        self._check = check
        self._ready: dict[tuple[int, Path], Future[TensorReader]] = {key: Future() for key in files}
        self._complete: Future[list[TensorReader]] = Future()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._checker = ThreadPoolExecutor(1, thread_name_prefix="p2u-check")
        threading.Thread(target=self._run, name="p2u-download", daemon=True).start()

    def reader(self, position: int, name: str) -> TensorReader:
        """A reader of the file holding payload ``name`` of stage ``position``, waiting for it to be ready.

        When the index placed the payload in a file that does not hold it, every file of the
        stage is waited for and read together (which also refuses a payload in two files).
        """
        file = self._stages[position].planned.get(name)
        if file is not None:
            reader = self._ready[position, file].result()
            if name in reader:
                return reader
        return self.wait()[position]

    def wait(self) -> list[TensorReader]:
        """One reader per stage over all its files, once every file is ready."""
        return self._complete.result()

    def close(self) -> None:
        self._closed.set()
        self._fail(CancelledError("the stage downloads were stopped"))
        self._checker.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        downloads = ThreadPoolExecutor(DOWNLOADS_AT_ONCE, thread_name_prefix="p2u-download")
        try:
            checked = [  # as each file arrives: a large file still downloading holds up no check of a later one
                self._checker.submit(self._arrived, position, file, path) for (position, file), path in self._fetched(downloads)
            ]
            for future in checked:
                future.result()
            readers = [TensorReader(shards.files) for shards in self._stages]  # refuses a payload in two files
            for shards, reader in zip(self._stages, readers):
                missing = next((name for name in shards.record.payloads if name not in reader), None)
                if missing is not None:
                    raise fmt.P2UFormatError(
                        f"{shards.folder}: payload of tensor {missing!r} is in none of {[f.name for f in shards.files]}"
                    )
            with self._lock:
                if not self._complete.done():
                    self._complete.set_result(readers)
        except BaseException as error:  # handed to whoever waits for a file
            self._fail(error)
        finally:
            downloads.shutdown(wait=False, cancel_futures=True)
            self._checker.shutdown(wait=False)

    def _fetched(self, downloads: ThreadPoolExecutor) -> Iterator[tuple[tuple[int, Path], Path]]:
        """``((position, file), local path)`` of every file as it arrives, started as ``LinkShare`` admits them."""
        link = LinkShare(list(self._ready), self._groups, DOWNLOADS_AT_ONCE)
        running: dict[Future[Path], tuple[int, Path]] = {}
        while True:
            for key in link.admit():
                running[downloads.submit(self._download, *key)] = key
            if not running:
                return
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                key = running.pop(future)
                link.finished(key)
                yield key, future.result()

    def _download(self, position: int, file: Path) -> Path:
        if self._closed.is_set():
            raise CancelledError("the stage downloads were stopped")
        folder = self._stages[position].folder
        path = download_file(folder, file.relative_to(folder).as_posix(), token=self._token)
        if not path.is_file():
            raise fmt.P2UFormatError(f"{path}: weight file missing")
        return path

    def _arrived(self, position: int, file: Path, path: Path) -> None:
        try:
            reader = TensorReader([path])
            if self._check is not None:
                self._check(position, reader)
        except BaseException as error:
            self._fail(error)
            raise
        with self._lock:
            if not self._ready[position, file].done():
                self._ready[position, file].set_result(reader)

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            futures: list[Future] = [*self._ready.values(), self._complete]
            for future in futures:
                if not future.done():
                    future.set_exception(error)


PREFETCH_BYTES = 1 << 28
"""At most this many bytes of rebuilt tensors wait ahead of their consumer by default (always at least one tensor)."""


class TensorPrefetch:
    """Tensors of a ``TensorRebuilder`` rebuilt ahead on ``codec_threads()`` threads, in the order they will be asked for.

    Why: a checkpoint is mostly tensors of one coding block or a few, so the codec's per-tensor
    block threads leave the other cores idle; rebuilding the next tensors meanwhile uses them
    (the C loops, inflate and sha256 release the GIL). ``get`` returns a tensor, or raises its
    error, exactly as ``rebuilder.tensor`` would; a name not in the announced order is rebuilt
    on the spot. Memory: the consumer's tensor plus at most ``room()`` bytes of rebuilt ones, or one
    rebuilt tensor when it alone is larger (and one tensor's coding temporaries per thread). Each
    finished rebuild starts the next one that fits, so the work goes on while the consumer waits
    for something else (an upgrade, for its last stage file) rather than only when it asks.
    """

    def __init__(
        self, rebuilder: TensorRebuilder, names: Iterable[str], workers: int | None = None,
        stored: Callable[[str], StoredCodes | None] = lambda name: None, room: Callable[[], int] = lambda: PREFETCH_BYTES,
    ):  # fmt: skip
        """``stored(name)``: the base codes of ``name`` already in memory (``TensorRebuilder.tensor``'s ``stored``);
        ``room()``: how many bytes of rebuilt tensors may wait now (asked before each one starts)."""
        self._rebuilder = rebuilder
        self._stored = stored
        self._room = room
        self._order = deque(names)
        self._pending: dict[str, tuple[Future, int]] = {}
        self._served: set[str] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._pool = ThreadPoolExecutor(workers or progressive.codec_threads(), thread_name_prefix="p2u-rebuild")
        self._fill()

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` at the rebuilder's stage (what ``TensorRebuilder.tensor`` returns)."""
        with self._lock:
            future, _ = self._pending.pop(name, (None, 0))
            self._served.add(name)
        self._fill()
        return self._rebuilder.tensor(name, self._stored(name)) if future is None else future.result()

    def _fill(self) -> None:
        started = []
        with self._lock:
            waiting = sum(size for _, size in self._pending.values())
            while self._order and not self._closed:
                name = self._order[0]
                entry = self._rebuilder.release.manifest.tensors.get(name)
                if name in self._pending or name in self._served or entry is None:
                    self._order.popleft()
                    continue  # announced twice, asked already, or unknown: ``get`` rebuilds it on the spot (naming the error)
                size = entry.numel * entry.torch_dtype.itemsize
                if self._pending and waiting + size > self._room():
                    break  # it starts once the consumer has taken enough (a tensor larger than the room starts alone)
                self._order.popleft()
                future = self._pool.submit(self._rebuilder.tensor, name, self._stored(name))
                self._pending[name] = (future, size)
                waiting += size
                started.append(future)
        for future in started:  # outside the lock: a rebuild done already runs its callback here, at once
            future.add_done_callback(lambda _: self._fill())

    def close(self) -> None:
        """Drop what was rebuilt ahead and not asked for; stop the rebuilder's downloads; wait for the running rebuilds."""
        with self._lock:
            self._closed = True
            self._order.clear()
        self._rebuilder.close()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
