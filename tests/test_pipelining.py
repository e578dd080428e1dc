"""Stages stream: a tensor is rebuilt as soon as the stage shards holding its payloads are local, while later shards
still download (over real HTTP from the local Hub), and an upgrade swaps nothing before every shard has arrived and
been checked."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub import snapshot_download
from safetensors.torch import load_file

import p2u_hub
from p2u_hub.core import format as fmt
from p2u_hub.core.hub import download_file
from p2u_hub.core.release import LinkShare, Release, TensorPrefetch
from p2u_hub.core.split import MIN_STAGE_SHARD_BYTES, STAGE_SHARDS, default_stage_shard_bytes
from p2u_hub.core.storage import DEFAULT_MAX_SHARD_BYTES
from p2u_hub.testing import LocalHub
from p2u_hub.testing.assertions import assert_checkpoints_bit_identical, assert_tensors_bit_identical
from p2u_hub.tools.publish import push

REPO = "local/gpt2-p2u"
WAIT_S = 120  # only a failing test waits this long: every wait below ends on an event


@pytest.fixture
def sharded(random_checkpoint, tmp_path) -> tuple[Path, Path]:
    """(source, release) of a tiny GPT-2 whose stages are cut into shards of 20 kB: several files per stage."""
    source = random_checkpoint("gpt2")
    return source, p2u_hub.split(source, tmp_path / "release", stage_shard_bytes=20_000)


def _last_shard(release: Path, stage: str) -> str:
    """The stage's last shard: it holds the tensors split wrote last, so it is the last file an upgrade fetches."""
    return sorted((release / stage).glob(f"{fmt.DELTA_WEIGHTS_NAME}-*.safetensors"))[-1].name


@pytest.fixture
def rebuilt() -> Iterator[threading.Event]:
    """Set when the release module reports a tensor rebuilt (its DEBUG log, which is how a user watches it too)."""
    event = threading.Event()

    class Watcher(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "rebuilt" in record.getMessage():
                event.set()

    logger = logging.getLogger("p2u_hub.core.release")
    watcher, level = Watcher(logging.DEBUG), logger.level
    logger.addHandler(watcher)
    logger.setLevel(logging.DEBUG)
    try:
        yield event
    finally:
        logger.removeHandler(watcher)
        logger.setLevel(level)


def test_split_cuts_each_stage_into_shards_that_merge_back_bit_for_bit(sharded, tmp_path):
    source, release = sharded
    for stage in ("stage-1", "stage-2"):
        folder = release / stage
        shards = sorted(folder.glob("delta-*.safetensors"))
        index = json.loads((folder / fmt.index_file_name(fmt.DELTA_WEIGHTS_NAME)).read_text())
        assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == [shard.name for shard in shards]
        record = fmt.read_stage_record(folder)
        assert set(index["weight_map"]) == set(record.payloads)
    assert_checkpoints_bit_identical(source, p2u_hub.merge(release, tmp_path / "merged"))


def test_default_stage_shard_is_a_fraction_of_the_source_within_bounds():
    assert default_stage_shard_bytes(1_000_000) == MIN_STAGE_SHARD_BYTES
    assert default_stage_shard_bytes(STAGE_SHARDS * 10**9) == 10**9
    assert default_stage_shard_bytes(10**13) == DEFAULT_MAX_SHARD_BYTES
    assert default_stage_shard_bytes(10**13, max_shard_bytes=10**8) == 10**8


def test_upgrade_rebuilds_while_the_last_shard_downloads_and_swaps_only_after_it(local_hub: LocalHub, sharded, rebuilt):
    source, release = sharded
    push(release, REPO)
    model = transformers.AutoModelForCausalLM.from_pretrained(REPO)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    released = local_hub.hold_downloads(_last_shard(release, "stage-2"))
    try:
        handle = p2u_hub.upgrade(model, background=True)
        assert rebuilt.wait(WAIT_S), "no tensor was rebuilt while the last stage shard was still downloading"
        assert not handle.done() and handle.progress == 0.0  # rebuilt ahead, not swapped: the last shard is unchecked
        after = model.state_dict()
        assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    finally:
        released.set()
    handle.result(timeout=WAIT_S)
    assert_tensors_bit_identical(transformers.AutoModelForCausalLM.from_pretrained(source).state_dict(), model.state_dict())


def test_merge_from_the_hub_rebuilds_while_the_last_shard_downloads(local_hub: LocalHub, sharded, rebuilt, tmp_path):
    source, release = sharded
    push(release, REPO)
    base = snapshot_download(REPO)
    released = local_hub.hold_downloads(_last_shard(release, "stage-2"))
    merged: list[Path] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            merged.append(p2u_hub.merge(base, tmp_path / "merged", progress=False))
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert rebuilt.wait(WAIT_S), "no tensor was rebuilt while the last stage shard was still downloading"
        assert not merged and not errors
    finally:
        released.set()
        thread.join(WAIT_S)
    assert not errors, errors
    assert_checkpoints_bit_identical(source, merged[0])


def test_a_corrupt_last_shard_leaves_the_model_unchanged_though_earlier_tensors_were_rebuilt(
    local_hub: LocalHub, sharded, rebuilt
):  # fmt: skip
    _, release = sharded
    push(release, REPO)
    last = release / "stage-2" / _last_shard(release, "stage-2")
    blob = local_hub.root / "blobs" / (digest := hashlib.sha256(last.read_bytes()).hexdigest())[:2] / digest
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # the last payload's last byte: the header still parses, the payload fails its sha256
    blob.write_bytes(bytes(data))
    model = transformers.AutoModelForCausalLM.from_pretrained(REPO)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(fmt.ChecksumError, match="fails its sha256 check"):
        p2u_hub.upgrade(model)
    assert rebuilt.is_set()  # tensors of the earlier shards were rebuilt ahead, and then dropped
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[name], tensor) for name, tensor in before.items())
    assert model.hf_quantizer.stage == 0 and not any(model.hf_quantizer.layer_stages.values())


