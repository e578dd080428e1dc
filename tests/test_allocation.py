"""Per-tensor widths under a byte budget: the allocation, its budget, the data kept apart for evaluation."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from importlib import resources

import pytest
from safetensors.torch import load_file

import p2u_hub
from p2u_hub.codecs import progressive
from p2u_hub.core import allocation
from p2u_hub.core import format as fmt
from p2u_hub.core.summary import summarize


def test_allocation_spends_the_budget_where_the_loss_falls_most():
    numels = {"sensitive": 4096, "insensitive": 4096}
    sensitivity = {
        "sensitive": {bits: 4.0**-bits for bits in range(1, 8)},
        "insensitive": {bits: 1e-3 * 4.0**-bits for bits in range(1, 8)},
    }
    budget = allocation.uniform_budget(numels.values(), 4, 64)
    widths = allocation.allocate(sensitivity | {"unused": dict.fromkeys(range(1, 8), 0.0)}, numels | {"unused": 64}, budget, 64, 4)
    assert widths["sensitive"] > 4 > widths["insensitive"] and widths["unused"] == 4
    assert sum(allocation.base_bytes((numels | {"unused": 64})[name], bits, 64) for name, bits in widths.items()) <= budget


def test_allocation_never_steps_to_a_width_measured_worse():
    numels = {"noisy": 1024, "other": 1024}
    sensitivity = {"noisy": {1: 1.0, 2: 0.5, 3: 0.6, 4: 0.1}, "other": {1: 0.2, 2: 0.1, 3: 0.05, 4: 0.02}}
    widths = allocation.allocate(sensitivity, numels, allocation.uniform_budget(numels.values(), 2, 64), 64, 2)
    assert widths["noisy"] != 3  # 3 bits measured worse than 2 counts as no better, never as a gain


def test_smallest_widths_are_kept_when_even_they_exceed_the_budget():
    widths = allocation.allocate({"a": {2: 1.0, 3: 0.5}}, {"a": 64}, budget=1, group_size=64, budget_bits=2)
    assert widths == {"a": 2}


def test_measured_widths_sit_around_the_budget_and_the_rest_is_extrapolated():
    widths = allocation.candidate_widths((8,))
    assert widths == (1, 2, 3, 4, 5, 6, 7)
    assert allocation.measured_widths(widths, 4) == (2, 3, 4, 5)
    assert allocation.measured_widths(widths, 2) == (1, 2, 3, 4)
    assert allocation.measured_widths(widths, 7) == (4, 5, 6, 7)
    full = allocation.extrapolate({2: 0.5, 3: 0.1, 4: 0.03, 5: 0.008}, widths)
    assert full[1] == 0.5 * allocation.EXTRAPOLATION and full[7] == 0.008 / allocation.EXTRAPOLATION**2 and full[3] == 0.1


def test_base_bytes_count_codes_scales_and_offsets():
    # 100 elements, groups of 64: 2 groups -> 2*64*3/8 code bytes, 2 float16 scales, 8 offsets packed at 3 bits
    assert allocation.base_bytes(100, 3, 64) == 48 + 4 + 3
    assert allocation.uniform_budget([100], 3, 64) == 48 + 4


def test_default_split_allocates_per_tensor_widths_within_the_uniform_budget(random_checkpoint, tmp_path, capsys):
    source = random_checkpoint("llama")
    release = p2u_hub.split(source, tmp_path / "release", bits=3, sensitivity="weights")
    manifest = fmt.read_manifest(release / "base")
    widths = {name: entry.bits for name, entry in manifest.quantized_tensors().items()}
    assert len(set(widths.values())) > 1 and all(1 <= bits < 8 for bits in widths.values())
    record = fmt.read_json(release / "base" / fmt.ALLOCATION_FILE)
    assert record["method"] == allocation.METHOD_WEIGHTS and record["bytes"] <= record["budget_bytes"]
    base = load_file(release / "base" / "model.safetensors")
    for name, bits in widths.items():
        stored = (base[name], base[fmt.scales_key(name)], base[fmt.offsets_key(name)])
        codes, scales, offsets = progressive.decode_base(*stored, manifest.tensor_ladder(name), manifest.tensors[name].numel)
        numel, groups = codes.numel() * 8 // bits, scales.numel()  # packed codes: bits per element
        assert numel == groups * 64 and offsets.numel() == -(-groups // 8) * bits, name
    for options in ({"uniform": True}, {}):  # no tokenizer here: "auto" cannot calibrate and keeps one width
        uniform = p2u_hub.split(source, tmp_path / f"uniform-{len(options)}", bits=3, **options)
        assert {entry.bits for entry in fmt.read_manifest(uniform / "base").quantized_tensors().values()} == {3}
        assert fmt.read_json(uniform / "base" / fmt.ALLOCATION_FILE) == {"method": "uniform", "bits": 3}
    summary = summarize(release)
    assert (
        summary["widths"]["method"] == "weights"
        and summary["widths"]["tensors"]["model.layers.0.mlp.up_proj.weight"]["bits"] == widths["model.layers.0.mlp.up_proj.weight"]
    )
    result = subprocess.run(
        [sys.executable, "-m", "p2u_hub.tools.cli", "inspect", str(release)], capture_output=True, text=True, check=True
    )
    assert "base widths (weights;" in result.stdout
    assert any(
        line.split()[:1] == ["model.layers.1.self_attn.v_proj.weight"]
        and line.split()[2] == str(widths["model.layers.1.self_attn.v_proj.weight"])
        for line in result.stdout.splitlines()
    )


def test_calibration_is_refused_with_a_fix_when_the_model_cannot_run(random_checkpoint, tmp_path):
    with pytest.raises(fmt.P2UFormatError, match="use --sensitivity weights"):
        p2u_hub.split(random_checkpoint("gpt2"), tmp_path / "release", sensitivity="calibration")


def test_calibration_text_is_disjoint_from_the_evaluation_sets():
    calibration = allocation.calibration_sentences()
    assert len(calibration) >= 64 and len(set(calibration)) == len(calibration)
    data = resources.files("p2u_hub") / "data"
    with (data / "sts_pairs.csv").open() as file:
        held_out = [sentence for row in csv.DictReader(file) for sentence in (row["sentence1"], row["sentence2"])]
    paragraphs = (data / "lm_text.txt").read_text()

    def words(text: str) -> set[str]:
        return {" ".join(text.lower().split()[i : i + 6]) for i in range(max(1, len(text.split()) - 5))}

    evaluation_phrases = set().union(*(words(s) for s in held_out), words(paragraphs))
    assert not any(words(sentence) & evaluation_phrases for sentence in calibration)
    from p2u_hub.tools.evaluate import calibration_overlap

    assert calibration_overlap(held_out) == 0 and calibration_overlap(["x " + calibration[3]]) == 1


def test_calibrated_split_measures_through_the_model(calibratable_bert, tmp_path):
    """A tiny BERT with MiniLM's tokenizer runs on the calibration text; its widths come from output error."""
    release = p2u_hub.split(calibratable_bert, tmp_path / "release", bits=3, sensitivity="calibration")
    record = json.loads((release / "base" / fmt.ALLOCATION_FILE).read_text())
    assert record["method"] == "calibration" and record["measured_widths"] == [1, 2, 3, 4]
    losses = record["sensitivity"]["encoder.layer.0.attention.self.value.weight"]
    assert losses["1"] > losses["2"] > losses["3"] > losses["4"] > 0
    p2u_hub.merge(release, tmp_path / "merged")  # checks every tensor's sha256
