"""The base behaves like other quantized models on the Hub: dtype moves, dequantize, sentence-transformers, peft, Trainer."""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import peft
import pytest
import torch
import transformers
from datasets import Dataset
from huggingface_hub import HfApi

import p2u_hub
from p2u_hub.core import format as fmt
from p2u_hub.errors import StageUnavailableError
from p2u_hub.integrations import transformers as p2u_transformers
from p2u_hub.integrations.transformers import P2UConfig, PackedLayer
from p2u_hub.testing.assertions import assert_tensors_bit_identical
from p2u_hub.tools.publish import push

TOKENS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 1]])
SENTENCES = ["A cat sits on the mat.", "Progressive releases send the low bits first."]
LORA_TARGETS = {  # a Linear (or GPT-2's Conv1D) and an Embedding of each (untied: merging into a tied one changes both)
    "gpt2": ["c_attn", "wpe"],
    "llama": ["q_proj", "v_proj", "embed_tokens"],
    "bert": ["query", "value", "word_embeddings"],
}


def _auto_class(architecture: str):
    return transformers.AutoModel if architecture == "bert" else transformers.AutoModelForCausalLM


def _output(model, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)[0]


def _packed_modules(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, PackedLayer)]


@pytest.fixture
def release(random_checkpoint, tmp_path):
    """Factory: ``release("llama", torch.bfloat16)`` -> (source folder, base folder)."""

    def make(architecture: str, dtype: torch.dtype = torch.float32) -> tuple[Path, Path]:
        source = random_checkpoint(architecture, dtype=dtype)
        return source, p2u_hub.split(source, tmp_path / f"release-{architecture}") / "base"

    return make


@pytest.fixture(scope="module")
def minilm_release(minilm_dir, tmp_path_factory) -> Path:
    return p2u_hub.split(minilm_dir, tmp_path_factory.mktemp("minilm") / "release", sensitivity="weights")  # mixed widths, data-free: fast


def test_parameters_are_float_and_to_dtype_keeps_codes_and_scales(release):
    _, base = release("bert")
    model = transformers.AutoModel.from_pretrained(base)
    assert len(_packed_modules(model)) > 0
    assert all(parameter.is_floating_point() for parameter in model.parameters())
    assert next(model.parameters()).dtype == torch.float32
    query = model.encoder.layer[0].attention.self.query
    weight, scales = PackedLayer.p2u_weight(query), query.weight_p2u_scales.clone()

    assert model.to(torch.bfloat16) is model
    assert _output(model).dtype == torch.bfloat16 and query.compute_dtype == torch.bfloat16
    assert query.weight.dtype == torch.uint8 and torch.equal(PackedLayer.p2u_weight(query, torch.float32), weight)
    assert query.weight_p2u_scales.dtype == torch.float16 and torch.equal(query.weight_p2u_scales, scales)
    loaded_in_bf16 = transformers.AutoModel.from_pretrained(base, dtype=torch.bfloat16)
    assert torch.equal(_output(model), _output(loaded_in_bf16))


def test_packed_layers_compute_in_the_input_dtype(release):
    _, base = release("gpt2")
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    hidden = torch.randn(2, 3, 64)
    for layer in (model.transformer.h[0].attn.c_attn, model.lm_head):  # Conv1D, Linear (float32 weights)
        assert layer(hidden.to(torch.bfloat16)).dtype == torch.bfloat16
        expected = layer(hidden).to(torch.bfloat16)
        assert torch.allclose(layer(hidden.to(torch.bfloat16)).float(), expected.float(), atol=0.1)


