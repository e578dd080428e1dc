"""Tensors rebuilt ahead on threads (``TensorPrefetch``) are the ones ``TensorRebuilder.tensor`` gives, errors included."""

from __future__ import annotations

from contextlib import closing

import pytest
import torch
from safetensors.torch import load_file, save_file

import p2u_hub
from p2u_hub.core import format as fmt
from p2u_hub.core import release as release_module
from p2u_hub.core.release import Release, TensorPrefetch


def test_prefetched_tensors_are_the_rebuilt_ones_in_any_order(random_checkpoint, tmp_path, monkeypatch):
    release = Release.open(p2u_hub.split(random_checkpoint("gpt2"), tmp_path / "release"))
    rebuilder = release.rebuilder("full")
    names = list(release.manifest.tensors)
    monkeypatch.setattr(release_module, "PREFETCH_BYTES", 1)  # one tensor ahead at a time
    with closing(TensorPrefetch(rebuilder, names, workers=2)) as ahead:
        asked = [names[1], names[0], *names[2:]]  # out of the announced order: still each tensor, bit for bit
        for name in asked:
            assert len(ahead._pending) <= 1
            assert torch.equal(ahead.get(name).view(torch.uint8), rebuilder.tensor(name).view(torch.uint8)), name
        assert not ahead._pending


def test_a_corrupt_payload_fails_at_its_own_tensor(random_checkpoint, tmp_path):
    folder = p2u_hub.split(random_checkpoint("gpt2"), tmp_path / "release")
    release = Release.open(folder)
    names = [name for name, entry in release.manifest.tensors.items() if entry.codec != fmt.CODEC_EXACT and entry.alias_of is None]
    delta_file = folder / "stage-2" / "delta.safetensors"
    payloads = load_file(delta_file)
    payloads[names[2]] = torch.flip(payloads[names[2]], dims=[0]).contiguous()
    save_file(payloads, delta_file)
    rebuilder = release.rebuilder("full")
    with closing(TensorPrefetch(rebuilder, names)) as ahead:
        for name in names[:2]:
            ahead.get(name)
        with pytest.raises(fmt.ChecksumError, match=f"payload of tensor {names[2]!r} fails its sha256 check"):
            ahead.get(names[2])
