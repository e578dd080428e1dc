"""Raise the precision of a loaded p2u model in place: ``p2u_hub.upgrade(model)``.

The model came from ``from_pretrained`` on a p2u base; its quantizer recorded where the base is
(a local folder, or a Hub repo at a commit). ``upgrade`` finds the stages from the base's config,
fetches them through huggingface_hub (the HF cache, its progress bars, ``HF_TOKEN``), checks them
and swaps every quantized weight for its rebuilt value, one layer at a time. Downloading and
decoding overlap: the stage shards come one by one in a background thread, each checked as it
arrives, and the codec threads rebuild every tensor whose shards are there while the next ones
download (``TensorRebuilder.start_downloads``), so little decoding is left after the last byte.

At ``"full"`` the model becomes a plain transformers model: its ``state_dict()`` is bit-identical
to the source checkpoint and ``save_pretrained`` writes no ``quantization_config``. That holds when
the base was loaded in the source's dtype (``dtype="auto"`` does it); with another ``dtype=`` the
weights are the source's cast to that dtype. An intermediate stage leaves dense weights holding
that stage's dequantized values, in the model's dtype.

Failure handling: everything that can be checked before the model changes is checked first.
Every stage is fetched, must name this base as its parent and come in order, and every payload
must match its sha256 (tensors rebuilt meanwhile wait, unswapped); a stage that is unreachable
(``StageUnavailableError``), from another base (``StageMismatchError``) or corrupt (``ChecksumError``)
leaves the model exactly as it was. Then each
layer's tensors are rebuilt (at ``"full"``, each checked against the source's sha256) before that
layer is swapped, from the codes the model holds (checked when it loaded) or, for a layer already
dense or one on the int4 kernel (whose stored codes would have to be re-packed from the kernel's
layout, which costs far more than reading and hashing them), from the base weights on disk, checked again. A failure there (a payload whose sha256
matches but which does not decode, base weights changed on disk after loading) stops the upgrade
with the error: swapped layers hold
checked weights of the new stage, the others keep theirs, the model still answers, and the stage
of every layer is recorded (``quantizer.layer_stages``), so calling ``upgrade`` again resumes with
the layers still below the target and never lowers one that is above it.

Memory: layers are swapped one by one and the packed codes of a swapped layer are freed at once;
tensors are rebuilt ahead on the codec threads (``release.TensorPrefetch``) while the stages
download, as far as the budget below allows: rebuilt tensors waiting plus payloads kept stay
within what the model grows by plus one stage shard (at least ``PREFETCH_BYTES`` of tensors), so
on a slow link most of the decoding is done when the last byte arrives, and the peak is the final
model plus about one shard, the decoders' buffers and the allocator's slack (1.1 GB bf16
Llama-shaped model, 4-bit base: 1,284-1,323 MiB of anonymous memory above the imports for a
1,062 MiB final model with 32 MiB shards). Freed pages are handed back to the system each time
a shard's worth of layers has been swapped (``_FreedPages``): glibc kept ~300 MiB more otherwise.
The payloads checked as their shards arrive are kept for decoding, and freed as it goes, while
they total at most what the model grows by plus one stage shard; so each payload is read and
hashed once, and a payload beyond that bound is read and checked again when its layer is rebuilt.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Generic, Literal, TypeVar, overload

import torch
from huggingface_hub.utils import tqdm

from ..core import format as fmt
from ..core.release import PREFETCH_BYTES, StageSpec, StoredCodes, TensorPrefetch, TensorRebuilder

if TYPE_CHECKING:
    from .transformers import P2UHfQuantizer, PackedParameter

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=torch.nn.Module)
"""The model handed to ``upgrade``: a transformers ``PreTrainedModel``, or a peft ``PeftModel`` wrapping one."""

_ONE_AT_A_TIME = threading.Lock()
"""Upgrades run one after the other: two on one model must not interleave, and each one keeps the CPU busy anyway."""


class UpgradeHandle(Generic[ModelT]):
    """An upgrade running in a background thread while the model keeps answering.

    Each layer swaps atomically, so a forward pass running meanwhile sees every layer either at
    the old precision or at the new one, never a half-written tensor.
    """

    def __init__(self) -> None:
        self._future: Future[ModelT] = Future()
        self._layers_done = 0
        self._layers_total = 0

    def done(self) -> bool:
        """Whether the upgrade has finished, successfully or not."""
        return self._future.done()

    def result(self, timeout: float | None = None) -> ModelT:
        """Wait for the upgrade and return the model; re-raises the upgrade's error.

        Raises:
            TimeoutError: still running after ``timeout`` seconds.
        """
        return self._future.result(timeout)

    @property
    def progress(self) -> float:
        """Fraction of the layers swapped so far (1.0 once done)."""
        if self._future.done():
            return 1.0
        return self._layers_done / self._layers_total if self._layers_total else 0.0

    def _report(self, done: int, total: int) -> None:
        self._layers_done, self._layers_total = done, total


@overload
def upgrade(model: ModelT, stage: StageSpec = ..., *, background: Literal[False] = ..., token: str | bool | None = ...) -> ModelT: ...
@overload
def upgrade(
    model: ModelT, stage: StageSpec = ..., *, background: Literal[True], token: str | bool | None = ...
) -> UpgradeHandle[ModelT]: ...
def upgrade(
    model: ModelT, stage: StageSpec = "full", *, background: bool = False, token: str | bool | None = None
) -> ModelT | UpgradeHandle[ModelT]:
    """Raise ``model``, loaded from a p2u base with ``from_pretrained``, to ``stage`` in place.

    Args:
        model: a transformers model loaded from a p2u base (packed or dense), or a peft model
            wrapping one: its adapters stay and apply on top of the upgraded weights.
        stage: ``"full"`` (the source weights, bit for bit) or a stage index (1 = first delta).
        background: run in a thread and return an ``UpgradeHandle`` at once; the model keeps
            answering at its current precision meanwhile, layer by layer at the new one.
        token: Hub token for private stage repos (default: ``HF_TOKEN`` / ``hf auth login``).

    Returns:
        ``model`` (upgraded), or an ``UpgradeHandle`` when ``background`` is true.

    Raises:
        ValueError: the model was not loaded from a p2u base, or ``stage`` is below its current one.
        StageUnavailableError: a stage cannot be downloaded (the model is unchanged).
        StageMismatchError: a stage belongs to another base or is out of order (unchanged).
        ChecksumError: a stage payload or a rebuilt tensor fails its sha256 check.
    """
    from .transformers import P2UHfQuantizer  # transformers is loaded already: the model came from it

    quantizer = getattr(model, "hf_quantizer", None)
    if not isinstance(quantizer, P2UHfQuantizer):
        raise ValueError(
            f"{type(model).__name__} has no p2u quantizer: it was not loaded from a p2u base, or it is already "
            "at full precision (then it is a plain transformers model)"
        )
    inner = _transformers_model(model)
    if not background:
        _upgrade(inner, quantizer, stage, token, on_layer=None)
        return model
    handle: UpgradeHandle[ModelT] = UpgradeHandle()

    def run() -> None:
        try:
            _upgrade(inner, quantizer, stage, token, on_layer=handle._report)
            handle._future.set_result(model)
        except BaseException as error:  # handed to the caller through result()
            handle._future.set_exception(error)

    handle._future.set_running_or_notify_cancel()
    threading.Thread(target=run, name="p2u-upgrade", daemon=True).start()
    return handle


def _transformers_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft ``PeftModel`` (whose module names are prefixed), else ``model``."""
    get_base_model = getattr(model, "get_base_model", None)
    return model if get_base_model is None else get_base_model()


