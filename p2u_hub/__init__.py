"""p2u-hub: progressive precision releases for Hugging Face models.

A release is a low-bit *base* that loads with plain ``from_pretrained`` plus delta stages
that raise precision until the source weights are restored bit for bit.

Public names load on first use (PEP 562), so ``import p2u_hub`` and ``p2u --help`` do not pay
for torch; importing the package registers the transformers quantizer either way (``_startup``).
"""

import importlib
import sys
import types

from . import _startup  # noqa: F401  registers the p2u quantizer with transformers once it loads (see _startup)

__version__ = "0.1.0"

_LAZY = {
    "P2UError": "errors", "P2UFormatError": "errors", "ChecksumError": "errors", "StageMismatchError": "errors",
    "HubError": "errors", "StageUnavailableError": "errors",
    "merge": "merge", "split": "split", "UpgradeHandle": "upgrade", "upgrade": "upgrade",
    "push": "publish", "summarize": "summary", "write_cards": "card",
}  # fmt: skip
"""Public name -> the module that owns it."""

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


class _FunctionsOverSubmodules(types.ModuleType):
    """Keep ``p2u_hub.merge`` / ``split`` / ``upgrade`` the functions once their same-named modules load.

    Importing a submodule binds it on its package (``setattr(p2u_hub, "merge", <module>)``); with
    the functions loaded lazily that binding would hide them, so it is skipped for those names
    (the modules stay importable through ``sys.modules`` as usual).
    """

    def __setattr__(self, name: str, value) -> None:
        if not (isinstance(value, types.ModuleType) and _LAZY.get(name) == name):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _FunctionsOverSubmodules
