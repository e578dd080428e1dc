"""Fuzzing a tiny release: every mutated release merges bit-exact or fails with a P2UError naming the culprit.

A release comes from whoever published it, so the mutations play the attacker as well as bad
luck: JSON fields replaced by hostile values (path escapes, huge sizes, wrong types) with the
hashes recomputed so the change reaches the reader; safetensors headers edited; stage payloads
corrupted and re-sealed with a matching sha256; bits flipped in the base weights. For every case
the outcome must be a correct merge (bit-exact against the unmutated release at that stage) or
a ``P2UError`` whose message names a file or tensor; nothing may appear outside the merge's
target, and the process's peak memory must stay bounded.

Run as a script (``python tests/test_fuzz.py [PYTHONPATH-root]``) to print the outcome counts,
also against an older p2u-hub, where outcomes other than these two are counted by kind.
"""

from __future__ import annotations

import collections
import copy
import json
import random
import resource
import shutil
import signal
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from p2u_hub.core import format as fmt

CASES = 300
SEED = 20261123
CASE_SECONDS = 20
HOSTILE_VALUES = [
    None, -1, 0, 1, 99, 2**40, 1.5, "", "x", "../../ESCAPED.safetensors", "/ESCAPED_ABSOLUTE", "a\\b", "a\x00b",
    [], {}, [1099511627776, 64], [-3, 64], True, "F64", "U8", "deadbeef",
]  # fmt: skip
ESCAPE_NAMES = ("ESCAPED", "ESCAPED.safetensors", "ESCAPED_ABSOLUTE")


def _error_base() -> tuple[type, ...]:
    """P2UError, or on a p2u-hub from before it existed, the errors it raised for bad input."""
    try:
        from p2u_hub.errors import P2UError

        return (P2UError,)
    except ImportError:
        from p2u_hub.core.hub import HubError

        return (fmt.P2UFormatError, HubError)


def _walk(node, path=()):
    """Every (path, value) of a JSON tree, containers included."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, (*path, index))


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    node = _get(tree, path[:-1])
    if value is _DELETE and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = None if value is _DELETE else value


_DELETE = object()


def _hostile(rng: random.Random, escape_root: Path):
    value = rng.choice([*HOSTILE_VALUES, _DELETE, "absolute"])
    if value is _DELETE:
        return value
    return str(escape_root / "ESCAPED_ABSOLUTE") if value == "absolute" else copy.deepcopy(value)


def _reseal(release: Path) -> None:
    """Recompute the manifest hash into config.json and every stage's parent, as an attacker would."""
    base = release / fmt.BASE_DIR
    digest = fmt.sha256_bytes((base / fmt.MANIFEST_FILE).read_bytes())
    config_path = base / fmt.CONFIG_FILE
    config = json.loads(config_path.read_text())
    if isinstance(config.get("quantization_config"), dict):
        config["quantization_config"]["manifest_sha256"] = digest
        config_path.write_bytes(fmt.canonical_json(config))
    for stage_file in release.glob(f"stage-*/{fmt.STAGE_FILE}"):
        record = json.loads(stage_file.read_text())
        if isinstance(record, dict):
            record["parent"] = digest
            stage_file.write_bytes(fmt.canonical_json(record))


def _mutate_json(release: Path, rng: random.Random, escape_root: Path) -> str:
    files = [
        release / fmt.BASE_DIR / fmt.MANIFEST_FILE,
        release / fmt.BASE_DIR / fmt.CONFIG_FILE,
        *release.glob(f"stage-*/{fmt.STAGE_FILE}"),
    ]
    path = rng.choice(files)
    tree = json.loads(path.read_text())
    if path.name == fmt.CONFIG_FILE:
        nodes = [p for p, _ in _walk(tree) if p[:1] == ("quantization_config",) and len(p) > 1]
    else:
        nodes = [p for p, _ in _walk(tree) if p]
    node = rng.choice(nodes)
    parent = _get(tree, node[:-1])
    if isinstance(parent, dict) and rng.random() < 0.25:  # rename a key: file and tensor names are keys
        name = rng.choice(["../../ESCAPED.safetensors", str(escape_root / "ESCAPED_ABSOLUTE"), "a/../../../ESCAPED", ""])
        parent[name] = parent.pop(node[-1])
        node = (*node[:-1], name)
    else:
        _set(tree, node, _hostile(rng, escape_root))
    path.write_bytes(fmt.canonical_json(tree))
    if path.name == fmt.MANIFEST_FILE:
        _reseal(release)
    return f"json {path.relative_to(release)} {list(node)}"


