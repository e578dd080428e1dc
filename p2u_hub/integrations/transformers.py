"""The "p2u" quantization method of transformers: ``from_pretrained`` loads a p2u base as it is.

transformers looks a checkpoint's ``quantization_config.quant_method`` up in a table of
quantizers. ``register`` adds p2u to it; importing this module registers, and
``p2u_hub._startup`` imports it as soon as transformers builds that table, in every interpreter
where p2u-hub is installed.

Loading. The base stores a quantized tensor ``N`` as packed uint8 codes under ``N``, float16
scales under ``N_p2u_scales`` and packed grid offsets under ``N_p2u_offsets`` (bases of format
version 3 on), each tensor at its own base width. Before the weights are read, the quantizer
gives each quantized parameter of the still empty model exactly those tensors, in the shapes the base holds, so
transformers' ordinary loader fills, places and ties them like any other weight. Then, by load mode:

* ``"packed"`` (the default; the low-memory choice): ``nn.Linear``, ``nn.Embedding`` and GPT-2's
  ``Conv1D`` become the ``Packed*`` layers below, which keep the codes and expand the weight at
  the start of every forward. A 4-bit base holds about a quarter of a bfloat16 model. Linear
  layers of at most 4 bits computing in bfloat16 or float16 on the CPU instead hold their codes in
  the layout of torch's int4 matmul kernel and multiply on it (``run_on_int4_kernel``): no
  expansion, faster than a dense bfloat16 layer for generation-sized inputs.
* ``"dense"`` (the fast-forward choice): every weight is expanded once, after loading, into the
  model's dtype, and the layers are the plain transformers layers again.

After loading, codes and scales are buffers (see ``PackedLayer``): the model's parameters are its
float tensors, as tools expect of bitsandbytes and HQQ models. Weights of other layer types are
expanded after loading in both modes. Choose the mode in the
base's ``config.json`` (``quantization_config.load_mode``) or when loading:
``AutoModel.from_pretrained(path, quantization_config=P2UConfig(load_mode="dense"))``.

Progressive loading without extra calls: ``P2UConfig(upgrade="prefetch")`` looks the stages up
while the base's weights download (``update_attn_implementation``, the first hook that sees the
repo) and starts downloading every stage file in a background thread as soon as the base's files
are local, before its weights are read, so the link stays busy while the model loads and a later
``p2u_hub.upgrade(model)`` decodes right behind the download (it waits for a file still under way);
``P2UConfig(upgrade="background")`` downloads the same way and also merges, as
``p2u_hub.upgrade(model, background=True)`` does, from the end of loading on while the base
serves: ``model.p2u_upgrade`` is that run's ``UpgradeHandle``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from torch import nn
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
from transformers.pytorch_utils import Conv1D
from transformers.quantizers import auto as quantizer_table
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..codecs import ladder as ladder_codec
from ..codecs.entropy import CorruptStreamError
from ..codecs.progressive import Ladder, codec_threads, decode_base_codes, decode_base_offsets, decode_base_scales, dequantize_packed
from ..core import format as fmt
from ..core.hub import check_repo_id, in_background, look_up_stages
from ..core.release import Release, StoredCodes
from ..core.storage import TensorReader, file_tensor_digests, safetensors_header
from . import cpu_int4

logger = logging.getLogger(__name__)

UPGRADE_PREFETCH = "prefetch"
UPGRADE_BACKGROUND = "background"
UPGRADE_AT_LOAD = (UPGRADE_PREFETCH, UPGRADE_BACKGROUND)
"""Values of ``P2UConfig(upgrade=...)``: what starts right after the base has loaded."""


class P2UConfig(QuantizationConfigMixin):
    """The ``quantization_config`` block of a p2u base's config.json, as transformers holds it.

    :class:`p2u_hub.core.format.QuantizationConfig` owns the block's fields and their validation: built
    from a base's config.json, this holds that object, parsed and checked once, as ``format``
    (its fields read through, ``config.bits``), and the loader hands it on rather than reading
    config.json again. On top come two switches of this load, never written to a base:
    ``load_mode`` (starting as the base's) and ``upgrade`` ("prefetch" or "background", see the
    module docstring). Passed to ``from_pretrained``, only the switches given are used (transformers
    takes the rest from the base): ``P2UConfig(load_mode="dense")`` loads a base dense whatever its
    config.json says.

    Raises:
        ValueError: ``load_mode`` or ``upgrade`` is not one of the known values.
        P2UFormatError: the base's block is invalid, or from a newer format than this p2u-hub reads.
    """

    def __init__(self, load_mode: str | None = None, upgrade: str | None = None, quant_method: str = fmt.QUANT_METHOD, **base_fields):
        if load_mode is not None and load_mode not in fmt.LOAD_MODES:
            raise ValueError(f"load_mode must be one of {fmt.LOAD_MODES}, got {load_mode!r}")
        if upgrade is not None and upgrade not in UPGRADE_AT_LOAD:
            raise ValueError(f"upgrade must be one of {UPGRADE_AT_LOAD} or None, got {upgrade!r}")
        self.quant_method = quant_method
        self.load_mode = load_mode  # None: the base's (a base's config.json always names one)
        self.upgrade = upgrade
        self.format: fmt.QuantizationConfig | None = None  # None: switches only, as passed to from_pretrained
        if base_fields:
            block = {"quant_method": quant_method, "load_mode": load_mode, **base_fields}
            self.format = fmt.QuantizationConfig.from_json({k: v for k, v in block.items() if v is not None}, "quantization_config")

    def __getattr__(self, name: str):
        """The base's fields (``bits``, ``stages``, ...) read through to ``format``."""
        base = self.__dict__.get("format")
        if base is None or name.startswith("_") or name not in fmt.QuantizationConfig.__dataclass_fields__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(base, name)

    def to_dict(self) -> dict:
        """The block as config.json holds it (the load mode in effect), or the switches set when there is no base."""
        if self.format is not None:
            return self.format.to_json() | {"load_mode": self.mode}
        switches = {"quant_method": self.quant_method, "load_mode": self.load_mode, "upgrade": self.upgrade}
        return {key: value for key, value in switches.items() if value is not None}

    def __iter__(self):
        yield from self.to_dict().items()

    def get_loading_attributes(self) -> dict:
        """The switches a config passed to ``from_pretrained`` sets over the base's (see ``register``)."""
        return {name: value for name in ("load_mode", "upgrade") if (value := getattr(self, name)) is not None}

    @property
    def mode(self) -> str:
        """The load mode in effect."""
        return self.load_mode or fmt.DEFAULT_LOAD_MODE

    def to_format(self) -> fmt.QuantizationConfig:
        """The validated block of the base (raises P2UFormatError when this config holds switches only)."""
        if self.format is None:
            raise fmt.P2UFormatError("quantization_config: no p2u base block (bits, stages, manifest_sha256) to load from")
        return self.format


