"""A release is untrusted input: paths that escape, size bombs, flipped bits, half-failed upgrades, racing forwards."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import p2u_hub
from p2u_hub.codecs import entropy, ladder, progressive
from p2u_hub.core import format as fmt
from p2u_hub.integrations.transformers import PackedLayer
from p2u_hub.tools.cli import main

TOKENS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 1]])


@pytest.fixture
def release(random_checkpoint, tmp_path) -> Path:
    """A split tiny BertModel (4-bit base, an 8-bit stage, the lossless stage)."""
    return p2u_hub.split(random_checkpoint("bert"), tmp_path / "release")


def _rewrite_manifest(release: Path, change) -> None:
    """Apply ``change`` to the manifest and recompute every hash that names it, as a malicious publisher would."""
    base = release / fmt.BASE_DIR
    manifest = json.loads((base / fmt.MANIFEST_FILE).read_text())
    change(manifest)
    (base / fmt.MANIFEST_FILE).write_bytes(fmt.canonical_json(manifest))
    digest = fmt.sha256_bytes((base / fmt.MANIFEST_FILE).read_bytes())
    config = json.loads((base / fmt.CONFIG_FILE).read_text())
    config["quantization_config"]["manifest_sha256"] = digest
    (base / fmt.CONFIG_FILE).write_bytes(fmt.canonical_json(config))
    for stage in release.glob("stage-*"):
        record = json.loads((stage / fmt.STAGE_FILE).read_text())
        record["parent"] = digest
        (stage / fmt.STAGE_FILE).write_bytes(fmt.canonical_json(record))


def _replace_payload(release: Path, stage: int, name: str, payload: bytes) -> None:
    """Put ``payload`` in a stage and re-seal its sha256 and size, so only decoding can tell it is wrong."""
    folder = release / fmt.stage_dir_name(stage)
    tensors = load_file(folder / "delta.safetensors")
    tensors[name] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    save_file(tensors, folder / "delta.safetensors")
    record = json.loads((folder / fmt.STAGE_FILE).read_text())
    record["tensors"][name] = {"sha256": fmt.sha256_bytes(payload), "bytes": len(payload)}
    (folder / fmt.STAGE_FILE).write_bytes(fmt.canonical_json(record))


def _cli_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]  # progress bars may precede it
    assert len(lines) == 1 and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("name", ["../../ESCAPED.safetensors", "/tmp/ESCAPED.safetensors", "a\\b.safetensors", "x\x00.safetensors"])
def test_source_file_names_escaping_the_output_are_refused(release, tmp_path, capsys, name):
    def rename(manifest):
        files = manifest["source"]["files"]
        files[name] = files.pop("model.safetensors")

    _rewrite_manifest(release, rename)
    error = _cli_error(capsys, "merge", str(release), str(tmp_path / "out" / "merged"))
    assert "p2u_manifest.json: source file name" in error and "is not a plain relative name" in error
    assert not (tmp_path / "ESCAPED.safetensors").exists() and not (tmp_path / "out").exists()
    assert "is not a plain relative name" in _cli_error(capsys, "verify", str(release))


def test_index_file_escaping_the_output_is_refused(release, tmp_path, capsys):
    _rewrite_manifest(release, lambda manifest: manifest["source"].update(index_file="../../ESCAPED.json"))
    error = _cli_error(capsys, "merge", str(release), str(tmp_path / "out" / "merged"))
    assert "source index_file '../../ESCAPED.json' is not a plain relative name" in error
    assert not list(tmp_path.rglob("ESCAPED*"))


def test_symlinked_file_in_a_release_is_refused(release, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    (release / "base" / "notes.txt").symlink_to(secret)
    error = _cli_error(capsys, "merge", str(release), str(tmp_path / "merged"))
    assert "notes.txt: symlinks are not allowed in a release" in error
    (release / "base" / "notes.txt").unlink()
    (release / "base" / "model.safetensors").rename(tmp_path / "model.safetensors")
    (release / "base" / "model.safetensors").symlink_to(tmp_path / "model.safetensors")
    assert "model.safetensors: symlinks are not allowed in a release" in _cli_error(capsys, "verify", str(release))


@pytest.mark.parametrize(
    ("revision", "message"),
    [("../../../x", "revision '../../../x' is not a valid"), ("p2u/../../x", "is not a valid"), ("a\\b", "is not a valid")],
)
def test_stage_revisions_are_validated_before_any_download(release, tmp_path, capsys, revision, message):
    config_path = release / "base" / fmt.CONFIG_FILE
    config = json.loads(config_path.read_text())
    for stage in config["quantization_config"]["stages"]:
        stage.update(path=None, repo_id="org/model", revision=revision)
    config_path.write_bytes(fmt.canonical_json(config))
    assert message in _cli_error(capsys, "verify", str(release))


def test_huge_declared_shape_fails_at_once(release, capsys):
    name = "encoder.layer.0.attention.self.query.weight"
    bits = fmt.read_manifest(release / fmt.BASE_DIR).tensors[name].bits  # the tensor's own base width
    _rewrite_manifest(release, lambda manifest: manifest["tensors"][name].update(shape=[1099511627776, 64]))
    error = _cli_error(capsys, "verify", str(release))
    offsets = 4096 // 64 // 8 * bits  # raw: shorter than the shape implies, so a stream; decoded first, before any buffer
    assert f"tensor {name!r} do not decode (offsets stored as a stream of {offsets} bytes cannot hold {1 << 40} symbols)" in error


def test_deflate_bomb_stops_at_the_declared_size(release, capsys):
    name = "encoder.layer.0.attention.self.query.weight"
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = bomb.compress(bytes(256 << 20)) + bomb.flush()  # 256 MB of zeros in ~250 KB
    block = bytes([1]) + len(stream).to_bytes(4, "little") + stream
    _replace_payload(release, 1, name, (1).to_bytes(4, "little") + len(block).to_bytes(4, "little") + block)
    error = _cli_error(capsys, "merge", str(release), str(release.parent / "merged"), "--stage", "1")
    assert f"stage-1: payload of tensor {name!r} does not decode (DEFLATE stream holds more than the" in error


def test_flipped_base_bit_is_caught_at_every_stage_and_at_load(release, tmp_path, capsys):
    weights = release / "base" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-100] ^= 0x10
    weights.write_bytes(bytes(raw))
    for stage in ("base", "1", "full"):
        error = _cli_error(capsys, "merge", str(release), str(tmp_path / f"merged-{stage}"), "--stage", stage)
        assert "model.safetensors: tensor" in error and "fails its base_sha256 check" in error
    with pytest.raises(fmt.ChecksumError, match=r"model\.safetensors: tensor '.*' fails its base_sha256 check"):
        transformers.AutoModel.from_pretrained(release / "base")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("bits", 99, "bits must be an integer in 2..8, got 99"),
    ("group_size", 0, "group_size must be an integer in 8..1048576, got 0"),
    ("group_size", 12, "group_size must be a multiple of 8, got 12"),
    ("bits", 3, r"quantization_config \(bits 3, .*does not match the manifest's ladder"),
])  # fmt: skip
def test_bad_quantization_config_fails_verify(release, capsys, field, value, message):
    config_path = release / "base" / fmt.CONFIG_FILE
    config = json.loads(config_path.read_text())
    config["quantization_config"][field] = value
    config_path.write_bytes(fmt.canonical_json(config))
    error = _cli_error(capsys, "verify", str(release))
    assert "config.json" in error
    assert pytest.importorskip("re").search(message, error), error


def test_coded_base_codes_out_of_range_fail_at_load_and_at_merge_naming_the_tensor(release, capsys):
    """A publisher seals codes wider than the tensor's width in a coded base: only decoding can tell."""
    name = "encoder.layer.0.attention.self.query.weight"
    manifest = fmt.read_manifest(release / fmt.BASE_DIR)
    spec, numel = manifest.tensor_ladder(name), manifest.tensors[name].numel
    weights = release / fmt.BASE_DIR / "model.safetensors"
    tensors = load_file(weights)
    groups = ladder.group_count(numel, spec.group_size)
    offsets = progressive.decode_base_offsets(tensors[fmt.offsets_key(name)], spec, groups)
    contexts = progressive._offset_contexts(offsets, spec, groups).repeat_interleave(spec.group_size)
    wide = torch.full((groups * spec.group_size,), 1 << spec.base_bits)
    tensors[name] = progressive.byte_tensor(progressive._frame([entropy.encode(wide, contexts)]))
    save_file(tensors, weights)
    _rewrite_manifest(release, lambda manifest: manifest["base_sha256"].update({name: fmt.tensor_sha256(tensors[name])}))
    message = rf"model\.safetensors: the base codes, scales or offsets of tensor '{name}' do not decode \(a code is wider than the tensor's {spec.base_bits} bits\)"
    with pytest.raises(fmt.P2UFormatError, match=message):
        transformers.AutoModel.from_pretrained(release / fmt.BASE_DIR)
    error = _cli_error(capsys, "merge", str(release), str(release.parent / "merged"), "--stage", "base")
    assert pytest.importorskip("re").search(message, error), error