def test_a_shard_still_downloading_holds_up_no_tensor_of_a_later_one(local_hub: LocalHub, sharded):
    """Files are checked as they arrive, not in download order: the first shard still on the link must not keep the
    decoder waiting for the shards that came after it."""
    source, release = sharded
    push(release, REPO)
    rebuilder = Release(Path(snapshot_download(REPO))).rebuilder("full")
    first = sorted((release / "stage-2").glob(f"{fmt.DELTA_WEIGHTS_NAME}-*.safetensors"))[0].name
    weight_map = json.loads((release / "stage-2" / fmt.index_file_name(fmt.DELTA_WEIGHTS_NAME)).read_text())["weight_map"]
    held = {name for name, file in weight_map.items() if file == first}
    later = [name for name in rebuilder.release.manifest.tensors if name in rebuilder.stages[-1].record.payloads and name not in held][-1]
    released = local_hub.hold_downloads(first)
    result: list[torch.Tensor] = []
    try:
        rebuilder.start_downloads(rebuilder.release.manifest.tensors, verify=True)
        thread = threading.Thread(target=lambda: result.append(rebuilder.tensor(later)), daemon=True)
        thread.start()
        thread.join(WAIT_S)
        assert result, f"{later!r} was not rebuilt while {first} (which does not hold it) was still downloading"
    finally:
        released.set()
        rebuilder.close()
    assert torch.equal(result[0], load_file(source / "model.safetensors")[later])


def test_rebuilt_tensors_waiting_ahead_never_exceed_the_room(sharded):
    """The room bounds the rebuilt tensors waiting (one tensor starts when none waits, whatever its size): a tensor that
    does not fit waits for the consumer, rather than the last one started overshooting the room by its own size."""
    source, release = sharded
    rebuilder = Release.open(release).rebuilder("full")
    tensors = rebuilder.release.manifest.tensors
    names = [name for name, entry in tensors.items() if entry.codec == fmt.CODEC_LADDER]
    sizes = {name: tensors[name].numel * tensors[name].torch_dtype.itemsize for name in names}
    room = sizes[names[0]] + sizes[names[1]] - 1  # the first fits, the second does not
    ahead = TensorPrefetch(rebuilder, names, workers=2, room=lambda: room)
    try:
        assert list(ahead._pending) == names[:1]
        expected = load_file(source / "model.safetensors")
        for name in names:
            assert sum(size for _, size in ahead._pending.values()) <= max(room, sizes[name])
            assert torch.equal(ahead.get(name), expected[name])
    finally:
        ahead.close()


