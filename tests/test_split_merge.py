"""split -> merge round trips through real safetensors files, size targets, and every bad-input error."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import p2u_hub
from p2u_hub.core import format as fmt
from p2u_hub.core.summary import summarize
from p2u_hub.testing.assertions import assert_checkpoints_bit_identical, checkpoint_tensors


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant,base_limit,total_limit", [("fp32", 0.135, 0.86), ("bf16", 0.27, 0.732)]
)  # base bytes include the manifest with its checksums
def test_minilm_sizes_and_bit_exact_merge(variant, base_limit, total_limit, minilm_dir, minilm_bf16_dir, tmp_path):
    """The default command (4-bit budget, calibrated widths): base no larger than the uniform 4-bit base of format 1."""
    source = minilm_dir if variant == "fp32" else minilm_bf16_dir
    release = p2u_hub.split(source, tmp_path / "release", bits=4, group_size=64)
    summary = summarize(release)
    base, *stages = summary["stages"]
    assert base["bytes"] / summary["source_bytes"] <= base_limit
    assert summary["widths"]["method"] == "calibration" and len({t["bits"] for t in summary["widths"]["tensors"].values()}) > 2
    assert summary["total_bytes"] / summary["source_bytes"] <= total_limit
    assert [s["name"] for s in stages] == ["stage-1", "stage-2"] and stages[0]["bits"] == 8
    merged = p2u_hub.merge(release, tmp_path / "merged")
    assert_checkpoints_bit_identical(source, merged)
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    assert (merged / "README.md").read_bytes() == (minilm_dir / "README.md").read_bytes()
    assert (merged / "1_Pooling" / "config.json").is_file() and (merged / "tokenizer.json").is_file()


def test_gpt2_tied_embeddings_round_trip(random_checkpoint, tmp_path):
    source = random_checkpoint("gpt2")
    release = p2u_hub.split(source, tmp_path / "release")
    base = load_file(release / "base" / "model.safetensors")
    assert "lm_head.weight" not in base and "transformer.wte.weight_p2u_scales" in base
    assert base["transformer.wte.weight"].dtype == torch.uint8
    assert_checkpoints_bit_identical(source, p2u_hub.merge(release, tmp_path / "merged"))


def test_shared_tensor_is_stored_once(random_checkpoint, tmp_path):
    source = random_checkpoint("gpt2")
    tensors = load_file(source / "model.safetensors")
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].clone()
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    release = p2u_hub.split(source, tmp_path / "release")
    manifest = fmt.read_manifest(release / "base")
    pair = {"lm_head.weight", "transformer.wte.weight"}
    aliases = {name for name in pair if manifest.tensors[name].alias_of is not None}
    assert len(aliases) == 1 and manifest.tensors[aliases.pop()].alias_of in pair
    for folder, prefix in (("base", "model"), ("stage-1", "delta"), ("stage-2", "delta")):
        assert len(pair & set(load_file(release / folder / f"{prefix}.safetensors"))) == 1
    assert_checkpoints_bit_identical(source, p2u_hub.merge(release, tmp_path / "merged"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_llama_sharded_round_trip(dtype, random_checkpoint, tmp_path):
    source = random_checkpoint("llama", dtype=dtype, max_shard_size="100KB")
    assert (source / "model.safetensors.index.json").is_file()
    release = p2u_hub.split(source, tmp_path / "release", bits=3, stages=(5, 8), max_shard_bytes=20_000)
    assert (release / "base" / "model.safetensors.index.json").is_file()
    assert len(list((release / "stage-3").glob("delta-*.safetensors"))) > 1
    merged = p2u_hub.merge(release, tmp_path / "merged")
    assert_checkpoints_bit_identical(source, merged)
    assert sorted(p.name for p in merged.glob("*.safetensors")) == sorted(p.name for p in source.glob("*.safetensors"))
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]


def test_intermediate_stages_load_and_approach_the_source(random_checkpoint, tmp_path):
    import transformers

    source = random_checkpoint("bert")
    release = p2u_hub.split(source, tmp_path / "release", bits=2, stages=(4, 8))
    original = checkpoint_tensors(source)["encoder.layer.0.attention.self.query.weight"]
    errors = []
    for stage in ("base", 1, 2):
        merged = p2u_hub.merge(release, tmp_path / f"merged-{stage}", stage=stage)
        model = transformers.AutoModel.from_pretrained(merged)
        assert type(model).__name__ == "BertModel"
        errors.append((model.encoder.layer[0].attention.self.query.weight - original).abs().mean().item())
    assert errors[0] > errors[1] > errors[2] > 0


def test_keep_patterns_stay_exact(random_checkpoint, tmp_path):
    source = random_checkpoint("llama")
    release = p2u_hub.split(source, tmp_path / "release", keep=["*embed_tokens*", "lm_head.weight"])
    manifest = fmt.read_manifest(release / "base")
    assert manifest.tensors["model.embed_tokens.weight"].codec == fmt.CODEC_EXACT
    assert manifest.tensors["lm_head.weight"].codec == fmt.CODEC_EXACT
    assert manifest.tensors["model.layers.0.mlp.up_proj.weight"].codec == fmt.CODEC_LADDER
    assert manifest.tensors["model.norm.weight"].codec == fmt.CODEC_EXACT
    base = load_file(release / "base" / "model.safetensors")
    assert torch.equal(base["lm_head.weight"], checkpoint_tensors(source)["lm_head.weight"])


# Bad input: one clear error naming the file or tensor, and nothing left behind.


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_pickle_checkpoint_is_refused(tmp_path):
    source = tmp_path / "pickle"
    source.mkdir()
    (source / "config.json").write_text("{}")
    (source / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(fmt.P2UFormatError, match=r"pytorch_model\.bin.*safetensors"):
        p2u_hub.split(source, tmp_path / "out")
    assert _leftovers(tmp_path) == ["pickle"]


def test_unsupported_dtype_names_the_tensor(random_checkpoint, tmp_path):
    source = random_checkpoint("bert")
    tensors = load_file(source / "model.safetensors")
    tensors["pooler.dense.weight"] = tensors["pooler.dense.weight"].double()
    save_file(tensors, source / "model.safetensors")
    with pytest.raises(fmt.P2UFormatError, match=r"pooler\.dense\.weight.*F64"):
        p2u_hub.split(source, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_truncated_safetensors_names_the_file(random_checkpoint, tmp_path):
    source = random_checkpoint("bert")
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(fmt.P2UFormatError, match=r"model\.safetensors.*truncated"):
        p2u_hub.split(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def release(random_checkpoint, tmp_path) -> Path:
    return p2u_hub.split(random_checkpoint("gpt2"), tmp_path / "release")


def test_stage_of_another_base_is_refused(release, random_checkpoint, tmp_path):
    other = p2u_hub.split(random_checkpoint("llama"), tmp_path / "other")
    shutil.rmtree(release / "stage-1")
    shutil.copytree(other / "stage-1", release / "stage-1")
    with pytest.raises(fmt.StageMismatchError, match="stage-1.*another base"):
        p2u_hub.merge(release, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_missing_stage_is_named(release, tmp_path):
    shutil.rmtree(release / "stage-2")
    with pytest.raises(fmt.P2UFormatError, match="stage-2 not found"):
        p2u_hub.merge(release, tmp_path / "merged")
    assert p2u_hub.merge(release, tmp_path / "merged-1", stage=1).is_dir()


def test_corrupt_payload_fails_checksum(release, tmp_path):
    stage = release / "stage-2" / "delta.safetensors"
    tensors = load_file(stage)
    name = "transformer.h.0.mlp.c_fc.weight"
    tensors[name][10] ^= 0xFF
    save_file(tensors, stage)
    with pytest.raises(fmt.ChecksumError, match=name.replace(".", r"\.")):
        p2u_hub.merge(release, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_edited_manifest_is_detected(release, tmp_path):
    manifest_path = release / "base" / fmt.MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["tensors"]["transformer.wpe.weight"]["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(fmt.ChecksumError, match="p2u_manifest.json"):
        p2u_hub.merge(release, tmp_path / "merged")


def test_existing_output_is_not_overwritten(release, random_checkpoint):
    with pytest.raises(FileExistsError, match="already exists"):
        p2u_hub.split(random_checkpoint("gpt2"), release)


@pytest.mark.slow
def test_cli_split_inspect_merge(random_checkpoint, tmp_path):
    source = random_checkpoint("gpt2")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "p2u_hub.tools.cli", *args], capture_output=True, text=True)

    assert run("split", str(source), str(tmp_path / "out"), "--bits", "3", "--stages").returncode == 0
    inspected = run("inspect", str(tmp_path / "out"), "--json")
    summary = json.loads(inspected.stdout)
    assert [s["name"] for s in summary["stages"]] == ["base", "stage-1"]
    assert summary["total_bytes"] == sum(s["bytes"] for s in summary["stages"])
    assert summary["source_bytes"] == sum(t.numel() * t.element_size() for t in load_file(source / "model.safetensors").values())
    assert run("merge", str(tmp_path / "out"), str(tmp_path / "merged")).returncode == 0
    assert_checkpoints_bit_identical(source, tmp_path / "merged")
    failed = run("merge", str(tmp_path / "nowhere"), str(tmp_path / "m2"))
    assert failed.returncode == 1 and "nowhere" in failed.stderr and "Traceback" not in failed.stderr


def test_every_safetensors_dtype_outside_the_ladder_stays_exact(random_checkpoint, tmp_path):
    source = random_checkpoint("bert")
    tensors = load_file(source / "model.safetensors")
    extra = {
        "extra.f8_e4m3": torch.linspace(-2, 2, 16).to(torch.float8_e4m3fn), "extra.f8_e5m2": torch.linspace(-2, 2, 16).to(torch.float8_e5m2),
        "extra.u16": torch.arange(16).to(torch.uint16), "extra.u32": torch.arange(16).to(torch.uint32),
        "extra.u64": torch.arange(16).to(torch.uint64), "extra.c64": torch.randn(16, dtype=torch.complex64),
        "extra.bool": torch.arange(16) % 3 == 0, "extra.f64": torch.randn(4, 4, dtype=torch.float64),
    }  # fmt: skip
    save_file({**tensors, **extra}, source / "model.safetensors", metadata={"format": "pt"})
    release = p2u_hub.split(source, tmp_path / "release")
    manifest = fmt.read_manifest(release / fmt.BASE_DIR)
    assert {manifest.tensors[name].codec for name in extra} == {fmt.CODEC_EXACT}
    assert_checkpoints_bit_identical(source, p2u_hub.merge(release, tmp_path / "merged"))


def test_release_of_format_version_1_still_reads(random_checkpoint, tmp_path, monkeypatch):
    """Version 1 had the symmetric grid, no offsets and lossless contexts without the scale's mantissa: a release
    made on that grid with those contexts, stripped of its offsets and per-tensor widths, must rebuild the same
    base and the source bit for bit."""
    from p2u_hub.codecs import ladder, progressive

    monkeypatch.setattr(
        ladder, "base_grid", lambda groups, bits: (ladder.base_scales(groups, bits), torch.zeros(groups.shape[0], dtype=torch.int32))
    )
    monkeypatch.setattr(progressive, "Ladder", functools.partial(progressive.Ladder, context_step_bits=0))
    source = random_checkpoint("llama")
    current = p2u_hub.split(source, tmp_path / "current", bits=3, uniform=True)
    old = tmp_path / "old"
    shutil.copytree(current, old)
    manifest = json.loads((old / "base" / fmt.MANIFEST_FILE).read_text())
    manifest["format_version"] = 1
    for entry in manifest["tensors"].values():
        entry.pop("bits", None)
    stored = load_file(old / "base" / "model.safetensors")
    current_manifest = fmt.read_manifest(current / "base")
    for name, entry in current_manifest.quantized_tensors().items():  # version 1 stores codes and scales raw
        keys = (name, fmt.scales_key(name), fmt.offsets_key(name))
        stored[name], stored[fmt.scales_key(name)], _ = progressive.decode_base(
            *(stored[key] for key in keys), current_manifest.tensor_ladder(name), entry.numel
        )
        manifest["base_sha256"].update({key: fmt.tensor_sha256(stored[key]) for key in (name, fmt.scales_key(name))})
    fmt.write_json(old / "base" / fmt.MANIFEST_FILE, manifest)
    weights = {k: v for k, v in stored.items() if not k.endswith(fmt.OFFSETS_SUFFIX)}
    save_file(weights, old / "base" / "model.safetensors", metadata={"format": "pt"})
    digest = fmt.sha256_bytes(fmt.canonical_json(manifest))
    config = json.loads((old / "base" / "config.json").read_text())
    config["quantization_config"].update(manifest_sha256=digest, format_version=1)
    fmt.write_json(old / "base" / "config.json", config)
    for stage in ("stage-1", "stage-2"):
        record = json.loads((old / stage / fmt.STAGE_FILE).read_text())
        record.update(parent=digest, format_version=1)
        fmt.write_json(old / stage / fmt.STAGE_FILE, record)
    assert not fmt.read_manifest(old / "base").has_offsets
    assert_checkpoints_bit_identical(
        p2u_hub.merge(current, tmp_path / "current-base", stage="base"), p2u_hub.merge(old, tmp_path / "old-base", stage="base")
    )
    assert_checkpoints_bit_identical(source, p2u_hub.merge(old, tmp_path / "merged"))
    import transformers

    tokens = torch.arange(12).reshape(1, 12)
    logits = [transformers.AutoModelForCausalLM.from_pretrained(release / "base")(tokens).logits for release in (current, old)]
    assert torch.equal(*logits)


def test_compact_base_codes_its_codes_and_loads_the_same_model(tmp_path):
    """By default the base codes only its scales; ``compact_base`` codes the codes too: a smaller base with the same codes."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=128, num_hidden_layers=1, num_attention_heads=2, intermediate_size=512, vocab_size=1024)
    model = transformers.BertModel(config)
    with torch.no_grad():  # heavy-tailed, like trained weights: codes crowd their grid's centre
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.distributions.Laplace(0.0, 0.02).sample(parameter.shape))
    model.save_pretrained(tmp_path / "source")
    releases = {
        compact: p2u_hub.split(tmp_path / "source", tmp_path / f"release-{compact}", uniform=True, compact_base=compact)
        for compact in (False, True)
    }
    name = "encoder.layer.0.intermediate.dense.weight"
    groups = 128 * 512 // 64
    stored = {compact: load_file(release / "base" / "model.safetensors") for compact, release in releases.items()}
    assert stored[False][name].numel() == groups * 64 * 4 // 8  # raw packed codes
    assert stored[True][name].numel() < groups * 64 * 4 // 8  # a stream, shorter
    for compact in (False, True):
        assert stored[compact][fmt.scales_key(name)].dtype == torch.uint8 and stored[compact][fmt.scales_key(name)].numel() < 2 * groups
        assert_checkpoints_bit_identical(tmp_path / "source", p2u_hub.merge(releases[compact], tmp_path / f"merged-{compact}"))
    sizes = {compact: summarize(release)["stages"][0]["bytes"] for compact, release in releases.items()}
    assert sizes[True] < sizes[False]
    loaded = [transformers.AutoModel.from_pretrained(release / "base").state_dict() for release in releases.values()]
    assert all(torch.equal(loaded[0][key], loaded[1][key]) for key in loaded[0])
