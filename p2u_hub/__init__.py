"""p2u-hub: progressive precision releases for Hugging Face models.

A release is a low-bit *base* that loads with plain ``from_pretrained`` plus delta stages
that raise precision until the source weights are restored bit for bit.
"""

from .format import ChecksumError, P2UFormatError, StageMismatchError
from .merge import merge
from .split import split

__version__ = "0.1.0"

__all__ = ["ChecksumError", "P2UFormatError", "StageMismatchError", "merge", "split", "__version__"]
