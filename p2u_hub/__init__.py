"""p2u-hub: progressive precision releases for Hugging Face models.

A release is a low-bit *base* that loads with plain ``from_pretrained`` plus delta stages
that raise precision until the source weights are restored bit for bit.
"""

from . import _startup  # noqa: F401  registers the p2u quantizer with transformers once it loads (see _startup)
from .format import ChecksumError, P2UFormatError, StageMismatchError
from .merge import merge
from .split import split
from .upgrade import UpgradeHandle, upgrade

__version__ = "0.1.0"

__all__ = [
    "ChecksumError", "P2UFormatError", "StageMismatchError", "UpgradeHandle", "merge", "split", "upgrade", "__version__",
]  # fmt: skip