def _safetensors_parts(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _mutate_header(release: Path, rng: random.Random, escape_root: Path) -> str:
    path = rng.choice(sorted(release.glob("*/*.safetensors")))
    header, data = _safetensors_parts(path)
    if rng.random() < 0.2:  # a raw byte flip anywhere in the length prefix or the header
        raw = bytearray(path.read_bytes())
        position = rng.randrange(8 + int.from_bytes(raw[:8], "little"))
        raw[position] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(raw))
        return f"header-byte {path.relative_to(release)} @{position}"
    nodes = [p for p, _ in _walk(header) if len(p) >= 2 and p[0] != "__metadata__"]
    node = rng.choice(nodes)
    _set(header, node, _hostile(rng, escape_root))
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)
    return f"header {path.relative_to(release)} {list(node)}"


def _mutate_payload(release: Path, rng: random.Random, escape_root: Path) -> str:
    """Corrupt one stage payload and re-seal it (new sha256 and size in the stage record)."""
    stage = rng.choice(sorted(release.glob("stage-*")))
    record_path = stage / fmt.STAGE_FILE
    record = json.loads(record_path.read_text())
    weights = next(iter(sorted(stage.glob("*.safetensors"))))
    tensors = load_file(weights)
    name = rng.choice(sorted(tensors))
    payload = bytearray(tensors[name].numpy().tobytes())
    how = rng.choice(["flip", "truncate", "append", "bomb", "count"])
    if how == "flip" and payload:
        for _ in range(rng.randint(1, 4)):
            payload[rng.randrange(len(payload))] ^= 1 << rng.randrange(8)
    elif how == "truncate":
        payload = payload[: rng.randrange(len(payload) + 1)]
    elif how == "append":
        payload += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif how == "bomb":  # one block whose first plane inflates to 64 MB
        coder = zlib.compressobj(9, zlib.DEFLATED, -15)
        bomb = coder.compress(bytes(64 << 20)) + coder.flush()
        stream = bytes([1]) + len(bomb).to_bytes(4, "little") + bomb
        payload = bytearray((1).to_bytes(4, "little") + len(stream).to_bytes(4, "little") + stream)
    else:  # a huge block count
        payload[:4] = rng.choice([0, 2**32 - 1, 1 << 20]).to_bytes(4, "little")
    tensors[name] = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.empty(0, dtype=torch.uint8)
    save_file(tensors, weights)
    record["tensors"][name] = {"sha256": fmt.sha256_bytes(bytes(payload)), "bytes": len(payload)}
    record_path.write_bytes(fmt.canonical_json(record))
    return f"payload {stage.name} {name} {how}"


def _flip_base_bit(release: Path, rng: random.Random, escape_root: Path) -> str:
    path = rng.choice(sorted((release / fmt.BASE_DIR).glob("*.safetensors")))
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    position = rng.randrange(start, len(raw))
    raw[position] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(raw))
    return f"base-bit {path.relative_to(release)} @{position}"


def _escape_paths(release: Path, rng: random.Random, escape_root: Path) -> str:
    """Point a file name of the manifest (a source file, the index file) outside the merge target."""
    path = release / fmt.BASE_DIR / fmt.MANIFEST_FILE
    manifest = json.loads(path.read_text())
    name = rng.choice(["../../ESCAPED.safetensors", str(escape_root / "ESCAPED_ABSOLUTE"), "sub/../../../ESCAPED"])
    if rng.random() < 0.5:
        files = manifest["source"]["files"]
        files[name] = files.pop(rng.choice(sorted(files)))
        where = "source.files"
    else:
        manifest["source"]["index_file"] = name
        where = "source.index_file"
    path.write_bytes(fmt.canonical_json(manifest))
    _reseal(release)
    return f"escape {where} {name!r}"


