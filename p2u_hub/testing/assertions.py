"""Bit-exactness checks for tests of p2u releases (ours and users' offline CI): one definition of "identical"."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file


def checkpoint_tensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder's safetensors files (single or sharded), by name."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def assert_tensors_bit_identical(expected: Mapping[str, torch.Tensor], actual: Mapping[str, torch.Tensor]) -> None:
    """Same names, and for each the same dtype, shape and bytes (``torch.equal`` alone calls -0.0 equal to 0.0 and NaN unequal)."""
    assert sorted(actual) == sorted(expected), f"tensor names differ: {sorted(set(actual) ^ set(expected))}"
    for name, tensor in expected.items():
        other = actual[name]
        assert other.dtype == tensor.dtype and other.shape == tensor.shape, (
            f"{name}: {other.dtype}{list(other.shape)} != {tensor.dtype}{list(tensor.shape)}"
        )
        assert torch.equal(other.detach().cpu().contiguous().view(torch.uint8), tensor.detach().cpu().contiguous().view(torch.uint8)), name


def assert_checkpoints_bit_identical(expected: str | os.PathLike, actual: str | os.PathLike) -> None:
    """Two checkpoint folders hold the same tensors, bit for bit (file layout aside)."""
    assert_tensors_bit_identical(checkpoint_tensors(expected), checkpoint_tensors(actual))
