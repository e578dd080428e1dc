"""Merge a base and its deltas back into a plain transformers checkpoint (peft's ``merge_and_unload`` verb).

The output mirrors the source: same safetensors file names, tensor sets and metadata, same
index file, config.json without ``quantization_config``, the source README restored. At the
last stage every tensor is byte-identical to the source, checked before the folder appears.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from huggingface_hub.utils import tqdm

from . import format as fmt
from .release import Release, StageSpec
from .storage import StreamingSafetensorsWriter, atomic_output_dir, visible_files


def merge(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    stage: StageSpec = "full",
    overwrite: bool = False,
    token: str | bool | None = None,
) -> Path:
    """Write the checkpoint rebuilt at ``stage`` to ``destination``.

    Args:
        source: a release folder from ``split`` (holding ``base/``) or a base folder whose
            config says where the stages are (local paths or Hub revisions).
        destination: the checkpoint folder to create.
        stage: ``"full"`` (bit-exact source), ``"base"``/0, or a stage index.
        overwrite: replace ``destination`` if it exists.
        token: Hub token for private stage repos.

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
    with atomic_output_dir(destination, overwrite=overwrite) as work:
        for file_name, source_file in tqdm(manifest.source_files.items(), desc="p2u merge", unit="file"):
            writer = StreamingSafetensorsWriter(work / file_name, source_file.metadata)
            for name in source_file.tensors:
                writer.add(name, rebuilder.tensor(name))
            writer.close()
        if manifest.source_index_file is not None:
            weight_map = {name: file for file, f in manifest.source_files.items() for name in f.tensors}
            index = {"metadata": manifest.source_index_metadata or {}, "weight_map": weight_map}
            fmt.write_json(work / manifest.source_index_file, index)
        _copy_plain_files(release.base_dir, work)
    return Path(destination)


def _copy_plain_files(base_dir: Path, destination: Path) -> None:
    """Copy the non-weight files, dropping everything p2u added and restoring the source README."""
    for relative in visible_files(base_dir):
        name = relative.as_posix()
        path = fmt.release_file(base_dir, name)  # refuses a symlink: it would copy whatever it points at
        if name.startswith(fmt.P2U_FILE_PREFIX) or name == "README.md" or name.endswith(".safetensors"):
            continue
        if name == fmt.index_file_name(fmt.BASE_WEIGHTS_NAME):
            continue
        target = destination / ("README.md" if name == fmt.SOURCE_README_FILE else relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        if name == fmt.CONFIG_FILE:
            config = fmt.read_json(path)
            config.pop("quantization_config", None)
            fmt.write_json(target, config)
        else:
            shutil.copyfile(path, target)
