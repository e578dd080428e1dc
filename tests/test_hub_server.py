"""The local Hub against the real ``huggingface_hub`` client, over loopback HTTP."""

from __future__ import annotations

import logging
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    get_session,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from p2u_hub.testing import LocalHub, hub_server
from p2u_hub.testing.client import local_hub_client

REPO = "local/tiny"
WEIGHTS = random.Random(0).randbytes(1_500_000)  # over 1 MB, and .safetensors: goes through LFS


def write_folder(folder: Path, weights: bytes = WEIGHTS, note: str = "first") -> Path:
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"hidden_size": 8}')
    (folder / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- p2u\n---\n# Tiny\n")
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "sub" / "note.txt").write_text(note)
    return folder


@pytest.fixture
def published(local_hub: LocalHub, tmp_path: Path) -> str:
    """REPO on the local Hub with one upload on main; returns that commit's sha."""
    api = HfApi()
    api.create_repo(REPO)
    return api.upload_folder(repo_id=REPO, folder_path=write_folder(tmp_path / "upload")).oid


def test_non_loopback_hosts_are_refused(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "192.168.1.10", "example.com"):
        with pytest.raises(ValueError, match="loopback"):
            LocalHub(tmp_path, host=host)


def test_create_repo_exist_ok_and_initial_commit(local_hub: LocalHub) -> None:
    api = HfApi()
    first = api.create_repo(REPO, exist_ok=True)
    assert api.create_repo(REPO, exist_ok=True) == first == f"{local_hub.url}/{REPO}"
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(REPO)
    assert conflict.value.response.status_code == 409
    commits = api.list_repo_commits(REPO)
    assert len(commits) == 1
    assert api.list_repo_files(REPO) == [".gitattributes"]


def test_upload_then_download_by_main_and_commit(published: str, tmp_path: Path) -> None:
    api = HfApi()
    info = api.model_info(REPO, revision=published)
    assert info.sha == published == api.model_info(REPO).sha
    assert info.card_data["license"] == "apache-2.0" and info.tags == ["p2u"]
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == {".gitattributes", "README.md", "config.json", "model.safetensors", "sub/note.txt"}
    assert siblings["model.safetensors"].lfs.sha256 == next(
        f.lfs.sha256 for f in api.list_repo_tree(REPO, recursive=True) if f.path == "model.safetensors"
    )
    assert siblings["config.json"].lfs is None

    weights = Path(hf_hub_download(REPO, "model.safetensors"))
    assert weights.read_bytes() == WEIGHTS and weights.parent.name == published
    for revision in ("main", published):
        snapshot = Path(snapshot_download(REPO, revision=revision))
        assert snapshot.name == published
        assert (snapshot / "sub" / "note.txt").read_text() == "first"
        assert (snapshot / "model.safetensors").read_bytes() == WEIGHTS


def test_branch_upload_leaves_main_alone(published: str, tmp_path: Path) -> None:
    api = HfApi()
    branch = "p2u/stage-1"
    api.create_branch(REPO, branch=branch)
    api.create_branch(REPO, branch=branch, exist_ok=True)
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_branch(REPO, branch=branch)
    assert conflict.value.response.status_code == 409

    weights = WEIGHTS[::-1]
    commit = api.upload_folder(repo_id=REPO, folder_path=write_folder(tmp_path / "stage", weights, "second"), revision=branch).oid
    refs = api.list_repo_refs(REPO)
    assert {ref.name: ref.target_commit for ref in refs.branches} == {"main": published, branch: commit}
    assert api.model_info(REPO, revision=branch).sha == commit
    assert Path(hf_hub_download(REPO, "sub/note.txt", revision=branch)).read_text() == "second"
    assert Path(hf_hub_download(REPO, "sub/note.txt")).read_text() == "first"
    assert (Path(snapshot_download(REPO, revision=commit)) / "model.safetensors").read_bytes() == weights
    assert [c.commit_id for c in api.list_repo_commits(REPO, revision=branch)][:2] == [commit, published]

    api.create_tag(REPO, tag="v1", revision=commit)
    assert Path(hf_hub_download(REPO, "sub/note.txt", revision="v1")).read_text() == "second"
    api.delete_branch(REPO, branch=branch)
    assert [ref.name for ref in api.list_repo_refs(REPO).branches] == ["main"]


def test_unchanged_push_is_not_a_commit(published: str, tmp_path: Path) -> None:
    api = HfApi()
    again = api.upload_folder(repo_id=REPO, folder_path=write_folder(tmp_path / "again"))
    assert again.oid == published
    # The client skips files preupload reports unchanged; a delete + re-add of the same content reaches the server.
    same = (tmp_path / "again" / "config.json").read_bytes()
    operations = [CommitOperationDelete("config.json"), CommitOperationAdd("config.json", same)]
    assert api.create_commit(REPO, operations=operations, commit_message="no-op").oid == published
    assert len(api.list_repo_commits(REPO)) == 2


