"""Per-tensor base widths under a byte budget: the mixed precision that ``p2u split --bits B`` does by default.

Sensitivity is very uneven across tensors (on all-MiniLM-L6-v2 the word-embedding table, half
the weights, barely matters, while value projections matter most), so spending the bytes of a
uniform ``B``-bit base where they reduce the error most beats any single width at equal bytes.

1. **Sensitivity.** For every quantized tensor and every candidate width, the loss of
   quantizing that tensor alone at that width (the others exact):

   * ``"calibration"``: run the source model on the bundled calibration sentences
     (``p2u_hub/data/calibration.txt``, disjoint from the evaluation sets) and take the relative
     squared error ``sum |y_q - y|^2 / sum |y|^2`` of its output over the real tokens (logits
     of a causal LM, else the last hidden state). A tensor that output does not depend on (a
     pooler, say) measures 0 at every width and keeps the budget width: the measurement cannot
     say what it is worth. One forward pass per tensor and measured width:
     ``MEASURED_WIDTHS`` consecutive widths around the budget; the loss at other widths is
     extrapolated by a factor ``EXTRAPOLATION`` per bit (a uniform quantizer's error power
     falls by 4 per bit, which the measured curves follow from 2-3 bits on).
   * ``"weights"`` (data-free, on request only): the relative squared error of the tensor
     itself, ``|W_q - W|^2 / |W|^2``. It knows nothing of how the model uses a tensor and can
     lose to one uniform width (SmolLM2-135M, whose tied embedding is also the LM head:
     perplexity 664 against 107 at a 4-bit budget), so ``split``'s "auto" keeps one width when
     it cannot calibrate.

2. **Allocation.** Losses are taken as additive across tensors. Starting from the smallest width
   everywhere, the upgrade (tensor, wider width) with the largest loss decrease per extra byte
   that still fits is applied until none fits: the greedy solution of the multiple-choice
   knapsack. The budget is the bytes of the uniform ``B``-bit base of format version 1 (codes
   and scales), so a mixed base is never larger than the uniform one it replaces; offsets are
   paid from it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources

import torch

from ..codecs import ladder
from ..codecs.progressive import base_reconstruction
from .tasks import AUTO, CAUSAL_LM, resolve_task

logger = logging.getLogger(__name__)

METHOD_CALIBRATION = "calibration"
METHOD_WEIGHTS = "weights"
METHOD_UNIFORM = "uniform"
METHODS = ("auto", METHOD_CALIBRATION, METHOD_WEIGHTS)
CALIBRATION_FILE = "calibration.txt"
CALIBRATION_MAX_PARAMETERS = 1_000_000_000
"""Above this many quantized weights "auto" uses the data-free sensitivity: one forward pass per tensor and
width on a CPU would take hours."""
CALIBRATION_MAX_TOKENS = 64
MEASURED_WIDTHS = 4
EXTRAPOLATION = 4.0


def candidate_widths(stage_bits: Iterable[int]) -> tuple[int, ...]:
    """Base widths a tensor may get: 1 up to 8, and below the first integer stage (which must raise every tensor)."""
    first = next(iter(stage_bits), 9)
    return tuple(range(1, min(first, 9)))


def base_bytes(numel: int, bits: int, group_size: int) -> int:
    """Bytes a base stores for a tensor of ``numel`` elements at width ``bits``: codes, float16 scales, offsets."""
    groups = ladder.group_count(numel, group_size)
    return groups * group_size * bits // 8 + 2 * groups + -(-groups // 8) * bits


def uniform_budget(numels: Iterable[int], bits: int, group_size: int) -> int:
    """Bytes of a uniform ``bits``-wide base as format version 1 stored it (codes and scales, no offsets)."""
    return sum(ladder.group_count(n, group_size) * (group_size * bits // 8 + 2) for n in numels)


def calibration_sentences() -> list[str]:
    """The bundled calibration text, one sentence per line."""
    text = (resources.files("p2u_hub") / "data" / CALIBRATION_FILE).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def weight_sensitivity(weight: torch.Tensor, widths: Iterable[int], group_size: int) -> dict[int, float]:
    """Relative squared error of ``weight`` quantized at each width: the data-free sensitivity."""
    reference = weight.to(torch.float32)
    norm = float(reference.square().sum()) or 1.0
    return {
        bits: float((base_reconstruction(weight, bits, group_size).to(torch.float32) - reference).square().sum()) / norm for bits in widths
    }


def measured_widths(widths: Sequence[int], bits: int) -> tuple[int, ...]:
    """The ``MEASURED_WIDTHS`` consecutive candidate widths measured for a budget of ``bits``: from ``bits - 2`` up."""
    first = max(0, min(widths.index(bits) - 2 if bits in widths else 0, len(widths) - MEASURED_WIDTHS))
    return tuple(widths[first : first + MEASURED_WIDTHS])


def extrapolate(by_width: Mapping[int, float], widths: Iterable[int]) -> dict[int, float]:
    """``by_width`` completed to every width of ``widths``: ``EXTRAPOLATION`` times less per extra bit, more per bit less."""
    low, high = min(by_width), max(by_width)
    return {
        bits: by_width[bits] if bits in by_width else
        by_width[high] / EXTRAPOLATION ** (bits - high) if bits > high else by_width[low] * EXTRAPOLATION ** (low - bits)
        for bits in widths
    }  # fmt: skip


def calibration_sensitivity(
    source_dir: str | os.PathLike, names: Iterable[str], widths: Iterable[int], group_size: int,
    on_tensor: Callable[[], None] | None = None,
) -> dict[str, dict[int, float]] | None:  # fmt: skip
    """Output error of the source model with each tensor alone quantized at each of ``widths``, or None
    when the model cannot be run here (no tokenizer, unknown architecture, a tensor it has no parameter for).
    """
    loaded = calibration_model(source_dir)
    if loaded is None:
        return None
    model, batch, causal = loaded
    parameters = parameters_by_tensor(model, names)
    if parameters is None:
        return None
    mask = batch["attention_mask"].bool()

    def output() -> torch.Tensor:
        result = model(**batch)
        return (result.logits if causal else result.last_hidden_state)[mask].float()

    with torch.inference_mode():
        try:
            reference = output() if bool(mask.any()) else None
        except (RuntimeError, IndexError) as error:  # e.g. token ids outside the model's vocabulary
            logger.warning(f"p2u split: {source_dir} fails on the calibration text ({error}); using the data-free sensitivity")
            return None
        if reference is None:
            logger.warning(f"p2u split: the tokenizer of {source_dir} gives no tokens; using the data-free sensitivity")
            return None
        norm = float(reference.square().sum()) or 1.0
        sensitivity: dict[str, dict[int, float]] = {}
        for name, parameter in parameters.items():
            original = parameter.detach().clone()
            sensitivity[name] = {}
            for bits in widths:
                parameter.copy_(base_reconstruction(original, bits, group_size))
                sensitivity[name][bits] = float((output() - reference).square().sum()) / norm
            parameter.copy_(original)
            if on_tensor is not None:
                on_tensor()
    return sensitivity


def calibration_model(source_dir: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, torch.Tensor], bool] | None:
    """The source model in float32 (eval mode), the tokenized calibration text, and whether it is a causal LM;
    None (with a warning) when the model cannot be loaded here (no tokenizer, unknown architecture)."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(source_dir)
        causal = resolve_task(AUTO, config.architectures) == CAUSAL_LM
        tokenizer = transformers.AutoTokenizer.from_pretrained(source_dir)
        model_class = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        model = model_class.from_pretrained(source_dir, dtype=torch.float32).eval()
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning(f"p2u split: {source_dir} cannot be run for calibration ({error}); using the data-free sensitivity")
        return None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = dict(tokenizer(calibration_sentences(), padding=True, truncation=True, max_length=CALIBRATION_MAX_TOKENS, return_tensors="pt"))
    return model, batch, causal


