"""pytest fixture ``local_hub``: a running :class:`LocalHub` that ``huggingface_hub`` talks to, in process and in
subprocesses (the ``hf`` CLI, ``p2u``).

Enable it with ``pytest_plugins = ["p2u_hub.testing.pytest_plugin"]`` in the root ``conftest.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .client import local_hub_client
from .hub_server import LocalHub

LOCAL_HUB_TOKEN = "hf_local_test"
"""The token the fixture's hub requires for writes, and that the client sends (through ``HF_TOKEN``)."""


@pytest.fixture
def local_hub(tmp_path: Path) -> Iterator[LocalHub]:
    """A LocalHub requiring ``LOCAL_HUB_TOKEN`` for writes, with ``huggingface_hub`` pointed at it and logged in."""
    with LocalHub(tmp_path / "local-hub", token=LOCAL_HUB_TOKEN) as hub:
        with local_hub_client(hub, tmp_path / "hf-home"):
            yield hub
