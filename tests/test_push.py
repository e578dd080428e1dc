"""Publishing through the real huggingface_hub client to the local Hub over HTTP: layouts, idempotence, hf upload."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard, hf_hub_download, snapshot_download

import p2u_hub
from p2u_hub.core import format as fmt
from p2u_hub.errors import HubError, PushRefusedError, StageUnavailableError
from p2u_hub.testing import LocalHub
from p2u_hub.testing.assertions import assert_checkpoints_bit_identical
from p2u_hub.tools.publish import push

REPO = "local/gpt2-p2u"


@pytest.fixture
def release(random_checkpoint, tmp_path) -> Path:
    return p2u_hub.split(random_checkpoint("gpt2"), tmp_path / "release")


def _commit_counts(api: HfApi, repo: str) -> dict[str, int]:
    branches = [ref.name for ref in api.list_repo_refs(repo).branches]
    return {branch: len(api.list_repo_commits(repo, revision=branch)) for branch in branches}


def _published_config(repo: str) -> dict:
    return json.loads(Path(hf_hub_download(repo, "config.json")).read_text())["quantization_config"]


def _assert_merges_bit_exact(repo: str, source: Path, destination: Path) -> None:
    base = snapshot_download(repo)
    assert_checkpoints_bit_identical(source, p2u_hub.merge(base, destination))


def test_push_branches_layout_is_idempotent(release, random_checkpoint, local_hub: LocalHub, tmp_path):
    result = push(release, REPO)
    api = HfApi()
    assert sorted(ref.name for ref in api.list_repo_refs(REPO).branches) == ["main", "p2u-stage-1", "p2u-stage-2"]
    stages = _published_config(REPO)["stages"]
    for stage, published in zip(stages, result.stages):
        assert (stage["repo_id"], stage["revision"], stage["commit"]) == (REPO, published.branch, published.commit)
        assert api.repo_info(REPO, revision=published.branch).sha == published.commit
    stage_files = {f.rfilename for f in api.model_info(REPO, revision="p2u-stage-1", files_metadata=False).siblings}
    assert stage_files == {".gitattributes", "README.md", "delta.safetensors", "p2u_stage.json"}  # no base files
    card = ModelCard.load(hf_hub_download(REPO, "README.md"))
    assert "p2u" in card.data.tags and card.data.library_name == "transformers"
    counts = _commit_counts(api, REPO)
    assert push(release, REPO) == result
    assert _commit_counts(api, REPO) == counts
    _assert_merges_bit_exact(REPO, random_checkpoint("gpt2"), tmp_path / "merged")


def test_push_repos_layout(release, random_checkpoint, local_hub: LocalHub, tmp_path):
    result = push(release, REPO, layout="repos")
    assert {stage.repo_id for stage in result.stages} == {REPO + "-p2u-delta"}
    assert [ref.name for ref in HfApi().list_repo_refs(REPO).branches] == ["main"]
    assert [s["repo_id"] for s in _published_config(REPO)["stages"]] == [REPO + "-p2u-delta"] * 2
    _assert_merges_bit_exact(REPO, random_checkpoint("gpt2"), tmp_path / "merged")


@pytest.mark.parametrize("branch", [fmt.stage_branch, fmt.legacy_stage_branch], ids=["p2u-stage-N", "legacy p2u/stage-N"])
def test_hf_upload_of_split_folders_gives_the_same_release(release, random_checkpoint, local_hub: LocalHub, tmp_path, branch):
    hf = [sys.executable, "-m", "huggingface_hub.cli.hf", "upload", REPO]
    for index in (1, 2):
        subprocess.run([*hf, str(release / f"stage-{index}"), ".", "--revision", branch(index)], check=True, capture_output=True)
    subprocess.run([*hf, str(release / "base"), "."], check=True, capture_output=True)
    assert "repo_id" not in _published_config(REPO)["stages"][0]  # stages found by branch name
    _assert_merges_bit_exact(REPO, random_checkpoint("gpt2"), tmp_path / "merged")


def test_deleted_stage_branch(release, local_hub: LocalHub, tmp_path):
    push(release, REPO)
    api = HfApi()
    api.delete_branch(REPO, branch="p2u-stage-2")
    base = snapshot_download(REPO)
    assert p2u_hub.merge(base, tmp_path / "pinned").is_dir()  # the base pins each stage's commit, which outlives the branch
    config = json.loads(Path(base, "config.json").read_text())
    for stage in config["quantization_config"]["stages"]:
        del stage["repo_id"], stage["commit"], stage["revision"]
    api.upload_file(path_or_fileobj=fmt.canonical_json(config), path_in_repo="config.json", repo_id=REPO)
    unpinned = snapshot_download(REPO)
    with pytest.raises(StageUnavailableError, match=rf"stage-2: revision 'p2u-stage-2' or 'p2u/stage-2' not found in {REPO}"):
        p2u_hub.merge(unpinned, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert p2u_hub.merge(unpinned, tmp_path / "merged-1", stage=1).is_dir()


def test_push_without_token_is_refused(release, local_hub: LocalHub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PushRefusedError, match=rf"{REPO}.*HTTP 401.*hf auth login"):
        push(release, REPO, token=False)


def test_split_from_hub_repo_at_revision(random_checkpoint, local_hub: LocalHub, tmp_path):
    source = random_checkpoint("bert")
    api = HfApi()
    api.create_repo("local/bert")
    first = api.upload_folder(repo_id="local/bert", folder_path=source).oid
    release = p2u_hub.split(f"local/bert@{first}", tmp_path / "release")
    manifest = fmt.read_manifest(release / "base")
    assert (manifest.source_repo, manifest.source_revision) == ("local/bert", first)
    with pytest.raises(StageUnavailableError, match="no-such-rev"):
        p2u_hub.split("local/bert@no-such-rev", tmp_path / "other")
    with pytest.raises(StageUnavailableError, match="local/missing"):
        p2u_hub.split("local/missing", tmp_path / "other")


def test_push_with_the_hub_down_names_the_endpoint_and_repo(release, monkeypatch, capsys):
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    with pytest.raises(HubError, match=rf"{REPO}: cannot reach the Hub at http://127.0.0.1:9 \(ConnectError"):
        push(release, REPO, token="hf_test")


def test_push_refuses_symlinks(release, tmp_path):
    (tmp_path / "secret.txt").write_text("not for upload")
    (release / "base" / "notes.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(p2u_hub.P2UError, match=r"notes\.txt: symlinks are not allowed in a release"):
        push(release, REPO, token="hf_test")


def test_push_with_xet_on_a_hub_without_it_names_the_setting(release, local_hub: LocalHub, monkeypatch):
    pytest.importorskip("hf_xet")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_DISABLE_XET", False)
    with pytest.raises(HubError, match=rf"{REPO}: Xet storage failed .*xet-write-token.*needs HF_HUB_DISABLE_XET=1"):
        push(release, REPO)


def test_push_keeps_the_base_model_and_follows_the_source_library(minilm_dir, local_hub: LocalHub, tmp_path):
    from p2u_hub.tools.card import write_cards

    release = p2u_hub.split(minilm_dir, tmp_path / "release", stages=(), uniform=True)  # the cards are the point: no calibration
    write_cards(release, base_model="sentence-transformers/all-MiniLM-L6-v2")
    push(release, "local/minilm-p2u")  # rewrites the cards with the repo's links
    card = ModelCard.load(hf_hub_download("local/minilm-p2u", "README.md"))
    assert (card.data.base_model, card.data.base_model_relation) == ("sentence-transformers/all-MiniLM-L6-v2", "quantized")
    assert (card.data.library_name, card.data.pipeline_tag) == ("sentence-transformers", "sentence-similarity")
    assert "pip install p2u-hub" in card.text and 'SentenceTransformer("local/minilm-p2u")' in card.text
    push(release, "local/minilm-p2u", base_model="org/another-source")
    assert ModelCard.load(hf_hub_download("local/minilm-p2u", "README.md")).data.base_model == "org/another-source"