def parameters_by_tensor(model, names: Iterable[str]) -> dict[str, torch.Tensor] | None:
    """The model parameter of every checkpoint tensor (with or without the base model prefix), or None if one has none."""
    parameters = dict(model.named_parameters())
    prefix = model.base_model_prefix + "."
    found = {}
    for name in names:
        for candidate in (name, name.removeprefix(prefix), prefix + name):
            if candidate in parameters:
                found[name] = parameters[candidate]
                break
        else:
            logger.warning(f"p2u split: {type(model).__name__} has no parameter for tensor {name!r}; using the data-free sensitivity")
            return None
    return found


def allocate(
    sensitivity: Mapping[str, Mapping[int, float]], numels: Mapping[str, int], budget: int, group_size: int, budget_bits: int
) -> dict[str, int]:
    """The width of every tensor: greedy loss decrease per byte under ``budget`` bytes (see the module docstring).

    A tensor whose loss is 0 at every width gets ``budget_bits``, and its bytes count against the budget.

    Losses are made non-increasing in the width first (a measured wider width never counts as
    worse), so noise cannot make the greedy step backwards. When even the smallest widths exceed
    the budget, every tensor gets its smallest width.
    """
    losses = {name: _non_increasing(by_width) for name, by_width in sensitivity.items() if any(by_width.values())}
    widths = {name: min(by_width) for name, by_width in losses.items()}
    unmeasured = dict.fromkeys(sensitivity.keys() - losses.keys(), budget_bits)
    spent = sum(base_bytes(numels[name], bits, group_size) for name, bits in (widths | unmeasured).items())
    while True:
        best, best_rate = None, 0.0
        for name, bits in widths.items():
            cost = base_bytes(numels[name], bits, group_size)
            for wider, loss in losses[name].items():
                extra = base_bytes(numels[name], wider, group_size) - cost
                if wider <= bits or spent + extra > budget:
                    continue
                rate = (losses[name][bits] - loss) / max(extra, 1)
                if rate > best_rate:
                    best, best_rate = (name, wider, extra), rate
        if best is None:
            return {name: (widths | unmeasured)[name] for name in sensitivity}
        name, wider, extra = best
        widths[name] = wider
        spent += extra


def _non_increasing(by_width: Mapping[int, float]) -> dict[int, float]:
    result, lowest = {}, math.inf
    for bits in sorted(by_width):
        lowest = min(lowest, by_width[bits])
        result[bits] = lowest
    return result
