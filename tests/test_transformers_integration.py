"""from_pretrained on a p2u base with no p2u import, packed and dense load modes, and upgrade in place to the source bits."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.quantizers import auto as quantizer_table

import p2u_hub
from p2u_hub.core import format as fmt
from p2u_hub.integrations.transformers import (
    P2UConfig,
    P2UHfQuantizer,
    PackedEmbedding,
    PackedLayer,
    PackedLinear,
    register,
)  # fmt: skip
from p2u_hub.testing.assertions import assert_tensors_bit_identical
from p2u_hub.tools.publish import push

TOKENS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 1]])


def _load(folder: str | Path, causal: bool = False, **kwargs):
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    return cls.from_pretrained(folder, **kwargs)


def _output(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)[0]


def _packed_modules(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, PackedLayer)]


@pytest.fixture
def bert(random_checkpoint, tmp_path) -> tuple[Path, Path]:
    """(source folder, base folder) of a tiny random BertModel."""
    source = random_checkpoint("bert")
    return source, p2u_hub.split(source, tmp_path / "release") / "base"


@pytest.fixture(scope="module")
def minilm_base(minilm_dir, tmp_path_factory) -> Path:
    # data-free per-tensor widths: the loader still meets mixed widths, without the calibration's minute and a half
    return p2u_hub.split(minilm_dir, tmp_path_factory.mktemp("minilm-release") / "release", sensitivity="weights") / "base"


@pytest.mark.slow
def test_fresh_interpreter_loads_minilm_base_without_importing_p2u(minilm_dir, minilm_base, tmp_path):
    base = minilm_base
    script = textwrap.dedent(
        f"""
        import json, torch, transformers
        sentences = ["A cat sits on the mat.", "Progressive releases send the low bits first."]
        tokenizer = transformers.AutoTokenizer.from_pretrained({str(minilm_dir)!r})
        batch = tokenizer(sentences, padding=True, return_tensors="pt")
        def embed(model):
            with torch.no_grad():
                hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1)
            return (hidden * mask).sum(1) / mask.sum(1)
        base = transformers.AutoModel.from_pretrained({str(base)!r})
        original = transformers.AutoModel.from_pretrained({str(minilm_dir)!r})
        cosine = torch.nn.functional.cosine_similarity(embed(base), embed(original)).min().item()
        layer = type(base.encoder.layer[0].attention.self.query)
        print(json.dumps({{"cosine": cosine, "layer": f"{{layer.__module__}}.{{layer.__name__}}"}}))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["layer"] == "p2u_hub.integrations.transformers.PackedLinear"
    assert report["cosine"] > 0.9  # 4-bit weights, embeddings included


def test_registering_again_is_harmless():
    register()
    register()
    assert quantizer_table.AUTO_QUANTIZER_MAPPING[fmt.QUANT_METHOD] is P2UHfQuantizer
    assert quantizer_table.AUTO_QUANTIZATION_CONFIG_MAPPING[fmt.QUANT_METHOD] is P2UConfig
    assert quantizer_table.LOADING_ATTRIBUTES_CONFIG_TYPES.count(P2UConfig) == 1


def test_packed_and_dense_load_modes(bert, tmp_path):
    source, base = bert
    packed = _load(base)
    assert isinstance(packed.embeddings.word_embeddings, PackedEmbedding)
    assert isinstance(packed.encoder.layer[0].attention.self.query, PackedLinear)
    assert packed.encoder.layer[0].attention.self.query.weight.dtype == torch.uint8
    assert packed.dtype == torch.float32  # the scales are buffers, not float parameters
    with pytest.warns(UserWarning, match="load_mode"):
        dense = _load(base, quantization_config=P2UConfig(load_mode="dense"))
    assert _packed_modules(dense) == []
    assert type(dense.encoder.layer[0].attention.self.query) is torch.nn.Linear
    assert torch.equal(_output(packed), _output(dense))
    assert torch.equal(_output(copy.deepcopy(packed)), _output(packed))
    cosine = torch.nn.functional.cosine_similarity(_output(packed).flatten(), _output(_load(source)).flatten(), dim=0)
    assert cosine > 0.95

    config = json.loads((base / fmt.CONFIG_FILE).read_text())
    config["quantization_config"]["load_mode"] = fmt.LOAD_MODE_DENSE
    (base / fmt.CONFIG_FILE).write_text(json.dumps(config))
    assert _packed_modules(_load(base)) == []