@dataclass(frozen=True)
class PackedLayout:
    """How one packed weight expands: its ladder (own base width), shape, the dtype the model computes in,
    whether the base stores grid offsets for it (format version 3 on), whether another layer holds the same
    codes (a tied weight or an alias), and whether the layer holds its codes in the int4 kernel's layout
    instead of the base's (``int4``, see ``run_on_int4_kernel``)."""

    ladder: Ladder
    shape: tuple[int, ...]
    dtype: torch.dtype
    has_offsets: bool = True
    shares_codes: bool = False
    int4: bool = False

    def stored_sizes(self) -> tuple[tuple[int, torch.dtype], ...]:
        """Element count and dtype of the packed codes, the scales and (if stored) the packed offsets."""
        groups = ladder_codec.group_count(math.prod(self.shape), self.ladder.group_size)
        bits = self.ladder.base_bits
        sizes = ((groups * self.ladder.group_size * bits // 8, torch.uint8), (groups, ladder_codec.SCALE_DTYPE))
        return sizes + (((-(-groups // 8)) * bits, torch.uint8),) if self.has_offsets else sizes


@dataclass(frozen=True)
class PackedParameter:
    """A model parameter the base stores quantized, and where its values come from."""

    name: str  # in the model, e.g. "lm_head.weight"
    tensor: str  # in the manifest: what TensorRebuilder rebuilds
    layout: PackedLayout
    owner: str | None = None  # the parameter whose codes it shares (a tied weight or a deduplicated alias)
    tied: bool = False  # the model itself ties it to ``owner``; an alias gets its own copy once expanded

    @property
    def module_name(self) -> str:
        return self.name.rpartition(".")[0]

    @property
    def attribute(self) -> str:
        return self.name.rpartition(".")[2]

    @property
    def attributes(self) -> tuple[str, ...]:
        """Attributes of the codes, the scales and the offsets (when stored) on the module, while loading."""
        return _with_grid(self.attribute, self.layout)

    @property
    def stored(self) -> tuple[str, ...]:
        """Names of the codes, the scales and the offsets (when stored) in the base weights."""
        return _with_grid(self.tensor, self.layout)


def _with_grid(name: str, layout: PackedLayout) -> tuple[str, ...]:
    """``name`` (the codes) and the names of its grid tensors: scales, then offsets when the base has them."""
    return (name, fmt.scales_key(name), fmt.offsets_key(name)) if layout.has_offsets else (name, fmt.scales_key(name))


class PackedLayer:
    """A layer whose ``weight`` is still packed codes: it expands the weight at the start of each forward.

    ``p2u_layout`` (a PackedLayout) says how. The codes and scales are buffers, not parameters, as
    in bitsandbytes' and HQQ's layers: ``model.parameters()`` holds float tensors only, so code
    that reads a model's dtype from its first parameter (sentence-transformers, peft) sees the
    compute dtype, and optimizers never see the codes. An upgrade (``install_parameters``) first
    gives ``_parameters`` the dense weight in one assignment, then drops codes and scales from
    ``_buffers``, restores the plain class and deletes ``p2u_layout``. Reading in the opposite order
    (layout, buffers, parameters) gives either the codes with their scales and layout or the dense
    weight, never a mix, even while another thread upgrades the layer. The ``forward`` methods call
    ``PackedLayer.p2u_weight(self)``, not ``self.p2u_weight()``: a forward that started just before the
    upgrade restored the plain class would not find the method on it.
    """

    def p2u_weight(self, dtype: torch.dtype | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The weight in ``dtype`` (default: the layer's), or only its ``rows`` (then only their groups are expanded)."""
        layout: PackedLayout | None = self.__dict__.get("p2u_layout")
        buffers = self._buffers
        codes = buffers.get("weight")
        if codes is None:
            weight = self._parameters["weight"]
            weight = weight if rows is None else weight[rows]
            return weight if dtype is None else weight.to(dtype)
        dtype = dtype or layout.dtype
        scales, offsets = buffers[fmt.scales_key("weight")], buffers.get(fmt.offsets_key("weight"))
        if layout.int4:
            weight = _expand_int4(codes, scales, offsets, layout, dtype)
            return weight if rows is None else weight[rows]
        if rows is None:
            return dequantize_packed(codes, scales, offsets, layout.ladder, layout.shape, dtype)
        return _expand_rows(codes, scales, offsets, layout, rows, dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the layer outputs (``model.to(dtype)`` changes it); peft gives adapters this dtype, as for bitsandbytes."""
        layout: PackedLayout | None = self.__dict__.get("p2u_layout")
        return layout.dtype if layout is not None else self._parameters["weight"].dtype

    def _apply(self, fn, recurse: bool = True):
        """``model.to(dtype)``, ``.to(device)``: move codes and scales, never cast them; compute in the new dtype.

        nn.Module casts every floating buffer, and the float16 scales must stay exact; the layer
        learns the new dtype by applying ``fn`` to an empty tensor of its current one.
        """
        layout: PackedLayout | None = self.__dict__.get("p2u_layout")
        scales_key = fmt.scales_key("weight")
        scales = self._buffers.get(scales_key)
        if layout is None or scales is None:
            return super()._apply(fn, recurse)
        target = fn(torch.empty(0, dtype=layout.dtype, device=scales.device))
        super()._apply(fn, recurse)
        self._buffers[scales_key] = scales.to(self._buffers[scales_key].device)  # offsets are uint8: never cast
        _mark_logical_shape(self._buffers["weight"], layout.shape)
        self.p2u_layout = replace(layout, dtype=target.dtype)
        if layout.int4:
            self._buffers[INT4_GRID] = _int4_grid(self)
        elif can_run_on_int4_kernel(self):  # the same layers run on the kernel whether loaded in the dtype or moved to it
            run_on_int4_kernel(self)
        return self


class PackedLinear(PackedLayer, nn.Linear):
    """Computes in the input's dtype, as bitsandbytes' and HQQ's layers do (mixed-precision training feeds float32).

    On the int4 kernel when the layer was moved onto it and the input suits it (``_int4_matmul``),
    else on the weight expanded for this call.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output = _int4_matmul(self, input)
        if output is None:
            return nn.functional.linear(input, PackedLayer.p2u_weight(self, input.dtype), _cast(self.bias, input.dtype))
        return output if self.bias is None else output.add_(_cast(self.bias, input.dtype))


INT4_GRID = "weight_p2u_int4_grid"
"""Buffer of a layer on the int4 kernel: its groups' ``(scale, zero)`` in the compute dtype, the kernel's order.
Derived from the scales and offsets at load and on ``.to(dtype)``; never saved (non-persistent)."""


def can_run_on_int4_kernel(module: nn.Module) -> bool:
    """Whether a packed layer's weight fits torch's int4 CPU kernel (see ``cpu_int4``): a linear weight of at
    most 4 bits on the CPU, computing in bfloat16 or float16, whose rows are whole groups, and whose codes
    no other layer shares (the kernel's copy would add to the shared codes instead of replacing them)."""
    layout: PackedLayout | None = module.__dict__.get("p2u_layout")
    return (
        type(module) is PackedLinear
        and layout is not None
        and not layout.int4
        and not layout.shares_codes
        and layout.ladder.base_bits <= 4
        and module._buffers["weight"].device.type == "cpu"
        and cpu_int4.usable(layout.shape, layout.ladder.group_size, layout.dtype)
    )


def run_on_int4_kernel(module: PackedLinear) -> None:
    """Replace the layer's codes by the int4 kernel's packed form and add the kernel's scales and zeros.

    The packed form takes the place of the codes (the same bytes at 4 bits, twice a 2-bit layer's),
    so no dense copy is kept; scales and offsets stay, and ``_expand_int4`` rebuilds the exact base
    weight from them, as ``loaded_codes`` rebuilds the stored codes an upgrade decodes.
    """
    layout: PackedLayout = module.p2u_layout
    bits = layout.ladder.base_bits
    codes, row_bytes = module._buffers["weight"], layout.shape[1] * bits // 8  # whole bytes: rows are whole groups

    def int4_nibbles(start: int, stop: int) -> torch.Tensor:
        stored = codes[start * row_bytes : stop * row_bytes]
        if bits == 4:  # the stored codes are the kernel's (``to_int4`` adds 0), two per byte as it takes them
            return stored.view(stop - start, -1)
        int4 = ladder_codec.to_int4(ladder_codec.unpack_unsigned(stored, bits), bits)
        return ladder_codec.pack_unsigned(int4, 4).view(stop - start, -1)

    packed = cpu_int4.pack_rows(int4_nibbles, layout.shape)
    _mark_logical_shape(packed, layout.shape)
    module.register_buffer(INT4_GRID, _int4_grid(module), persistent=False)
    module._buffers["weight"] = packed
    module.p2u_layout = replace(layout, int4=True)


def _int4_grid(module: nn.Module) -> torch.Tensor | None:
    """The kernel's ``(scale, zero)`` per group for the layer's compute dtype; None for a dtype the kernel lacks."""
    layout: PackedLayout = module.p2u_layout
    scales, offsets = module._buffers[fmt.scales_key("weight")], module._buffers.get(fmt.offsets_key("weight"))
    if layout.dtype not in cpu_int4.COMPUTE_DTYPES or scales.device.type != "cpu":
        return None
    bits = layout.ladder.base_bits
    group_offsets = None if offsets is None else ladder_codec.unpack_offsets(offsets, bits, scales.numel())
    return cpu_int4.scales_and_zeros(ladder_codec.int4_scales_and_zeros(scales, group_offsets, layout.dtype), layout.shape[0])


def _int4_matmul(layer: nn.Module, input: torch.Tensor) -> torch.Tensor | None:
    """``input @ weight.T`` on the int4 kernel; None where it does not apply (then the caller expands the weight).

    It applies to a layer on the kernel, for a CPU input in the dtype of the kernel's scales (a float32
    input of a bfloat16 layer, as in mixed-precision training, would lose precision) that needs no
    gradient (the kernel has no backward) and has at most ``cpu_int4.MAX_ROWS`` rows (generation,
    small batches; a large batch is faster on the expanded weight). Reads layout, then buffers, as
    ``PackedLayer`` requires.
    """
    layout: PackedLayout | None = layer.__dict__.get("p2u_layout")
    if layout is None or not layout.int4:
        return None
    codes, grid = layer._buffers.get("weight"), layer._buffers.get(INT4_GRID)
    if codes is None or grid is None or input.dtype != grid.dtype or input.device.type != "cpu":
        return None
    if (input.requires_grad and torch.is_grad_enabled()) or input.numel() > cpu_int4.MAX_ROWS * input.shape[-1]:
        return None
    return cpu_int4.matmul(input, codes, layout.ladder.group_size, grid)


def _expand_int4(
    codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, layout: PackedLayout, dtype: torch.dtype
) -> torch.Tensor:
    """The base weight of a layer on the int4 kernel: the same bits as ``dequantize_packed`` of the base's codes."""
    bits, group_size = layout.ladder.base_bits, layout.ladder.group_size
    unsigned = ladder_codec.from_int4(cpu_int4.unpack(codes, layout.shape), bits).view(-1, group_size)
    group_offsets = None if offsets is None else ladder_codec.unpack_offsets(offsets, bits, scales.numel())
    return ladder_codec.dequantize_unsigned(unsigned, scales, group_offsets, bits).view(layout.shape).to(dtype)


class PackedEmbedding(PackedLayer, nn.Embedding):
    """A lookup expands only the rows it reads (``max_norm``, which renormalises the whole table, expands it all)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.max_norm is None:
            return PackedLayer.p2u_weight(self, rows=input)  # what F.embedding computes; padding_idx and the rest only shape gradients
        return nn.functional.embedding(
            input, PackedLayer.p2u_weight(self), self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )


def _cast(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return bias if bias is None or bias.dtype == dtype else bias.to(dtype)


def _mark_logical_shape(codes: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Tell peft the weight's shape: it reads a ``Conv1D``'s from ``weight.ds_shape`` when present.

    DeepSpeed ZeRO-3 sets that attribute on parameters whose data is a placeholder, as the codes
    are for the weight; peft takes ``in_features``/``out_features`` from it, never the data.
    """
    codes.ds_shape = torch.Size(shape)


def _expand_rows(
    codes: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    layout: PackedLayout,
    rows: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Rows of a packed weight, the same values as indexing the fully expanded one.

    Groups run over the flattened weight and each fills ``group_size * bits / 8`` whole bytes, so
    the groups holding the wanted elements are unpacked alone.
    """
    ladder = layout.ladder
    row_size = math.prod(layout.shape[1:])
    elements = rows.reshape(-1, 1) * row_size + torch.arange(row_size, device=rows.device)
    groups, position = torch.unique(elements // ladder.group_size, return_inverse=True)
    group_bytes = codes.view(-1, ladder.group_size * ladder.base_bits // 8)[groups]
    group_offsets = None if offsets is None else ladder_codec.offsets_of_groups(offsets, ladder.base_bits, groups)
    values = ladder_codec.dequantize_packed(group_bytes, scales[groups], group_offsets, ladder.base_bits, ladder.group_size)
    return values[position, elements % ladder.group_size].reshape(*rows.shape, *layout.shape[1:]).to(dtype)


class PackedConv1D(PackedLayer, Conv1D):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        weight = PackedLayer.p2u_weight(self, x.dtype)
        return torch.addmm(_cast(self.bias, x.dtype), x.view(-1, x.size(-1)), weight).view(size_out)


PACKED_LAYERS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: PackedLinear, nn.Embedding: PackedEmbedding, Conv1D: PackedConv1D,
}  # fmt: skip
"""Exact layer types that can run packed (a subclass may have its own forward, so it loads dense)."""
PLAIN_LAYERS = {packed: plain for plain, packed in PACKED_LAYERS.items()}


class P2UHfQuantizer(HfQuantizer):
    """Loads a p2u base (see the module docstring) and remembers what ``p2u_hub.upgrade`` needs.

    Attributes set while loading:
        base_dir: the base folder read (a snapshot in the HF cache for a Hub repo).
        repo_id: the Hub repo of the base, None when loaded from a local folder.
        parameters: every quantized model parameter, owners before the parameters sharing their codes.
        stage: the stage every quantized parameter has reached (0 = base); ``upgrade`` raises it.
        layer_stages: the stage of each quantized parameter (absent = 0), true after every swapped
            module, so an interrupted upgrade resumes where it stopped and never lowers a layer.
    """

    quantization_config: P2UConfig

    def __init__(self, quantization_config: P2UConfig, **kwargs):
        if not kwargs.get("pre_quantized", True):
            raise ValueError(
                "P2UConfig only loads p2u bases (folders written by `p2u split`); this checkpoint has no p2u "
                "quantization_config in its config.json"
            )
        super().__init__(quantization_config, **kwargs)
        self.base_dir: Path | None = None
        self.repo_id: str | None = None
        self.release: Release | None = None  # the base as read while loading; upgrade reuses its parsed files
        self.parameters: dict[str, PackedParameter] = {}
        self.stage = 0
        self.layer_stages: dict[str, int] = {}
        self.prefetch: Future | None = None  # P2UConfig(upgrade=...): done once every stage file is local
        self.stage_lookups: dict[int, Future[Path]] = {}  # P2UConfig(upgrade=...), from the Hub: started before the base downloads
        self.conversions: Future | None = None  # from the Hub: transformers' key conversions, built while the base downloads
        self._follower_bias_sizes: dict[str, int] = {}
        self._decoding: dict[str, Future] = {}  # a coded base's streams by quantized tensor, decoding while transformers loads

    def validate_environment(self, *args, **kwargs) -> None:
        self.quantization_config.to_format()

    def update_attn_implementation(self, config):
        """The first hook that sees which repo is loading, before transformers downloads the base's weights.

        From the Hub, two things start in the background while the base's bytes come, so that
        neither stands between the base's last byte and the loaded model (and the stages' first byte):

        * transformers' table of checkpoint key conversions (``warm_conversions``), which
          ``plan_parameters`` and then transformers' own loader read.
        * with ``P2UConfig(upgrade=...)``, the stages' records and shard indexes: their round trips
          (``_process_model_before_weight_loading`` then starts the stage downloads).
        """
        config = super().update_attn_implementation(config)
        name_or_path = config.name_or_path
        from_hub = bool(name_or_path) and not Path(name_or_path).is_dir()
        if from_hub:
            self.conversions = in_background("p2u-conversions", warm_conversions, config.model_type)
        if self.quantization_config.upgrade in UPGRADE_AT_LOAD and from_hub:
            with contextlib.suppress(fmt.UnsafePathError):  # not a repo id: transformers says so itself
                repo_id = check_repo_id(name_or_path, "from_pretrained")
                self.stage_lookups = look_up_stages(self.quantization_config.to_format().stages, default_repo_id=repo_id)
        return config

    def is_serializable(self, *args, **kwargs) -> bool:
        logger.warning(
            "A p2u model below full precision is not saved: the base and stage folders are its saved form. "
            "Call p2u_hub.upgrade(model) first to save a plain checkpoint."
        )
        return False

    @property
    def is_trainable(self) -> bool:
        """Adapters (peft) train on a packed base, as on a bitsandbytes one; the codes are buffers, never trained."""
        return True

    def dequantize(self, model, dtype=None):
        """``model.dequantize(dtype=None)``: as transformers', but no ``dtype`` keeps each layer's own.

        transformers would default ``dtype`` to ``config.dtype``, which ``model.to(dtype)`` leaves
        at the loading dtype: a bfloat16 model would get float32 weights.
        """
        model = self._dequantize(model, dtype)
        self.remove_quantization_config(model)
        return model

    def _dequantize(self, model, dtype=None):
        """Every quantized weight expanded at the base's precision into a plain layer, in ``dtype`` or the layer's."""
        install_expanded(model, self.parameters, lambda packed: expand_loaded(model, packed, dtype))
        return model

    def _process_model_before_weight_loading(self, model, checkpoint_files: list[str] | None = None, **kwargs):
        self.base_dir, self.repo_id = locate_base(model.config.name_or_path, checkpoint_files)
        self.release = Release(
            self.base_dir, repo_id=self.repo_id, qconfig=self.quantization_config.to_format(), stage_lookups=self.stage_lookups
        )
        if self.quantization_config.upgrade in UPGRADE_AT_LOAD and self.release.stage_count:  # first: the link is idle
            self.prefetch = in_background("p2u-prefetch", self.release.download_stages)  # an error: upgrade meets it again
        if self.conversions is not None:  # one build, not a second one racing it; a failure is met again just below
            with contextlib.suppress(Exception):
                self.conversions.result()
        self.parameters = plan_parameters(model, self.release.manifest)
        stored = self._check_stored(checkpoint_files, self.release.manifest)
        if self.release.manifest.coded_base:
            self._decoding = self._start_decoding(checkpoint_files, stored)
        for packed in self.parameters.values():
            module = model.get_submodule(packed.module_name)
            (codes, codes_dtype), *grid = self._loading_sizes(packed, stored)
            codes_attribute, *grid_attributes = packed.attributes
            setattr(module, codes_attribute, _meta_parameter(codes, codes_dtype))
            for attribute, (size, dtype) in zip(grid_attributes, grid):
                module.register_parameter(attribute, _meta_parameter(size, dtype))
            if packed.owner is not None:
                self._tie_for_loading(model, module, packed)
            if self.quantization_config.mode == fmt.LOAD_MODE_PACKED and _can_run_packed(module, packed):
                module.__class__ = PACKED_LAYERS[type(module)]
        return model

    def _tie_for_loading(self, model, module: nn.Module, packed: PackedParameter) -> None:
        """Have transformers share the owner's scales and offsets (and an alias's codes) as it does tied weights.

        transformers ties a pair by assigning the owner's tensor to the follower, then pads the
        follower's bias to the length of its new weight: the codes. The bias size is recorded so
        that the padding can be cut off after loading.
        """
        ties = model.all_tied_weights_keys
        for follower, owner in zip(_with_grid(packed.name, packed.layout)[1:], _with_grid(packed.owner, packed.layout)[1:]):
            ties[follower] = owner
        if not packed.tied:
            ties[packed.name] = packed.owner
        if getattr(module, "bias", None) is not None:
            self._follower_bias_sizes[packed.module_name] = module.bias.shape[0]

    def _loading_sizes(self, packed: PackedParameter, stored: dict[str, dict]) -> list[tuple[int, torch.dtype]]:
        """Element count and dtype the codes, scales and offsets of ``packed`` load with: the arrays a coded base may
        store as streams (format 6 on: codes and scales; 7 on: offsets too) as its files declare them, a stream or the
        raw array (``decode_base`` tells which and checks); the others at the layout's sizes, which the files must
        declare (refused here, naming the tensor, rather than by transformers' size check)."""
        sizes = list(packed.layout.stored_sizes())
        coded = self._coded_arrays()
        for position, tensor in enumerate(packed.stored):
            declared, (size, dtype) = stored[tensor], sizes[position]
            if position >= coded:
                if _declared(declared) != (fmt.DTYPE_NAMES[dtype], [size]):  # transformers would fail on it, naming neither
                    raise fmt.P2UFormatError(
                        f"{self._files()}: tensor {tensor!r} is stored as {declared['dtype']}{declared['shape']}, "
                        f"the manifest implies {fmt.DTYPE_NAMES[dtype]}[{size}]"
                    )
                continue
            if declared["dtype"] not in ("U8", fmt.DTYPE_NAMES[dtype]) or len(declared["shape"]) != 1:
                raise fmt.P2UFormatError(
                    f"{self._files()}: tensor {tensor!r} is stored as {declared['dtype']}{declared['shape']}, "
                    f"a coded base stores it as U8[n] or {fmt.DTYPE_NAMES[dtype]}[{size}]"
                )
            sizes[position] = (declared["shape"][0], fmt.SAFETENSORS_DTYPES[declared["dtype"]])
        return sizes

    def _coded_arrays(self) -> int:
        """How many of a packed parameter's stored arrays (codes, scales, offsets) the base may store as streams."""
        manifest = self.release.manifest
        return 3 if manifest.coded_offsets else 2 if manifest.coded_base else 0

    def _start_decoding(self, checkpoint_files: list[str], stored: dict[str, dict]) -> dict[str, Future]:
        """Decode the streams of a coded base (format 6 on) from its files, in the background, by quantized tensor.

        The files are local and checked (``_check_stored``) by now: decoding on ``codec_threads()`` threads
        (the C loops release the GIL) while transformers builds the model and loads the other weights
        hides most of it (MiniLM's codes: ~0.06 s of CPU). Arrays stored raw are transformers' to load, as in
        older bases: read again here, a 1.1 GB model's raw codes made it usable ~1 s later at 1000 MB/s
        (its raw offsets are read again where its codes are a stream: they are the codes' contexts).
        Each future holds ``{stored name: decoded array}``; ``_decoded_base`` collects them after loading.
        """
        reader = TensorReader([Path(file) for file in checkpoint_files])

        def read(tensor: str) -> torch.Tensor:  # one read into a buffer of its own: a safetensors handle per tensor cost more than decoding
            return torch.frombuffer(reader.read_bytes(tensor), dtype=fmt.SAFETENSORS_DTYPES[stored[tensor]["dtype"]])

        def decode(packed: PackedParameter, streams: list[str]) -> dict[str, torch.Tensor]:
            codes, scales, offsets = packed.stored
            ladder = packed.layout.ladder
            groups = packed.layout.stored_sizes()[1][0]
            decoded = {}
            if offsets in streams or codes in streams:
                decoded[offsets] = decode_base_offsets(read(offsets), ladder, groups)
            if codes in streams:
                decoded[codes] = decode_base_codes(read(codes), decoded[offsets], ladder, math.prod(packed.layout.shape))
            if scales in streams:
                decoded[scales] = decode_base_scales(read(scales), groups)
            return {name: decoded[name] for name in streams}

        work: dict[str, tuple[PackedParameter, list[str]]] = {}
        for packed in self.parameters.values():
            if packed.owner is None:
                arrays = zip(packed.stored[: self._coded_arrays()], packed.layout.stored_sizes())
                streams = [name for name, (size, dtype) in arrays if _declared(stored[name]) != (fmt.DTYPE_NAMES[dtype], [size])]
                if streams:
                    work[packed.tensor] = (packed, streams)
        if not work:
            return {}
        pool = ThreadPoolExecutor(min(len(work), codec_threads()), thread_name_prefix="p2u-base")
        decoding = {tensor: pool.submit(decode, *job) for tensor, job in work.items()}
        pool.shutdown(wait=False)  # its threads end with the last decode
        return decoding

    def _decoded_base(self, model) -> dict[torch.Tensor, torch.Tensor]:
        """The decoded arrays of a coded base, keyed by the loaded streams they replace.

        Followers share their owner's loaded streams (transformers ties them): each is looked up by
        identity and replaced by one decoded tensor, placed where transformers put the stream.
        """
        decoded: dict[torch.Tensor, torch.Tensor] = {}
        for packed in self.parameters.values():
            if packed.owner is not None or packed.tensor not in self._decoding:
                continue
            try:
                values = self._decoding[packed.tensor].result()
            except CorruptStreamError as error:
                raise fmt.P2UFormatError(
                    f"{self._files()}: the base codes, scales or offsets of tensor {packed.tensor!r} do not decode ({error})"
                ) from None
            module = model.get_submodule(packed.module_name)
            for attribute, name in zip(packed.attributes, packed.stored):
                if name in values:
                    stream = module._parameters[attribute]
                    decoded[stream] = values[name].to(stream.device)
        self._decoding = {}  # the model holds them now
        return decoded

    def _process_model_after_weight_loading(self, model, **kwargs):
        for packed in self.parameters.values():
            self._check_arrived(model, packed)
        decoded = self._decoded_base(model) if self.release.manifest.coded_base else {}
        buffers: dict[torch.Tensor, torch.Tensor] = {}  # one buffer per loaded tensor (hashed by identity): tied codes stay one object
        sharing = {packed.owner for packed in self.parameters.values()}  # owners whose codes a follower shares
        for packed in self.parameters.values():
            module = model.get_submodule(packed.module_name)
            if packed.owner is not None:
                _untie_after_loading(model, packed)
            for attribute in packed.attributes:  # codes, scales and offsets become buffers (see PackedLayer)
                loaded = module._parameters.pop(attribute)
                module.register_buffer(attribute, buffers.setdefault(loaded, decoded.get(loaded, loaded).detach()))
            _mark_logical_shape(module._buffers[packed.attribute], packed.layout.shape)
            if isinstance(module, PackedLayer):
                module.p2u_layout = replace(packed.layout, shares_codes=packed.owner is not None or packed.name in sharing)
                if can_run_on_int4_kernel(module):
                    run_on_int4_kernel(module)
        for module_name, size in self._follower_bias_sizes.items():
            bias = model.get_submodule(module_name).bias
            if bias.shape[0] != size:
                bias.data = bias.data[:size].clone()
        dense = {
            name: packed for name, packed in self.parameters.items() if not isinstance(model.get_submodule(packed.module_name), PackedLayer)
        }
        install_expanded(model, dense, lambda packed: expand_loaded(model, packed))
        _copy_out_of_checkpoint_maps(model)
        self._start_upgrade(model)
        return model

    def _start_upgrade(self, model) -> None:
        """``P2UConfig(upgrade="background")``: merge the stages in the background (downloading since before loading).

        This runs as the last step of ``from_pretrained`` (transformers has set ``model.hf_quantizer``),
        and an upgrade swaps nothing before its stages are downloaded and checked.
        """
        if self.quantization_config.upgrade == UPGRADE_BACKGROUND:
            from .upgrade import upgrade

            model.p2u_upgrade = upgrade(model, background=True)

    def _check_stored(self, checkpoint_files: list[str], manifest: fmt.Manifest) -> dict[str, dict]:
        """Refuse a base missing codes or scales, or whose bytes fail the manifest's ``base_sha256``, before loading.

        transformers would initialise missing uint8 codes at random, and a flipped bit in the base
        would load silently. The files are hashed through a memory map just before transformers
        reads them, so the bytes are read from disk once and the page cache serves the load.
        Returns the files' header entries (dtype, shape) by tensor name.
        """
        stored: dict[str, dict] = {}
        for file in checkpoint_files:
            header = safetensors_header(file)
            header.pop("__metadata__", None)
            stored.update(header)
            if manifest.base_sha256 is None:  # format 1: nothing to check against (read_manifest warned)
                continue
            for name, digest in file_tensor_digests(file).items():
                if manifest.base_sha256.get(name) != digest:
                    raise fmt.ChecksumError(f"{file}: tensor {name!r} fails its base_sha256 check (corrupt file?)")
        for packed in self.parameters.values():
            for tensor in packed.stored if packed.owner is None else ():
                if tensor not in stored:
                    raise self._incomplete(tensor, "it is missing")
        return stored

    def _check_arrived(self, model, packed: PackedParameter) -> None:
        """Fail loudly when a packed tensor did not load: transformers would leave uninitialised memory in its place."""
        module = model.get_submodule(packed.module_name)
        if packed.owner is None:
            for attribute, tensor in zip(packed.attributes, packed.stored):
                value = module._parameters[attribute]
                if value.is_meta or not getattr(value, "_is_hf_initialized", False):
                    raise self._incomplete(tensor, f"it did not load into {packed.module_name}.{attribute}")
            return
        owner = self.parameters[packed.owner]
        owner_module = model.get_submodule(owner.module_name)
        for attribute, owner_attribute in zip(packed.attributes, owner.attributes):
            if module._parameters[attribute] is not owner_module._parameters[owner_attribute]:
                raise fmt.P2UFormatError(
                    f"{self.base_dir}: {packed.module_name}.{attribute} was not tied to "
                    f"{owner.module_name}.{owner_attribute} while loading this p2u base"
                )

    def _incomplete(self, tensor: str, what: str) -> fmt.P2UFormatError:
        return fmt.P2UFormatError(f"{self._files()}: tensor {tensor!r}: {what}; this p2u base is incomplete")

    def _files(self) -> str:
        """The base's weight files, for an error message."""
        return ", ".join(str(path) for path in fmt.weight_files(self.base_dir, fmt.BASE_WEIGHTS_NAME))


def _declared(header_entry: dict) -> tuple[str, list[int]]:
    """The dtype and shape a safetensors header entry declares."""
    return header_entry["dtype"], header_entry["shape"]


def _copy_out_of_checkpoint_maps(model) -> None:
    """Copy the CPU tensors that still point into transformers' memory maps of the base files.

    transformers leaves every loaded CPU tensor a view of its file's memory map (storage torch does
    not own, hence not resizable). A plain model uses all of those bytes. A p2u base re-packs its
    codes for the int4 kernel (bf16, fp16) and an upgrade replaces them all, yet the few MB kept
    from the file (norms, biases, scales, offsets) would keep the whole map, and every page of it
    that loading read, resident for the life of the model, upgraded or not (1.1 GB Llama-shaped model: 254 MiB of a 286 MiB base file). Own copies
    let the map go (CPU: 11-15 ms on MiniLM, 68 ms on that model). This runs at load, the one moment
    when every such tensor is known to come from the map: later, decoded weights (numpy's memory) are
    not resizable either. Tensors shared by several modules stay shared, and keep their Python attributes
    (``_mark_logical_shape``).
    """
    copies: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for name, tensor in tensors.items():
                if tensor is None or tensor.device.type != "cpu" or tensor.untyped_storage().resizable():
                    continue
                copy = copies.get(id(tensor))
                if copy is None:
                    copy = copies[id(tensor)] = tensor.detach().clone()
                    vars(copy).update(vars(tensor))
                if isinstance(tensor, nn.Parameter):
                    tensor.data = copy
                else:
                    tensors[name] = copy


def _meta_parameter(size: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(size, dtype=dtype, device="meta"), requires_grad=False)


def _can_run_packed(module: nn.Module, packed: PackedParameter) -> bool:
    return packed.attribute == "weight" and type(module) in PACKED_LAYERS


def _untie_after_loading(model, packed: PackedParameter) -> None:
    """Drop the tie entries added for loading: scales become buffers, and an alias is no tie of the model's."""
    ties = model.all_tied_weights_keys
    for grid_name in _with_grid(packed.name, packed.layout)[1:]:
        ties.pop(grid_name, None)
    if not packed.tied:
        ties.pop(packed.name, None)


def locate_base(name_or_path: str, checkpoint_files: list[str] | None) -> tuple[Path, str | None]:
    """The base folder transformers read the weights from, and its Hub repo (None for a local folder).

    For a Hub repo the folder is a ``snapshots/<commit>`` folder of the HF cache; the manifest is
    fetched into it at that same commit, so base and manifest always match.
    """
    if not checkpoint_files:
        raise fmt.P2UFormatError(f"{name_or_path}: transformers found no weight files for this p2u base")
    base_dir = Path(checkpoint_files[0]).parent
    if Path(name_or_path).is_dir():
        return base_dir, None
    parts = base_dir.parts
    if "snapshots" not in parts:
        raise fmt.P2UFormatError(f"{base_dir}: expected the weights of Hub repo {name_or_path!r} in an HF cache snapshot")
    at = len(parts) - 1 - parts[::-1].index("snapshots")
    commit, subfolder = parts[at + 1], "/".join(parts[at + 2 :])
    hf_hub_download(name_or_path, fmt.MANIFEST_FILE, subfolder=subfolder or None, revision=commit)
    return base_dir, name_or_path


WARM_UP_SWITCH_INTERVAL_S = 0.0002
"""The interpreter's thread switch interval while ``warm_conversions`` runs (the default is 0.005 s)."""
_SWITCH_INTERVAL_LOCK = threading.Lock()


def warm_conversions(model_type: str) -> None:
    """Build transformers' table of checkpoint key conversions, which it caches for the process.

    The table holds every model type's conversions: ~1,000 regular expressions compiled in pure
    Python, ~70 ms of CPU holding the GIL (MiniLM's ``_process_model_before_weight_loading`` took
    87 ms of CPU with it, 19 ms without). Built by ``plan_parameters`` after the base's bytes
    arrive, it held up the stage downloads started just before (on loopback 75 ms to do 3 ms of
    their work); built here, in a background thread while the base downloads, it costs nothing.
    At the default switch interval (5 ms) it would make each short step of the main thread
    between its requests wait up to 5 ms for the GIL (the base's download started ~60 ms later),
    so the interval is cut to ``WARM_UP_SWITCH_INTERVAL_S`` while it runs and then restored (by
    one warm-up at a time; another runs at the interval it finds).
    """
    shortened, previous = _SWITCH_INTERVAL_LOCK.acquire(blocking=False), sys.getswitchinterval()
    if shortened:
        sys.setswitchinterval(min(previous, WARM_UP_SWITCH_INTERVAL_S))
    try:
        get_checkpoint_conversion_mapping(model_type)
    finally:
        if shortened:
            sys.setswitchinterval(previous)
            _SWITCH_INTERVAL_LOCK.release()


def plan_parameters(model, manifest: fmt.Manifest) -> dict[str, PackedParameter]:
    """Every parameter of ``model`` whose tensor the base stores quantized, owners first.

    An owner's codes and scales are in the base weights; its manifest name becomes its parameter
    name through transformers' own key renaming (legacy names, ``base_model_prefix``), as the
    loader will rename them. A follower shares an owner's codes: a weight the model ties to it,
    or a tensor that ``split`` stored once (``alias_of``).

    Raises:
        P2UFormatError: transformers merges or splits a quantized tensor while loading (e.g. MoE
            experts), which packed codes cannot follow, or an alias has no owner in the model.
    """
    parameters = dict(model.named_parameters(remove_duplicate=False))
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    state = model.state_dict()

    def parameter_name(tensor: str) -> str | None:
        name, converter = rename_source_key(tensor, renamings, converters, model.base_model_prefix, state)
        if converter is not None:
            raise fmt.P2UFormatError(
                f"tensor {tensor!r}: transformers converts it while loading {type(model).__name__} ({converter}), which "
                f"packed codes cannot follow; split the source keeping it exact (--keep '{tensor}')"
            )
        return name if name in parameters else None

    def layout(name: str, tensor: str) -> PackedLayout:
        shape = tuple(manifest.tensors[tensor].shape)
        return PackedLayout(manifest.tensor_ladder(tensor), shape, parameters[name].dtype, manifest.has_offsets)

    quantized = {tensor: entry for tensor, entry in manifest.tensors.items() if entry.codec == fmt.CODEC_LADDER}
    owners: dict[str, str] = {}  # manifest name -> parameter name
    plan: dict[str, PackedParameter] = {}
    for tensor, entry in quantized.items():
        name = parameter_name(tensor) if entry.alias_of is None else None
        if name is not None:  # None: a tensor the model does not use; transformers reports it unexpected
            owners[tensor] = name
            plan[name] = PackedParameter(name, tensor, layout(name, tensor))
    followers: dict[str, PackedParameter] = {}
    for target, source in model.all_tied_weights_keys.items():
        for follower, owner in ((target, source), (source, target)):
            if owner in plan and follower not in plan:
                tensor = plan[owner].tensor
                followers[follower] = PackedParameter(follower, tensor, layout(follower, tensor), owner, tied=True)
    for tensor, entry in quantized.items():
        name = parameter_name(tensor) if entry.alias_of is not None else None
        if name is None or name in followers:
            continue
        if entry.alias_of not in owners:
            raise fmt.P2UFormatError(
                f"tensor {tensor!r} is stored as {entry.alias_of!r}, which {type(model).__name__} has no parameter for"
            )
        followers[name] = PackedParameter(name, entry.alias_of, layout(name, entry.alias_of), owners[entry.alias_of])
    return plan | followers


def expand_loaded(model, packed: PackedParameter, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The base weight of ``packed`` expanded from the codes, scales and offsets in memory, in ``dtype`` (default: the layer's)."""
    module = quantized_layer(model, packed.module_name)
    if isinstance(module, PackedLayer):
        return PackedLayer.p2u_weight(module, dtype or placement(model, packed)[1])
    codes, scales, offsets = loaded_codes(model, packed)
    layout = packed.layout
    return dequantize_packed(codes, scales, offsets, layout.ladder, layout.shape, dtype or placement(model, packed)[1])


def loaded_codes(model, packed: PackedParameter) -> StoredCodes | None:
    """The codes, scales and offsets (None before format 3) of ``packed`` in memory; None once its layer is dense.

    Loading checked them against the manifest's ``base_sha256``, so an upgrade rebuilds from
    these rather than reading and hashing the base weights again. A layer on the int4 kernel holds
    its codes in the kernel's layout: the stored ones are re-derived from it, bit for bit.
    """
    module = quantized_layer(model, packed.module_name)
    layout: PackedLayout | None = module.__dict__.get("p2u_layout")
    buffers = module._buffers
    if packed.attribute not in buffers:
        return None
    codes, scales, *offsets = (buffers[attribute] for attribute in packed.attributes)
    if layout is not None and layout.int4:  # the stored codes, exactly, from the int4 kernel's layout
        bits = layout.ladder.base_bits
        codes = ladder_codec.pack_unsigned(ladder_codec.from_int4(cpu_int4.unpack(codes, layout.shape), bits), bits)
    return codes, scales, offsets[0] if offsets else None


def quantized_layer(model, module_name: str) -> nn.Module:
    """The module holding a quantized weight; through a peft adapter wrapping it (``get_base_layer``)."""
    module = model.get_submodule(module_name)
    get_base_layer = getattr(module, "get_base_layer", None)
    return module if get_base_layer is None else get_base_layer()


def placement(model, packed: PackedParameter) -> tuple[torch.device, torch.dtype]:
    """Device and dtype a new value of ``packed`` takes: where the layer computes now (after any ``model.to``)."""
    module = quantized_layer(model, packed.module_name)
    current = module._parameters.get(packed.attribute)
    if current is not None:  # already dense (an intermediate stage, or a layer type that cannot run packed)
        return current.device, current.dtype
    layout: PackedLayout | None = module.__dict__.get("p2u_layout")
    return module._buffers[packed.attribute].device, layout.dtype if layout is not None else packed.layout.dtype


def install_expanded(
    model,
    parameters: dict[str, PackedParameter],
    expand: Callable[[PackedParameter], torch.Tensor],
    on_module: Callable[[int, int, list[str]], None] | None = None,
) -> None:
    """Give every parameter in ``parameters`` its dense value ``expand(parameter)``, module by module.

    Owners go first; a tied follower then shares its owner's new Parameter and an alias gets a
    copy. Each module changes atomically (``install_parameters``), so a model serving forward
    passes meanwhile only ever mixes whole layers of the old and the new precision.
    ``on_module(done, total, names)`` is called after each module with the names of the parameters
    it swapped, for progress reports and the upgrade's per-layer bookkeeping. A tied follower whose
    owner is not in ``parameters`` (swapped by an earlier, interrupted upgrade) shares the owner's
    current weight.
    """
    installed: dict[str, nn.Parameter] = {}
    batches = _module_batches(parameters)
    for done, (module_name, group) in enumerate(batches, start=1):
        module = quantized_layer(model, module_name)
        tensors = {}
        for packed in group:
            source = installed.get(packed.owner)
            if source is None and packed.tied and packed.owner not in parameters:
                source = model.get_parameter(packed.owner)
            if source is None:
                tensors[packed.attribute] = expand(packed)
            else:
                tensors[packed.attribute] = source if packed.tied else source.detach().clone()
        install_parameters(module, tensors)
        installed.update({packed.name: module._parameters[packed.attribute] for packed in group})
        if on_module is not None:
            on_module(done, len(batches), [packed.name for packed in group])


def _module_batches(parameters: dict[str, PackedParameter]) -> list[tuple[str, list[PackedParameter]]]:
    """Parameters grouped by module, the modules of owners before those of followers."""
    batches: dict[tuple[bool, str], list[PackedParameter]] = {}
    for packed in parameters.values():
        batches.setdefault((packed.owner is not None, packed.module_name), []).append(packed)
    return [(module_name, group) for (_, module_name), group in sorted(batches.items(), key=lambda item: item[0][0])]


def install_parameters(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Replace parameters of ``module`` by plain ``tensors`` (attribute -> tensor) in one step.

    The new parameter dict is built aside and assigned with a single reference store, which a
    forward in another thread sees entirely or not at all; only then are the replaced codes and
    their scales dropped from the buffers and a packed layer given back its plain class, then its
    layout deleted (see ``PackedLayer``).
    """
    replaced = {attribute: tensors.get(attribute, current) for attribute, current in module._parameters.items()}
    new = {attribute: tensor for attribute, tensor in tensors.items() if attribute not in module._parameters}
    parameters = {
        attribute: tensor if isinstance(tensor, nn.Parameter) or tensor is None else nn.Parameter(tensor)
        for attribute, tensor in (new | replaced).items()
    }  # a weight coming from the buffers goes first, where the plain layer has it
    module.__dict__["_parameters"] = parameters
    dropped = set(tensors) | {key(attribute) for attribute in tensors for key in (fmt.scales_key, fmt.offsets_key)}
    dropped |= {INT4_GRID} if "weight" in tensors else set()
    module.__dict__["_buffers"] = {name: buffer for name, buffer in module._buffers.items() if name not in dropped}
    module._non_persistent_buffers_set.difference_update(dropped)
    if type(module) in PLAIN_LAYERS:
        module.__class__ = PLAIN_LAYERS[type(module)]
        del module.p2u_layout


def register() -> None:
    """Add p2u to transformers' quantization tables; a second call does nothing.

    transformers has no plug-in discovery for quantizers and, meeting an unknown ``quant_method``,
    only logs a warning and returns random weights: hence the start-up hook in ``p2u_hub._startup``.
    p2u is also made a config type with *loading attributes*, so that ``load_mode`` passed in a
    ``P2UConfig`` to ``from_pretrained`` overrides the base's (transformers warns that it does).
    """
    if quantizer_table.AUTO_QUANTIZATION_CONFIG_MAPPING.get(fmt.QUANT_METHOD) is not P2UConfig:
        quantizer_table.register_quantization_config(fmt.QUANT_METHOD)(P2UConfig)
    if quantizer_table.AUTO_QUANTIZER_MAPPING.get(fmt.QUANT_METHOD) is not P2UHfQuantizer:
        quantizer_table.register_quantizer(fmt.QUANT_METHOD)(P2UHfQuantizer)
    if P2UConfig not in quantizer_table.LOADING_ATTRIBUTES_CONFIG_TYPES:
        quantizer_table.LOADING_ATTRIBUTES_CONFIG_TYPES = (*quantizer_table.LOADING_ATTRIBUTES_CONFIG_TYPES, P2UConfig)


register()
