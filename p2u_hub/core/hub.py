"""Fetching from the Hugging Face Hub: checkpoint sources and release stages, into the standard HF cache.

Tokens come from the usual ``HF_TOKEN`` / ``hf auth login`` and are only ever handed to
``huggingface_hub``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import TypeVar

import httpx2
from huggingface_hub import constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from ..errors import HubError, PushRefusedError, StageUnavailableError, UnsafePathError  # noqa: F401  (PushRefusedError: its old home)
from . import format as fmt

T = TypeVar("T")

OTHER_WEIGHT_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.ot", "*.gguf"]


def cached_repo_id(folder: str | os.PathLike) -> str | None:
    """The model repo id of a folder inside the HF cache (``models--org--name/snapshots/<sha>``), else None.

    A base loaded from the Hub is read from such a folder; its stages, when the config gives
    no repo, live on branches of this repo.
    """
    folder = Path(folder).absolute()
    if folder.parent.name != "snapshots" or not folder.parent.parent.name.startswith("models--"):
        return None
    return folder.parent.parent.name[len("models--") :].replace("--", "/")


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
    if revision is not None:
        fmt.check_revision(revision, str(source))
    try:
        with hub_errors(str(source)):
            folder = Path(snapshot_download(repo_id, revision=revision, token=token, ignore_patterns=OTHER_WEIGHT_PATTERNS))
    except RepositoryNotFoundError:
        raise StageUnavailableError(f"{source}: no local folder of that name and no Hub repo {repo_id!r}") from None
    except RevisionNotFoundError:
        raise StageUnavailableError(f"{source}: revision {revision!r} not found in {repo_id}") from None
    except (HfHubHTTPError, EntryNotFoundError, OSError) as error:
        raise StageUnavailableError(f"{source}: cannot download {repo_id} ({' '.join(str(error).split())})") from None
    return folder, repo_id, folder.name


def download_stage(entry: fmt.StageEntry, *, default_repo_id: str | None, token: str | bool | None = None) -> Path:
    """Download one stage's record and shard index into the standard HF cache (works offline once cached).

    Returns the stage's snapshot folder, at one commit; its weight files come one by one with
    ``download_file``, so that a reader can decode the first while the next ones download.
    Without a recorded revision the stage is looked for on ``p2u-stage-N``, then on the
    ``p2u/stage-N`` branch of releases pushed by older p2u-hub versions.
    """
    repo_id = check_repo_id(entry.repo_id or default_repo_id, entry.name)
    recorded = entry.commit or entry.revision
    revisions = [recorded] if recorded else [fmt.stage_branch(entry.index), fmt.legacy_stage_branch(entry.index)]
    stage_files = [fmt.STAGE_FILE, fmt.index_file_name(fmt.DELTA_WEIGHTS_NAME)]
    failure = f"revision {' or '.join(map(repr, revisions))} not found in {repo_id}"
    for revision in revisions:
        fmt.check_revision(revision, entry.name)
        try:
            with hub_errors(f"{entry.name}: {repo_id}@{revision}"):
                return Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=stage_files))
        except RevisionNotFoundError:
            continue
        except RepositoryNotFoundError:
            raise StageUnavailableError(f"{entry.name}: repo {repo_id!r} not found (or private without a token)") from None
        except (EntryNotFoundError, OSError) as error:  # offline: the other branch name may be the cached one
            failure = f"cannot download {repo_id}@{revision} ({error})"
    raise StageUnavailableError(f"{entry.name}: {failure}")


def look_up_stages(entries: Iterable[fmt.StageEntry], *, default_repo_id: str, token: str | bool | None = None) -> dict[int, Future[Path]]:
    """Start ``download_stage`` of every stage, side by side in background threads; each stage's future folder by index.

    For a loader that knows the base's repo before the base's weights download: the round
    trips of each stage's record and shard index then overlap the base's bytes instead of
    following them. A failure stays in its future, for the caller to look that stage up again
    and report it. The caller checks what a lookup found (``Release``): transformers' first hooks
    may see the name saved in ``config.json`` rather than the repo being loaded (a model class's
    own ``from_pretrained``; the Auto classes set it first), and that repo may hold another base's
    stages.
    """
    look_up = functools.partial(download_stage, default_repo_id=default_repo_id, token=token)
    return {entry.index: in_background("p2u-stage-lookup", look_up, entry) for entry in entries}


def in_background(name: str, function: Callable[..., T], *args: object) -> Future[T]:
    """``function(*args)`` in a daemon thread (a fetch left under way never holds up the interpreter's exit).

    Its error, too, goes to the returned future: to whoever waits for the result.
    """
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(function(*args))
        except BaseException as error:
            future.set_exception(error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


_downloading: dict[Path, Future[None]] = {}
"""Files this process is fetching now (``download_file``), each with the future its other callers wait on."""
_downloading_lock = threading.Lock()


def download_file(snapshot: Path, name: str, *, token: str | bool | None = None) -> Path:
    """File ``name`` of a snapshot folder of the HF cache (``models--org--name/snapshots/<commit>``), downloaded at that commit if absent.

    The snapshot's commit pins every file to the one the stage record came from, even if the
    branch moves meanwhile; a file already in the cache is returned without a request. Callers
    in this process asking for a file that another one is fetching (a prefetch, then the
    upgrade) wait for that download instead of starting their own: no second request, and no
    wait on huggingface_hub's file lock, which notices a released lock only at its next poll
    (every 50 ms). If that download fails, the caller tries on its own (with its own token).
    """
    path = fmt.release_file(snapshot, name)
    repo_id = cached_repo_id(snapshot)
    if path.is_file() or repo_id is None:
        return path
    with _downloading_lock:
        running = _downloading.get(path)
        if running is None:
            _downloading[path] = mine = Future[None]()
    if running is not None:
        with contextlib.suppress(Exception):
            running.result()
            return fmt.release_file(snapshot, name)
        return download_file(snapshot, name, token=token)
    try:
        with hub_errors(f"{repo_id}@{snapshot.name}: {name}"):
            hf_hub_download(repo_id, name, revision=snapshot.name, cache_dir=snapshot.parent.parent.parent, token=token)
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError, HfHubHTTPError, OSError) as error:
        mine.set_exception(error)
        raise StageUnavailableError(f"{repo_id}@{snapshot.name}: cannot download {name} ({' '.join(str(error).split())})") from None
    except BaseException as error:
        mine.set_exception(error)
        raise
    else:
        mine.set_result(None)
    finally:
        with _downloading_lock:
            del _downloading[path]
    return fmt.release_file(snapshot, name)  # checked again now that it is a link into the cache's blobs


def check_repo_id(repo_id: object, origin: str) -> str:
    """A Hub repo id as huggingface_hub validates it, before it is joined into a URL or a cache path."""
    try:
        if not isinstance(repo_id, str):
            raise TypeError(repo_id)
        validate_repo_id(repo_id)
    except (HFValidationError, TypeError):
        raise UnsafePathError(f"{origin}: {repo_id!r} is not a valid Hub repo id") from None
    return repo_id


@contextlib.contextmanager
def hub_errors(what: str) -> Iterator[None]:
    """Turn a transport failure (the Hub down, a refused connection, a timeout) into a HubError naming the endpoint.

    huggingface_hub raises its own errors for HTTP answers; a connection that never gets one
    surfaces as the HTTP library's exception, which says nothing of which repo was wanted.
    """
    try:
        yield
    except (httpx2.TransportError, ConnectionError, TimeoutError) as error:
        if "xet-" in str(error):  # hf_xet's own transport, which drops the server's message
            raise HubError(
                f"{what}: Xet storage failed at {constants.ENDPOINT} ({error}); a Hub without Xet (such as "
                "p2u's local Hub) needs HF_HUB_DISABLE_XET=1 in the environment"
            ) from None
        raise HubError(f"{what}: cannot reach the Hub at {constants.ENDPOINT} ({type(error).__name__}: {error})") from None