def test_not_found_errors(published: str) -> None:
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("local/missing", "config.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO, revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.json")
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("local/missing")


def test_writes_need_the_token(published: str, local_hub: LocalHub) -> None:
    for token in (False, "hf_wrong"):
        with pytest.raises(HfHubHTTPError) as denied:
            HfApi(token=token).create_repo("local/other")
        assert denied.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as denied:
        HfApi(token=False).upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    assert denied.value.response.status_code == 401
    assert HfApi(token=False).model_info(REPO).sha == published  # reads stay open
    assert HfApi().whoami()["name"] == "local"


def test_hf_cli_upload_to_branch(local_hub: LocalHub, tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "cli", note="from the cli")
    command = [sys.executable, "-m", "huggingface_hub.cli.hf", "upload", REPO, str(folder), "--revision", "p2u/stage-2"]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    assert "p2u/stage-2" in [ref.name for ref in HfApi().list_repo_refs(REPO).branches]
    assert Path(hf_hub_download(REPO, "sub/note.txt", revision="p2u/stage-2")).read_text() == "from the cli"


def test_dropped_download_is_resumed(published: str, local_hub: LocalHub, caplog: pytest.LogCaptureFixture) -> None:
    """huggingface_hub retries a download cut short, with a Range request for the rest."""
    local_hub.drop_next_downloads(1)
    with caplog.at_level(logging.WARNING, logger="huggingface_hub"):
        weights = Path(hf_hub_download(REPO, "model.safetensors"))
    assert weights.read_bytes() == WEIGHTS
    assert "Trying to resume download" in caplog.text


def test_range_requests(published: str) -> None:
    url = hf_hub_url(REPO, "model.safetensors")
    response = get_session().get(url, headers={"Range": "bytes=100-199"})
    assert response.status_code == 206
    assert response.content == WEIGHTS[100:200]
    assert response.headers["Content-Range"] == f"bytes 100-199/{len(WEIGHTS)}"
    assert get_session().get(url, headers={"Range": "bytes=-10"}).content == WEIGHTS[-10:]
    assert get_session().get(url, headers={"Range": f"bytes={len(WEIGHTS)}-"}).status_code == 416


def test_rate_limit_paces_downloads(local_hub: LocalHub, tmp_path: Path) -> None:
    HfApi().create_repo(REPO)
    HfApi().upload_file(path_or_fileobj=bytes(2_000_000), path_in_repo="zeros.bin", repo_id=REPO)
    local_hub.rate_mbps = 10
    start = time.monotonic()
    assert Path(hf_hub_download(REPO, "zeros.bin")).stat().st_size == 2_000_000
    assert time.monotonic() - start >= 0.15  # 2 MB at 10 MB/s is 0.2 s


