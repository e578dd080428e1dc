"""split on several worker processes (one job per source file, ``p2u_hub.core.shards``) writes the same release, byte
for byte, as one process; and the Llama checkpoint tiled from MiniLM's trained weights that the scale benchmarks use."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import p2u_hub
from p2u_hub.codecs import progressive
from p2u_hub.core import format as fmt
from p2u_hub.core import shards
from p2u_hub.core.storage import safetensors_header
from p2u_hub.testing.assertions import assert_checkpoints_bit_identical
from p2u_hub.tools.bench import TrainedTiles, write_synthetic_llama
from p2u_hub.tools.demo import bundled_minilm

TINY_LLAMA = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000}
CROSS_COPY = ("model.layers.0.mlp.gate_proj.weight", "model.layers.7.mlp.up_proj.weight")
"""A tensor of the first shard and its copy in a later shard: only the combine step can see they are equal."""
LOCAL_COPY = ("model.layers.7.self_attn.k_proj.weight", "model.layers.7.self_attn.v_proj.weight")


def _tiny_tiled_llama(folder: Path, seed: int = 0) -> Path:
    return write_synthetic_llama(folder, 0.004, weights="minilm", seed=seed, max_shard_bytes=1_000_000, **TINY_LLAMA)


@pytest.fixture(scope="module")
def sharded_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 4 MB of bf16 tiled from MiniLM in 1 MB shards, with one copy across shards and one within a shard."""
    source = _tiny_tiled_llama(tmp_path_factory.mktemp("workers") / "llama")
    index = fmt.read_json(source / "model.safetensors.index.json")["weight_map"]
    first, copy = CROSS_COPY
    assert index[first] != index[copy] and index[LOCAL_COPY[0]] == index[copy]
    path = source / index[copy]
    tensors = load_file(path)
    tensors[copy] = load_file(source / index[first])[first]
    tensors[LOCAL_COPY[1]] = tensors[LOCAL_COPY[0]].clone()
    save_file(tensors, path, metadata={"format": "pt"})
    return source


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.rglob("*")) if path.is_file()
    }


def test_workers_write_the_same_bytes_as_one_process(sharded_source: Path, tmp_path: Path):
    """Data-free widths (copies hashed first, release-wide), several output shards: 2 and 3 workers, same files."""
    options = {"sensitivity": "weights", "max_shard_bytes": 700_000}
    serial = p2u_hub.split(sharded_source, tmp_path / "serial", workers=1, **options)
    assert len(list((serial / "base").glob("model-*.safetensors"))) > 1
    for workers in (2, 3):
        assert _digests(p2u_hub.split(sharded_source, tmp_path / f"w{workers}", workers=workers, **options)) == _digests(serial)
    manifest = fmt.read_manifest(serial / "base")
    assert manifest.tensors[CROSS_COPY[1]].alias_of == CROSS_COPY[0] and manifest.tensors[LOCAL_COPY[1]].bits is None
    assert_checkpoints_bit_identical(sharded_source, p2u_hub.merge(tmp_path / "w2", tmp_path / "merged"))


def test_cli_workers_find_copies_across_shards_when_coding(sharded_source: Path, tmp_path: Path):
    """Uniform widths: nothing is hashed before the workers, so the copy in a later shard is coded and then dropped."""
    command = [sys.executable, "-m", "p2u_hub.tools.cli", "split", str(sharded_source), "--uniform", "--bits", "3"]
    for workers in (1, 2):
        subprocess.run([*command, str(tmp_path / f"w{workers}"), "--workers", str(workers)], check=True, capture_output=True)
    assert _digests(tmp_path / "w2") == _digests(tmp_path / "w1")
    manifest = fmt.read_manifest(tmp_path / "w2" / "base")
    assert manifest.tensors[CROSS_COPY[1]].alias_of == CROSS_COPY[0] and manifest.tensors[CROSS_COPY[1]].bits is None
    assert manifest.tensors[LOCAL_COPY[1]].alias_of == LOCAL_COPY[0]
    assert all(CROSS_COPY[1] not in safetensors_header(path) for path in (tmp_path / "w2" / "base").glob("*.safetensors"))
    assert_checkpoints_bit_identical(sharded_source, p2u_hub.merge(tmp_path / "w2", tmp_path / "merged"))


def test_shard_jobs_can_run_anywhere_in_any_order(sharded_source: Path, tmp_path: Path):
    """What Ray or Dask do with ``map_shards``: jobs and results cross a process boundary (pickled), finishing out of order."""

    def remote_map(jobs):
        done = {id(job): pickle.loads(pickle.dumps(shards.split_shard(pickle.loads(pickle.dumps(job))))) for job in reversed(jobs)}
        return [done[id(job)] for job in jobs]

    serial = p2u_hub.split(sharded_source, tmp_path / "serial", uniform=True, workers=1)
    assert _digests(p2u_hub.split(sharded_source, tmp_path / "remote", uniform=True, map_shards=remote_map)) == _digests(serial)


