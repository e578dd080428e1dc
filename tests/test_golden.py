"""Committed releases of every format version decode bit-exactly: the format is locked, not just round-tripping.

``tests/golden/vN/`` is written once by ``tests/golden/make_golden.py`` when version N appears.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import transformers
from safetensors.torch import load_file

import p2u_hub
from p2u_hub.core import format as fmt
from p2u_hub.core.release import Release
from p2u_hub.integrations.transformers import P2UConfig

GOLDEN = sorted((Path(__file__).parent / "golden").glob("v*/"), key=lambda folder: int(folder.name[1:]))


def test_there_is_a_golden_release_of_the_current_version():
    assert f"v{fmt.FORMAT_VERSION}" in [folder.name for folder in GOLDEN]


@pytest.mark.parametrize("golden", GOLDEN, ids=[folder.name for folder in GOLDEN])
def test_golden_release_rebuilds_every_stage_bit_exactly(golden: Path, tmp_path: Path):
    expected = json.loads((golden / "expected.json").read_text())["tensor_sha256"]
    release = Release.open(golden / "release")
    assert [fmt.stage_name(index) for index in range(release.stage_count + 1)] == list(expected)
    for index, stage in enumerate(expected):
        rebuilder = release.rebuilder(index)
        rebuilt = {name: fmt.tensor_sha256(rebuilder.tensor(name)) for name in expected[stage]}
        assert rebuilt == expected[stage], f"{golden.name} {stage}"
    merged = p2u_hub.merge(golden / "release", tmp_path / "merged")
    tensors = load_file(merged / "model.safetensors")
    assert {name: fmt.tensor_sha256(tensor) for name, tensor in tensors.items()} == expected[fmt.stage_name(release.stage_count)]
    model = transformers.AutoModel.from_pretrained(golden / "release" / fmt.BASE_DIR)
    assert type(model).__name__ == "BertModel" and model.hf_quantizer.quantization_config.quant_method == "p2u"
    dense = transformers.AutoModel.from_pretrained(golden / "release" / fmt.BASE_DIR, quantization_config=P2UConfig(load_mode="dense"))
    loaded = dense.state_dict()  # the codes and scales as transformers loaded them (a coded base's decoded), expanded
    assert {name: fmt.tensor_sha256(loaded[name]) for name in release.manifest.quantized_tensors()} == {
        name: expected[fmt.stage_name(0)][name] for name in release.manifest.quantized_tensors()
    }


def test_a_newer_format_version_is_refused_with_a_clear_error(tmp_path: Path):
    release = shutil.copytree(GOLDEN[-1] / "release", tmp_path / "release")
    manifest_path = release / fmt.BASE_DIR / fmt.MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = fmt.FORMAT_VERSION + 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(fmt.P2UFormatError, match=rf"format version {fmt.FORMAT_VERSION + 1} is newer.*upgrade p2u-hub"):
        Release.open(release)
