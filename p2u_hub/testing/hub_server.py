"""A local Hugging Face Hub: a stdlib HTTP server the real ``huggingface_hub`` client talks to over loopback.

Tests and benchmarks need publishing and fetching to go through the very code paths users run (``HfApi``,
``hf_hub_download``, ``snapshot_download``, ``upload_folder``, the ``hf`` CLI) without the network. Point the client
at a running :class:`LocalHub` with ``HF_ENDPOINT=<hub.url>`` and ``HF_HUB_DISABLE_XET=1``: the server implements the
Hub's legacy upload path (preupload, LFS batch API with basic transfer, ndjson commits), not Xet.

What it covers: model, dataset and Space repos; branches, tags and commits (a commit that leaves the tree unchanged
is not a new commit, as on the Hub, so re-pushes are idempotent); ``/resolve`` downloads with the Hub's metadata
headers and byte ranges; repo info, refs, commit history, tree listings; and the Hub's error headers, so that the
client raises its usual ``RepositoryNotFoundError`` / ``RevisionNotFoundError`` / ``EntryNotFoundError``.

Storage under ``root``: ``blobs/`` is content addressed by sha256 and never garbage collected;
``repos/<type>/<namespace>/<name>.json`` holds a repo's refs and commits, each commit with its full tree. Every change
is written to a temporary file and moved in place, so a server restarted on the same root serves the same repos.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import ipaddress
import json
import os
import posixpath
import re
import secrets
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

from ..errors import HubError

try:
    import yaml
except ImportError:  # cardData is a nicety: without PyYAML, repo info simply has none
    yaml = None

USER = "local"
"""The one user of a local Hub: author of every commit, namespace of repos created without an organization."""

LFS_THRESHOLD = 10 * 1024 * 1024
"""Files above this size go through LFS whatever their name, like on the Hub."""

CHUNK_SIZE = 64 * 1024

LINK_QUEUE_S = 0.002
"""How far a paced download may catch up after coming late for its slot, like the queue of a real link. Without it,
each late wake-up (about 0.1 ms per 64 KiB chunk) was lost: one download got about 80% of ``rate_mbps`` at 100 MB/s."""

MAX_BODY_BYTES = 64 * 1024 * 1024
"""Largest request body read into memory (JSON, ndjson commits); bigger ones get a 413. LFS uploads stream to disk."""

XET_DISABLED_MESSAGE = (
    "The local Hub does not implement Xet storage; set HF_HUB_DISABLE_XET=1 in the client's environment "
    "so that huggingface_hub uploads through LFS"
)

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}

DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
        "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
        "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*",
        "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)  # fmt: skip
"""The ``.gitattributes`` of a new repo's initial commit: the Hub's default LFS rules."""

_NAME = re.compile(r"[A-Za-z0-9][\w.-]{0,95}")
_COMMIT_OID = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REF_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]{0,199}")


def _now() -> str:
    """UTC time in the one format ``huggingface_hub`` parses (``2024-01-31T12:00:00.000Z``)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_oid(data: bytes) -> str:
    """The git object id of a file, which the client compares with preupload's ``oid`` to skip unchanged files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    """The git LFS pointer file standing for an LFS file in git: its git oid is the file's ``oid`` on the Hub."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _lfs_entry(sha256: str, size: int) -> dict[str, Any]:
    return {"sha256": sha256, "size": size, "lfs": True, "oid": _git_blob_oid(_lfs_pointer(sha256, size))}


def _pointer_size(entry: dict[str, Any]) -> int:
    return len(_lfs_pointer(entry["sha256"], entry["size"]))


def _write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary file then rename, so a crash or a concurrent reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as file:
            json.dump(data, file)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _check_loopback(host: str) -> None:
    """The server has no TLS and trusts a single token: it must never be reachable from another machine."""
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"LocalHub listens on loopback only (127.0.0.1, ::1 or localhost), not {host!r}")


@dataclass(frozen=True)
class _Change:
    """One line of an ndjson commit: ``entry`` is the file's new tree entry, None deletes the path."""

    path: str
    entry: dict[str, Any] | None
    folder: bool = False


