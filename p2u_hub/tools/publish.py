"""Publishing a release to the Hugging Face Hub through ``huggingface_hub.HfApi``.

Layouts:

* ``branches`` (default): the base on ``main`` of ``repo_id`` (so ``from_pretrained(repo_id)``
  gets a working model) and stage N on branch ``p2u-stage-N`` of the same repo.
* ``repos``: the base in ``repo_id``, the stages on branches ``p2u-stage-N`` of the sibling
  repo ``repo_id + "-p2u-delta"``.

Either way the published base's config records each stage's repo id, branch and commit, so
a base always upgrades to the stages it was published with.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError

from ..core import format as fmt
from ..core.hub import check_repo_id, hub_errors
from ..core.release import Release, verify
from ..core.storage import visible_files
from ..errors import HubError, PushRefusedError
from .card import write_cards

LAYOUTS = ("branches", "repos")
DELTA_REPO_SUFFIX = "-p2u-delta"


@dataclass(frozen=True)
class PublishedStage:
    repo_id: str
    branch: str
    commit: str


@dataclass(frozen=True)
class PushResult:
    """Where a release landed: the base repo and commit, and each stage's repo, branch and commit."""

    repo_id: str
    commit: str
    stages: tuple[PublishedStage, ...]


def push(
    release_dir: str | os.PathLike,
    repo_id: str,
    *,
    layout: str = "branches",
    private: bool = False,
    commit_message: str | None = None,
    token: str | bool | None = None,
    base_model: str | None = None,
) -> PushResult:
    """Publish a split release: stages first, then the base whose config points at their commits.

    The model cards (``p2u card``) are rewritten first with this repo's links, so the Hub pages
    explain the release; quality figures appear when ``p2u eval`` has been run.

    Idempotent: unchanged files are not uploaded again and an unchanged release makes no new
    commit, so an interrupted push is finished by running it again.

    Args:
        release_dir: the output folder of ``split`` (or a base folder with local stages).
        repo_id: the repo of the base (created if missing).
        layout: ``"branches"`` (stages on branches of ``repo_id``) or ``"repos"`` (stages
            in ``repo_id + "-p2u-delta"``).
        private: create new repos as private.
        commit_message: message of every commit (default: one naming the part pushed).
        token: Hub token (default: ``HF_TOKEN`` / the stored login).
        base_model: Hub id of the source model for the cards' ``base_model`` (default: what
            ``write_cards`` finds: an earlier card's, else the repo the release was split from).

    Returns:
        The commits that the base and each stage were published at.

    Raises:
        ChecksumError: the release fails ``verify`` (checked before anything is uploaded).
        PushRefusedError: the Hub refused the token.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    check_repo_id(repo_id, "push")
    fmt.refuse_symlinks(Path(release_dir))
    release = verify(release_dir, token=token)
    api = HfApi(token=token)
    stage_repo = repo_id if layout == "branches" else repo_id + DELTA_REPO_SUFFIX
    write_cards(release_dir, base_model=base_model, repo_id=repo_id, stage_repo_id=stage_repo)
    try:
        with hub_errors(repo_id):
            for repo in dict.fromkeys((repo_id, stage_repo)):
                api.create_repo(repo, private=private, exist_ok=True)
            published = tuple(_push_stage(api, release, entry, stage_repo, commit_message) for entry in release.qconfig.stages)
            stage_entries = [
                dataclasses.replace(entry, repo_id=stage.repo_id, revision=stage.branch, commit=stage.commit)
                for entry, stage in zip(release.qconfig.stages, published)
            ]
            published_config = dataclasses.replace(release.qconfig, stages=stage_entries)
            info = api.create_commit(
                repo_id, operations=_base_operations(release.base_dir, published_config),
                commit_message=commit_message or "p2u base",
            )  # fmt: skip
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise PushRefusedError(
                f"{repo_id}: the Hub refused the push (HTTP {status}); log in with `hf auth login` or set "
                "HF_TOKEN to a token with write access"
            ) from None
        raise HubError(f"{repo_id}: the Hub answered HTTP {status}: {error.server_message or str(error).splitlines()[0]}") from None
    return PushResult(repo_id, info.oid, published)


def _push_stage(api: HfApi, release: Release, entry: fmt.StageEntry, stage_repo: str, message: str | None) -> PublishedStage:
    """Upload one stage folder to its branch; return where it now is: repo, branch and commit.

    The branch starts at the repo's first commit, so it never inherits the base's files from ``main``.
    """
    folder = release.stage_dir(entry.index)
    branch = fmt.stage_branch(entry.index)
    first_commit = api.list_repo_commits(stage_repo)[-1].commit_id
    api.create_branch(stage_repo, branch=branch, revision=first_commit, exist_ok=True)
    api.upload_folder(
        repo_id=stage_repo, folder_path=folder, revision=branch,
        commit_message=message or f"p2u {entry.name}", ignore_patterns=[".*"],
    )  # fmt: skip
    commit = api.repo_info(stage_repo, revision=branch).sha
    if commit is None:
        raise HubError(f"{stage_repo}: the Hub gave no commit for branch {branch!r} after the upload")
    return PublishedStage(stage_repo, branch, commit)


def _base_operations(base_dir: Path, published_config: fmt.QuantizationConfig) -> list[CommitOperationAdd]:
    """Every file of the base folder, with config.json carrying the published stage locations."""
    config = fmt.read_json(base_dir / fmt.CONFIG_FILE)
    config["quantization_config"] = published_config.to_json()
    operations = [CommitOperationAdd(fmt.CONFIG_FILE, fmt.canonical_json(config))]
    for relative in visible_files(base_dir):
        if relative.as_posix() != fmt.CONFIG_FILE:
            operations.append(CommitOperationAdd(relative.as_posix(), base_dir / relative))
    return operations
