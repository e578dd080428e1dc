"""What a model is for, as far as p2u measures it: the owner of the task names.

Split's calibration (``allocation``), ``p2u eval`` and the model cards all need to know whether
a checkpoint is an embedding model, a causal LM or a classifier; they ask ``resolve_task``.
"""

from __future__ import annotations

from collections.abc import Sequence

EMBEDDING, CAUSAL_LM, CLASSIFICATION = "embedding", "causal-lm", "classification"
TASKS = (EMBEDDING, CAUSAL_LM, CLASSIFICATION)
AUTO = "auto"


def resolve_task(task: str, architectures: Sequence[str] | None) -> str:
    """``task`` itself, or for ``"auto"`` the task the config's architectures name (embedding otherwise)."""
    if task != AUTO:
        if task not in TASKS:
            raise ValueError(f"task must be {AUTO!r} or one of {TASKS}, got {task!r}")
        return task
    for architecture in architectures or ():
        if architecture.endswith("ForCausalLM") or architecture.endswith("LMHeadModel"):
            return CAUSAL_LM
        if architecture.endswith("ForSequenceClassification"):
            return CLASSIFICATION
    return EMBEDDING