@dataclass
class _Repo:
    """A repo's persistent state. Commits are immutable once stored, so readers may keep them outside the lock."""

    type: str
    id: str
    private: bool
    created_at: str
    commits: dict[str, dict[str, Any]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> dict[str, Any]:
        """The commit a branch, tag or commit oid names."""
        oid = self.branches.get(revision) or self.tags.get(revision) or revision
        if oid not in self.commits:
            raise HubError(f"Invalid rev id: {revision}", status=404, code="RevisionNotFound")
        return self.commits[oid]

    def add_commit(self, parent: str | None, tree: dict[str, Any], title: str, message: str) -> str:
        """Store a commit whose oid hashes parent, tree and message: the same change twice is the same commit."""
        identity = json.dumps({"parent": parent, "tree": tree, "title": title, "message": message}, sort_keys=True)
        oid = hashlib.sha1(identity.encode()).hexdigest()
        commit = {"oid": oid, "parent": parent, "title": title, "message": message, "author": USER, "tree": tree}
        self.commits.setdefault(oid, {**commit, "date": _now()})
        return oid


class _Store:
    """Blobs and repos on disk, with one lock around all repo state."""

    def __init__(self, root: Path) -> None:
        self._blobs = root / "blobs"
        self._repos_dir = root / "repos"
        self._tmp = root / "tmp"
        for folder in (self._blobs, self._repos_dir, self._tmp):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], _Repo] = {}
        for path in self._repos_dir.glob("*/*/*.json"):
            repo = _Repo(**json.loads(path.read_text()))
            self._repos[repo.type, repo.id] = repo

    def blob_path(self, sha256: str) -> Path:
        return self._blobs / sha256[:2] / sha256

    def read_blob(self, sha256: str) -> bytes:
        return self.blob_path(sha256).read_bytes()

    def blob_size(self, sha256: str) -> int | None:
        """Size of a stored blob, None when it is not stored."""
        path = self.blob_path(sha256)
        return path.stat().st_size if _SHA256.fullmatch(sha256) and path.is_file() else None

    def write_blob(self, chunks: Iterable[bytes], expected: tuple[str, int] | None = None) -> tuple[str, int]:
        """Store a blob streamed in chunks and return (sha256, size); refuse it if ``expected`` does not match."""
        digest = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=self._tmp)
        try:
            with os.fdopen(fd, "wb") as file:
                for chunk in chunks:
                    digest.update(chunk)
                    file.write(chunk)
                    size += len(chunk)
            sha256 = digest.hexdigest()
            if expected is not None and expected != (sha256, size):
                raise HubError(f"Uploaded content does not match oid {expected[0]} and size {expected[1]}", status=400)
            self.blob_path(sha256).parent.mkdir(exist_ok=True)
            os.replace(tmp, self.blob_path(sha256))
        finally:
            Path(tmp).unlink(missing_ok=True)
        return sha256, size

    def add_regular_file(self, data: bytes) -> dict[str, Any]:
        """Store a file committed inline (not through LFS) and return its tree entry."""
        sha256, size = self.write_blob([data])
        return {"sha256": sha256, "size": size, "lfs": False, "oid": _git_blob_oid(data)}

    def get(self, repo_type: str, repo_id: str) -> _Repo:
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(f"Repository not found: {repo_id}", status=404, code="RepoNotFound")
        return repo

    def lookup(self, repo_type: str, repo_id: str, revision: str) -> tuple[_Repo, dict[str, Any]]:
        with self._lock:
            repo = self.get(repo_type, repo_id)
            return repo, repo.resolve(revision)

    def refs(self, repo_type: str, repo_id: str) -> tuple[dict[str, str], dict[str, str]]:
        """Copies of (branches, tags), safe to read while other requests move refs."""
        with self._lock:
            repo = self.get(repo_type, repo_id)
            return dict(repo.branches), dict(repo.tags)

    def history(self, repo_type: str, repo_id: str, revision: str) -> list[dict[str, Any]]:
        """Commits reachable from ``revision``, newest first."""
        with self._lock:
            repo, commit = self.lookup(repo_type, repo_id, revision)
            commits = [commit]
            while commits[-1]["parent"] is not None:
                commits.append(repo.commits[commits[-1]["parent"]])
        return commits

    def create(self, repo_type: str, repo_id: str, private: bool) -> bool:
        """Create a repo with the Hub's initial commit (a default ``.gitattributes``); False if it exists."""
        gitattributes = self.add_regular_file(DEFAULT_GITATTRIBUTES.encode())
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                return False
            repo = _Repo(type=repo_type, id=repo_id, private=private, created_at=_now())
            repo.branches["main"] = repo.add_commit(None, {".gitattributes": gitattributes}, "initial commit", "")
            self._repos[repo_type, repo_id] = repo
            self._save(repo)
        return True

    def delete(self, repo_type: str, repo_id: str) -> None:
        with self._lock:
            self.get(repo_type, repo_id)
            del self._repos[repo_type, repo_id]
            self._repo_file(repo_type, repo_id).unlink()

    def commit(
        self,
        repo_type: str,
        repo_id: str,
        branch: str,
        *,
        title: str,
        message: str,
        changes: list[_Change],
        parent_commit: str | None,
    ) -> str:
        """Apply ``changes`` on top of ``branch``; return the new head, or the old one if the tree did not change."""
        with self._lock:
            repo = self.get(repo_type, repo_id)
            if branch not in repo.branches:
                raise HubError(f"Invalid rev id: {branch} is not a branch", status=404, code="RevisionNotFound")
            head = repo.commits[repo.branches[branch]]
            if parent_commit is not None and not head["oid"].startswith(parent_commit):
                raise HubError("A commit has happened since. Please refresh and try again.", status=412)
            tree = _apply_changes(head["tree"], changes)
            if tree == head["tree"]:
                return head["oid"]
            repo.branches[branch] = repo.add_commit(head["oid"], tree, title, message)
            self._save(repo)
            return repo.branches[branch]

    def create_ref(self, repo_type: str, repo_id: str, kind: str, name: str, revision: str) -> None:
        """Point a new branch or tag (``kind`` is ``"branches"`` or ``"tags"``) at ``revision``; 409 if it exists."""
        if (
            not isinstance(name, str)
            or not _REF_NAME.fullmatch(name)
            or _COMMIT_OID.fullmatch(name)
            or ".." in name
            or "//" in name
            or name.endswith(("/", ".", ".lock"))
            or "/." in name
        ):  # fmt: skip  (git check-ref-format's rules, plus: not a commit id)
            raise HubError(f"Invalid reference name: {name!r}", status=400)
        with self._lock:
            repo = self.get(repo_type, repo_id)
            refs: dict[str, str] = getattr(repo, kind)
            if name in refs:
                raise HubError(f"Reference already exists: {name}", status=409)
            refs[name] = repo.resolve(revision)["oid"]
            self._save(repo)

    def delete_ref(self, repo_type: str, repo_id: str, kind: str, name: str) -> None:
        with self._lock:
            repo = self.get(repo_type, repo_id)
            refs: dict[str, str] = getattr(repo, kind)
            if kind == "branches" and name == "main":
                raise HubError("The main branch cannot be deleted", status=403)
            if refs.pop(name, None) is None:
                raise HubError(f"Invalid rev id: {name}", status=404, code="RevisionNotFound")
            self._save(repo)

    def _repo_file(self, repo_type: str, repo_id: str) -> Path:
        return self._repos_dir / repo_type / f"{repo_id}.json"

    def _save(self, repo: _Repo) -> None:
        _write_json_atomic(self._repo_file(repo.type, repo.id), asdict(repo))


