"""Merge a base and its deltas back into a plain transformers checkpoint (peft's ``merge_and_unload`` verb).

The output mirrors the source: same safetensors file names, tensor sets and metadata, same
index file, config.json without ``quantization_config``, the source README restored. At the
last stage every tensor is byte-identical to the source, checked before the folder appears.

The unit of work is one output file (one of the source's safetensors files): ``merge_file``
runs a picklable ``MergeJob`` anywhere that sees the release and the output's parent folder at
the same paths (a local process pool by default; Ray or Dask through ``map_shards``,
docs/scale.md), and ``merge`` writes the index and the other files around the results.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub.utils import tqdm

from ..errors import P2UError
from . import format as fmt
from . import shards
from .release import Release, StageSpec, TensorPrefetch, TensorRebuilder
from .storage import StreamingSafetensorsWriter, atomic_output_dir, visible_files


@dataclass(frozen=True)
class MergeJob:
    """Everything ``merge_file`` needs to write one output file: picklable, no open handles, no token.

    Args:
        base_dir: the release's base folder (a release's ``base/`` or a Hub snapshot of it).
        stages: every stage up to the one merged, as (folder, record): a local folder already
            holding all the stage's weight files, and its record as ``merge`` checked it against the base.
        file_name: the output file: one of the source's safetensors files (``manifest.source_files``).
        folder: the folder to write it in (``merge``'s temporary output folder).
    """

    base_dir: Path
    stages: list[tuple[Path, fmt.StageRecord]]
    file_name: str
    folder: Path


@dataclass(frozen=True)
class MergedFile:
    """What ``merge_file`` wrote: ``merge`` checks the file is there with this size (workers must share its folder)."""

    file_name: str
    size: int


def merge(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    stage: StageSpec = "full",
    overwrite: bool = False,
    token: str | bool | None = None,
    progress: bool = True,
    workers: int = 1,
    map_shards: Callable[[list[MergeJob]], Sequence[MergedFile]] | None = None,
) -> Path:
    """Write the checkpoint rebuilt at ``stage`` to ``destination``.

    Args:
        source: a release folder from ``split`` (holding ``base/``) or a base folder whose
            config says where the stages are (local paths or Hub revisions).
        destination: the checkpoint folder to create.
        stage: ``"full"`` (bit-exact source), ``"base"``/0, or a stage index.
        overwrite: replace ``destination`` if it exists.
        token: Hub token for private stage repos.
        progress: show a progress bar (callers with a bar of their own, like ``evaluate``, pass False).
        workers: processes writing the output files in parallel. With 1 (default), this process
            writes them, rebuilding the next tensors on ``codec_threads()`` threads while the stage
            files still download: on 2 cores that was 1.3x faster than 2 processes (docs/scale.md),
            which pay where threads cannot use the cores. With more, the stage files are all
            downloaded first, then each worker reads them from the local folders. The output is
            the same bytes whatever the count. A script calling ``merge`` with workers needs the
            ``if __name__ == "__main__":`` guard (``shards.run_in_processes``).
        map_shards: runs ``merge_file`` on every job and returns the results, instead of the local
            pool (``workers`` is then unused): e.g. over a Ray or Dask cluster whose machines see the
            release and ``destination``'s parent folder at the same paths (docs/scale.md).

    Returns:
        The destination folder.

    Raises:
        StageMismatchError: a stage belongs to another base or is out of order.
        ChecksumError: a payload or a rebuilt tensor fails its sha256 check.
        P2UFormatError: a file is missing or corrupt (the message names it).
        P2UError: a worker died, or ``map_shards`` did not write every file.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    release = Release.open(source, token=token)
    manifest = release.manifest
    rebuilder = release.rebuilder(stage)
    plain_files = _plain_files(release.base_dir)
    own_names = {*manifest.source_files, manifest.source_index_file, *plain_files.values()}
    in_process = map_shards is None and min(workers, len(manifest.source_files)) <= 1

    def is_earlier_merge(folder: Path) -> bool:
        return all(relative.as_posix() in own_names for relative in visible_files(folder))

    with atomic_output_dir(destination, overwrite=overwrite, is_replaceable=is_earlier_merge) as work:
        if in_process:
            _write_files(rebuilder, manifest.source_files, work, progress)
        else:
            jobs = _jobs(release, rebuilder, work)
            results: Sequence[MergedFile]
            if map_shards is None:
                results = shards.run_in_processes(merge_file, jobs, workers, "p2u merge", progress)
            else:
                results = map_shards(jobs)
            _check_written(jobs, results)
        if manifest.source_index_file is not None:
            weight_map = {name: file for file, f in manifest.source_files.items() for name in f.tensors}
            index = {"metadata": manifest.source_index_metadata or {}, "weight_map": weight_map}
            fmt.write_json(work / manifest.source_index_file, index)
        for path, name in plain_files.items():
            target = work / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if name == fmt.CONFIG_FILE:
                config = fmt.read_json(path)
                config.pop("quantization_config", None)
                fmt.write_json(target, config)
            else:
                shutil.copyfile(path, target)
    return Path(destination)


def merge_file(job: MergeJob) -> MergedFile:
    """Rebuild the tensors of one output file and write it: the unit of work of ``merge``, in any process, in any order.

    Reads the base and the stage files from the job's local folders (nothing is downloaded);
    rebuilds the next tensors on ``codec_threads()`` threads while one is written.

    Raises:
        ChecksumError: a payload or a rebuilt tensor fails its sha256 check (the message names it).
        P2UFormatError: a file is missing or corrupt, or the source has no file ``job.file_name``.
    """
    release = Release(job.base_dir)
    source_file = release.manifest.source_files.get(job.file_name)
    if source_file is None:
        raise fmt.P2UFormatError(f"{job.base_dir / fmt.MANIFEST_FILE}: the source has no weight file {job.file_name!r}")
    _write_files(TensorRebuilder(release, len(job.stages), job.stages), {job.file_name: source_file}, job.folder, progress=False)
    return MergedFile(job.file_name, (job.folder / job.file_name).stat().st_size)


def _write_files(rebuilder: TensorRebuilder, files: dict[str, fmt.SourceFile], folder: Path, progress: bool) -> None:
    """Write ``files`` into ``folder``, their tensors rebuilt ahead (``TensorPrefetch``) in the order the stage files arrive."""
    order = [name for source_file in files.values() for name in source_file.tensors]
    with closing(TensorPrefetch(rebuilder, rebuilder.start_downloads(order))) as ahead:
        for file_name, source_file in tqdm(files.items(), desc="p2u merge", unit="file", disable=not progress):
            writer = StreamingSafetensorsWriter(folder / file_name, source_file.metadata)
            for name in source_file.tensors:
                writer.add(name, ahead.get(name))
            writer.close()


def _jobs(release: Release, rebuilder: TensorRebuilder, folder: Path) -> list[MergeJob]:
    """One job per output file, once every stage file is local: downloaded here, once, rather than by each worker
    (without checking payloads: the workers check what they read)."""
    release.download_stages(rebuilder.index)
    stages = [(stage.folder, stage.record) for stage in rebuilder.stages]
    return [MergeJob(release.base_dir, stages, file_name, folder) for file_name in release.manifest.source_files]


def _check_written(jobs: list[MergeJob], results: Sequence[MergedFile]) -> None:
    """Refuse to finish unless every job's file is in the output folder, as large as its worker wrote it."""
    written = {result.file_name: result.size for result in results}
    for job in jobs:
        path = job.folder / job.file_name
        size = path.stat().st_size if path.is_file() else None
        if job.file_name not in written or size != written[job.file_name]:
            raise P2UError(
                f"{path}: not written as its merge job reported ({size} bytes here, {written.get(job.file_name)} reported): "
                "map_shards must run every job, on machines that see this folder at the same path"
            )


def _plain_files(base_dir: Path) -> dict[Path, str]:
    """The base's non-weight files and their names in the checkpoint: p2u's own files dropped, the source README restored."""
    files = {}
    for relative in visible_files(base_dir):
        name = relative.as_posix()
        if name.startswith(fmt.P2U_FILE_PREFIX) or name == fmt.README_FILE or name.endswith(".safetensors"):
            continue
        if name == fmt.index_file_name(fmt.BASE_WEIGHTS_NAME):
            continue
        path = fmt.release_file(base_dir, name)  # refuses a symlink: merge would copy whatever it points at
        files[path] = fmt.README_FILE if name == fmt.SOURCE_README_FILE else name
    return files