def test_tensors_coded_ahead_write_the_same_bytes_as_one_at_a_time(sharded_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``split_shard`` codes the next tensors while it writes one (a copy within a shard is found as it reads them):
    one thread, three, and a window bounded by bytes to a single tensor ahead all write the same files."""
    monkeypatch.setenv(progressive.THREADS_VARIABLE, "1")
    serial = _digests(p2u_hub.split(sharded_source, tmp_path / "one", uniform=True, workers=1))
    monkeypatch.setenv(progressive.THREADS_VARIABLE, "3")
    assert _digests(p2u_hub.split(sharded_source, tmp_path / "three", uniform=True, workers=1)) == serial
    monkeypatch.setattr(shards, "AHEAD_BYTES", 1)
    assert _digests(p2u_hub.split(sharded_source, tmp_path / "bounded", uniform=True, workers=1)) == serial
    assert fmt.read_manifest(tmp_path / "three" / "base").tensors[LOCAL_COPY[1]].alias_of == LOCAL_COPY[0]
    assert_checkpoints_bit_identical(sharded_source, p2u_hub.merge(tmp_path / "three", tmp_path / "merged"))


def test_default_workers_leave_small_sources_in_one_process(sharded_source: Path, monkeypatch: pytest.MonkeyPatch):
    files = sorted(sharded_source.glob("model-*.safetensors"))
    assert len(files) > 2 and shards.default_workers(files) == 1  # 4 MB: a worker would cost more than it saves
    monkeypatch.setattr(shards, "WORKER_MIN_BYTES", 1)
    assert shards.default_workers(files) == min(len(files), os.cpu_count())


def test_workers_must_be_positive(sharded_source: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="workers must be at least 1, got 0"):
        p2u_hub.split(sharded_source, tmp_path / "release", workers=0)
    assert not (tmp_path / "release").exists()


def test_tiled_llama_is_made_of_minilm_weights_and_repeatable(tmp_path: Path):
    folder = _tiny_tiled_llama(tmp_path / "a")
    assert _digests(_tiny_tiled_llama(tmp_path / "b")) == _digests(folder)
    assert _digests(_tiny_tiled_llama(tmp_path / "c", seed=1)) != _digests(folder)
    tensors = {name: t for path in folder.glob("model-*.safetensors") for name, t in load_file(path).items()}
    minilm = load_file(bundled_minilm() / "model.safetensors")
    queries = torch.cat([t.reshape(-1) for name, t in minilm.items() if name.endswith("attention.self.query.weight")])
    norms = torch.cat([t.reshape(-1) for name, t in minilm.items() if name.endswith("LayerNorm.weight")])
    query = tensors["model.layers.3.self_attn.q_proj.weight"]
    assert query.dtype == torch.bfloat16 and query.shape == (128, 128)
    assert torch.isin(query.float().abs(), queries.to(torch.bfloat16).float().abs()).all()  # trained values, signs flipped
    assert torch.isin(tensors["model.norm.weight"].float(), norms.to(torch.bfloat16).float()).all()
    assert not torch.isin(query.float().abs(), norms.to(torch.bfloat16).float().abs()).all()


def test_tiles_refuse_a_tensor_without_trained_counterpart():
    with pytest.raises(ValueError, match=r"no MiniLM tensors to tile 'model.layers.0.self_attn.q_proj.bias' \[128\]"):
        TrainedTiles().tensor("model.layers.0.self_attn.q_proj.bias", (128,), torch.Generator())


def test_gptq_hessians_travel_with_their_shard(calibratable_bert: Path, tmp_path: Path):
    """The Hessians are computed once, release-wide; each worker gets its file's and corrects the same codes."""
    import transformers

    source = tmp_path / "sharded-bert"
    transformers.BertModel.from_pretrained(calibratable_bert).save_pretrained(source, max_shard_size="100KB")
    transformers.AutoTokenizer.from_pretrained(calibratable_bert).save_pretrained(source)
    assert len(list(source.glob("model-*.safetensors"))) > 2
    serial = p2u_hub.split(source, tmp_path / "serial", bits=3, uniform=True, gptq=True, workers=1)
    parallel = p2u_hub.split(source, tmp_path / "parallel", bits=3, uniform=True, gptq=True, workers=2)
    assert _digests(parallel) == _digests(serial)
    corrected = [name for name, entry in fmt.read_manifest(parallel / "base").tensors.items() if entry.corrected]
    weight_map = fmt.read_json(source / "model.safetensors.index.json")["weight_map"]
    assert len(corrected) >= 12 and len({weight_map[name] for name in corrected}) > 1  # corrected in several workers
