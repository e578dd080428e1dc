"""Every error p2u-hub raises for a bad release, a bad argument or an unreachable Hub.

A release is untrusted input: whatever its files hold, a reader either gives the right
tensors or raises one of these, with a message naming the file, tensor, revision or repo at
fault. Catching ``P2UError`` catches them all (the CLI prints its message on one line).
``P2UFormatError`` also derives from ``ValueError``, as it always has.
"""

from __future__ import annotations

from typing import Any


class P2UError(Exception):
    """Base of every p2u-hub error; its message names the file, tensor, revision or repo at fault."""


class P2UFormatError(P2UError, ValueError):
    """A release folder or file does not follow the p2u format (names the file or tensor at fault)."""


class UnsafePathError(P2UFormatError):
    """A file name or revision from a release would leave its folder (``..``, absolute, a symlink out)."""


class StageMismatchError(P2UFormatError):
    """A stage does not belong to this base, or stages were applied out of order."""


class ChecksumError(P2UFormatError):
    """Bytes on disk or rebuilt in memory do not match the sha256 recorded in the manifest."""


class HubError(P2UError):
    """A Hub operation failed; the message names the repo, revision or endpoint.

    The local Hub server (``p2u_hub.testing``) raises it too, with the HTTP ``status`` to answer,
    the ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) the client maps
    to its own exceptions, extra ``headers`` and ``extra`` fields of the JSON body.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.headers = headers or {}
        self.extra = extra or {}


class StageUnavailableError(HubError):
    """A stage or source cannot be fetched: unknown repo or revision, or the Hub cannot be reached."""


class PushRefusedError(HubError):
    """The Hub refused a write: no token, a wrong token, or no write access to the repo."""
