"""Make transformers know the "p2u" quantization method in every interpreter where p2u-hub is installed.

transformers keeps its quantization methods in a table filled at import time and has no plug-in
discovery; meeting an unknown ``quant_method`` it only logs a warning and returns randomly
initialised weights. So p2u-hub installs ``p2u_hub.pth`` at the top of site-packages, which the
``site`` module runs at every interpreter start. Importing torch, transformers or even the
``p2u_hub`` package there would add seconds to every Python start, so the .pth executes this file
alone (standard library only), registered as ``p2u_hub._startup``. It puts an import hook first in
``sys.meta_path`` that lets ``transformers.quantizers.auto`` import as usual and, right after it
has, imports ``p2u_hub.integrations.transformers``, whose import registers p2u. ``import p2u_hub``
imports this module too, so the same happens without the .pth (e.g. from a source checkout).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings

QUANTIZER_TABLE = "transformers.quantizers.auto"
INTEGRATION = "p2u_hub.integrations.transformers"


def install() -> None:
    """Register p2u now if transformers' quantizer table is loaded, else as soon as it is. Idempotent."""
    if QUANTIZER_TABLE in sys.modules:
        importlib.import_module(INTEGRATION)
    elif not any(isinstance(finder, RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, RegisterAfterImport())


class RegisterAfterImport:
    """A ``sys.meta_path`` finder that wraps the loader of transformers' quantizer table, once."""

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname != QUANTIZER_TABLE:
            return None
        sys.meta_path.remove(self)  # one import to watch; the real finders locate the module
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = ThenRegister(spec.loader)  # type: ignore[assignment]  # a Loader in all but its base class
        return spec


class ThenRegister:
    """A loader that runs the real one, then imports the integration (whose import registers p2u).

    While the integration itself is being imported (it imports transformers' quantizers), the
    import below returns the half-initialised module and the integration registers when it ends.
    """

    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        try:
            importlib.import_module(INTEGRATION)
        except Exception as error:  # a broken p2u-hub must not break every use of transformers
            warnings.warn(f"p2u-hub could not register its quantizer with transformers: {error!r}", stacklevel=2)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)  # get_source, get_filename, ... for tracebacks and inspect


install()
