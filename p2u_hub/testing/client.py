"""Point the ``huggingface_hub`` client of this process (and of its subprocesses) at a local Hub."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from unittest import mock
from urllib.parse import urlsplit

from huggingface_hub import constants, hf_api

from .hub_server import LocalHub


@contextlib.contextmanager
def local_hub_client(hub: LocalHub, hf_home: str | os.PathLike) -> Iterator[None]:
    """Point ``huggingface_hub`` at ``hub`` with a fresh HF home and cache under ``hf_home``; undo on exit.

    Environment variables reach subprocesses; this process also needs the ``huggingface_hub.constants`` they were
    read into at import time, and the module-level ``HfApi`` behind ``huggingface_hub.create_repo`` and friends,
    which copied ``constants.ENDPOINT`` when it was created.
    """
    hf_home = Path(hf_home)
    hub_cache = hf_home / "hub"
    environment = {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_DISABLE_XET": "1",  # the local Hub implements LFS uploads, not Xet
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",  # the CLI would otherwise look for updates on the (unreachable) internet
    }
    if hub.token is not None:
        environment["HF_TOKEN"] = hub.token
    constant_values = {
        "ENDPOINT": hub.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {urlsplit(hub.url).hostname},
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
    }
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, environment))
        for name in ("TRANSFORMERS_OFFLINE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH", *(() if hub.token else ("HF_TOKEN",))):
            os.environ.pop(name, None)
        for name, value in constant_values.items():
            stack.enter_context(mock.patch.object(constants, name, value))
        stack.enter_context(mock.patch.object(hf_api.api, "endpoint", hub.url))
        yield