def _upgrade(
    model: torch.nn.Module,
    quantizer: P2UHfQuantizer,
    stage: StageSpec,
    token: str | bool | None,
    on_layer: Callable[[int, int], None] | None,
) -> torch.nn.Module:
    from .transformers import install_expanded, loaded_codes, placement

    with _ONE_AT_A_TIME, torch.no_grad():
        if getattr(model, "hf_quantizer", None) is not quantizer:
            return model  # an upgrade queued before this one reached full precision
        release = quantizer.release.reopened(token)  # config and manifest as parsed and checked at load
        index = release.stage_index(stage)
        if index < quantizer.stage:
            raise ValueError(f"the model is at stage {quantizer.stage}; upgrade cannot lower it to stage {index}")
        stages = quantizer.layer_stages
        todo = {name: packed for name, packed in quantizer.parameters.items() if stages.get(name, 0) < index}
        if not todo and index <= quantizer.stage:
            return model
        rebuilder = release.rebuilder(index)
        expanded = _expanded_tensors(todo)
        budget = _payload_budget(model, todo, rebuilder)
        ahead_order = rebuilder.start_downloads(  # in the order split wrote the files: nothing is swapped before the last
            [name for name in release.manifest.tensors if name in expanded], verify=True,
            keep={packed.tensor for packed in todo.values()}, keep_bytes=budget,
        )  # fmt: skip
        bars: list[tqdm] = []  # opened at the first layer, when the total is known (no empty bar before it)
        holders = {packed.tensor: packed for packed in reversed(todo.values())}  # owners win: listed before their aliases

        base_on_disk = _base_files_present(release.base_dir)

        def stored_codes(tensor: str) -> StoredCodes | None:
            """The base codes of ``tensor`` in the model, checked at load; None once its layer is dense, or to read
            them from the base files (checked again) where that is cheaper than taking them out of the int4 kernel."""
            packed = holders.get(tensor)
            if packed is None or (base_on_disk and _on_int4_kernel(model, packed)):
                return None
            stored = loaded_codes(model, packed)
            if stored is None:
                return None
            codes, scales, offsets = stored
            return codes.cpu(), scales.cpu(), None if offsets is None else offsets.cpu()

        def room() -> int:
            """Rebuilt tensors may wait up to the budget the payloads they replace leave (``_payload_budget``)."""
            return max(PREFETCH_BYTES, budget - rebuilder.held_payload_bytes)

        ahead = TensorPrefetch(rebuilder, ahead_order, stored=stored_codes, room=room)  # rebuilds each tensor once its files are there

        def rebuild(packed: PackedParameter) -> torch.Tensor:
            device, dtype = placement(model, packed)
            return ahead.get(packed.tensor).to(device=device, dtype=dtype)

        freed = _FreedPages(every=rebuilder.largest_stage_shard())

        def layer_done(done: int, total: int, names: list[str]) -> None:
            stages.update(dict.fromkeys(names, index))
            freed.swapped(sum(_dense_bytes(model, todo[name]) for name in names))
            if not bars:
                bars.append(tqdm(total=total, desc=f"p2u upgrade to {release.stage_label(index)}", unit="layer"))
            bars[0].update(1)
            if on_layer is not None:
                on_layer(done, total)

        try:
            rebuilder.verify_payloads()  # every file downloaded and checked: nothing is swapped before
            install_expanded(model, todo, rebuild, on_module=layer_done)
        finally:
            ahead.close()
            freed.release()
            for bar in bars:
                bar.close()
            quantizer.stage = min((stages.get(name, 0) for name in quantizer.parameters), default=index)
        logger.info("%s: %d quantized weights at %s", release.base_dir, len(todo), release.stage_label(index))
        if quantizer.stage == release.stage_count:
            _make_plain(model, quantizer)
    return model


