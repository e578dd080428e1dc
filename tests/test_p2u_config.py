"""One owner for the quantization_config block: format.QuantizationConfig parses it, P2UConfig carries it for transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import transformers

import p2u_hub
from p2u_hub.core import format as fmt
from p2u_hub.integrations.transformers import P2UConfig


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from conftest import save_random_model

    folder = tmp_path_factory.mktemp("config")
    return p2u_hub.split(save_random_model(folder / "bert", "bert"), folder / "release", uniform=True) / fmt.BASE_DIR


def _block(base: Path) -> dict:
    return json.loads((base / fmt.CONFIG_FILE).read_text())["quantization_config"]


def test_a_base_block_is_the_format_object_read_through(base):
    config = P2UConfig.from_dict(_block(base))
    assert config.format == fmt.read_quantization_config(base)
    assert (config.bits, config.group_size, config.stages) == (config.format.bits, config.format.group_size, config.format.stages)
    assert config.to_dict() == _block(base) and dict(config) == _block(base)


def test_load_switches_alone_hold_no_base_block():
    config = P2UConfig(load_mode=fmt.LOAD_MODE_DENSE, upgrade="prefetch")
    assert config.format is None and config.get_loading_attributes() == {"load_mode": "dense", "upgrade": "prefetch"}
    with pytest.raises(AttributeError, match="has no attribute 'bits'"):
        config.bits  # noqa: B018 - the read is the test
    with pytest.raises(fmt.P2UFormatError, match="quantization_config: no p2u base block"):
        config.to_format()


def test_a_load_mode_switch_overrides_the_base_without_changing_its_block(base):
    model = transformers.AutoModel.from_pretrained(base, quantization_config=P2UConfig(load_mode=fmt.LOAD_MODE_DENSE))
    config = model.hf_quantizer.quantization_config
    assert config.mode == fmt.LOAD_MODE_DENSE and config.format.load_mode == fmt.LOAD_MODE_PACKED
    assert config.to_dict()["load_mode"] == fmt.LOAD_MODE_DENSE


@pytest.mark.parametrize(("field", "value", "message"), [
    ("bits", 99, "quantization_config: bits must be an integer in 2..8, got 99"),
    ("format_version", fmt.FORMAT_VERSION + 1, "newer than this p2u-hub understands"),
])  # fmt: skip
def test_a_bad_block_fails_the_load_naming_the_field(base, tmp_path, field, value, message):
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    config = json.loads((broken / fmt.CONFIG_FILE).read_text())
    config["quantization_config"][field] = value
    (broken / fmt.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(fmt.P2UFormatError, match=message):
        transformers.AutoModel.from_pretrained(broken)