def test_offsets_stream_in_a_base_of_format_6_is_refused_naming_the_tensor(release, capsys):
    """Before format 7 a tensor's offsets have one size: a base relabelled as format 6 whose offsets are streams is
    refused naming the tensor, by ``from_pretrained`` before transformers' own size check (which names neither the
    file nor the format) and by merge."""
    manifest = fmt.read_manifest(release / fmt.BASE_DIR)
    stored = load_file(release / fmt.BASE_DIR / "model.safetensors")
    coded = {}  # offsets name -> (stream length, raw length)
    for name, entry in manifest.quantized_tensors().items():
        spec = manifest.tensor_ladder(name)
        size = ladder.offsets_bytes(ladder.group_count(entry.numel, spec.group_size), spec.base_bits)
        if stored[fmt.offsets_key(name)].numel() < size:
            coded[fmt.offsets_key(name)] = (stored[fmt.offsets_key(name)].numel(), size)
    assert coded  # the larger tensors' offsets are streams
    _rewrite_manifest(release, lambda manifest: manifest.update(format_version=6))
    pattern = r"tensor '(\S+)' is stored as U8\[(\d+)\], the manifest implies U8\[(\d+)\]"
    with pytest.raises(fmt.P2UFormatError, match=pattern) as error:
        transformers.AutoModel.from_pretrained(release / fmt.BASE_DIR)
    for message in (str(error.value), _cli_error(capsys, "merge", str(release), str(release.parent / "merged"), "--stage", "base")):
        name, stream, raw = pytest.importorskip("re").search(pattern, message).groups()
        assert "model.safetensors" in message and coded[name] == (int(stream), int(raw))


