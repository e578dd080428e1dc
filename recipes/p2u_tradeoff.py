"""Reproduce the P²U tradeoff offline: accuracy, bytes and time to a usable / full model for bases of 2, 3, 4 and 8 bits.

P²U (progressive precision update) sends a low-bit model first and the precision update after: the receiver has
a working model after a fraction of the bytes, and the original in the end. This recipe measures that tradeoff
on data that needs no network: scikit-learn's bundled digits (1,797 grey 8x8 images of 10 classes, wrapped in a
``datasets.Dataset``), classified by a tiny transformers ``ViTForImageClassification`` (2x2 patches) trained
here in one or two minutes on two CPU cores. A model this small is harder to quantize than a large one (few
weights per layer, every one matters), so the low-bit bases show the tradeoff clearly.

For each base width (ladders 2 -> 4 -> 8 -> lossless, 3 -> 8 -> lossless, 4 -> 8 -> lossless, 8 -> lossless):

* accuracy of the base and after each stage: the checkpoint is rebuilt with ``p2u_hub.merge(stage=k)`` and
  loaded with plain ``from_pretrained``, so it is exactly the model a user holds after that download;
* bytes sent per stage (``p2u inspect``);
* time to usable / full at two bandwidths, *computed* as measured bytes / bandwidth + measured local time to
  load the base with ``from_pretrained`` and to apply each stage with ``p2u_hub.upgrade`` (median of 3);

against sending the original (its bytes / bandwidth + its load time) and sending only a quantized model (the base,
never upgraded). Writes ``docs/p2u_tradeoff.md`` and ``docs/p2u_tradeoff.png``.

Run from the repository root::

    python recipes/p2u_tradeoff.py [--bandwidths 0.1 1] [--epochs 30] [--docs docs]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import torch
import transformers
from huggingface_hub.utils import disable_progress_bars
from sklearn.datasets import load_digits

import p2u_hub
from p2u_hub.core.summary import summarize

LADDERS = {2: (4, 8), 3: (8,), 4: (8,), 8: ()}
"""Base width -> intermediate integer stages; every ladder ends with the lossless stage."""
REPEATS = 3


def digits_dataset(seed: int = 0) -> datasets.DatasetDict:
    """The digits as ``pixel_values`` (1x8x8, scaled to 0..1) and ``label``, 70% train / 30% test."""
    digits = load_digits()
    data = datasets.Dataset.from_dict({"pixel_values": (digits.images[:, None] / 16.0).tolist(), "label": digits.target.tolist()})
    return data.train_test_split(test_size=0.3, seed=seed).with_format("torch")


def train(data: datasets.Dataset, epochs: int, seed: int = 0) -> transformers.ViTForImageClassification:
    """A 4-layer, 64-wide ViT on 2x2 patches, AdamW with a one-cycle schedule (deterministic for a seed)."""
    torch.manual_seed(seed)
    config = transformers.ViTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=128, num_labels=10, id2label={i: str(i) for i in range(10)}, label2id={str(i): i for i in range(10)},
    )  # fmt: skip
    model = transformers.ViTForImageClassification(config)
    columns = data[:]  # every row, as tensors
    pixels, labels = columns["pixel_values"], columns["label"]
    batch = 64
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=epochs * -(-len(labels) // batch))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels))
        for start in range(0, len(labels), batch):
            rows = order[start : start + batch]
            model(pixel_values=pixels[rows], labels=labels[rows]).loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
    return model.eval()


def accuracy(checkpoint: Path, test: datasets.Dataset) -> float:
    model = transformers.ViTForImageClassification.from_pretrained(checkpoint).eval()
    columns = test[:]
    with torch.inference_mode():
        predictions = model(pixel_values=columns["pixel_values"]).logits.argmax(-1)
    return float((predictions == columns["label"]).float().mean())


def stage_accuracies(release: Path, stage_count: int, test: datasets.Dataset, work: Path) -> list[float]:
    """Accuracy of the checkpoint a user holds after the base and after each stage (rebuilt by merge)."""
    results = []
    for stage in range(stage_count + 1):
        checkpoint = p2u_hub.merge(release, work / f"{release.name}-at-{stage}", stage=stage)
        results.append(accuracy(checkpoint, test))
    return results


def median_seconds(action) -> float:
    """Median wall time of ``REPEATS`` calls of ``action`` (a tiny model's load time is noisy)."""
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def upgrade_seconds(base: Path, stage_count: int) -> tuple[float, list[float]]:
    """Median time to load the base with ``from_pretrained``, and to apply each stage after the one before."""
    load = median_seconds(lambda: transformers.ViTForImageClassification.from_pretrained(base))
    steps = []
    for stage in range(1, stage_count + 1):

        def step(stage: int = stage) -> float:  # time only the upgrade to ``stage``, starting from a model at ``stage - 1``
            model = transformers.ViTForImageClassification.from_pretrained(base)
            if stage > 1:
                p2u_hub.upgrade(model, stage=stage - 1)
            start = time.perf_counter()
            p2u_hub.upgrade(model, stage=stage)
            return time.perf_counter() - start

        steps.append(statistics.median(step() for _ in range(REPEATS)))
    return load, steps


def measure(bits: int, original: Path, test: datasets.Dataset, work: Path) -> dict:
    release = p2u_hub.split(original, work / f"release-{bits}", bits=bits, stages=LADDERS[bits])
    summary = summarize(release)
    stage_count = len(summary["stages"]) - 1
    load_s, upgrade_s = upgrade_seconds(release / "base", stage_count)
    return {
        "bits": bits,
        "source_bytes": summary["source_bytes"],
        "ladder": [bits, *LADDERS[bits], "exact"],
        "accuracy": stage_accuracies(release, stage_count, test, work),
        "cumulative_bytes": [stage["cumulative_bytes"] for stage in summary["stages"]],
        "load_s": load_s,
        "upgrade_s": upgrade_s,
    }


def seconds_at(row: dict, stage: int, mbps: float) -> float:
    """Bytes up to ``stage`` / bandwidth + load of the base + the upgrades up to ``stage``."""
    return row["cumulative_bytes"][stage] / (mbps * 1e6) + row["load_s"] + sum(row["upgrade_s"][:stage])


def markdown(original: dict, rows: list[dict], bandwidths: list[float], command: str) -> str:
    source_bytes = original["bytes"]
    widest = max(len(row["accuracy"]) for row in rows)
    lines = [
        "# The P²U tradeoff on scikit-learn digits",
        "",
        f"Produced by `{command}` (`recipes/p2u_tradeoff.py`; method and caveats in its docstring).",
        f"Model: transformers `ViTForImageClassification`, {original['parameters']:,} parameters, float32, trained on "
        f"{original['train_samples']:,} digits and tested on {original['test_samples']}. Accuracy at every stage is that of the checkpoint rebuilt by "
        "`p2u_hub.merge(stage=k)` and loaded with `from_pretrained`; one test image is "
        f"{100 / original['test_samples']:.2f} points, so differences of a point or less are noise.",
        "",
        "## Accuracy after each download, and bytes sent",
        "",
        "| base | ladder | " + " | ".join(["base"] + [f"after stage-{k}" for k in range(1, widest)]) + " | base bytes | all bytes |",
        "|---|---|" + "---|" * widest + "---|---|",
    ]
    for row in rows:
        cells = [f"{100 * a:.1f}%" for a in row["accuracy"]] + [""] * (widest - len(row["accuracy"]))
        base, total = row["cumulative_bytes"][0], row["cumulative_bytes"][-1]
        lines.append(
            f"| {row['bits']}-bit | {' → '.join(map(str, row['ladder']))} | " + " | ".join(cells)
            + f" | {base:,} ({100 * base / source_bytes:.1f}%) | {total:,} ({100 * total / source_bytes:.1f}%) |"
        )  # fmt: skip
    lines.append(f"| original | float32 | {100 * original['accuracy']:.1f}% |" + " |" * (widest - 1) + f" | {source_bytes:,} (100%) |")
    lines += [
        "",
        "## Time to a usable and to the final model",
        "",
        "Computed, not timed over a network: bytes / bandwidth + the measured local time to load the base with "
        f"`from_pretrained` and to apply each stage with `p2u_hub.upgrade` (median of {REPEATS}; loads of the "
        f"original likewise). Load times: original {original['load_s']:.3f} s; "
        + ", ".join(f"{row['bits']}-bit base {row['load_s']:.3f} s" for row in rows)
        + ".",
        "",
        "| what is sent | bytes | accuracy when usable | final accuracy | "
        + " | ".join(f"usable @{mbps:g} MB/s | final @{mbps:g} MB/s" for mbps in bandwidths)
        + " |",
        "|---|---|---|---|" + "---|---|" * len(bandwidths),
    ]
    times = " | ".join(
        f"{source_bytes / (mbps * 1e6) + original['load_s']:.2f} s | {source_bytes / (mbps * 1e6) + original['load_s']:.2f} s"
        for mbps in bandwidths
    )
    lines.append(
        f"| original (float32) | {source_bytes:,} | {100 * original['accuracy']:.1f}% | {100 * original['accuracy']:.1f}% | {times} |"
    )
    for row in rows:
        base_times = " | ".join(f"{seconds_at(row, 0, mbps):.2f} s | {seconds_at(row, 0, mbps):.2f} s" for mbps in bandwidths)
        lines.append(
            f"| {row['bits']}-bit quantized only | {row['cumulative_bytes'][0]:,} | {100 * row['accuracy'][0]:.1f}% | "
            f"{100 * row['accuracy'][0]:.1f}% | {base_times} |"
        )  # fmt: skip
    for row in rows:
        last = len(row["cumulative_bytes"]) - 1
        p2u_times = " | ".join(f"{seconds_at(row, 0, mbps):.2f} s | {seconds_at(row, last, mbps):.2f} s" for mbps in bandwidths)
        lines.append(
            f"| p2u {' → '.join(map(str, row['ladder']))} | {row['cumulative_bytes'][-1]:,} | {100 * row['accuracy'][0]:.1f}% | "
            f"{100 * row['accuracy'][-1]:.1f}% | {p2u_times} |"
        )  # fmt: skip
    lines += ["", "![accuracy against bytes and time](p2u_tradeoff.png)", ""]
    return "\n".join(lines)


def plot(original: dict, rows: list[dict], mbps: float, path: Path) -> None:
    """Accuracy against cumulative bytes, and accuracy over time during a transfer at ``mbps``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (by_bytes, by_time) = pyplot.subplots(1, 2, figsize=(10, 3.8), dpi=90)
    for row in rows:
        label = "p2u " + " → ".join(map(str, row["ladder"]))
        by_bytes.plot([b / 1e3 for b in row["cumulative_bytes"]], [100 * a for a in row["accuracy"]], marker="o", label=label)
        times = [seconds_at(row, stage, mbps) for stage in range(len(row["accuracy"]))]
        by_time.step(
            [0, *times, times[-1] * 1.5], [0, *(100 * a for a in row["accuracy"]), 100 * row["accuracy"][-1]], where="post", label=label
        )
    original_time = original["bytes"] / (mbps * 1e6) + original["load_s"]
    by_bytes.plot(
        [original["bytes"] / 1e3], [100 * original["accuracy"]], marker="*", markersize=12, color="black", linestyle="", label="original"
    )
    by_time.step(
        [0, original_time, original_time * 1.5],
        [0, 100 * original["accuracy"], 100 * original["accuracy"]],
        where="post",
        color="black",
        linestyle="--",
        label="original",
    )
    by_bytes.set_xlabel("kB received (cumulative)")
    by_time.set_xlabel(f"seconds at {mbps:g} MB/s (bytes / bandwidth + load + upgrades)")
    for axes in (by_bytes, by_time):
        axes.set_ylabel("test accuracy (%)")
        axes.grid(alpha=0.3)
    by_bytes.legend(fontsize=7)
    figure.suptitle("P²U tradeoff: ViT on scikit-learn digits", fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bandwidths", type=float, nargs=2, default=[0.1, 1.0], metavar="MBPS",
        help="two download rates in MB/s (default 0.1 1: a slow mobile or IoT link, where P²U matters for a 0.5 MB model)",
    )  # fmt: skip
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    parser.add_argument("--docs", type=Path, default=Path("docs"), help="folder for p2u_tradeoff.md and .png (default docs)")
    args = parser.parse_args()
    disable_progress_bars()  # dozens of tiny loads and upgrades; their bars would bury the table
    transformers.utils.logging.disable_progress_bar()

    data = digits_dataset()
    with tempfile.TemporaryDirectory(prefix="p2u-tradeoff-") as folder:
        work = Path(folder)
        model = train(data["train"], args.epochs)
        model.save_pretrained(work / "original")
        rows = [measure(bits, work / "original", data["test"], work) for bits in LADDERS]
        original = {
            "accuracy": accuracy(work / "original", data["test"]),
            "bytes": rows[0]["source_bytes"],
            "parameters": model.num_parameters(),
            "train_samples": len(data["train"]),
            "test_samples": len(data["test"]),
            "load_s": median_seconds(lambda: transformers.ViTForImageClassification.from_pretrained(work / "original")),
        }
    command = "python recipes/p2u_tradeoff.py " + " ".join(
        f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()
    )
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / "p2u_tradeoff.md").write_text(markdown(original, rows, args.bandwidths, command))
    plot(original, rows, min(args.bandwidths), args.docs / "p2u_tradeoff.png")
    print((args.docs / "p2u_tradeoff.md").read_text())


if __name__ == "__main__":
    main()
