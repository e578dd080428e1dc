"""Load, upgrade and split do each read, parse and hash once: counted by wrapping the project's own helpers."""

from __future__ import annotations

import mmap
from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import p2u_hub
from p2u_hub.core import format as fmt
from p2u_hub.core import storage
from p2u_hub.core.storage import TensorReader


@pytest.fixture
def release(random_checkpoint, tmp_path) -> Path:
    """A split tiny BertModel (4-bit base, an 8-bit stage, the lossless stage)."""
    return p2u_hub.split(random_checkpoint("bert"), tmp_path / "release")


@pytest.fixture
def hashes(monkeypatch) -> Counter:
    """Digest -> how many times the project hashed bytes with that digest (every sha256 goes through format.sha256_bytes)."""
    counts: Counter = Counter()
    real = fmt.sha256_bytes

    def counted(data) -> str:
        digest = real(data)
        counts[digest] += 1
        return digest

    monkeypatch.setattr(fmt, "sha256_bytes", counted)
    monkeypatch.setattr(storage, "sha256_bytes", counted)
    return counts


@pytest.fixture
def reads(monkeypatch) -> Counter:
    """(file, tensor) -> how many times a TensorReader read it (as a tensor or as bytes)."""
    counts: Counter = Counter()
    for method in ("get", "read_bytes"):
        real = getattr(TensorReader, method)

        def counted(self, name, real=real):
            counts[self.locations.get(name), name] += 1
            return real(self, name)

        monkeypatch.setattr(TensorReader, method, counted)
    return counts


def _count_calls(monkeypatch, owner, attribute: str) -> Counter:
    counts: Counter = Counter()
    real = getattr(owner, attribute)

    def counted(*args, **kwargs):
        counts["calls"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attribute, counted)
    return counts


def test_load_parses_the_config_once_and_hashes_each_base_tensor_once(release, hashes, monkeypatch):
    parses = _count_calls(monkeypatch, fmt.QuantizationConfig, "from_json")
    configs = _count_calls(monkeypatch, fmt, "read_quantization_config")
    transformers.AutoModel.from_pretrained(release / "base")
    assert parses["calls"] == 1 and configs["calls"] == 0  # transformers read config.json; P2UConfig parsed the block
    expected = Counter(fmt.read_manifest(release / "base").base_sha256.values())
    assert {digest: hashes[digest] for digest in expected} == expected


def test_upgrade_reads_and_hashes_each_payload_once_and_no_base_tensor(release, hashes, reads, monkeypatch):
    model = transformers.AutoModel.from_pretrained(release / "base")
    hashes.clear()
    reads.clear()  # loading read the base's coded scales; the upgrade must read nothing from the base
    records = _count_calls(monkeypatch, fmt, "read_stage_record")
    manifests = _count_calls(monkeypatch, fmt, "read_manifest")
    p2u_hub.upgrade(model)
    assert (records["calls"], manifests["calls"]) == (2, 0)  # two stages
    stages = sorted(release.glob("stage-*"))
    payloads = {(folder, name): payload for folder in stages for name, payload in fmt.read_stage_record(folder).payloads.items()}
    read = Counter({(file.parent, name): count for (file, name), count in reads.items()})
    assert read == Counter(dict.fromkeys(payloads, 1))  # every payload once; nothing from the base
    expected = Counter(payload["sha256"] for payload in payloads.values())
    assert {digest: hashes[digest] for digest in expected} == expected


def test_upgrade_beyond_its_payload_budget_reads_again_and_still_checks(release, hashes, reads, monkeypatch):
    """With no room to keep checked payloads, each is read and hashed twice (checked, dropped, then checked when decoded)."""
    monkeypatch.setattr("p2u_hub.integrations.upgrade._payload_budget", lambda *args: 0)
    model = transformers.AutoModel.from_pretrained(release / "base")
    hashes.clear()
    reads.clear()
    p2u_hub.upgrade(model)
    stages = sorted(release.glob("stage-*"))
    payloads = [payload for folder in stages for payload in fmt.read_stage_record(folder).payloads.values()]
    expected = Counter(payload["sha256"] for payload in payloads)
    assert {digest: hashes[digest] for digest in expected} == {digest: 2 * count for digest, count in expected.items()}
    assert set(reads.values()) == {2}


def test_uniform_split_reads_and_hashes_each_source_tensor_once_and_still_finds_copies(random_checkpoint, tmp_path, hashes, reads):
    source = random_checkpoint("gpt2")
    tensors = load_file(source / "model.safetensors")
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].clone()
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    release = p2u_hub.split(source, tmp_path / "release", uniform=True)
    manifest = fmt.read_manifest(release / "base")
    assert Counter(name for _, name in reads.elements()) == Counter(dict.fromkeys(manifest.tensors, 1))
    expected = Counter(entry.sha256 for entry in manifest.tensors.values())
    assert {digest: hashes[digest] for digest in expected} == expected
    aliases = {manifest.tensors[name].alias_of for name in ("lm_head.weight", "transformer.wte.weight")}
    assert aliases - {None} <= {"lm_head.weight", "transformer.wte.weight"} and len(aliases) == 2  # found while encoding


def test_read_bytes_gives_the_stored_bytes_in_pages_of_their_own_and_refuses_a_file_cut_short(tmp_path):
    """Each payload in its own anonymous memory map (not the C heap), so freeing it returns its pages."""
    tensors = {
        "a": torch.arange(10, dtype=torch.float32),
        "b": torch.arange(7, dtype=torch.bfloat16),
        "c": torch.arange(5, dtype=torch.uint8),
        "empty": torch.empty(0, dtype=torch.uint8),
    }
    path = tmp_path / "payloads.safetensors"
    save_file(tensors, path)
    reader = TensorReader([path])
    payloads = {name: reader.read_bytes(name) for name in tensors}
    assert payloads == {name: fmt.tensor_bytes(t).tobytes() for name, t in tensors.items()}
    assert all(isinstance(payload.obj, mmap.mmap) for payload in payloads.values())
    last = max(tensors, key=lambda name: reader.header(name)["data_offsets"][1])
    path.write_bytes(path.read_bytes()[:-3])  # cut after the reader checked the header
    with pytest.raises(fmt.P2UFormatError, match=f"{path}: tensor '{last}' cannot be read \\(the file ends within it\\)"):
        reader.read_bytes(last)