MUTATIONS = [_mutate_json, _mutate_json, _mutate_header, _mutate_payload, _flip_base_bit, _escape_paths]
SEALED = {_mutate_json, _mutate_payload, _escape_paths}
"""Mutations that recompute the hashes: only the full stage's source sha256 can tell them from a real release."""


def _tensors(folder: Path) -> dict[str, bytes]:
    return {
        name: fmt.tensor_bytes(tensor).tobytes()
        for file in sorted(folder.glob("*.safetensors"))
        for name, tensor in load_file(file).items()
    }


def _names_culprit(message: str, release: Path, tensor_names) -> bool:
    file_names = {path.name for path in release.rglob("*")} | {fmt.BASE_DIR}
    return any(name in message for name in file_names) or any(f"'{name}'" in message for name in tensor_names)


class _Timeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Timeout


def run_fuzz(release: Path, workdir: Path, cases: int = CASES, seed: int = SEED) -> tuple[collections.Counter, list[str]]:
    """Mutate copies of ``release`` and merge each; count outcomes. Returns (counts, descriptions of bad cases)."""
    from p2u_hub.core.merge import merge

    errors = _error_base()
    rng = random.Random(seed)
    stages = {"full": _tensors(merge(release, workdir / "reference-full")), 1: _tensors(merge(release, workdir / "reference-1", stage=1))}
    tensor_names = set(stages["full"])
    counts: collections.Counter = collections.Counter()
    bad: list[str] = []
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        for case in range(cases):
            sandbox = workdir / f"case-{case}"
            escape_root = sandbox / "outside"
            copy_dir = sandbox / "inside" / "release"
            shutil.copytree(release, copy_dir)
            escape_root.mkdir()
            mutation = rng.choice(MUTATIONS)
            description = mutation(copy_dir, rng, escape_root)
            stage = "full" if mutation in SEALED or case % 2 else 1
            target = sandbox / "inside" / "out" / "merged"
            description += f" (stage {stage})"
            signal.alarm(CASE_SECONDS)
            try:
                merge(copy_dir, target, stage=stage)
                outcome = "correct" if _tensors(target) == stages[stage] else "silently wrong"
            except _Timeout:
                outcome = "hang"
            except errors as error:
                outcome = "P2UError naming the culprit" if _names_culprit(str(error), copy_dir, tensor_names) else "P2UError naming nothing"
                description += f": {type(error).__name__}: {str(error)[:200]}"
            except Exception as error:  # noqa: BLE001 - counted: this is what the fuzzer looks for
                outcome = f"raw {type(error).__name__}"
                description += f": {str(error)[:200]}"
            finally:
                signal.alarm(0)
            outside = [p for p in sandbox.rglob("*") if p.name.startswith(ESCAPE_NAMES) or p.parent == escape_root]
            if outside:
                outcome = "wrote outside the target"
            counts[outcome] += 1
            if outcome not in ("correct", "P2UError naming the culprit"):
                bad.append(f"{outcome}: {description}")
            shutil.rmtree(sandbox, ignore_errors=True)
    finally:
        signal.signal(signal.SIGALRM, previous)
    return counts, bad


def _tiny_release(folder: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import save_random_model

    from p2u_hub.core.split import split

    source = save_random_model(folder / "source", "gpt2", max_shard_size="100KB")
    return split(source, folder / "release", bits=4, group_size=64, stages=[8])


@pytest.mark.slow
def test_fuzzed_releases_merge_exactly_or_fail_naming_the_culprit(tmp_path: Path):
    release = _tiny_release(tmp_path)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    counts, bad = run_fuzz(release, tmp_path / "fuzz")
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert set(counts) <= {"correct", "P2UError naming the culprit"}, "\n".join(bad[:20])
    assert counts["P2UError naming the culprit"] > CASES // 2  # the mutations do reach the reader
    assert grown_mb < 512, f"peak memory grew by {grown_mb:.0f} MB while fuzzing"


if __name__ == "__main__":
    import tempfile
    import time

    with tempfile.TemporaryDirectory() as scratch:
        started = time.monotonic()
        counts, bad = run_fuzz(_tiny_release(Path(scratch)), Path(scratch) / "fuzz")
        for outcome, count in counts.most_common():
            print(f"{count:5d}  {outcome}")
        print(f"{time.monotonic() - started:.1f} s, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB")
        for line in bad[:60]:
            print("  " + line)