def test_upgrade_after_to_dtype_gives_the_source_in_that_dtype(release):
    source, base = release("llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(base).to(torch.bfloat16)
    p2u_hub.upgrade(model)
    expected = transformers.AutoModelForCausalLM.from_pretrained(source).to(torch.bfloat16).state_dict()
    actual = model.state_dict()
    assert actual.keys() == expected.keys()
    assert all(actual[name].dtype == torch.bfloat16 and torch.equal(actual[name], expected[name]) for name in expected)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_dequantize_gives_a_plain_model_at_the_base_precision(dtype, release, tmp_path):
    _, base = release("gpt2")
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    if dtype is not None:
        model.to(dtype)
    expected = _output(model)
    assert model.dequantize() is model
    assert _packed_modules(model) == [] and not hasattr(model, "hf_quantizer")
    assert not hasattr(model.config, "quantization_config")
    assert type(model.lm_head) is torch.nn.Linear and type(model.transformer.wte) is torch.nn.Embedding
    assert all(parameter.dtype == (dtype or torch.float32) for parameter in model.parameters())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(_output(model), expected)
    model.save_pretrained(tmp_path / "plain")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype="auto")
    assert torch.equal(_output(reloaded), expected)


def test_split_keeps_the_sentence_transformers_files(minilm_dir, minilm_release):
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json"):
        assert (minilm_release / "base" / name).read_bytes() == (minilm_dir / name).read_bytes()