def _apply_changes(tree: dict[str, Any], changes: list[_Change]) -> dict[str, Any]:
    new_tree = dict(tree)
    for change in changes:
        if change.folder:
            doomed = [path for path in new_tree if path.startswith(change.path.rstrip("/") + "/")]
        else:
            doomed = [change.path] if change.entry is None else []
        if change.entry is None and not doomed:
            raise HubError(f"A file with this name doesn't exist: {change.path}", status=404, code="EntryNotFound")
        for path in doomed:
            del new_tree[path]
        if change.entry is not None:
            new_tree[change.path] = change.entry
    return new_tree


def _clean_path(path: str) -> str:
    """A path in a repo, refused when it could escape the repo or is not canonical."""
    parts = path.split("/") if isinstance(path, str) else [""]
    if not path or "\\" in path or "\x00" in path or len(path) > 1024 or any(part in ("", ".", "..", ".git") for part in parts):
        raise HubError(f"Invalid path in repo: {path!r}", status=400)
    return path


def _lfs_patterns(gitattributes: str) -> list[str]:
    return [line.split()[0] for line in gitattributes.splitlines() if "filter=lfs" in line.split()[1:]]


def _wants_lfs(path: str, size: int, sample: bytes, patterns: list[str]) -> bool:
    """The Hub's preupload rule: big files, binary files and files an LFS rule of ``.gitattributes`` matches."""
    return (
        size > LFS_THRESHOLD
        or b"\0" in sample
        or any(fnmatch.fnmatchcase(path if "/" in pattern else posixpath.basename(path), pattern.lstrip("/")) for pattern in patterns)
    )


def _card_data(readme: bytes) -> dict[str, Any] | None:
    """The YAML front matter of a README.md, which the Hub returns as ``cardData``."""
    match = re.match(rb"---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|$)", readme, re.DOTALL)
    if yaml is None or match is None:
        return None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def _file_json(path: str, entry: dict[str, Any]) -> dict[str, Any]:
    """A file as the tree and paths-info endpoints describe it."""
    info: dict[str, Any] = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
    if entry["lfs"]:
        info["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": _pointer_size(entry)}
    return info