@pytest.mark.parametrize("missing", ["encoder.layer.0.attention.self.query.weight_p2u_scales", "pooler.dense.weight"])
def test_missing_packed_tensor_is_named(missing, bert):
    _, base = bert
    tensors = load_file(base / "model.safetensors")
    del tensors[missing]
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(fmt.P2UFormatError, match=rf"model\.safetensors: tensor '{missing}'.*incomplete"):
        _load(base)


@pytest.mark.parametrize(("architecture", "dtype"), [("bert", torch.float32), ("llama", torch.bfloat16)])
def test_upgrade_stage_by_stage_to_the_source_bits(architecture, dtype, random_checkpoint, tmp_path):
    source = random_checkpoint(architecture, dtype=dtype)
    base = p2u_hub.split(source, tmp_path / "release", bits=3, stages=(6,)) / "base"
    original = _load(source, causal=architecture == "llama", dtype="auto")
    model = _load(base, causal=architecture == "llama", dtype="auto")
    errors = [(_output(model) - _output(original)).abs().mean()]

    assert p2u_hub.upgrade(model, 1) is model
    assert _packed_modules(model) == [] and model.config.quantization_config.quant_method == fmt.QUANT_METHOD
    errors.append((_output(model) - _output(original)).abs().mean())
    with pytest.raises(ValueError, match="cannot lower"):
        p2u_hub.upgrade(model, 0)

    p2u_hub.upgrade(model, "full")
    assert errors[0] > errors[1] > 0
    assert torch.equal(_output(model), _output(original))
    assert_tensors_bit_identical(original.state_dict(), model.state_dict())
    assert not hasattr(model, "hf_quantizer") and not hasattr(model.config, "quantization_config")
    model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in json.loads((tmp_path / "saved" / fmt.CONFIG_FILE).read_text())
    assert_tensors_bit_identical(
        original.state_dict(), _load(tmp_path / "saved", causal=architecture == "llama", dtype="auto").state_dict()
    )
    with pytest.raises(ValueError, match="no p2u quantizer"):
        p2u_hub.upgrade(model)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
@pytest.mark.parametrize("load_mode", fmt.LOAD_MODES)
def test_gpt2_with_tied_embeddings_generates_as_the_source(load_mode, random_checkpoint, tmp_path):
    source = random_checkpoint("gpt2")
    base = p2u_hub.split(source, tmp_path / "release") / "base"
    model = _load(base, causal=True, quantization_config=P2UConfig(load_mode=load_mode))
    assert model.lm_head.weight is model.transformer.wte.weight
    p2u_hub.upgrade(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    original = _load(source, causal=True)
    assert_tensors_bit_identical(original.state_dict(), model.state_dict())
    generate = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(TOKENS, **generate), original.generate(TOKENS, **generate))
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()


@pytest.mark.parametrize(("architecture", "dtype"), [("llama", torch.bfloat16), ("gpt2", torch.float32)])
def test_loaded_base_lets_go_of_the_file_maps(architecture, dtype, random_checkpoint, tmp_path):
    # transformers loads CPU tensors as views of a memory map of each file; a packed base keeps
    # few of them, and those few must not pin the whole map (and the pages loading read) for ever
    source = random_checkpoint(architecture, dtype)
    base = p2u_hub.split(source, tmp_path / "release") / "base"
    model = _load(base, causal=True, dtype="auto")
    mapped = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if not tensor.untyped_storage().resizable()]
    assert mapped == []
    if architecture == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight
    assert not [path for path in _mapped_files() if path.startswith(str(base))]
    p2u_hub.upgrade(model)
    assert_tensors_bit_identical(_load(source, causal=True).state_dict(), model.state_dict())


def _mapped_files() -> list[str]:
    """Files this process has memory-mapped (Linux; empty elsewhere)."""
    maps = Path("/proc/self/maps")
    return [line.split()[-1] for line in maps.read_text().splitlines() if len(line.split()) >= 6] if maps.exists() else []


