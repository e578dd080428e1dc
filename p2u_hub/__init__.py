"""p2u-hub: progressive precision releases for Hugging Face models.

A release is a low-bit *base* that loads with plain ``from_pretrained`` plus delta stages
that raise precision until the source weights are restored bit for bit.
"""

import importlib

from . import _startup  # noqa: F401  registers the p2u quantizer with transformers once it loads (see _startup)
from .errors import (
    ChecksumError,
    HubError,
    P2UError,
    P2UFormatError,
    StageMismatchError,
    StageUnavailableError,
)
from .merge import merge
from .split import split
from .upgrade import UpgradeHandle, upgrade

__version__ = "0.1.0"

_LAZY = {"push": "publish", "summarize": "summary", "write_cards": "card"}
"""Functions whose modules import matplotlib or huggingface_hub upload code: loaded on first use, so ``import p2u_hub`` stays light."""

__all__ = [
    "ChecksumError", "HubError", "P2UError", "P2UFormatError", "StageMismatchError", "StageUnavailableError",
    "UpgradeHandle", "merge", "split", "upgrade",
    *_LAZY, "__version__",
]  # fmt: skip


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
