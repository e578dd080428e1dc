"""``p2u bench`` and its synthetic checkpoint, at a size that runs in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers
from safetensors.torch import load_file

from p2u_hub import merge, split
from p2u_hub.tools.bench import bench, format_table, write_synthetic_llama

TINY_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 1 MB of Llama-shaped bf16 weights in shards of at most 200 kB."""
    return write_synthetic_llama(tmp_path_factory.mktemp("synthetic") / "llama", 0.001, max_shard_bytes=200_000, **TINY_LLAMA)


def test_synthetic_llama_is_a_sharded_bf16_checkpoint_that_round_trips(synthetic: Path, tmp_path: Path):
    index = json.loads((synthetic / "model.safetensors.index.json").read_text())
    shards = sorted(synthetic.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == [shard.name for shard in shards]
    tensors = {name: tensor for shard in shards for name, tensor in load_file(shard).items()}
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values()) >= 1e6

    model = transformers.LlamaForCausalLM.from_pretrained(synthetic)
    assert set(model.state_dict()) == set(tensors)
    assert str(next(model.parameters()).dtype) == "torch.bfloat16"

    merged = merge(split(synthetic, tmp_path / "release"), tmp_path / "merged")
    for shard in shards:
        rebuilt = load_file(merged / shard.name)
        assert all(rebuilt[name].equal(tensors[name]) for name in rebuilt)


@pytest.mark.slow
def test_bench_measures_a_release_against_the_plain_download(synthetic: Path, tmp_path: Path):
    result = bench(synthetic, bandwidths=(2.0,), json_path=tmp_path / "out" / "tiny.json")

    assert json.loads((tmp_path / "out" / "tiny.json").read_text()) == result
    assert (tmp_path / "out" / "tiny.png").stat().st_size > 0
    assert [stage["name"] for stage in result["stages"]] == ["base", "stage-1", "stage-2"]
    assert result["total_bytes"] == sum(stage["bytes"] for stage in result["stages"])
    assert result["stages"][0]["bytes"] < 0.4 * result["source_bytes"]
    assert all(result[key] > 0 for key in ("plain_s", "usable_s", "full_s"))  # speed itself: p2u bench, not a test
    runs = result["bandwidths"][0]["runs"]
    assert runs["full"]["bit_exact"] and all(run["answers"] for run in runs.values())
    assert 0 <= runs["full"]["decode_after_download_s"] <= runs["full"]["upgrade_s"]  # the stages were local before it ended
    assert all(0 <= run["link_idle_s"] < run["seconds"] for run in runs.values())
    assert result["lossless"]["zstd"]["bytes"] < result["source_bytes"]
    for job in ("split", "merge"):
        assert result[job]["mb_per_s"] > 0 and result[job]["peak_rss_mb"] >= result[job]["baseline_rss_mb"] > 0
    table = format_table(result)
    assert "usable_s" in table and "zstd" in table
