"""Packed linear layers on torch's int4 CPU kernel: the grid maps exactly, outputs stay close, the exact base and upgrade stay."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from safetensors.torch import load_file

import p2u_hub
from p2u_hub.codecs import ladder
from p2u_hub.codecs.progressive import decode_base
from p2u_hub.core import format as fmt
from p2u_hub.integrations import cpu_int4
from p2u_hub.integrations.transformers import INT4_GRID, P2UConfig, PackedLayer, loaded_codes

pytestmark = [
    pytest.mark.skipif(cpu_int4._layout() is None, reason="torch's int4 CPU kernel or its known layout is missing"),
    pytest.mark.filterwarnings("ignore:You passed `quantization_config`"),
]
TOKENS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64]])


@pytest.fixture
def llama_base(random_checkpoint, tmp_path):
    """Factory: ``llama_base(bits)`` -> (source, base folder) of a bfloat16 tiny Llama, every tensor ``bits`` wide."""

    def make(bits: int = 4):
        source = random_checkpoint("llama", dtype=torch.bfloat16)
        return source, p2u_hub.split(source, tmp_path / f"release-{bits}", bits=bits, uniform=True) / "base"

    return make


def _load(base, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(base, dtype="auto", **kwargs)


def _kernel_layers(model) -> dict[str, PackedLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, PackedLayer) and module.p2u_layout.int4}


def test_pack_and_unpack_round_trip(monkeypatch):
    codes = torch.randint(0, 16, (192, 256), generator=torch.Generator().manual_seed(1))
    packed = cpu_int4.pack(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == codes.numel() // 2
    assert torch.equal(cpu_int4.unpack(packed, tuple(codes.shape)), codes.to(torch.uint8))
    monkeypatch.setattr(cpu_int4, "CHUNK_ELEMENTS", 64 * 256)  # three runs of rows, packed one after the other
    runs = []
    nibbles = ladder.pack_unsigned(codes.to(torch.uint8), 4).view(192, 128)  # as a 4-bit base stores them

    def rows(start: int, stop: int) -> torch.Tensor:
        runs.append(stop - start)
        return nibbles[start:stop]

    assert torch.equal(cpu_int4.pack_rows(rows, (192, 256)), packed)
    assert len(runs) == 3 and sum(runs) == 192


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_packing_unsigned_codes_gives_the_stored_bytes(bits):
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (4096,), generator=torch.Generator().manual_seed(bits))
    unsigned = (codes + (1 << (bits - 1))).to(torch.uint8)
    assert torch.equal(ladder.pack_unsigned(unsigned, bits), ladder.pack(codes, bits))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_int4_grid_gives_the_ladder_weights_exactly_in_float32(bits):
    generator = torch.Generator().manual_seed(bits)
    groups = torch.randn(64, 32, generator=generator)
    scales, offsets = ladder.base_grid(groups, bits)
    unsigned = (ladder.quantize(groups, scales, offsets, bits, bits) + (1 << (bits - 1))).to(torch.uint8)
    codes = ladder.to_int4(unsigned, bits)
    assert codes.min() >= 0 and codes.max() < 16 and torch.equal(ladder.from_int4(codes.to(torch.uint8), bits), unsigned)
    scale, zero = ladder.int4_scales_and_zeros(scales, offsets, torch.float32).unbind(-1)
    kernel_weights = (codes - ladder.INT4_MIDPOINT).to(torch.float32) * scale.unsqueeze(1) + zero.unsqueeze(1)
    assert torch.equal(kernel_weights, ladder.dequantize_unsigned(unsigned, scales, offsets, bits))


@pytest.mark.parametrize("bits", [2, 4])
def test_linear_layers_run_on_the_kernel_without_a_dense_copy(bits, llama_base):
    _, base = llama_base(bits)
    model = _load(base)
    dense = _load(base, quantization_config=P2UConfig(load_mode="dense"))
    layers = _kernel_layers(model)
    assert {name.rpartition(".")[2] for name in layers} == {"q_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}
    for name, layer in layers.items():  # k_proj/v_proj have 32 rows, under the kernel's block of 64
        rows, inputs = layer.p2u_layout.shape
        assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == rows * inputs // 2
        assert layer._buffers[INT4_GRID].shape == (inputs // 64, rows, 2) and INT4_GRID not in layer.state_dict()
        assert torch.equal(PackedLayer.p2u_weight(layer), dense.get_submodule(name).weight)
    with torch.no_grad():
        logits, expected = model(TOKENS).logits, dense(TOKENS).logits
    assert logits.dtype == torch.bfloat16
    assert torch.allclose(logits.float(), expected.float(), atol=0.02 * expected.abs().max().item())


def test_inputs_the_kernel_cannot_take_use_the_exact_weight(llama_base):
    _, base = llama_base()
    layer = _load(base).lm_head
    hidden = torch.randn(2, 3, 64)
    weight = PackedLayer.p2u_weight(layer, torch.float32)
    assert torch.equal(layer(hidden), hidden @ weight.T)  # float32: the kernel's float32 path is not used
    batch = torch.randn(cpu_int4.MAX_ROWS + 1, 64, dtype=torch.bfloat16)  # faster on the expanded weight
    assert torch.equal(layer(batch), torch.nn.functional.linear(batch, weight.to(torch.bfloat16)))
    trained = hidden.to(torch.bfloat16).requires_grad_()
    layer(trained).sum().backward()  # the kernel has no backward: the expanded weight carries the gradient
    assert torch.equal(trained.grad, torch.ones(2, 3, 256, dtype=torch.bfloat16) @ weight.to(torch.bfloat16))


def test_to_dtype_rebuilds_the_kernel_scales_and_float32_expands(llama_base):
    _, base = llama_base()
    model = _load(base)
    layer = model.model.layers[0].mlp.up_proj
    codes = layer.weight.clone()
    model.to(torch.float32)
    assert layer._buffers[INT4_GRID] is None and torch.equal(layer.weight, codes)
    hidden = torch.randn(1, 64)
    assert torch.equal(layer(hidden), hidden @ PackedLayer.p2u_weight(layer).T)
    model.to(torch.float16)
    assert layer._buffers[INT4_GRID].dtype == torch.float16 and layer(hidden.half()).dtype == torch.float16


def test_dequantize_and_upgrade_from_kernel_layers_are_exact(llama_base):
    source, base = llama_base()
    dense = _load(base, quantization_config=P2UConfig(load_mode="dense")).state_dict()
    dequantized = _load(base).dequantize().state_dict()
    assert dequantized.keys() == dense.keys() and all(torch.equal(dequantized[name], dense[name]) for name in dense)
    model = _load(base)
    p2u_hub.upgrade(model)
    expected = _load(source).state_dict()
    actual = model.state_dict()
    assert actual.keys() == expected.keys() and all(torch.equal(actual[name], expected[name]) for name in expected)
    assert not any(INT4_GRID in dict(module.named_buffers(recurse=False)) for module in model.modules())


def test_codes_an_upgrade_decodes_are_the_stored_ones(llama_base):
    _, base = llama_base()
    model = _load(base)
    stored = {name: tensor for file in fmt.weight_files(base, fmt.BASE_WEIGHTS_NAME) for name, tensor in load_file(file).items()}
    kernel_layers = _kernel_layers(model)
    checked = 0
    for packed in model.hf_quantizer.parameters.values():
        if packed.module_name in kernel_layers:
            codes, scales, offsets = loaded_codes(model, packed)
            layout = packed.layout  # a coded base's arrays may be stored as streams: compare the decoded arrays
            expected = decode_base(*(stored[name] for name in packed.stored), layout.ladder, math.prod(layout.shape))
            assert all(torch.equal(tensor, arrays) for tensor, arrays in zip((codes, scales, offsets), expected))
            checked += 1
    assert checked == len(kernel_layers) > 0
