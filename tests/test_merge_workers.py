"""merge on several worker processes (one job per output file, ``p2u_hub.core.merge.merge_file``) writes the same
checkpoint, byte for byte, as one process: at the last stage and at an intermediate one, with copies across files, jobs
run in any order or elsewhere (pickled), stages fetched from the Hub once; a failing job leaves no output."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import snapshot_download
from safetensors.torch import load_file, save_file

import p2u_hub
from p2u_hub.core import format as fmt
from p2u_hub.core import merge as merge_module
from p2u_hub.core import shards
from p2u_hub.core.merge import merge_file
from p2u_hub.core.storage import safetensors_header
from p2u_hub.errors import P2UError
from p2u_hub.testing import LocalHub
from p2u_hub.testing.assertions import assert_checkpoints_bit_identical
from p2u_hub.tools.publish import push

COPIES = {"model.layers.1.self_attn.q_proj.weight": "model.layers.0.self_attn.q_proj.weight", "lm_head.weight": "model.embed_tokens.weight"}
"""Tensors of a later file made equal to one of the first file (a tied head saved twice): stored once, as aliases."""
CORRUPTED = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(source, release) of a tiny bf16 Llama in 3 files, with copies across files; 4-bit base, 8-bit stage, lossless stage."""
    from conftest import save_random_model

    folder = tmp_path_factory.mktemp("merge-workers")
    source = save_random_model(folder / "source", "llama", torch.bfloat16, max_shard_size="100KB")
    weight_map = fmt.read_json(source / "model.safetensors.index.json")["weight_map"]
    for copy, original in COPIES.items():
        assert weight_map[copy] != weight_map[original]
        tensors = load_file(source / weight_map[copy])
        tensors[copy] = load_file(source / weight_map[original])[original]
        save_file(tensors, source / weight_map[copy], metadata={"format": "pt"})
    output = p2u_hub.split(source, folder / "release", uniform=True)
    manifest = fmt.read_manifest(output / fmt.BASE_DIR)
    assert len(manifest.source_files) == 3 and all(manifest.tensors[copy].alias_of == original for copy, original in COPIES.items())
    return source, output


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.rglob("*")) if path.is_file()
    }


def _leftovers(folder: Path) -> list[str]:
    return [path.name for path in folder.iterdir() if path.name.startswith(".")]


def test_workers_write_the_same_bytes_as_one_process(release: tuple[Path, Path], tmp_path: Path):
    source, output = release
    for stage in ("full", 1):
        serial = _digests(p2u_hub.merge(output, tmp_path / f"{stage}-w1", stage=stage, workers=1))
        assert len([name for name in serial if name.endswith(".safetensors")]) == 3
        for workers in (2, 3):
            assert _digests(p2u_hub.merge(output, tmp_path / f"{stage}-w{workers}", stage=stage, workers=workers)) == serial
    assert_checkpoints_bit_identical(source, tmp_path / "full-w2")
    assert _digests(tmp_path / "1-w2") != _digests(tmp_path / "full-w2")  # the 8-bit stage is not the source


def test_jobs_read_the_stages_the_parent_fetched_from_the_hub_once(local_hub: LocalHub, release: tuple[Path, Path], tmp_path: Path):
    """What Ray or Dask do with ``map_shards``: jobs and results pickled, run in reverse order, and with the Hub gone by
    then: the stage files were all downloaded by ``merge`` before the jobs, which read them from the HF cache."""
    source, output = release
    push(output, "local/llama-p2u")
    base = Path(snapshot_download("local/llama-p2u"))

    def remote_reversed(jobs):
        local_hub.stop()
        done = {job.file_name: pickle.loads(pickle.dumps(merge_file(pickle.loads(pickle.dumps(job))))) for job in reversed(jobs)}
        return [done[job.file_name] for job in jobs]

    merged = p2u_hub.merge(base, tmp_path / "remote", map_shards=remote_reversed, progress=False)
    assert _digests(merged) == _digests(p2u_hub.merge(output, tmp_path / "serial", workers=1))
    assert_checkpoints_bit_identical(source, merged)


def test_a_failing_job_names_the_tensor_and_leaves_no_output(release: tuple[Path, Path], tmp_path: Path):
    _, output = release
    corrupt = Path(shutil.copytree(output, tmp_path / "corrupt"))
    stage = corrupt / fmt.stage_dir_name(2)
    path = next(file for file in stage.glob("*.safetensors") if CORRUPTED in safetensors_header(file))
    header = safetensors_header(path)
    position = 8 + int.from_bytes(path.read_bytes()[:8], "little") + header[CORRUPTED]["data_offsets"][0]
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(fmt.ChecksumError, match=re.escape(f"payload of tensor {CORRUPTED!r} fails its sha256 check")):
        p2u_hub.merge(corrupt, tmp_path / "merged", workers=2, progress=False)
    assert not (tmp_path / "merged").exists() and not _leftovers(tmp_path)


def test_a_job_map_that_skips_a_file_is_refused(release: tuple[Path, Path], tmp_path: Path):
    _, output = release
    with pytest.raises(P2UError, match=r"model-00002-of-00003\.safetensors: not written as its merge job reported \(None bytes"):
        p2u_hub.merge(output, tmp_path / "merged", map_shards=lambda jobs: [merge_file(job) for job in jobs[::2]], progress=False)
    assert not (tmp_path / "merged").exists() and not _leftovers(tmp_path)


def test_a_worker_that_dies_raises_one_p2u_error():
    with pytest.raises(P2UError, match=r"^p2u merge: a worker process died \(.*\); killed, or out of memory\? Try fewer workers$"):
        shards.run_in_processes(os._exit, [1, 1], 2, "p2u merge", progress=False)


def test_merge_runs_in_this_process_unless_asked(release: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Default: one process, its threads rebuilding ahead (faster than processes on 2 cores); a pool of at most one per file."""
    _, output = release
    pools: list[int] = []

    def recorded(function, jobs, workers, what, progress=True):
        pools.append(workers)
        return [function(job) for job in jobs]

    monkeypatch.setattr(shards, "run_in_processes", recorded)
    serial = p2u_hub.merge(output, tmp_path / "default", progress=False)
    assert pools == []
    assert _digests(p2u_hub.merge(output, tmp_path / "pooled", workers=8, progress=False)) == _digests(serial)
    assert pools == [8]  # run_in_processes starts at most one process per job
    with pytest.raises(ValueError, match="workers must be at least 1, got 0"):
        merge_module.merge(output, tmp_path / "none", workers=0)
    assert not (tmp_path / "none").exists()


def test_cli_merge_workers(release: tuple[Path, Path], tmp_path: Path):
    _, output = release
    command = [sys.executable, "-m", "p2u_hub.tools.cli", "merge", str(output)]
    subprocess.run([*command, str(tmp_path / "w2"), "--workers", "2"], check=True, capture_output=True)
    assert _digests(tmp_path / "w2") == _digests(p2u_hub.merge(output, tmp_path / "w1", workers=1, progress=False))
