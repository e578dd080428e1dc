"""p2u-hub: progressive precision releases for Hugging Face models.

A release is a low-bit *base* that loads with plain ``from_pretrained`` plus delta stages
that raise precision until the source weights are restored bit for bit.

Public names load on first use (PEP 562), so ``import p2u_hub`` and ``p2u --help`` do not pay
for torch; importing the package registers the transformers quantizer either way (``_startup``).
"""

import importlib

from . import _startup  # noqa: F401  registers the p2u quantizer with transformers once it loads (see _startup)

__version__ = "0.1.0"

_LAZY = {
    "P2UError": "errors", "P2UFormatError": "errors", "ChecksumError": "errors", "StageMismatchError": "errors",
    "HubError": "errors", "StageUnavailableError": "errors",
    "merge": "core.merge", "split": "core.split", "verify": "core.release", "summarize": "core.summary",
    "UpgradeHandle": "integrations.upgrade", "upgrade": "integrations.upgrade",
    "push": "tools.publish", "write_cards": "tools.card",
}  # fmt: skip
"""Public name -> the module that owns it."""

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
