"""GPTQ-style error compensation on the nested grid: ``p2u split --gptq``.

Rounding every weight to its own bin minimises the weight error, not the layer's output error.
GPTQ (Frantar et al., 2022) quantizes a linear layer's input columns in order and spreads each
column's rounding error over the columns not yet quantized, weighted by the inverse Hessian
``H = X^T X`` of the layer's inputs ``X`` on calibration text, which lowers the output error.

Here the grid is the one ``ladder.base_grid`` picks per group from the original weights (so
scales and offsets are those of the plain base); only the codes change. A code GPTQ moves out
of the weight's own bin is no longer the high bits of the weight's higher-width codes: the
first stage then sends a signed correction (``ladder.refinement(..., corrected=True)``), which
is what this option costs in stage bytes. Tensors that are no ``nn.Linear`` weight (embeddings,
tied LM heads) keep the plain codes.

The Hessians come from one forward pass of the source model over the bundled calibration text
(``allocation.calibration_sentences``), every layer seeing the original model's activations:
feeding each layer the already quantized layers' outputs instead ("true sequential", one pass per
group of layers sharing an input) scored no better on MiniLM (3-bit budget: 0.9639 against 0.9643).
Columns go in their natural order: GPTQ's "act order" (largest Hessian diagonal first) gained
nothing on MiniLM (3-bit budget, damping 0.01: cosine 0.9610 against 0.9629) and moved more codes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from ..codecs import ladder
from . import allocation

DAMPING = 0.1
"""Added to the Hessian's diagonal, as a fraction of its mean. More than GPTQ's usual 0.01: the bundled calibration
text is ~1,000 tokens, fewer than a wide layer's inputs, and on MiniLM 0.1 gave the better held-out cosine (3-bit
budget: 0.9643 against 0.9629) while moving fewer codes out of their bins (15% against 24%: a smaller first stage)."""
STAY_MARGIN = 0.3
"""A code stays in the weight's own bin while GPTQ's updated value lies within this many steps outside it.

Every code moved out of its bin costs the first stage a signed correction. On MiniLM (4-bit budget) plain GPTQ
moves 15% of the codes: cosine 0.9918, 8-bit stage +6%, all stages 0.864 of the source; with this margin 4%:
cosine 0.9912, 8-bit stage +2.7%, all stages 0.860 (3-bit budget: 0.9643 / 0.864 against 0.9625 / 0.859)."""
BLOCK_COLUMNS = 128
"""Columns updated together (GPTQ's lazy batch): the same result as one column at a time, fewer passes."""


def corrected_codes(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int) -> torch.Tensor | None:
    """Base codes of a ``(out, in)`` weight chosen by GPTQ on the base grid: int32, the shape of ``weight``.

    ``hessian`` is ``X^T X`` (``in x in``) of the layer's inputs. Groups are consecutive elements of
    the flattened weight (``ladder.to_groups``), so a group may span rows; each element is
    quantized on its own group's grid, and kept in its own bin when GPTQ would move it by less than
    ``STAY_MARGIN`` steps. Returns None when GPTQ does not apply: non-finite weights,
    a Hessian that is not positive definite after damping.
    """
    rows, columns = weight.shape
    work = weight.detach().to(torch.float32).clone()
    if not bool(torch.isfinite(work).all()) or not bool(torch.isfinite(hessian).all()):
        return None
    groups = ladder.to_groups(work, group_size)
    scales, offsets = ladder.base_grid(groups, bits)
    step = _per_element(scales.to(torch.float32), group_size, rows, columns)
    offset = _per_element(offsets.to(torch.float32), group_size, rows, columns)
    inverse = _inverse_hessian_factor(hessian.to(torch.float64))
    if inverse is None:
        return None
    inverse = inverse.to(torch.float32)
    low, high = -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    plain = (torch.where(step > 0, work / step, torch.zeros_like(work)) + offset).floor().clamp(low, high)
    codes = torch.empty(rows, columns, dtype=torch.float32)
    for start in range(0, columns, BLOCK_COLUMNS):
        stop = min(start + BLOCK_COLUMNS, columns)
        block = work[:, start:stop]
        errors = torch.empty_like(block)
        for j in range(stop - start):
            column, s = block[:, j], step[:, start + j]
            ratio = torch.where(s > 0, column / s, torch.zeros_like(column)) + offset[:, start + j]
            code = ratio.floor().clamp_(low, high)
            own = plain[:, start + j]
            code = torch.where((ratio - own - 0.5).abs() <= 0.5 + STAY_MARGIN, own, code)
            codes[:, start + j] = code
            quantized = (code - offset[:, start + j] + 0.5) * s
            error = (column - quantized) / inverse[start + j, start + j]
            block[:, j:] -= error.unsqueeze(1) * inverse[start + j, start + j : stop].unsqueeze(0)
            errors[:, j] = error
        work[:, stop:] -= errors @ inverse[start:stop, stop:]
    return codes.to(torch.int32)


def _per_element(values: torch.Tensor, group_size: int, rows: int, columns: int) -> torch.Tensor:
    """A per-group value spread over the elements of a ``(rows, columns)`` weight (groups in row-major order)."""
    return values.repeat_interleave(group_size)[: rows * columns].view(rows, columns)


def _inverse_hessian_factor(hessian: torch.Tensor) -> torch.Tensor | None:
    """Upper Cholesky factor of the damped inverse Hessian (GPTQ's ``Hinv``), or None if not positive definite."""
    hessian = hessian.clone()
    dead = torch.diagonal(hessian) == 0  # inputs that are always 0: their weights cannot matter
    hessian[dead, dead] = 1.0
    diagonal = torch.diagonal(hessian)
    diagonal += DAMPING * float(diagonal.mean())
    factor, info = torch.linalg.cholesky_ex(hessian)
    if int(info):
        return None
    factor, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
    return None if int(info) else factor


def input_hessians(source_dir: str | os.PathLike, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """``X^T X`` of the inputs of every ``nn.Linear`` whose weight is one of the checkpoint tensors ``names``.

    Measured over the real tokens of the calibration text. Tensors that are no linear layer's
    weight, or also an embedding's (a tied LM head), get none; so does every tensor when the
    model cannot be run here.
    """
    loaded = allocation.calibration_model(source_dir)
    if loaded is None:
        return {}
    model, batch, _ = loaded
    parameters = allocation.parameters_by_tensor(model, names) or {}
    embedded = {id(module.weight) for module in model.modules() if isinstance(module, torch.nn.Embedding)}
    linear_weights = {
        id(module.weight): module for module in model.modules() if isinstance(module, torch.nn.Linear) and id(module.weight) not in embedded
    }
    mask = batch["attention_mask"].bool()
    hessians: dict[str, torch.Tensor] = {}
    hooks = []
    for name, parameter in parameters.items():
        module = linear_weights.get(id(parameter))
        if module is None:
            continue
        hessians[name] = torch.zeros(module.in_features, module.in_features, dtype=torch.float64)

        def accumulate(module, inputs, output, name=name):
            values = inputs[0]
            values = values[mask] if values.shape[:2] == mask.shape else values.reshape(-1, values.shape[-1])
            values = values.to(torch.float64)
            hessians[name] += values.T @ values

        hooks.append(module.register_forward_hook(accumulate))
    try:
        with torch.inference_mode():
            model(**batch)
    except (RuntimeError, IndexError) as error:  # e.g. token ids outside the model's vocabulary
        allocation.logger.warning(f"p2u split: {source_dir} fails on the calibration text ({error}); no error compensation")
        return {}
    finally:
        for hook in hooks:
            hook.remove()
    return hessians