def test_each_finished_rebuild_starts_the_next_one_that_fits(sharded, rebuilt):
    """The decoding goes on while the consumer waits for something else (an upgrade, for its last stage file): room
    that opens up is used when a rebuild finishes, not only when the consumer asks for a tensor."""
    source, release = sharded
    rebuilder = Release.open(release).rebuilder("full")
    names = [name for name, entry in rebuilder.release.manifest.tensors.items() if entry.codec == fmt.CODEC_LADDER]
    room = [0]  # none at first: one tensor starts (there is always room for one)
    done = threading.Semaphore(0)

    class Counter(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "rebuilt" in record.getMessage():
                room[0] = 1 << 40
                done.release()

    logger = logging.getLogger("p2u_hub.core.release")
    logger.addHandler(counter := Counter(logging.DEBUG))
    ahead = TensorPrefetch(rebuilder, names, workers=1, room=lambda: room[0])
    try:
        assert all(done.acquire(timeout=WAIT_S) for _ in names), "not every tensor was rebuilt ahead without being asked for"
        expected = load_file(source / "model.safetensors")
        assert all(torch.equal(ahead.get(name), expected[name]) for name in names)
    finally:
        ahead.close()
        logger.removeHandler(counter)


def test_the_files_of_a_large_tensor_share_the_link_only_with_each_other():
    """Shared four ways, a large tensor's files would arrive last and leave its decode for after the download; on their
    own, they start together once the files before them are done and nothing joins them. The others share the link
    four at a time, and a second large tensor's files wait for the first's."""
    groups = {"big-1": "big", "big-2": "big", "other-1": "other", "other-2": "other"}
    link = LinkShare(["a", "b", "big-1", "big-2", "c", "d", "e", "f", "g", "other-1", "other-2"], groups, at_once=4)
    assert link.admit() == ["a", "b"]  # "big-1" waits for the link to empty
    link.finished("a")
    assert link.admit() == []
    link.finished("b")
    assert link.admit() == ["big-1", "big-2"]
    assert link.admit() == []  # nothing else joins them
    link.finished("big-1")
    assert link.admit() == []
    link.finished("big-2")
    assert link.admit() == ["c", "d", "e", "f"]
    link.finished("d")
    assert link.admit() == ["g"]
    for name in ["c", "e", "f"]:
        link.finished(name)
    assert link.admit() == []  # "other-1" waits for "g"
    link.finished("g")
    assert link.admit() == ["other-1", "other-2"]


def test_files_of_equal_size_download_four_at_a_time():
    link = LinkShare(list(range(6)), {}, at_once=4)
    assert link.admit() == [0, 1, 2, 3]
    link.finished(2)
    assert link.admit() == [4]
    link.finished(0)
    assert link.admit() == [5]


def test_only_a_tensor_with_over_a_quarter_of_the_stage_bytes_has_its_files_in_a_group(sharded):
    _, release = sharded
    rebuilder = Release.open(release).rebuilder("full")
    payloads = [shards.record.payloads for shards in rebuilder.stages]
    total = sum(payload["bytes"] for stage in payloads for payload in stage.values())
    sizes = {name: sum(stage[name]["bytes"] for stage in payloads if name in stage) for name in payloads[-1]}
    largest = max(sizes, key=sizes.__getitem__)
    files = {name: [(position, shards.planned[name]) for position, shards in enumerate(rebuilder.stages)] for name in sizes}
    assert rebuilder._large_tensor_of_files(files) == (dict.fromkeys(files[largest], largest) if 4 * sizes[largest] > total else {})


def test_a_file_two_callers_want_at_once_is_fetched_once(local_hub: LocalHub, sharded):
    """A prefetch and then the upgrade ask for the same stage file: the second waits for the first one's download (one
    HEAD, one GET) rather than for huggingface_hub's file lock, which it would notice only at the lock's next poll."""
    _, release = sharded
    push(release, REPO)
    folder, _ = Release(Path(snapshot_download(REPO))).stage(2)
    name = _last_shard(release, "stage-2")
    released = local_hub.hold_downloads(name)
    paths: list[Path] = []
    first, second = (threading.Thread(target=lambda: paths.append(download_file(folder, name)), daemon=True) for _ in range(2))
    try:
        first.start()
        deadline = time.monotonic() + WAIT_S
        while local_hub.file_requests(name)["GET"] == 0 and time.monotonic() < deadline:  # its body is held now
            time.sleep(0.01)
        second.start()
        second.join(1.0)  # time for a second request, if one were made, while the first download is still held
        assert local_hub.file_requests(name) == {"HEAD": 1, "GET": 1}
    finally:
        released.set()
    for caller in (first, second):
        caller.join(WAIT_S)
    assert paths == [folder / name] * 2 and (folder / name).read_bytes() == (release / "stage-2" / name).read_bytes()
    assert local_hub.file_requests(name) == {"HEAD": 1, "GET": 1}


def test_freed_pages_go_back_only_through_a_c_library_that_has_malloc_trim(monkeypatch):
    from p2u_hub.integrations import upgrade

    monkeypatch.setattr("sys.platform", "win32")  # where ctypes.CDLL(None) raises TypeError
    assert upgrade._malloc_trim.__wrapped__() is None
    upgrade._FreedPages(every=1).swapped(1)  # trims where it can, else nothing: never raises