def _expanded_tensors(todo: dict) -> set[str]:
    """The tensors ``install_expanded`` will rebuild: owners', and aliases' whose owner it does not swap
    (tied followers and aliases of swapped owners reuse those)."""
    return {packed.tensor for packed in todo.values() if packed.owner is None or (packed.owner not in todo and not packed.tied)}


def _payload_budget(model: torch.nn.Module, todo: dict[str, PackedParameter], rebuilder: TensorRebuilder) -> int:
    """Bytes of checked payloads the upgrade may keep until it decodes them: what the model grows by, plus one shard.

    Kept payloads are freed as their layers are rebuilt while the model grows from packed codes
    to dense weights, so keeping that much adds no more than one shard to what the rebuilt model
    needs anyway; beyond it payloads are read (and checked) a second time.
    """
    from .transformers import quantized_layer

    growth = 0
    for packed in todo.values():
        buffers = quantized_layer(model, packed.module_name)._buffers
        if packed.owner is None and packed.attribute in buffers:  # a dense layer (an intermediate stage) keeps its size
            held = [tensor for name in packed.attributes if (tensor := buffers.get(name)) is not None]
            growth += _dense_bytes(model, packed) - sum(tensor.numel() * tensor.element_size() for tensor in held)
    return max(growth, 0) + rebuilder.largest_stage_shard()


def _dense_bytes(model: torch.nn.Module, packed: PackedParameter) -> int:
    """Bytes of the dense weight ``packed`` becomes, in the model's placement."""
    from .transformers import placement

    return math.prod(packed.layout.shape) * placement(model, packed)[1].itemsize


def _on_int4_kernel(model: torch.nn.Module, packed: PackedParameter) -> bool:
    """Whether the layer of ``packed`` holds its codes in the int4 kernel's layout (``loaded_codes`` must then re-pack them)."""
    from .transformers import quantized_layer

    layout = quantized_layer(model, packed.module_name).__dict__.get("p2u_layout")
    return layout is not None and layout.int4


def _base_files_present(base_dir: Path) -> bool:
    """Whether the base weight files are still where the model was loaded from (a cache may have been cleared since)."""
    try:
        fmt.weight_files(base_dir, fmt.BASE_WEIGHTS_NAME)
    except fmt.P2UFormatError:
        return False
    return True


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None  # ctypes.CDLL(None) is not even a library handle on Windows
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # musl
        return None


class _FreedPages:
    """Hands the pages of freed payloads, codes and decoding buffers back to the system (glibc's ``malloc_trim``).

    glibc keeps freed blocks below its (self-raising) mmap threshold in its arenas, where the
    rebuilt weights allocated meanwhile pin them: without this, the process kept ~300 MiB more than
    it used at the peak of a 1.1 GB upgrade. Each call walks the arenas (there: ~1.7 ms a call, 90 ms
    after every one of its 52 layers), so ``swapped`` calls ``release`` once layers of ``every``
    bytes have been swapped: at most about one more shard of freed pages waits.
    """

    def __init__(self, every: int):
        self._every = every
        self._since = 0

    def swapped(self, nbytes: int) -> None:
        self._since += nbytes
        if self._since >= self._every:
            self.release()

    def release(self) -> None:
        self._since = 0
        trim = _malloc_trim()
        if trim is not None:
            trim(0)


def _make_plain(model: torch.nn.Module, quantizer: P2UHfQuantizer) -> None:
    """Forget the quantization, as a model loaded from the source checkpoint never had it."""
    from transformers import PreTrainedModel

    quantizer.remove_quantization_config(model)
    del model.is_quantized  # remove_quantization_config leaves it False; a plain model has no such attribute
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            vars(module.config).pop("_is_quantized", None)