def test_duplicate_tensor_the_model_does_not_tie(random_checkpoint, tmp_path):
    source = random_checkpoint("llama")
    tensors = load_file(source / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    base = p2u_hub.split(source, tmp_path / "release") / "base"
    manifest = fmt.read_manifest(base)
    assert {manifest.tensors[name].alias_of for name in ("lm_head.weight", "model.embed_tokens.weight")} - {None}
    model = _load(base, causal=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the codes, stored once
    assert "lm_head.weight" not in model.all_tied_weights_keys
    p2u_hub.upgrade(model)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert_tensors_bit_identical(_load(source, causal=True).state_dict(), model.state_dict())


def test_masked_lm_decoder_tied_to_embeddings_keeps_its_bias(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128, vocab_size=256)
    source = tmp_path / "bert-mlm"
    transformers.BertForMaskedLM(config).save_pretrained(source)
    base = p2u_hub.split(source, tmp_path / "release") / "base"
    original = transformers.AutoModelForMaskedLM.from_pretrained(source)
    model = transformers.AutoModelForMaskedLM.from_pretrained(base)
    assert torch.equal(model.cls.predictions.decoder.bias, original.cls.predictions.decoder.bias)
    p2u_hub.upgrade(model)
    assert_tensors_bit_identical(original.state_dict(), model.state_dict())


def test_other_layer_types_and_renamed_keys_load_dense(tmp_path):
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8
    )
    source = tmp_path / "vit"
    transformers.ViTModel(config).save_pretrained(source)  # saved under legacy names that loading renames
    base = p2u_hub.split(source, tmp_path / "release") / "base"
    assert fmt.read_manifest(base).tensors["embeddings.cls_token"].codec == fmt.CODEC_LADDER
    model, original = transformers.AutoModel.from_pretrained(base), transformers.AutoModel.from_pretrained(source)
    assert model.embeddings.cls_token.dtype == torch.float32  # a bare Parameter: expanded at load
    assert type(model.embeddings.patch_embeddings.projection) is torch.nn.Conv2d
    assert len(_packed_modules(model)) > 0
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(model(images)[0].flatten(), original(images)[0].flatten(), dim=0) > 0.95
    p2u_hub.upgrade(model)
    assert_tensors_bit_identical(original.state_dict(), model.state_dict())


def test_background_upgrade_while_serving(minilm_dir, minilm_base, monkeypatch):
    from p2u_hub.integrations.upgrade import UpgradeHandle

    served = threading.Semaphore(0)  # the upgrade swaps its next layer only after a forward pass: they interleave
    report = UpgradeHandle._report

    def report_then_wait(self, done: int, total: int) -> None:
        report(self, done, total)
        served.acquire(timeout=10)

    monkeypatch.setattr(UpgradeHandle, "_report", report_then_wait)
    tokens = transformers.AutoTokenizer.from_pretrained(minilm_dir)(["A cat sits on the mat in the sun."], return_tensors="pt")

    def embed(model) -> torch.Tensor:
        with torch.no_grad():
            return model(**tokens).last_hidden_state.flatten()

    model = _load(minilm_base)
    expected = embed(_load(minilm_dir))
    base_cosine = torch.nn.functional.cosine_similarity(embed(model), expected, dim=0)
    handle = p2u_hub.upgrade(model, background=True)
    outputs, progress = [], []
    while not handle.done():
        progress.append(handle.progress)
        outputs.append(embed(model))
        served.release()
    assert handle.result(timeout=120) is model and handle.progress == 1.0
    assert len(outputs) > 3 and progress == sorted(progress) and any(0 < p < 1 for p in progress)
    for output in outputs:  # whole layers, each at the base or at full precision: never worse than the base
        assert torch.nn.functional.cosine_similarity(output, expected, dim=0) > base_cosine - 0.02
    assert torch.equal(embed(model), expected)


def test_background_upgrade_reports_errors_and_threads_take_turns(bert):
    _, base = bert
    model = _load(base)
    handles = [p2u_hub.upgrade(model, stage, background=True) for stage in (1, "full", "full")]
    assert [handle.result(timeout=60) for handle in handles] == [model] * 3
    failing = p2u_hub.upgrade(_load(base), 7, background=True)
    with pytest.raises(ValueError, match="stage must be"):
        failing.result(timeout=60)


def test_stage_of_another_base_leaves_the_model_at_its_precision(bert, random_checkpoint, tmp_path):
    _, base = bert
    other = p2u_hub.split(random_checkpoint("llama"), tmp_path / "other")
    shutil.rmtree(base.parent / "stage-1")
    shutil.copytree(other / "stage-1", base.parent / "stage-1")
    model = _load(base)
    before = _output(model)
    with pytest.raises(fmt.StageMismatchError, match="stage-1.*another base"):
        p2u_hub.upgrade(model)
    assert len(_packed_modules(model)) > 0 and torch.equal(_output(model), before)


def test_corrupt_payload_leaves_the_model_unchanged(bert):
    _, base = bert
    stage = base.parent / "stage-2" / "delta.safetensors"
    tensors = load_file(stage)
    tensors["pooler.dense.weight"][3] ^= 0xFF  # the last layer: every other one would be swapped already
    save_file(tensors, stage)
    model = _load(base)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(fmt.ChecksumError, match=r"pooler\.dense\.weight"):
        p2u_hub.upgrade(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)
    p2u_hub.upgrade(model, 1)  # the intact stage still applies


def test_unreachable_stage_is_named(bert):
    _, base = bert
    shutil.rmtree(base.parent / "stage-2")
    model = _load(base)
    with pytest.raises(fmt.P2UFormatError, match="stage-2 not found"):
        p2u_hub.upgrade(model)
    assert len(_packed_modules(model)) > 0


@pytest.mark.parametrize("device_map", ["cpu", "auto"])
def test_device_map_and_dtype(device_map, bert):
    source, base = bert
    model = _load(base, device_map=device_map, dtype=torch.bfloat16)
    assert model.embeddings.LayerNorm.weight.dtype == torch.bfloat16
    assert _output(model).dtype == torch.bfloat16
    p2u_hub.upgrade(model)
    expected = {name: tensor.to(torch.bfloat16) for name, tensor in _load(source).state_dict().items()}
    assert all(torch.equal(tensor, expected[name]) for name, tensor in model.state_dict().items())


def test_base_and_stages_from_the_hub(local_hub, random_checkpoint, tmp_path):
    source = random_checkpoint("gpt2")
    push(p2u_hub.split(source, tmp_path / "release"), "local/gpt2-p2u")
    model = _load("local/gpt2-p2u", causal=True)
    assert len(_packed_modules(model)) > 0
    p2u_hub.upgrade(model)
    assert_tensors_bit_identical(_load(source, causal=True).state_dict(), model.state_dict())


@pytest.mark.slow
def test_hf_upload_layout_loads_upgrades_resumes_and_works_offline(local_hub, random_checkpoint, tmp_path):
    source = random_checkpoint("gpt2")
    release = p2u_hub.split(source, tmp_path / "release")
    hf = [sys.executable, "-m", "huggingface_hub.cli.hf", "upload", "local/plain-upload"]
    for index in (1, 2):
        subprocess.run([*hf, str(release / f"stage-{index}"), ".", "--revision", f"p2u/stage-{index}"], check=True, capture_output=True)
    subprocess.run([*hf, str(release / "base"), "."], check=True, capture_output=True)
    model = _load("local/plain-upload", causal=True)
    local_hub.drop_next_downloads(1)  # the first stage download is cut half way: the client resumes it
    p2u_hub.upgrade(model)
    assert_tensors_bit_identical(_load(source, causal=True).state_dict(), model.state_dict())
    offline = textwrap.dedent(f"""
        import torch, transformers, p2u_hub
        model = transformers.AutoModelForCausalLM.from_pretrained("local/plain-upload")
        p2u_hub.upgrade(model)
        source = transformers.AutoModelForCausalLM.from_pretrained({str(source)!r})
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
        print("offline upgrade ok")
    """)
    result = subprocess.run([sys.executable, "-c", offline], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0 and "offline upgrade ok" in result.stdout, result.stderr[-2000:]