def test_version_1_release_still_reads_with_a_warning(tmp_path):
    golden = Path(__file__).parent / "golden" / "v1"
    expected = json.loads((golden / "expected.json").read_text())["tensor_sha256"]
    with pytest.warns(UserWarning, match="format version 1 records no checksums of the base weights"):
        merged = p2u_hub.merge(golden / "release", tmp_path / "merged")
    rebuilt = {name: fmt.tensor_sha256(tensor) for name, tensor in load_file(merged / "model.safetensors").items()}
    assert rebuilt == expected[fmt.stage_name(len(expected) - 1)]


def test_a_release_relabelled_version_1_cannot_skip_its_checksums(release):
    def downgrade(manifest):
        manifest["format_version"] = 1
        del manifest["base_sha256"]

    _rewrite_manifest(release, downgrade)
    with pytest.raises(fmt.P2UFormatError, match=r"tensor '[^']+' has a base width, which only ladder tensors of format 3\+ have"):
        p2u_hub.merge(release, release.parent / "merged")


def _output(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)[0]


def test_undecodable_stage_leaves_true_layer_stages_and_a_retry_never_lowers(release, random_checkpoint):
    stage_file = release / "stage-2" / "delta.safetensors"
    original = load_file(stage_file)
    victim = "encoder.layer.1.attention.self.query.weight"  # in the middle: earlier layers get swapped first
    _replace_payload(release, 2, victim, original[victim].numpy().tobytes()[:-1])
    model = transformers.AutoModel.from_pretrained(release / "base")
    quantizer = model.hf_quantizer
    with pytest.raises(fmt.P2UFormatError, match=rf"stage-2: payload of tensor '{victim}' does not decode"):
        p2u_hub.upgrade(model)
    source = transformers.AutoModel.from_pretrained(random_checkpoint("bert"))
    full = {name for name, stage in quantizer.layer_stages.items() if stage == 2}
    assert full and len(full) < len(quantizer.parameters) and quantizer.stage == 0
    p2u_hub.upgrade(model, 1)
    assert quantizer.stage == 1 and {name for name, stage in quantizer.layer_stages.items() if stage == 2} == full
    for name in full:  # still the source bits: upgrading to stage 1 did not lower them
        assert torch.equal(model.get_parameter(name), source.get_parameter(name)), name
    _replace_payload(release, 2, victim, original[victim].numpy().tobytes())
    p2u_hub.upgrade(model)
    assert not hasattr(model, "hf_quantizer") or model.hf_quantizer is None or quantizer.stage == 2
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_forward_racing_a_packed_upgrade_never_fails(release, random_checkpoint):
    model = transformers.AutoModel.from_pretrained(release / "base")
    layers = [module for module in model.modules() if isinstance(module, PackedLayer)]
    inputs = [torch.tensor([[0, 1]]) if isinstance(module, torch.nn.Embedding) else torch.ones(1, module.in_features) for module in layers]
    errors: list[BaseException] = []
    calls = 0
    stop = threading.Event()

    def hammer() -> None:  # each layer's forward, over and over: the cheapest way to land inside a swap
        nonlocal calls
        while not stop.is_set():
            for module, tokens in zip(layers, inputs):
                try:
                    with torch.no_grad():
                        module(tokens)
                except Exception as error:  # noqa: BLE001 - collected: any failure is the bug this test looks for
                    errors.append(error)
                calls += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, inside the swap of every layer
    thread = threading.Thread(target=hammer)
    try:
        thread.start()
        for stage in (1, "full"):
            p2u_hub.upgrade(model, stage)
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]
    assert calls > len(layers)
    assert torch.equal(_output(model), _output(transformers.AutoModel.from_pretrained(random_checkpoint("bert"))))


def test_a_forward_begun_before_its_layer_swapped_still_works(release):
    """What the race above looks for, made certain: a packed forward that runs after the layer became plain."""
    model = transformers.AutoModel.from_pretrained(release / "base")
    query = model.encoder.layer[0].attention.self.query
    packed_forward = type(query).forward
    p2u_hub.upgrade(model)
    assert type(query) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(packed_forward(query, torch.ones(1, query.in_features)), query(torch.ones(1, query.in_features)))


def test_cli_push_with_the_hub_down_prints_one_line(release, capsys, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    error = _cli_error(capsys, "push", str(release), "org/model")
    assert error.startswith("p2u push: error: org/model: cannot reach the Hub at http://127.0.0.1:9")


def test_serve_hub_on_a_busy_port_prints_one_line(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "p2u_hub.tools.cli", "serve-hub", "--root", str(tmp_path / "root"), "--port", str(port)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"p2u serve-hub: error: port {port} on 127.0.0.1 is busy (Address already in use)"]
    assert not (tmp_path / "root").exists()