def _path_entries(tree: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every file and folder of a tree, by path; a folder's oid hashes what it contains."""
    members: dict[str, list[str]] = {}
    for path, entry in tree.items():
        parts = path.split("/")
        for depth in range(1, len(parts)):
            members.setdefault("/".join(parts[:depth]), []).append(f"{entry['oid']} {path}")
    entries = {
        folder: {
            "type": "directory",
            "oid": hashlib.sha1("\n".join(sorted(lines)).encode()).hexdigest(),
            "size": 0,
            "path": folder,
        }
        for folder, lines in members.items()
    }
    entries.update((path, _file_json(path, entry)) for path, entry in tree.items())
    return entries


def _repo_key(kind: str, namespace: str, name: str) -> tuple[str, str]:
    """(repo type, repo id) from the ``models|datasets|spaces/{namespace}/{name}`` of a URL."""
    return REPO_TYPES[kind], f"{namespace}/{name}"


def _in_listing(path: str, folder: str, recursive: bool) -> bool:
    if recursive:
        return not folder or path.startswith(folder + "/")
    return posixpath.dirname(path) == folder


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) of a single ``bytes=`` range; None without one; 416 when it cannot be served."""
    if header is None:
        return None
    unsatisfiable = HubError(f"Range not satisfiable: {header}", status=416, headers={"Content-Range": f"bytes */{size}"})
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if match is None or match.groups() == ("", ""):
        raise unsatisfiable
    first, last = match.groups()
    if first == "":  # a suffix: the last bytes
        start, end = max(size - int(last), 0), size
    else:
        start, end = int(first), min(int(last) + 1, size) if last else size
    if start >= end:
        raise unsatisfiable
    return start, end


class _Handler(BaseHTTPRequestHandler):
    """Routes Hub API requests to the store. HTTP/1.1 keep-alive, since the client pools its connections."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = 60
    server: _HubHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: tests stay readable, and no header (a token) can end up in a log."""

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def _dispatch(self) -> None:
        raw_path, _, raw_query = self.path.partition("?")
        self.query = parse_qs(raw_query)
        self._body_read = False
        method = "GET" if self.command == "HEAD" else self.command
        try:
            for route_method, pattern, handler in self._routes:
                match = pattern.fullmatch(raw_path)
                if match is not None and route_method == method:
                    handler(self, **{key: unquote(value) for key, value in match.groupdict().items() if value})
                    break
            else:
                raise HubError(f"Not found: {self.command} {raw_path}", status=404)
        except HubError as error:
            if error.status == 413:
                self.close_connection = True  # not worth reading: answer and hang up
            else:
                self._drain_body()
            self._send_error(error)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as error:
            self._drain_body()
            self._send_error(HubError(f"Malformed request: {error!r}", status=400))
        except ConnectionError:
            self.close_connection = True
        finally:
            if not self._body_read and (self.headers.get("Content-Length", "0") != "0" or self._is_chunked()):
                self.close_connection = True  # an unread body would be parsed as the next request

    # ---- request and response plumbing

    @property
    def _store(self) -> _Store:
        store = self.server.hub._store
        if store is None:  # the server thread starts after the store exists; this would be a LocalHub bug
            raise RuntimeError("LocalHub is serving without a store")
        return store

    def _base_url(self) -> str:
        """The address the client used, so that URLs handed back (LFS uploads) reach this server as it sees it."""
        host = self.headers.get("Host")
        return f"http://{host}" if host else self.server.hub.url

    def _is_chunked(self) -> bool:
        return "chunked" in self.headers.get("Transfer-Encoding", "").lower()

    def _body_chunks(self) -> Iterator[bytes]:
        """The request body, de-chunked when the client streams it with ``Transfer-Encoding: chunked``."""
        if self._is_chunked():
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunk = self.rfile.read(size)
                if len(chunk) != size:
                    raise ConnectionError("client closed the connection mid-body")
                yield chunk
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers
                pass
        else:
            remaining = self._content_length()
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, CHUNK_SIZE))
                if not chunk:
                    raise ConnectionError("client closed the connection mid-body")
                remaining -= len(chunk)
                yield chunk
        self._body_read = True

    def _content_length(self) -> int:
        value = self.headers.get("Content-Length") or "0"
        if not value.isdigit():
            self._body_read = True  # unknown length: nothing can be read, the connection closes after the answer
            raise HubError(f"Malformed request: Content-Length {value!r} is not a byte count", status=400)
        return int(value)

    def _drain_body(self) -> None:
        """Read an unread request body before answering an error: a client still sending it would see a reset."""
        if self._body_read:
            return
        try:
            for _ in self._body_chunks():
                pass
        except (ConnectionError, ValueError, HubError):
            self.close_connection = True

    def _read_body(self) -> bytes:
        """The whole body, refused with a 413 past ``MAX_BODY_BYTES`` (checked before and while reading)."""
        if not self._is_chunked() and self._content_length() > MAX_BODY_BYTES:
            raise HubError(f"Request body of {self._content_length()} bytes is larger than {MAX_BODY_BYTES}", status=413)
        body = bytearray()
        for chunk in self._body_chunks():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise HubError(f"Request body is larger than {MAX_BODY_BYTES} bytes", status=413)
        return bytes(body)

    def _json(self) -> dict[str, Any]:
        body = self._read_body()
        value = json.loads(body) if body.strip() else {}
        if not isinstance(value, dict):
            raise HubError(f"Malformed request: the body must be a JSON object, not {type(value).__name__}", status=400)
        return value

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {}), "Content-Length": str(len(body))}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _send_error(self, error: HubError) -> None:
        headers = {"X-Error-Message": " ".join(error.message.encode("ascii", "replace").decode().split())}
        if error.code is not None:
            headers["X-Error-Code"] = error.code
        self._send_json({"error": error.message, **error.extra}, error.status or 500, {**headers, **error.headers})

    def _authenticate(self, *, always: bool = False) -> None:
        """Writes need the hub's token when it has one; ``always`` asks for some token even when it has none."""
        expected = self.server.hub.token
        if expected is None and not always:
            return
        authorization = self.headers.get("Authorization", "")
        if not authorization.startswith("Bearer "):
            raise HubError("Authentication required: send a token in the Authorization header", status=401)
        if expected is not None and not hmac.compare_digest(authorization[7:].encode(), expected.encode()):
            raise HubError("Invalid credentials in Authorization header", status=401)

    def _readable(self, repo_type: str, repo_id: str) -> None:
        """Reading a private repo needs a token, as on the Hub (which answers as if the repo did not exist)."""
        if self._store.get(repo_type, repo_id).private:
            try:
                self._authenticate(always=True)
            except HubError:
                raise HubError(f"Repository not found: {repo_id} (private: send a token)", status=401, code="RepoNotFound") from None

    # ---- account

    def whoami(self) -> None:
        self._authenticate(always=True)
        auth = {"type": "access_token", "accessToken": {"displayName": USER, "role": "write"}}
        self._send_json({"type": "user", "name": USER, "fullname": "Local Hub user", "orgs": [], "auth": auth})

    def validate_yaml(self) -> None:
        self._read_body()
        self._send_json({"errors": [], "warnings": []})

    # ---- repos

    def create_repo(self) -> None:
        self._authenticate()
        body = self._json()
        repo_type = body.get("type") or "model"
        namespace, name = body.get("organization") or USER, body["name"]
        if repo_type not in URL_PREFIXES:
            raise HubError(f"Unsupported repo type: {repo_type}", status=400)
        if not (_NAME.fullmatch(namespace) and _NAME.fullmatch(name)) or name.endswith(".git") or ".." in name:
            raise HubError(f"Invalid repo name: {namespace}/{name}", status=400)
        repo_id = f"{namespace}/{name}"
        url = f"{self._base_url()}/{URL_PREFIXES[repo_type]}{repo_id}"
        private = body.get("visibility") == "private" or bool(body.get("private"))
        if not self._store.create(repo_type, repo_id, private):
            raise HubError(f"You already created this {repo_type} repo", status=409, extra={"url": url})
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def delete_repo(self) -> None:
        self._authenticate()
        body = self._json()
        self._store.delete(body.get("type") or "model", f"{body.get('organization') or USER}/{body['name']}")
        self._send_json({})

    def repo_info(self, kind: str, ns: str, name: str, rev: str = "main") -> None:
        self._readable(*_repo_key(kind, ns, name))
        repo, commit = self._store.lookup(*_repo_key(kind, ns, name), rev)
        tree = commit["tree"]
        card = _card_data(self._store.read_blob(tree["README.md"]["sha256"])) if "README.md" in tree else None
        tags = card.get("tags") if card is not None else None
        siblings = []
        for path, entry in sorted(tree.items()):
            sibling = {"rfilename": path, "size": entry["size"], "blobId": entry["oid"]}
            if entry["lfs"]:
                sibling["lfs"] = {"size": entry["size"], "sha256": entry["sha256"], "pointerSize": _pointer_size(entry)}
            siblings.append(sibling)
        payload = {
            "id": repo.id,
            "author": ns,
            "sha": commit["oid"],
            "lastModified": commit["date"],
            "createdAt": repo.created_at,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": tags if isinstance(tags, list) else [],
            "siblings": siblings,
        }
        if card is not None:
            payload["cardData"] = card
        self._send_json(payload)

    def refs(self, kind: str, ns: str, name: str) -> None:
        self._readable(*_repo_key(kind, ns, name))
        branches, tags = self._store.refs(*_repo_key(kind, ns, name))

        def refs_json(refs: dict[str, str], prefix: str) -> list[dict[str, str]]:
            return [{"name": n, "ref": f"{prefix}{n}", "targetCommit": oid} for n, oid in sorted(refs.items())]

        self._send_json({
            "branches": refs_json(branches, "refs/heads/"),
            "converts": [],
            "tags": refs_json(tags, "refs/tags/"),
            "pullRequests": [],
        })  # fmt: skip

    def create_branch(self, kind: str, ns: str, name: str, ref: str) -> None:
        self._authenticate()
        starting_point = self._json().get("startingPoint") or "main"
        self._store.create_ref(*_repo_key(kind, ns, name), "branches", ref, starting_point)
        self._send_json({})

    def create_tag(self, kind: str, ns: str, name: str, ref: str) -> None:
        """``ref`` is the revision to tag; the tag's name comes in the body."""
        self._authenticate()
        self._store.create_ref(*_repo_key(kind, ns, name), "tags", self._json()["tag"], ref)
        self._send_json({})

    def delete_ref(self, kind: str, ns: str, name: str, ref: str, kind_of_ref: str) -> None:
        self._authenticate()
        self._store.delete_ref(*_repo_key(kind, ns, name), kind_of_ref, ref)
        self._send_json({})

    def commits(self, kind: str, ns: str, name: str, rev: str) -> None:
        self._readable(*_repo_key(kind, ns, name))
        history = self._store.history(*_repo_key(kind, ns, name), rev)
        self._send_json([
            {
                "id": commit["oid"],
                "title": commit["title"],
                "message": commit["message"],
                "authors": [{"user": commit["author"]}],
                "date": commit["date"],
            }
            for commit in history
        ])  # fmt: skip

    def tree(self, kind: str, ns: str, name: str, rev: str, path: str = "") -> None:
        self._readable(*_repo_key(kind, ns, name))
        _, commit = self._store.lookup(*_repo_key(kind, ns, name), rev)
        entries = _path_entries(commit["tree"])
        folder = path.strip("/")
        if folder and entries.get(folder, {}).get("type") != "directory":
            raise HubError(f"Folder not found: {folder}", status=404, code="EntryNotFound")
        recursive = self.query.get("recursive") == ["true"]
        self._send_json([entry for p, entry in sorted(entries.items()) if _in_listing(p, folder, recursive)])

    def paths_info(self, kind: str, ns: str, name: str, rev: str) -> None:
        form = parse_qs(self._read_body().decode())
        self._readable(*_repo_key(kind, ns, name))
        _, commit = self._store.lookup(*_repo_key(kind, ns, name), rev)
        entries = _path_entries(commit["tree"])
        self._send_json([entries[p.strip("/")] for p in form.get("paths", []) if p.strip("/") in entries])

    # ---- uploads

    def preupload(self, kind: str, ns: str, name: str, rev: str) -> None:
        self._authenticate()
        files = self._json()["files"]
        _, commit = self._store.lookup(*_repo_key(kind, ns, name), rev)
        tree = commit["tree"]
        gitattributes = tree.get(".gitattributes")
        patterns = _lfs_patterns(self._store.read_blob(gitattributes["sha256"]).decode()) if gitattributes else []
        answers = []
        for file in files:
            lfs = _wants_lfs(file["path"], file["size"], base64.b64decode(file.get("sample", "")), patterns)
            answer: dict[str, Any] = {
                "path": file["path"],
                "uploadMode": "lfs" if lfs else "regular",
                "shouldIgnore": False,
            }
            if (entry := tree.get(file["path"])) is not None:
                answer["oid"] = entry["sha256"] if entry["lfs"] else entry["oid"]
            answers.append(answer)
        self._send_json({"files": answers})

    def commit(self, kind: str, ns: str, name: str, rev: str) -> None:
        self._authenticate()
        if self.query.get("create_pr") == ["1"]:
            raise HubError("Pull requests are not supported by the local Hub", status=400)
        repo_type, repo_id = _repo_key(kind, ns, name)
        self._store.get(repo_type, repo_id)
        lines = [json.loads(line) for line in self._read_body().splitlines() if line.strip()]
        header: dict = next((line["value"] for line in lines if line["key"] == "header"), {})
        changes = [self._change(line["key"], line["value"]) for line in lines if line["key"] != "header"]
        oid = self._store.commit(
            repo_type,
            repo_id,
            rev,
            title=header.get("summary", ""),
            message=header.get("description", ""),
            changes=changes,
            parent_commit=header.get("parentCommit"),
        )
        url = f"{self._base_url()}/{URL_PREFIXES[repo_type]}{repo_id}/commit/{oid}"
        self._send_json({"success": True, "commitOid": oid, "commitUrl": url, "hookOutput": "", "pullRequestUrl": None})

    def _change(self, key: str, value: dict[str, Any]) -> _Change:
        path = _clean_path(value["path"])
        if key == "file":
            content = value["content"]
            data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
            return _Change(path, self._store.add_regular_file(data))
        if key == "lfsFile":
            size = self._store.blob_size(value["oid"])
            if size is None:
                raise HubError(f"LFS object {value['oid']} of {path} was never uploaded", status=400)
            return _Change(path, _lfs_entry(value["oid"], size))
        if key in ("deletedFile", "deletedFolder"):
            return _Change(path, None, folder=key == "deletedFolder")
        raise HubError(f"Unknown commit operation: {key}", status=400)

    def lfs_batch(self, ns: str, name: str, kind: str = "models") -> None:
        self._authenticate()
        body = self._json()
        self._store.get(*_repo_key(kind, ns, name))
        if body.get("operation") != "upload":
            raise HubError("The local Hub only supports LFS uploads (download through /resolve)", status=400)
        objects = []
        for obj in body["objects"]:
            oid, size = obj["oid"], obj["size"]
            if not _SHA256.fullmatch(oid):
                raise HubError(f"Invalid LFS oid: {oid}", status=400)
            if self._store.blob_size(oid) == size:
                objects.append({"oid": oid, "size": size})  # no actions: the client skips the upload
                continue
            upload = f"{self._base_url()}/_lfs/{oid}?size={size}&sig={self.server.hub._sign(oid, size)}"
            verify = f"{self._base_url()}/_lfs/{oid}/verify"
            actions = {"upload": {"href": upload}, "verify": {"href": verify}}
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
        payload = {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}
        self._send_json(payload, headers={"Content-Type": "application/vnd.git-lfs+json"})

    def lfs_upload(self, oid: str) -> None:
        """The basic-transfer PUT: it has no Authorization header (on the Hub it goes to S3), hence the signature."""
        size = self.query.get("size", [""])[0]
        signature = self.query.get("sig", [""])[0]
        if not (size.isdigit() and hmac.compare_digest(signature, self.server.hub._sign(oid, int(size)))):
            raise HubError("Invalid upload URL signature", status=403)
        if not self._is_chunked() and self._content_length() != int(size):
            raise HubError(f"Upload of {self._content_length()} bytes, the batch request announced {size}", status=413)
        self._store.write_blob(self._body_chunks(), expected=(oid, int(size)))
        self._send(200)

    def lfs_verify(self, oid: str) -> None:
        self._authenticate()
        if self._store.blob_size(oid) != self._json().get("size"):
            raise HubError(f"LFS object {oid} not found", status=404)
        self._send_json({"success": True})

    # ---- downloads

    def resolve(self, ns: str, name: str, rev: str, path: str, kind: str = "models") -> None:
        self.server.hub._count_request(self.command, path)
        self._readable(*_repo_key(kind, ns, name))
        _, commit = self._store.lookup(*_repo_key(kind, ns, name), rev)
        headers = {"X-Repo-Commit": commit["oid"]}
        entry = commit["tree"].get(path)
        if entry is None:
            raise HubError(f"Entry not found: {path}", status=404, code="EntryNotFound", headers=headers)
        size = entry["size"]
        if entry["lfs"]:  # the client names cached blobs by this etag: sha256 for LFS files, git oid otherwise
            etag = f'"{entry["sha256"]}"'
            headers.update({"ETag": etag, "X-Linked-Etag": etag, "X-Linked-Size": str(size)})
        else:
            headers["ETag"] = f'"{entry["oid"]}"'
        byte_range = _parse_range(self.headers.get("Range"), size)
        start, end = byte_range or (0, size)
        self.send_response(206 if byte_range else 200)
        headers.update({"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes", "Content-Length": str(end - start)})
        if byte_range:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        for header, value in headers.items():
            self.send_header(header, value)
        self.end_headers()
        if self.command == "GET":
            self.server.hub._wait_if_held(path)
            self._send_blob(self._store.blob_path(entry["sha256"]), start, end)

    def _send_blob(self, blob: Path, start: int, end: int) -> None:
        """Stream a byte range of a blob, paced by the hub's rate and cut in half when a drop is pending."""
        hub = self.server.hub
        dropped = hub._take_drop()
        remaining = (end - start) // 2 if dropped else end - start
        with blob.open("rb") as file:
            file.seek(start)
            while remaining > 0:
                chunk = file.read(min(CHUNK_SIZE, remaining))
                hub._pace(len(chunk))
                self.wfile.write(chunk)
                remaining -= len(chunk)
        if dropped:
            self.close_connection = True  # the client sees the body end early, like a connection reset mid-download

    _API = r"/api/(?P<kind>models|datasets|spaces)/(?P<ns>[^/]+)/(?P<name>[^/]+)"
    _WEB = r"(?:/(?P<kind>datasets|spaces))?/(?P<ns>[^/]+)/(?P<name>[^/]+?)"

    def xet(self, **_: str) -> None:
        self._drain_body()
        raise HubError(XET_DISABLED_MESSAGE, status=501)

    _routes = [
        (method, re.compile(pattern), handler)
        for method, pattern, handler in (
            ("GET", r"/api/whoami-v2", whoami),
            ("POST", r"/api/validate-yaml", validate_yaml),
            ("POST", r"/api/repos/create", create_repo),
            ("DELETE", r"/api/repos/delete", delete_repo),
            ("GET", _API + r"(?:/revision/(?P<rev>[^/]+))?", repo_info),
            ("GET", _API + r"/refs", refs),
            ("GET", _API + r"/commits/(?P<rev>[^/]+)", commits),
            ("GET", _API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", tree),
            ("POST", _API + r"/paths-info/(?P<rev>[^/]+)", paths_info),
            ("POST", _API + r"/preupload/(?P<rev>[^/]+)", preupload),
            ("POST", _API + r"/commit/(?P<rev>[^/]+)", commit),
            ("POST", _API + r"/branch/(?P<ref>[^/]+)", create_branch),
            ("DELETE", _API + r"/branch/(?P<ref>[^/]+)", partial(delete_ref, kind_of_ref="branches")),
            ("POST", _API + r"/tag/(?P<ref>[^/]+)", create_tag),
            ("DELETE", _API + r"/tag/(?P<ref>[^/]+)", partial(delete_ref, kind_of_ref="tags")),
            ("GET", _WEB + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", resolve),
            ("POST", _WEB + r"\.git/info/lfs/objects/batch", lfs_batch),
            ("PUT", r"/_lfs/(?P<oid>[0-9a-f]{64})", lfs_upload),
            ("POST", r"/_lfs/(?P<oid>[0-9a-f]{64})/verify", lfs_verify),
            ("GET", _API + r"/xet-(?:read|write)-token/.*", xet),
            ("POST", _API + r"/xet-(?:read|write)-token/.*", xet),
        )
    ]


class _HubHTTPServer(ThreadingHTTPServer):
    """Serves one LocalHub and tracks open connections, so that stopping cuts off keep-alive clients too."""

    daemon_threads = True
    request_queue_size = 128  # snapshot_download opens several connections at once

    def __init__(self, address: tuple[str, int], hub: LocalHub) -> None:
        self.hub = hub
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients hanging up (a cancelled download) are routine; anything else is a server bug worth a traceback."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _HubHTTPServerV6(_HubHTTPServer):
    address_family = socket.AF_INET6


class LocalHub:
    """A Hub-compatible server on loopback, storing its repos under ``root``.

    ``token``: when set, every write (create or delete a repo, preupload, commit, branch, tag, LFS upload) needs
    ``Authorization: Bearer <token>`` and gets a 401 otherwise; reads of public repos are always allowed, reads of
    private repos need a token (the hub's, when it has one), as on the Hub. ``rate_mbps``: pace the
    bodies of ``/resolve`` downloads to that many MB/s (1 MB = 1e6 bytes) in total, like one network link, for
    download-time benchmarks; it can be changed while the server runs, and setting it starts a new link
    (``link_idle_s`` counts from there).

    Use as a context manager, or ``start()`` / ``stop()``::

        with LocalHub(tmp_path) as hub:
            os.environ["HF_ENDPOINT"] = hub.url  # plus HF_HUB_DISABLE_XET=1; see p2u_hub.testing.pytest_plugin
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        host: str = "127.0.0.1",
        port: int = 0,
        rate_mbps: float | None = None,
        token: str | None = None,
    ) -> None:
        _check_loopback(host)
        self.root = Path(root)
        self.host = host
        self.token = token
        self._port = port
        self._store: _Store | None = None  # created by start(), once the port is bound: a busy port leaves no folder
        self._lock = threading.Lock()
        self._rate_mbps: float | None = None
        self._next_send = 0.0
        self._link_idle_s = 0.0
        self._drops_pending = 0
        self._holds: dict[str, threading.Event] = {}
        self._resolved: Counter[tuple[str, str]] = Counter()  # /resolve requests per (method, file path): bounded by the files
        self._upload_key = secrets.token_bytes(32)
        self._server: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.rate_mbps = rate_mbps

    @property
    def url(self) -> str:
        """``http://host:port`` of the running server: the value for ``HF_ENDPOINT``."""
        if self._server is None:
            raise RuntimeError("LocalHub is not running")
        host, port = self._server.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def rate_mbps(self) -> float | None:
        return self._rate_mbps

    @rate_mbps.setter
    def rate_mbps(self, value: float | None) -> None:
        if value is not None and value <= 0:
            raise ValueError(f"rate_mbps must be positive or None, not {value}")
        with self._lock:
            self._rate_mbps = value
            self._next_send = 0.0
            self._link_idle_s = 0.0

    @property
    def link_idle_s(self) -> float:
        """Seconds the paced link carried nothing between its first and its last byte (since ``rate_mbps`` was set).

        What a download leaves of the link between its requests: a plain ``from_pretrained`` of
        one file idles only while its few requests go out; a client that fetches many files one
        after another, or starts a download only once it has decoded something, idles more.
        """
        with self._lock:
            return self._link_idle_s

    def start(self) -> LocalHub:
        if self._server is not None:
            raise RuntimeError("LocalHub is already running")
        server_class = _HubHTTPServerV6 if ":" in self.host else _HubHTTPServer
        try:
            server = server_class((self.host, self._port), self)
        except OSError as error:
            raise HubError(f"port {self._port} on {self.host} is busy ({error.strerror})") from None
        if self._store is None:
            self._store = _Store(self.root)
        self._server = server
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def drop_next_downloads(self, n: int) -> None:
        """Make the next ``n`` ``/resolve`` GETs send half their body, then close the connection.

        This is what a flaky network does to a download; tests use it to check that downloads are retried and resumed
        (with a ``Range`` request) rather than failing or leaving a truncated file behind.
        """
        with self._lock:
            self._drops_pending = n

    def hold_downloads(self, pattern: str) -> threading.Event:
        """Make ``/resolve`` GETs of files matching the glob ``pattern`` wait, headers sent, until the returned event is set.

        A test can then watch what a client does while one file is still downloading (its first
        bytes not yet arrived) without depending on timing; set the event to let the body through.
        """
        released = threading.Event()
        with self._lock:
            self._holds[pattern] = released
        return released

    def file_requests(self, pattern: str) -> Counter[str]:
        """How many ``/resolve`` requests of files matching the glob ``pattern`` arrived so far, per method (HEAD, GET)."""
        counts: Counter[str] = Counter()
        with self._lock:
            for (method, path), count in self._resolved.items():
                if fnmatch.fnmatchcase(path, pattern):
                    counts[method] += count
        return counts

    def _count_request(self, method: str, path: str) -> None:
        with self._lock:
            self._resolved[method, path] += 1

    def _wait_if_held(self, path: str) -> None:
        with self._lock:
            holds = [event for pattern, event in self._holds.items() if fnmatch.fnmatchcase(path, pattern)]
        for event in holds:
            event.wait()

    def _take_drop(self) -> bool:
        with self._lock:
            if self._drops_pending == 0:
                return False
            self._drops_pending -= 1
            return True

    def _pace(self, nbytes: int) -> None:
        """Wait for the slot of ``nbytes`` on the shared link: concurrent downloads split ``rate_mbps`` between them.

        A sender that comes late for its slot (a sleep that overshoots, a write that blocked) may
        catch up by ``LINK_QUEUE_S``; the link's pace holds on average.
        """
        with self._lock:
            if self._rate_mbps is None:
                return
            now = time.monotonic()
            start = max(now - LINK_QUEUE_S, self._next_send)
            if self._next_send:  # not the link's first byte
                self._link_idle_s += start - self._next_send
            self._next_send = start + nbytes / (self._rate_mbps * 1e6)
            delay = self._next_send - now
        time.sleep(max(delay, 0.0))

    def _sign(self, oid: str, size: int) -> str:
        """Signature of an LFS upload URL: the PUT comes without Authorization, as S3 pre-signed URLs do on the Hub."""
        return hmac.new(self._upload_key, f"{oid}:{size}".encode(), hashlib.sha256).hexdigest()


def serve(root: str | os.PathLike[str], port: int, rate_mbps: float | None = None, token: str | None = None) -> None:
    """Run a LocalHub on 127.0.0.1 until interrupted (Ctrl-C); the entry point of ``p2u serve-hub``."""
    with LocalHub(root, port=port, rate_mbps=rate_mbps, token=token) as hub:
        print(f"Local Hub at {hub.url} (root {Path(root).resolve()})", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
