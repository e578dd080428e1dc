"""Safe reading and writing of safetensors folders: validated opens, sharded writers, atomic output.

Every writer here writes into a temporary location and renames it into place only when the
whole output is complete, so an interrupted or failed run leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import mmap
import os
import shutil
import tempfile
import typing
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .format import (
    DTYPE_NAMES,
    SAFETENSORS_DTYPES,
    P2UFormatError,
    index_file_name,
    sha256_bytes,
    shard_file_name,
    tensor_bytes,
    write_json,
)  # fmt: skip

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


TEMPORARY_MARK = ".tmp-"
REPLACED_MARK = ".old-"
"""Hidden siblings ``.NAME.tmp-PID-XXXX`` (output being written) and ``.NAME.old-PID-XXXX`` (output being replaced)."""


@contextlib.contextmanager
def atomic_output_dir(
    destination: str | os.PathLike,
    *,
    overwrite: bool = False,
    is_replaceable: Callable[[Path], bool] | None = None,
) -> Iterator[Path]:
    """Yield a temporary folder beside ``destination``; rename it to ``destination`` on success.

    On any exception the temporary folder is removed and ``destination`` is untouched. With
    ``overwrite``, an existing ``destination`` is replaced only if it is empty or
    ``is_replaceable(destination)`` says it is an output of the same kind (so a typo cannot wipe
    an unrelated folder), and the swap is two renames (old aside, new in) before the old copy is
    deleted: a kill at any moment leaves either the old or the new folder in place. Leftovers of
    runs that were killed (their process no longer exists) are removed first.
    """
    destination = Path(destination)
    _remove_leftovers_of_dead_runs(destination)
    if destination.exists():
        if not overwrite:
            raise FileExistsError(
                f"{destination}: already exists; choose another folder or replace it "
                "(--overwrite on the command line, overwrite=True in Python)"
            )
        if not destination.is_dir() or destination.is_symlink():
            raise FileExistsError(f"{destination}: exists and is not a folder; refusing to replace it")
        if any(destination.iterdir()) and not (is_replaceable is not None and is_replaceable(destination)):
            raise FileExistsError(
                f"{destination}: not empty and not an output of this command; refusing to replace it "
                "(move it away or choose another folder)"
            )
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=_sibling_prefix(destination, TEMPORARY_MARK), dir=destination.parent))
    umask = os.umask(0)
    os.umask(umask)
    temporary.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary folder
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if not destination.exists():
        os.replace(temporary, destination)
        return
    replaced = Path(tempfile.mkdtemp(prefix=_sibling_prefix(destination, REPLACED_MARK), dir=destination.parent))
    os.replace(destination, replaced)  # renaming a folder onto an empty folder replaces it atomically
    os.replace(temporary, destination)
    shutil.rmtree(replaced, ignore_errors=True)


def _sibling_prefix(destination: Path, mark: str) -> str:
    return f".{destination.name}{mark}{os.getpid()}-"


def _remove_leftovers_of_dead_runs(destination: Path) -> None:
    """Delete ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` siblings whose process PID is gone (killed runs)."""
    if not destination.parent.is_dir():
        return
    for mark in (TEMPORARY_MARK, REPLACED_MARK):
        prefix = f".{destination.name}{mark}"
        for leftover in destination.parent.glob(f"{glob.escape(prefix)}*"):
            pid = leftover.name[len(prefix) :].split("-", 1)[0]
            if pid.isdigit() and not _process_exists(int(pid)) and leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists but belongs to another user
        return True
    return True


def visible_files(folder: Path) -> list[Path]:
    """Files under ``folder``, relative to it, sorted; hidden files and folders (``.git``, ``.cache``) left out."""
    return [
        path.relative_to(folder)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in path.relative_to(folder).parts)
    ]


def safetensors_header(path: str | os.PathLike) -> dict:
    """The JSON header of a safetensors file (dtypes, shapes, offsets, ``__metadata__``) without loading data.

    Validated as the safetensors spec requires: every tensor's dtype is known, its byte range lies
    in the file and holds exactly ``prod(shape) * itemsize`` bytes, so sizes can be trusted before
    anything is allocated.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            length = int.from_bytes(file.read(8), "little")
            if length <= 0 or length > min(size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"header length {length} does not fit a file of {size} bytes")
            header = json.loads(file.read(length))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as error:
        raise P2UFormatError(f"{path}: not a readable safetensors file ({error})") from None
    if not isinstance(header, dict):
        raise P2UFormatError(f"{path}: safetensors header is not a JSON object")
    data_bytes = size - 8 - length
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(value, str) for value in info.values()):
                raise P2UFormatError(f"{path}: __metadata__ must map strings to strings")
            continue
        problem = _entry_problem(info, data_bytes)
        if problem is not None:
            raise P2UFormatError(f"{path}: tensor {name!r} {problem}")
    return header


MAX_HEADER_BYTES = 100_000_000
"""safetensors' own limit on the header length."""


def _entry_problem(info: object, data_bytes: int) -> str | None:
    """What is wrong with one tensor's header entry, or None."""
    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) or info["dtype"] not in SAFETENSORS_DTYPES:
        return f"has no known dtype in its header entry {info!r}"
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        return f"has a bad shape {shape!r}"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) for n in offsets):
        return f"has bad data_offsets {offsets!r}"
    start, stop = offsets
    if stop > data_bytes:
        return "ends past the end of the file; truncated"
    if not 0 <= start <= stop or stop - start != math.prod(shape) * SAFETENSORS_DTYPES[info["dtype"]].itemsize:
        return f"data_offsets {offsets} do not hold {info['dtype']}{shape}"
    return None


def file_tensor_digests(path: str | os.PathLike) -> dict[str, str]:
    """sha256 of every tensor's stored bytes in a safetensors file, read once through a memory map."""
    path = Path(path)
    header = safetensors_header(path)
    digests = {}
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        view = memoryview(data)
        start = 8 + int.from_bytes(view[:8], "little")
        try:
            for name, info in header.items():
                if name != "__metadata__":
                    first, last = info["data_offsets"]
                    digests[name] = sha256_bytes(view[start + first : start + last])
        finally:
            view.release()
    return digests


class StreamingSafetensorsWriter:
    """Write one safetensors file tensor by tensor, holding at most one tensor in memory.

    safetensors puts the header (every name, dtype, shape and offset) before the data, so
    tensor bytes go to a spill file first (or stay where they already lie on disk: ``add_stored``);
    ``close`` writes the header and copies the data after it. Tensors are laid out as
    ``safetensors.save_file`` does (by decreasing alignment, then name), so every tensor is
    aligned to its dtype for zero-copy loading.
    """

    def __init__(self, path: str | os.PathLike, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.metadata = metadata
        self._spill = tempfile.TemporaryFile(dir=self.path.parent)
        self._entries: dict[str, tuple[str, list[int], int, Path | None, int, int]] = {}  # dtype, shape, itemsize, file, offset, size
        self._spilled = 0
        self.data_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor_bytes(tensor)
        self._entries[name] = (DTYPE_NAMES[tensor.dtype], list(tensor.shape), tensor.element_size(), None, self._spilled, len(data))
        self._spill.write(data)
        self._spilled += len(data)
        self.data_bytes += len(data)

    def add_stored(self, name: str, dtype: str, shape: list[int], file: Path, offset: int, size: int) -> None:
        """Add a tensor whose bytes already lie at ``offset`` in ``file``: copied from there by ``close``, not spilled."""
        self._entries[name] = (dtype, shape, SAFETENSORS_DTYPES[dtype].itemsize, file, offset, size)
        self.data_bytes += size

    def close(self) -> None:
        order = sorted(self._entries, key=lambda name: (-self._entries[name][2], name))
        header: dict[str, object] = {"__metadata__": self.metadata} if self.metadata else {}
        offset = 0
        for name in order:
            dtype, shape, _, _, _, size = self._entries[name]
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        with self.path.open("wb") as output, contextlib.ExitStack() as opened:
            sources: dict[Path | None, typing.IO[bytes]] = {None: self._spill}  # each part file opened once
            output.write(len(encoded).to_bytes(8, "little") + encoded)
            for name in order:
                _, _, _, file, start, size = self._entries[name]
                if file not in sources:
                    sources[file] = opened.enter_context(file.open("rb"))  # type: ignore[union-attr]  # not None: None is the spill
                source = sources[file]
                source.seek(start)
                while size:
                    chunk = source.read(min(size, 1 << 24))
                    output.write(chunk)
                    size -= len(chunk)
        self._spill.close()


class ShardedWriter:
    """Collect tensors and write them as safetensors shards of at most ``max_shard_bytes``.

    Shard file names follow transformers (``model.safetensors`` when one shard,
    ``model-00001-of-00002.safetensors`` + ``model.safetensors.index.json`` otherwise). Tensors
    are streamed to disk as they come (``StreamingSafetensorsWriter``), so memory does not grow
    with the shard.
    """

    def __init__(self, folder: str | os.PathLike, prefix: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_shard_bytes = max_shard_bytes
        self._current: StreamingSafetensorsWriter | None = None
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self._shard_for(name, tensor.numel() * tensor.element_size()).add(name, tensor)

    def add_stored(self, name: str, dtype: str, shape: list[int], file: Path, offset: int, size: int) -> None:
        """Add a tensor already written to ``file`` at ``offset`` (``StreamingSafetensorsWriter.add_stored``)."""
        self._shard_for(name, size).add_stored(name, dtype, shape, file, offset, size)

    def _shard_for(self, name: str, size: int) -> StreamingSafetensorsWriter:
        """The shard that takes the next tensor, of ``size`` bytes: a new one when it would overflow the current one."""
        if self._current is not None and self._current.data_bytes and self._current.data_bytes + size > self.max_shard_bytes:
            self._finish_shard()
        if self._current is None:
            self._current = StreamingSafetensorsWriter(self.folder / f".shard-{len(self._shards)}.partial", {"format": "pt"})
            self._shards.append((self._current.path, []))
        self._shards[-1][1].append(name)
        self.total_bytes += size
        return self._current

    def _finish_shard(self) -> None:
        assert self._current is not None
        self._current.close()
        self._current = None

    def close(self) -> list[str]:
        """Write the last shard, give shards their final names, write the index if sharded."""
        if self._current is None and not self._shards:
            self._current = StreamingSafetensorsWriter(self.folder / ".shard-0.partial", {"format": "pt"})
            self._shards.append((self._current.path, []))
        if self._current is not None:
            self._finish_shard()
        count = len(self._shards)
        weight_map: dict[str, str] = {}
        names = []
        for number, (path, tensor_names) in enumerate(self._shards, start=1):
            name = shard_file_name(self.prefix, number, count)
            os.replace(path, self.folder / name)
            weight_map.update(dict.fromkeys(tensor_names, name))
            names.append(name)
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            write_json(self.folder / index_file_name(self.prefix), index)
            names.append(index_file_name(self.prefix))
        return names


def tensor_locations(headers: dict[Path, dict]) -> dict[str, Path]:
    """Map every tensor name to the file that holds it, given each file's validated header."""
    locations: dict[str, Path] = {}
    for file, header in headers.items():
        for name in header:
            if name == "__metadata__":
                continue
            if name in locations:
                raise P2UFormatError(f"{file}: tensor {name!r} is also in {locations[name]}")
            locations[name] = file
    return locations


class TensorReader:
    """Read tensors by name from a set of safetensors files.

    Each read opens, copies and closes: a file kept mapped would count every page already read
    in the process's resident memory, so a pass over a checkpoint would look (and, under memory
    pressure, act) like holding all of it.
    """

    def __init__(self, files: list[Path]):
        self._headers = {file: safetensors_header(file) for file in files}
        self.locations = tensor_locations(self._headers)

    def header(self, name: str) -> dict | None:
        """The validated header entry of tensor ``name`` (dtype, shape, data_offsets), None if absent."""
        path = self.locations.get(name)
        return None if path is None else self._headers[path][name]

    def __contains__(self, name: str) -> bool:
        return name in self.locations

    def get(self, name: str) -> torch.Tensor:
        path = self._location(name)
        try:
            with safe_open(str(path), framework="pt") as handle:
                return handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise P2UFormatError(f"{path}: tensor {name!r} cannot be read ({error})") from None

    def read_bytes(self, name: str) -> memoryview:
        """The stored bytes of tensor ``name``, read from the file into one new buffer of their own pages.

        For payloads that are hashed and decoded as bytes: ``get`` would copy them into a tensor
        first, then a second time out of it. The buffer is an anonymous memory map, not the C
        heap's: freeing it returns its pages at once. Payloads of many sizes, freed while the
        rebuilt weights are allocated, would otherwise raise glibc's mmap threshold (to 32 MiB)
        and leave the heap's free pages pinned between those weights (``docs/quickstart.md``).
        """
        path = self._location(name)
        first, last = self._headers[path][name]["data_offsets"]
        buffer = memoryview(mmap.mmap(-1, max(last - first, 1)))[: last - first]
        read = 0
        try:
            with path.open("rb", buffering=0) as file:
                file.seek(8 + int.from_bytes(file.read(8), "little") + first)
                while read < len(buffer) and (count := file.readinto(buffer[read:])):
                    read += count
        except OSError as error:
            raise P2UFormatError(f"{path}: tensor {name!r} cannot be read ({error})") from None
        if read != last - first:
            raise P2UFormatError(f"{path}: tensor {name!r} cannot be read (the file ends within it)")
        return buffer

    def _location(self, name: str) -> Path:
        path = self.locations.get(name)
        if path is None:
            raise P2UFormatError(f"tensor {name!r} not found in {sorted({str(p) for p in self.locations.values()})}")
        return path
