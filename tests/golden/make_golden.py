"""Write the golden release of the current format version: ``python tests/golden/make_golden.py``.

Creates ``tests/golden/v{FORMAT_VERSION}/``: ``release/`` (a tiny BERT split with the default
ladder and ``compact_base``, so that every kind of stored array is there) and ``expected.json``
(sha256 of every tensor's bytes at every stage, computed from the source and from this version's
rebuild). ``tests/test_golden.py`` decodes every committed version
bit-exactly, so a change to the format that still round-trips cannot pass unnoticed: a new
version gets a new folder and the old ones keep passing (or are dropped on purpose, with a note
in docs/format.md).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
import transformers

import p2u_hub
from p2u_hub.core import format as fmt
from p2u_hub.core.release import Release

HERE = Path(__file__).parent


def main() -> None:
    folder = HERE / f"v{fmt.FORMAT_VERSION}"
    if folder.exists():
        raise SystemExit(f"{folder} exists: a golden release is never rewritten; bump FORMAT_VERSION for a new one")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=1024,
        max_position_embeddings=32,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "source"
        transformers.BertModel(config).save_pretrained(source)
        release = p2u_hub.split(source, Path(scratch) / "release", bits=4, group_size=32, compact_base=True)
        opened = Release.open(release)
        stages = {}
        for index in range(opened.stage_count + 1):
            rebuilder = opened.rebuilder(index)
            stages[fmt.stage_name(index)] = {name: fmt.tensor_sha256(rebuilder.tensor(name)) for name in opened.manifest.tensors}
        shutil.copytree(release, folder / "release")
    fmt.write_json(folder / "expected.json", {"format_version": fmt.FORMAT_VERSION, "tensor_sha256": stages})
    print(folder)


if __name__ == "__main__":
    main()
