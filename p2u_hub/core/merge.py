"""Merge a base and its deltas back into a plain transformers checkpoint (peft's ``merge_and_unload`` verb).

The output mirrors the source: same safetensors file names, tensor sets and metadata, same
index file, config.json without ``quantization_config``, the source README restored. At the
last stage every tensor is byte-identical to the source, checked before the folder appears.
"""

from __future__ import annotations

import os
import shutil
from contextlib import closing
from pathlib import Path

from huggingface_hub.utils import tqdm

from . import format as fmt
from .release import Release, StageSpec, TensorPrefetch
from .storage import StreamingSafetensorsWriter, atomic_output_dir, visible_files


def merge(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    stage: StageSpec = "full",
    overwrite: bool = False,
    token: str | bool | None = None,
    progress: bool = True,
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

    Returns:
        The destination folder.

    Raises:
        StageMismatchError: a stage belongs to another base or is out of order.
        ChecksumError: a payload or a rebuilt tensor fails its sha256 check.
        P2UFormatError: a file is missing or corrupt (the message names it).
    """
    release = Release.open(source, token=token)
    manifest = release.manifest
    rebuilder = release.rebuilder(stage)
    plain_files = _plain_files(release.base_dir)
    own_names = {*manifest.source_files, manifest.source_index_file, *plain_files.values()}

    def is_earlier_merge(folder: Path) -> bool:
        return all(relative.as_posix() in own_names for relative in visible_files(folder))

    with atomic_output_dir(destination, overwrite=overwrite, is_replaceable=is_earlier_merge) as work:
        order = [name for source_file in manifest.source_files.values() for name in source_file.tensors]
        with closing(TensorPrefetch(rebuilder, rebuilder.start_downloads(order))) as ahead:
            for file_name, source_file in tqdm(manifest.source_files.items(), desc="p2u merge", unit="file", disable=not progress):
                writer = StreamingSafetensorsWriter(work / file_name, source_file.metadata)
                for name in source_file.tensors:
                    writer.add(name, ahead.get(name))
                writer.close()
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