def test_pacing_lets_a_late_sender_catch_up_within_the_link_queue(tmp_path: Path, monkeypatch) -> None:
    """A download whose every wake-up comes late still gets the whole rate: 100 chunks of 1 ms take 0.1 s, not 0.13 s."""
    hub = LocalHub(tmp_path, rate_mbps=100)  # pacing only: never started
    clock = [1000.0]

    def oversleep(seconds: float) -> None:
        clock[0] += seconds + 0.0003  # as a loaded machine's sleep does

    monkeypatch.setattr(hub_server.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(hub_server.time, "sleep", oversleep)
    for _ in range(100):
        hub._pace(100_000)  # 1 ms of link each
    assert 0.1 - hub_server.LINK_QUEUE_S <= clock[0] - 1000.0 <= 0.1 + 0.0003 + 1e-9


def test_link_idle_time_counts_the_gaps_between_paced_bytes(tmp_path: Path, monkeypatch) -> None:
    """Gaps beyond the link queue count, from the first byte on; a late wake-up the queue absorbs does not."""
    hub = LocalHub(tmp_path, rate_mbps=100)  # pacing only: never started
    clock = [1000.0]
    monkeypatch.setattr(hub_server.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(hub_server.time, "sleep", lambda seconds: clock.__setitem__(0, clock[0] + seconds))
    clock[0] += 5.0  # before the first byte: not idle time
    hub._pace(100_000)  # 1 ms of link
    clock[0] += 0.001  # within the link queue
    hub._pace(100_000)
    assert hub.link_idle_s == 0.0
    clock[0] += 0.030  # a file's round trips
    hub._pace(100_000)
    assert 0.030 - hub_server.LINK_QUEUE_S <= hub.link_idle_s <= 0.030
    hub.rate_mbps = 100
    assert hub.link_idle_s == 0.0


def test_restart_keeps_repos(published: str, local_hub: LocalHub, tmp_path: Path) -> None:
    local_hub.stop()
    with LocalHub(local_hub.root, token=local_hub.token) as restarted, local_hub_client(restarted, tmp_path / "fresh"):
        assert HfApi().model_info(REPO).sha == published
        assert Path(hf_hub_download(REPO, "model.safetensors")).read_bytes() == WEIGHTS


def test_dataset_repos(local_hub: LocalHub) -> None:
    api = HfApi()
    api.create_repo(REPO, repo_type="dataset")
    api.upload_file(path_or_fileobj=b"a,b\n1,2\n", path_in_repo="data.csv", repo_id=REPO, repo_type="dataset")
    path = hf_hub_download(REPO, "data.csv", repo_type="dataset")
    assert Path(path).read_bytes() == b"a,b\n1,2\n"
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(REPO)  # same id, other type


def _raw(hub: LocalHub, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None):
    """One request on a fresh connection, bypassing the client's own validation: (status, JSON body)."""
    import http.client
    import json
    from urllib.parse import urlsplit

    url = urlsplit(hub.url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        connection.putrequest(method, path)
        for name, value in {"Authorization": f"Bearer {hub.token}", "Content-Length": str(len(body)), **(headers or {})}.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


def test_private_repos_need_a_token_to_read(local_hub: LocalHub, tmp_path: Path) -> None:
    api = HfApi()
    api.create_repo("local/secret", private=True)
    api.upload_file(path_or_fileobj=b"hidden", path_in_repo="note.txt", repo_id="local/secret")
    assert Path(hf_hub_download("local/secret", "note.txt")).read_bytes() == b"hidden"  # HF_TOKEN is set
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("local/secret", "note.txt", token=False, cache_dir=tmp_path / "anonymous")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info("local/secret")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token="hf_wrong").list_repo_refs("local/secret")


@pytest.mark.parametrize("path", ["a\\b.txt", "nul\x00.txt", ".git/config", "sub/.git/hooks/x", "../escape.txt", "/abs.txt"])
def test_commit_paths_are_validated(published: str, local_hub: LocalHub, path: str) -> None:
    import base64
    import json

    lines = [
        {"key": "header", "value": {"summary": "bad path"}},
        {"key": "file", "value": {"path": path, "content": base64.b64encode(b"x").decode(), "encoding": "base64"}},
    ]
    body = "\n".join(json.dumps(line) for line in lines).encode()
    status, answer = _raw(local_hub, "POST", f"/api/models/{REPO}/commit/main", body, {"Content-Type": "application/x-ndjson"})
    assert status == 400 and "Invalid path in repo" in answer["error"]


@pytest.mark.parametrize("name", ["..", "a..b", "/main", "main/", "x.lock", "a//b", "a/.hidden"])
def test_branch_names_are_validated(published: str, local_hub: LocalHub, name: str) -> None:
    from urllib.parse import quote

    status, answer = _raw(local_hub, "POST", f"/api/models/{REPO}/branch/{quote(name, safe='')}", b"{}")
    assert status == 400 and "Invalid reference name" in answer["error"]


def test_malformed_requests_get_a_400(published: str, local_hub: LocalHub) -> None:
    status, answer = _raw(local_hub, "POST", "/api/repos/create", b"[1, 2]", {"Content-Type": "application/json"})
    assert status == 400 and "must be a JSON object" in answer["error"]
    status, answer = _raw(local_hub, "POST", "/api/repos/create", b"{}", {"Content-Length": "abc"})
    assert status == 400 and "Content-Length 'abc'" in answer["error"]
    status, answer = _raw(local_hub, "POST", f"/api/models/{REPO}/preupload/main", b'{"files": 3}')
    assert status == 400 and "Malformed request" in answer["error"]


def test_request_bodies_are_bounded(published: str, local_hub: LocalHub, monkeypatch) -> None:
    from p2u_hub.testing import hub_server

    monkeypatch.setattr(hub_server, "MAX_BODY_BYTES", 1000)
    status, answer = _raw(local_hub, "POST", f"/api/models/{REPO}/preupload/main", b'{"files": []}' + b" " * 2000)
    assert status == 413 and "larger than 1000" in answer["error"]


def test_xet_endpoints_name_the_setting_to_use(published: str, local_hub: LocalHub) -> None:
    status, answer = _raw(local_hub, "GET", f"/api/models/{REPO}/xet-write-token/main")
    assert status == 501 and "HF_HUB_DISABLE_XET=1" in answer["error"]


def test_serve_hub_token_option_requires_it_on_writes(monkeypatch, tmp_path: Path) -> None:
    from p2u_hub.tools import cli

    started = {}
    monkeypatch.setattr("p2u_hub.testing.serve", lambda root, **kwargs: started.update(root=root, **kwargs))
    cli.main(["serve-hub", "--root", str(tmp_path), "--token", "hf_secret"])
    assert started["token"] == "hf_secret"
    with LocalHub(tmp_path / "hub", token="hf_secret") as hub:
        status, answer = _raw(hub, "POST", "/api/repos/create", b'{"name": "x"}', {"Authorization": "Bearer hf_other"})
        assert status == 401 and "Invalid credentials" in answer["error"]
