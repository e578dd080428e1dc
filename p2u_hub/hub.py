"""Fetching from the Hugging Face Hub: checkpoint sources and release stages, into the standard HF cache.

Tokens come from the usual ``HF_TOKEN`` / ``hf auth login`` and are only ever handed to
``huggingface_hub``.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.utils import validate_repo_id
from huggingface_hub.errors import EntryNotFoundError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

from . import format as fmt

OTHER_WEIGHT_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.ot", "*.gguf"]


class HubError(RuntimeError):
    """A Hub operation of p2u failed; the message names the repo and revision."""


class StageUnavailableError(HubError):
    """A stage or source cannot be fetched: unknown repo or revision, or the Hub cannot be reached."""


class PushRefusedError(HubError):
    """The Hub refused a write: no token, a wrong token, or no write access to the repo."""


def cached_repo_id(folder: str | os.PathLike) -> str | None:
    """The model repo id of a folder inside the HF cache (``models--org--name/snapshots/<sha>``), else None.

    A base loaded from the Hub is read from such a folder; its stages, when the config gives
    no repo, live on branches of this repo.
    """
    folder = Path(folder).absolute()
    if folder.parent.name != "snapshots" or not folder.parent.parent.name.startswith("models--"):
        return None
    return folder.parent.parent.name[len("models--") :].replace("--", "/")


def stage_branch(index: int) -> str:
    """Branch of stage ``index``: ``p2u/stage-1`` ... (also what ``hf upload --revision`` should use)."""
    return f"p2u/{fmt.stage_dir_name(index)}"


def parse_repo_reference(reference: str) -> tuple[str, str | None]:
    """``"org/model@rev"`` -> ``("org/model", "rev")``; no ``@`` -> revision None (main)."""
    repo_id, _, revision = reference.partition("@")
    return repo_id, revision or None


def resolve_source(source: str | os.PathLike, *, token: str | bool | None = None) -> tuple[Path, str | None, str | None]:
    """A local folder as is, or a Hub ``repo@revision`` downloaded with ``snapshot_download``.

    Returns (folder, repo_id, commit sha); repo_id and commit are None for a local folder.
    Pickle and other non-safetensors weights are not downloaded.
    """
    if Path(source).exists():
        return Path(source), None, None
    repo_id, revision = parse_repo_reference(str(source))
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise StageUnavailableError(f"{source}: no such local folder, and not a Hub repo id") from None
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, token=token, ignore_patterns=OTHER_WEIGHT_PATTERNS))
    except RepositoryNotFoundError:
        raise StageUnavailableError(f"{source}: no local folder of that name and no Hub repo {repo_id!r}") from None
    except RevisionNotFoundError:
        raise StageUnavailableError(f"{source}: revision {revision!r} not found in {repo_id}") from None
    return folder, repo_id, folder.name


def download_stage(entry: fmt.StageEntry, *, default_repo_id: str | None, token: str | bool | None = None) -> Path:
    """Download one stage folder into the standard HF cache (works offline once cached)."""
    repo_id = entry.repo_id or default_repo_id
    revision = entry.commit or entry.revision or stage_branch(entry.index)
    try:
        stage_files = [fmt.STAGE_FILE, f"{fmt.DELTA_WEIGHTS_NAME}*.safetensors*"]
        return Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=stage_files))
    except RepositoryNotFoundError:
        raise StageUnavailableError(f"{entry.name}: repo {repo_id!r} not found (or private without a token)") from None
    except RevisionNotFoundError:
        raise StageUnavailableError(f"{entry.name}: revision {revision!r} not found in {repo_id}") from None
    except (EntryNotFoundError, OSError) as error:
        raise StageUnavailableError(f"{entry.name}: cannot download {repo_id}@{revision} ({error})") from None
