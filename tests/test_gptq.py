"""Error-compensated base codes (``p2u split --gptq``): lower output error, signed corrections, bit-exact restore."""

from __future__ import annotations

import json

import pytest
import torch

import p2u_hub
from p2u_hub.codecs import ladder, progressive
from p2u_hub.core import format as fmt
from p2u_hub.core.gptq import corrected_codes


def _layer(rows: int = 48, columns: int = 96, tokens: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and correlated inputs (shared latent factors), where compensation has something to exploit."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, columns, generator=generator) * 0.05
    inputs = torch.randn(tokens, 8, generator=generator) @ torch.randn(8, columns, generator=generator)
    inputs += 0.1 * torch.randn(tokens, columns, generator=generator)
    return weight, inputs


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_corrected_codes_lower_the_output_error_on_the_same_grid(bits: int):
    weight, inputs = _layer()
    codes = corrected_codes(weight, (inputs.T @ inputs).double(), bits, 64)
    groups = ladder.to_groups(weight, 64)
    scales, offsets = ladder.base_grid(groups, bits)
    plain = ladder.quantize(groups, scales, offsets, bits, bits)
    assert codes.shape == weight.shape and codes.min() >= -(1 << (bits - 1)) and codes.max() < 1 << (bits - 1)
    moved = (codes.reshape(-1, 64) != plain).float().mean()
    assert 0 < moved < 0.6

    def output_error(codes: torch.Tensor) -> float:
        reconstruction = ladder.dequantize(codes.reshape(-1, 64), scales, offsets, bits, bits).view_as(weight)
        return float(((reconstruction - weight) @ inputs.T).square().sum())

    assert output_error(codes) < 0.8 * output_error(plain)


def test_corrected_codes_give_up_on_non_finite_weights():
    weight, inputs = _layer()
    weight[3, 5] = float("nan")
    assert corrected_codes(weight, (inputs.T @ inputs).double(), 4, 64) is None


@pytest.mark.parametrize("low,high", [(2, 8), (4, 8), (3, 5)])
def test_signed_corrections_round_trip_in_every_bin(low: int, high: int):
    generator = torch.Generator().manual_seed(1)
    coarse = torch.randint(-(1 << (low - 1)), 1 << (low - 1), (4000,), generator=generator, dtype=torch.int32)
    k = high - low
    fine = (coarse << k) + torch.randint(-3 << k, 4 << k, (4000,), generator=generator, dtype=torch.int32)
    refinements = ladder.refinement(fine, coarse, low, high, corrected=True)
    assert refinements.min() >= 0
    inside = (fine >> k) == coarse
    assert torch.equal(refinements[inside], (fine & ((1 << k) - 1))[inside])  # unmoved codes still send their low bits
    assert torch.equal(ladder.refine(coarse, refinements, low, high, corrected=True), fine)


@pytest.mark.parametrize("stage_bits", [(), (8,), (5, 8)])
def test_a_tensor_with_chosen_base_codes_decodes_bit_exactly(stage_bits: tuple[int, ...]):
    weight, inputs = _layer(40, 70)  # 2800 elements: the last group is padded
    weight = weight.to(torch.bfloat16)
    spec = progressive.Ladder(3, stage_bits, 64, corrected=True)
    codes = corrected_codes(weight, (inputs.T @ inputs).double(), 3, 64)
    encoded = progressive.encode(weight, spec, codes)
    assert torch.equal(ladder.unpack(encoded.packed_codes, 3)[: weight.numel()], codes.reshape(-1))
    for stage in range(spec.stage_count + 1):
        rebuilt = progressive.decode(
            encoded.packed_codes, encoded.scales, encoded.offsets, encoded.deltas[:stage], spec, tuple(weight.shape), weight.dtype
        )
        if stage == spec.stage_count:
            assert torch.equal(rebuilt.view(torch.uint8), weight.view(torch.uint8))
        elif stage:
            plain_spec = progressive.Ladder(3, stage_bits, 64)
            plain = progressive.encode(weight, plain_spec)
            plain_rebuilt = progressive.decode(
                plain.packed_codes, plain.scales, plain.offsets, plain.deltas[:stage], plain_spec, tuple(weight.shape), weight.dtype
            )
            assert torch.equal(rebuilt, plain_rebuilt)  # an integer stage holds the weight's own codes again
    with pytest.raises(ValueError, match="exactly when the ladder is corrected"):
        progressive.encode(weight, progressive.Ladder(3, stage_bits, 64), codes)


def test_gptq_split_marks_corrected_tensors_loads_and_merges_bit_exactly(calibratable_bert, tmp_path):
    import transformers

    release = p2u_hub.split(calibratable_bert, tmp_path / "release", bits=3, uniform=True, gptq=True)
    manifest = json.loads((release / fmt.BASE_DIR / fmt.MANIFEST_FILE).read_text())
    corrected = {name for name, entry in manifest["tensors"].items() if entry.get("corrected")}
    assert "encoder.layer.0.attention.self.value.weight" in corrected and "encoder.layer.0.output.dense.weight" in corrected
    assert "embeddings.word_embeddings.weight" not in corrected  # no linear layer: plain codes
    assert manifest["format_version"] == fmt.FORMAT_VERSION >= fmt.CORRECTED_CODES_VERSION
    model = transformers.AutoModel.from_pretrained(release / fmt.BASE_DIR)
    assert model.hf_quantizer.quantization_config.quant_method == "p2u"
    merged = p2u_hub.merge(release, tmp_path / "merged")  # checks every tensor's sha256
    p2u_hub.upgrade(model)
    source = transformers.AutoModel.from_pretrained(merged).state_dict()
    upgraded = model.state_dict()
    assert all(torch.equal(upgraded[name], source[name]) for name in corrected)


def test_gptq_is_refused_with_a_fix_when_the_model_cannot_run(random_checkpoint, tmp_path):
    with pytest.raises(fmt.P2UFormatError, match="split without --gptq"):
        p2u_hub.split(random_checkpoint("gpt2"), tmp_path / "release", uniform=True, gptq=True)


def test_corrected_tensors_need_format_4():
    entry = {"shape": [8, 8], "dtype": "F32", "codec": "ladder", "sha256": "0" * 64, "bits": 4, "corrected": True}
    manifest = {
        "format": "p2u", "format_version": 3, "ladder": {"base_bits": 4, "stage_bits": [8], "group_size": 64},
        "source": {"files": {"model.safetensors": {"metadata": None, "tensors": ["w"]}}},
        "tensors": {"w": entry}, "base_sha256": {},
    }  # fmt: skip
    with pytest.raises(fmt.P2UFormatError, match="'w' is corrected, which only .* format 4\\+"):
        fmt.Manifest.from_json(manifest, "manifest")
    assert fmt.Manifest.from_json(manifest | {"format_version": 4}, "manifest").tensor_ladder("w").corrected
    with pytest.raises(fmt.P2UFormatError, match="corrected must be true or false"):
        fmt.Manifest.from_json(manifest | {"format_version": 4, "tensors": {"w": entry | {"corrected": 1}}}, "manifest")


@pytest.mark.parametrize("tied", [False, True])
def test_gptq_on_a_causal_lm_spares_the_tied_head_and_eval_reports_perplexity_per_stage(minilm_dir, tmp_path, tied: bool):
    import transformers

    from p2u_hub.tools.evaluate import evaluate

    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=30522, max_position_embeddings=128, tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(0)
    source = tmp_path / "llama"
    transformers.LlamaForCausalLM(config).save_pretrained(source)
    transformers.AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(source)
    release = p2u_hub.split(source, tmp_path / "release", bits=3, uniform=True, gptq=True)
    tensors = json.loads((release / fmt.BASE_DIR / fmt.MANIFEST_FILE).read_text())["tensors"]
    corrected = {name for name, entry in tensors.items() if entry.get("corrected")}
    projections = {
        f"model.layers.0.{kind}_proj.weight"
        for kind in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "mlp.gate", "mlp.up", "mlp.down")
    }
    assert corrected == projections | (set() if tied else {"lm_head.weight"})
    report = evaluate(release, max_samples=3)
    assert report["task"] == "causal-lm" and report["dataset"]["calibration_overlap"] == 0
    perplexities = [stage["metrics"]["perplexity"] for stage in report["stages"]]
    assert perplexities[-1] == report["original"]["perplexity"] and perplexities[0] != perplexities[-1]
    p2u_hub.write_cards(release)
    card = (release / fmt.BASE_DIR / fmt.README_FILE).read_text()
    assert f"The base codes of {len(corrected)} linear-layer tensors were chosen by GPTQ" in card and "held out" in card