def test_sentence_transformers_loads_the_base_from_a_folder_and_the_hub(minilm_dir, minilm_release, local_hub):
    from sentence_transformers import SentenceTransformer

    base = minilm_release / "base"
    embeddings = SentenceTransformer(str(base), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    transformer = SentenceTransformer(str(base), device="cpu")[0].auto_model
    assert len(_packed_modules(transformer)) > 0

    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = transformers.AutoModel.from_pretrained(base)(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    mean = (hidden * mask).sum(1) / mask.sum(1)  # the MiniLM pipeline: mean pooling, then normalisation
    assert torch.allclose(embeddings, torch.nn.functional.normalize(mean), atol=1e-6)
    original = SentenceTransformer(str(minilm_dir), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    assert 0.9 < torch.nn.functional.cosine_similarity(embeddings, original).min() < 0.9999

    push(minilm_release, "local/minilm-p2u")
    from_hub = SentenceTransformer("local/minilm-p2u", device="cpu").encode(SENTENCES, convert_to_tensor=True)
    assert torch.equal(from_hub, embeddings)


@pytest.mark.parametrize("architecture", list(LORA_TARGETS))
def test_lora_on_the_base_then_upgrade_keeps_the_adapter(architecture, release):
    source, base = release(architecture)
    auto = _auto_class(architecture)
    model = auto.from_pretrained(base)
    expected_base = _output(model)
    fan_in_fan_out = architecture == "gpt2"  # GPT-2's Conv1D stores the weight transposed
    config = peft.LoraConfig(target_modules=LORA_TARGETS[architecture], r=4, fan_in_fan_out=fan_in_fan_out)
    wrapped = peft.get_peft_model(model, config)
    assert torch.equal(_output(wrapped), expected_base)  # LoRA starts as the identity

    torch.manual_seed(1)
    for name, parameter in wrapped.named_parameters():
        if "lora_" in name:
            parameter.data.normal_(std=0.05)
    adapter = peft.get_peft_model_state_dict(wrapped, save_embedding_layers=False)
    packed = _output(wrapped)
    assert not torch.equal(packed, expected_base)

    assert p2u_hub.upgrade(wrapped) is wrapped
    assert _packed_modules(wrapped) == []
    reference = peft.get_peft_model(auto.from_pretrained(source), config)
    peft.set_peft_model_state_dict(reference, adapter)
    assert torch.equal(_output(wrapped), _output(reference))  # the adapter applies on the source weights
    merged = wrapped.merge_and_unload()
    assert isinstance(merged, transformers.PreTrainedModel) and not any("lora_" in name for name, _ in merged.named_parameters())
    assert torch.allclose(_output(merged), _output(reference), atol=1e-4)


def test_kbit_preparation_and_trainer_steps_on_a_bf16_base(release, tmp_path):
    _, base = release("llama", torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    codes = model.model.layers[0].self_attn.q_proj.weight.clone()
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, init_lora_weights=False))
    lora = {name: parameter.detach().clone() for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert lora and all("lora_" in name for name in lora)

    data = Dataset.from_dict({"input_ids": [list(range(1, 17))] * 8, "labels": [list(range(1, 17))] * 8})
    arguments = transformers.TrainingArguments(
        str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
        use_cpu=True, save_strategy="no",
    )  # fmt: skip
    result = transformers.Trainer(model=model, args=arguments, train_dataset=data).train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    trained = dict(model.named_parameters())
    assert all(not torch.equal(trained[name].detach(), before) for name, before in lora.items())
    layer = model.get_base_model().model.layers[0].self_attn.q_proj.get_base_layer()
    assert isinstance(layer, PackedLayer) and torch.equal(layer.weight, codes)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
def test_prefetch_at_load_then_upgrade_needs_no_network(release, local_hub):
    source, base = release("gpt2")
    push(base.parent, "local/gpt2-p2u")
    model = transformers.AutoModelForCausalLM.from_pretrained("local/gpt2-p2u", quantization_config=P2UConfig(upgrade="prefetch"))
    assert len(_packed_modules(model)) > 0  # the base serves at once
    folders = model.hf_quantizer.prefetch.result(timeout=120)
    assert [fmt.read_stage_record(folder).index for folder in folders] == [1, 2]
    local_hub.stop()  # every stage must now come from what the prefetch put in the cache
    p2u_hub.upgrade(model)
    expected = transformers.AutoModelForCausalLM.from_pretrained(source).state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in model.state_dict().items())


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
def test_prefetch_looks_up_the_stages_while_the_base_weights_download(release, local_hub):
    """The stages' records and shard indexes are fetched before the base's last byte, not in turn after it."""
    source, base = release("gpt2")
    push(base.parent, "local/gpt2-p2u")
    released = local_hub.hold_downloads("model.safetensors")
    loading = ThreadPoolExecutor(1).submit(
        transformers.AutoModelForCausalLM.from_pretrained, "local/gpt2-p2u", quantization_config=P2UConfig(upgrade="prefetch")
    )
    try:
        deadline = time.monotonic() + 60
        while local_hub.file_requests(fmt.STAGE_FILE)["GET"] < 2 and time.monotonic() < deadline and not loading.done():
            time.sleep(0.01)
        assert local_hub.file_requests(fmt.STAGE_FILE)["GET"] == 2  # both stages' records, the base weights still held
        assert local_hub.file_requests("delta*.safetensors")["GET"] == 0  # the stage weights wait for the base's
    finally:
        released.set()
    model = loading.result(timeout=120)
    p2u_hub.upgrade(model)
    assert_tensors_bit_identical(transformers.AutoModelForCausalLM.from_pretrained(source).state_dict(), model.state_dict())


def test_transformers_conversion_table_is_built_while_the_base_weights_download(release, local_hub, monkeypatch):
    """From the Hub, the table is built in the background before the base's bytes come, yielding the GIL often; the
    interpreter's switch interval is back after. From a folder there is nothing to overlap: the loader builds it."""
    _, base = release("gpt2")
    push(base.parent, "local/gpt2-p2u")
    calls = []
    build = p2u_transformers.get_checkpoint_conversion_mapping

    def recording(model_type):
        calls.append((threading.current_thread().name, sys.getswitchinterval(), released.is_set()))
        return build(model_type)

    monkeypatch.setattr(p2u_transformers, "get_checkpoint_conversion_mapping", recording)
    interval = sys.getswitchinterval()
    released = local_hub.hold_downloads("model.safetensors")
    loading = ThreadPoolExecutor(1).submit(transformers.AutoModelForCausalLM.from_pretrained, "local/gpt2-p2u")
    try:
        deadline = time.monotonic() + 60
        while not calls and time.monotonic() < deadline and not loading.done():
            time.sleep(0.01)
    finally:
        released.set()
    model = loading.result(timeout=120)
    ((thread, interval_while_building, base_released),) = calls  # once: transformers' loader reads the cached table
    assert thread == "p2u-conversions" and not base_released
    assert interval_while_building == pytest.approx(p2u_transformers.WARM_UP_SWITCH_INTERVAL_S)  # kept in microseconds
    assert model.hf_quantizer.conversions.done() and sys.getswitchinterval() == interval
    assert transformers.AutoModelForCausalLM.from_pretrained(base).hf_quantizer.conversions is None
    assert len(calls) == 1


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
def test_prefetch_of_a_base_without_its_stages_loads_and_upgrade_names_the_missing_stage(release, local_hub):
    """The lookups started while the base downloads fail; the base still serves and upgrade reports the stage itself."""
    _, base = release("gpt2")
    HfApi().create_repo("local/gpt2-base-only")
    HfApi().upload_folder(repo_id="local/gpt2-base-only", folder_path=base)
    model = transformers.AutoModelForCausalLM.from_pretrained("local/gpt2-base-only", quantization_config=P2UConfig(upgrade="prefetch"))
    before = _output(model)
    with pytest.raises(StageUnavailableError, match="stage-1: revision 'p2u-stage-1' or 'p2u/stage-1' not found in local/gpt2-base-only"):
        p2u_hub.upgrade(model)
    assert torch.equal(_output(model), before) and len(_packed_modules(model)) > 0


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
def test_prefetch_sets_aside_the_stages_found_on_the_repo_named_in_the_base_config(release, local_hub, tmp_path):
    """A base uploaded by hand (its config records no stage repo) whose config.json names another p2u release as
    ``_name_or_path`` (a fine-tune of it, say), loaded with its own class rather than an Auto class: transformers'
    first hooks then see that name, not the repo being loaded, and the stages looked up there are another base's:
    they are set aside and this base's are found on the repo being loaded (the prefetch used to fail on them, and the
    upgrade had to download everything after it)."""
    _, other = release("gpt2")
    push(other.parent, "local/gpt2-p2u")  # stages on its p2u-stage-N branches, another base's
    source, base = release("llama")
    config = fmt.read_json(base / fmt.CONFIG_FILE)
    assert all("repo_id" not in entry for entry in config["quantization_config"]["stages"])
    fmt.write_json(base / fmt.CONFIG_FILE, {**config, "_name_or_path": "local/gpt2-p2u"})
    api = HfApi()
    api.create_repo("local/llama-by-hand")
    api.upload_folder(repo_id="local/llama-by-hand", folder_path=base)
    for index in (1, 2):
        api.create_branch("local/llama-by-hand", branch=fmt.stage_branch(index))
        api.upload_folder(
            repo_id="local/llama-by-hand", folder_path=base.parent / fmt.stage_dir_name(index), revision=fmt.stage_branch(index)
        )
    model = transformers.LlamaForCausalLM.from_pretrained("local/llama-by-hand", quantization_config=P2UConfig(upgrade="prefetch"))
    folders = model.hf_quantizer.prefetch.result(timeout=120)
    assert [fmt.read_stage_record(folder).parent for folder in folders] == [fmt.read_manifest(base).sha256] * 2
    p2u_hub.upgrade(model)
    assert_tensors_bit_identical(transformers.AutoModelForCausalLM.from_pretrained(source).state_dict(), model.state_dict())


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
def test_background_upgrade_at_load(release, local_hub):
    source, base = release("llama")
    push(base.parent, "local/llama-p2u")
    model = transformers.AutoModelForCausalLM.from_pretrained("local/llama-p2u", quantization_config=P2UConfig(upgrade="background"))
    quantizer = model.hf_quantizer
    _output(model)  # serves while the stages arrive
    assert model.p2u_upgrade.result(timeout=120) is model
    assert [fmt.read_stage_record(folder).index for folder in quantizer.prefetch.result(timeout=120)] == [1, 2]  # fetched from load on
    assert _packed_modules(model) == [] and not hasattr(model, "hf_quantizer")
    expected = transformers.AutoModelForCausalLM.from_pretrained(source).state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in model.state_dict().items())


def test_unknown_upgrade_switch_is_refused():
    with pytest.raises(ValueError, match="upgrade must be one of"):
        P2UConfig(upgrade="eager")
