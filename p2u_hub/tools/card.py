"""Model cards of a release (``p2u card``): a README.md for the base and for every stage folder.

Every figure in a card is measured, from two sources only: ``summary.summarize`` (bytes and
bits per weight, what ``p2u inspect --json`` prints) and the base's ``p2u_eval.json``
(``evaluate``). A release without an eval report for this very split gets cards that say
"not evaluated" and no ``model-index``, never made-up numbers.

Links: with ``repo_id`` given (``p2u push`` knows it) the cards link the Hub pages of the base
and of each stage's revision. Without it they name the revisions: the base is ``main`` and
stage N is the branch ``p2u-stage-N`` of the same repo (the default ``branches`` layout of
``p2u push``); for the ``repos`` layout pass ``stage_repo_id``.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

from huggingface_hub import EvalResult, ModelCard, ModelCardData, constants

from ..core import format as fmt
from ..core.release import Release
from ..core.summary import summarize
from ..core.tasks import AUTO, CAUSAL_LM, CLASSIFICATION, EMBEDDING, resolve_task
from ..extras import require
from .evaluate import read_eval

CARRIED_METADATA = ("license", "license_name", "license_link", "language", "datasets", "library_name", "pipeline_tag")
"""Metadata of the source card that still holds for a quantized copy (unlike its tags or widget): a
sentence-transformers model stays one, its base loading with ``SentenceTransformer``."""
DEFAULT_LIBRARY = "transformers"
SENTENCE_TRANSFORMERS = "sentence-transformers"
NOT_EVALUATED = "not evaluated (run `p2u eval`)"
HUB_TASKS = {EMBEDDING: "sentence-similarity", CAUSAL_LM: "text-generation", CLASSIFICATION: "text-classification"}
AUTO_CLASSES = {EMBEDDING: "AutoModel", CAUSAL_LM: "AutoModelForCausalLM", CLASSIFICATION: "AutoModelForSequenceClassification"}
TAGS = ["p2u", "progressive-precision"]


def write_cards(
    release_dir: str | os.PathLike,
    *,
    base_model: str | None = None,
    repo_id: str | None = None,
    stage_repo_id: str | None = None,
) -> list[Path]:
    """Write README.md into the base folder and into every stage folder, and the quality plot into the base.

    Args:
        release_dir: a release folder from ``split`` whose stages are local folders.
        base_model: Hub id of the source model (card metadata ``base_model``); default: the
            ``base_model`` of the card already in the base folder (an earlier ``p2u card
            --base-model``, kept when ``push`` rewrites the cards), else the repo the release was
            split from, when it came from the Hub.
        repo_id: Hub repo the base is (or will be) pushed to; enables links and a ready
            ``from_pretrained`` snippet.
        stage_repo_id: repo holding the stage branches; default ``repo_id`` (``branches`` layout).

    Returns:
        The files written: the base card, the plot (when evaluated), then each stage card.

    Raises:
        P2UFormatError: the release is incomplete, or a stage is not a local folder.
    """
    release = Release.open(release_dir)
    for entry in release.qconfig.stages:
        if entry.path is None or not (release.base_dir / entry.path / fmt.STAGE_FILE).is_file():
            raise fmt.P2UFormatError(f"{entry.name}: not a local folder; write cards on the output folder of p2u split")
    base_model = base_model or _card_base_model(release.base_dir / fmt.README_FILE) or release.manifest.source_repo
    context = _CardContext(release, base_model, repo_id, stage_repo_id or repo_id)
    written = []
    plot = release.base_dir / fmt.QUALITY_PLOT_FILE
    if context.report is not None:
        context.plot_quality(plot)
        written.append(plot)
    else:
        plot.unlink(missing_ok=True)  # a plot left from an earlier split would not match these stages
    base_card = release.base_dir / fmt.README_FILE
    context.base_card().save(base_card)
    written.insert(0, base_card)
    for entry in release.qconfig.stages:
        path = (release.stage_dir(entry.index) / fmt.README_FILE).resolve()
        context.stage_card(entry.index).save(path)
        written.append(path)
    return written


class _CardContext:
    """What every card of one release shares: sizes, eval report, carried metadata, where things live."""

    def __init__(self, release: Release, base_model: str | None, repo_id: str | None, stage_repo_id: str | None):
        self.release = release
        self.base_model = base_model
        self.repo_id = repo_id
        self.stage_repo_id = stage_repo_id
        self.summary = summarize(release.base_dir)
        self.report = read_eval(release)
        self.config = fmt.read_json(release.base_dir / fmt.CONFIG_FILE)
        self.carried = _source_metadata(release.base_dir / fmt.SOURCE_README_FILE)
        self.carried.setdefault("library_name", DEFAULT_LIBRARY)
        self.task = self.report["task"] if self.report else resolve_task(AUTO, self.config.get("architectures"))
        self.carried.setdefault("pipeline_tag", HUB_TASKS[self.task])
        self.bits = release.qconfig.bits
        self.title = (base_model or release.base_dir.resolve().parent.name).split("/")[-1]
        self.rows = {stage["name"]: stage for stage in self.summary["stages"]}

    # ---- cards

    def base_card(self) -> ModelCard:
        data = ModelCardData(
            base_model=self.base_model, base_model_relation="quantized" if self.base_model else None,
            tags=[*TAGS, f"{self.bits}-bit"],
            **self.carried, **self._model_index(0, self.repo_id or f"{self.title}-p2u-{self.bits}bit"),
        )  # fmt: skip
        summary = self.summary
        stage_list = ", ".join(f"{self._revision(k)} ({self._bits_label(k)})" for k in range(1, self.release.stage_count + 1))
        source = f"[{self.base_model}]({constants.ENDPOINT}/{self.base_model})" if self.base_model else "a source checkpoint"
        sections = [
            f"# {self.title}: p2u {self.bits}-bit progressive release",
            f"This is a progressive-precision (p2u) release of {source}. The base ({self._revision(0)}) is a complete "
            f"{self.bits}-bit model, group size {summary['ladder']['group_size']}, that loads with plain `from_pretrained` "
            f"once `p2u-hub` is installed: {_percent(self.rows['base'])} of the original's "
            f"{summary['source_bytes']:,} bytes of weights. The delta stages {stage_list} raise its precision step by "
            "step; after the last one the weights are the original's, bit for bit (every tensor is checked against the "
            "source sha256). Serve the base right away and upgrade when the full quality is needed.",
            "## Usage\n\n```bash\npip install p2u-hub\n```\n\n```python\n" + self._snippet() + "\n```",
            "## Stages\n\n" + self._stage_table(range(self.release.stage_count + 1), with_original=True) + "\n\n" + self._table_notes(),
            "## Base widths\n\n" + self._widths_section(),
        ]
        if self.report is not None:
            sections.append(f"![quality vs. download size]({fmt.QUALITY_PLOT_FILE})")
        sections.append(
            f"Made with [p2u-hub](https://pypi.org/project/p2u-hub/): `p2u split`, `p2u eval`, `p2u card`. `p2u merge` rebuilds "
            "a plain checkpoint at any stage; the original model card is kept as "
            f"[`{fmt.SOURCE_README_FILE}`]({fmt.SOURCE_README_FILE})."
        )
        return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")

    def stage_card(self, index: int) -> ModelCard:
        name = fmt.stage_dir_name(index)
        data = ModelCardData(
            base_model=self.repo_id, tags=[*TAGS, "p2u-delta", self._bits_label(index)],
            **self.carried, **self._model_index(index, f"{self.repo_id or self.title}-p2u-{name}"),
        )  # fmt: skip
        previous = self._revision(index - 1)
        following = f" Next: {self._revision(index + 1)}." if index < self.release.stage_count else ""
        sections = [
            f"# {self.title}: p2u {name} ({self._bits_label(index)} delta)",
            f"Stage {index} of {self.release.stage_count} of the p2u release whose base is {self._revision(0)}. "
            "This folder is not a model by itself: it holds the data that raises a loaded model "
            f"from {self._bits_label(index - 1)} to {self._bits_label(index)}"
            + (", which restores the original weights bit for bit" if index == self.release.stage_count else "")
            + f". `p2u_hub.upgrade(model)` fetches and merges it in place; `p2u merge` does it on disk. "
            f"Previous: {previous}.{following}",
            "## After this stage\n\n" + self._stage_table([index], with_original=False) + "\n\n" + self._table_notes(),
        ]
        return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")

    # ---- pieces

    def plot_quality(self, path: Path) -> None:
        """The headline metric against the cumulative download, base to last stage, with the original for scale."""
        report = self._report()
        metric = report["metrics"][0]
        indices = range(self.release.stage_count + 1)
        names = [fmt.stage_name(index) for index in indices]
        megabytes = [self.rows[name]["cumulative_bytes"] / 1e6 for name in names]
        values = [_stage_metrics(report, index)[metric["key"]] for index in indices]
        figure = require("matplotlib.figure", "eval", purpose="the quality plot of a card").Figure(figsize=(6.4, 4.0), dpi=120)
        axes = figure.subplots()
        axes.plot(megabytes, values, marker="o", label="p2u stages (cumulative download)")
        for name, x, y in zip(names, megabytes, values):
            axes.annotate(name, (x, y), textcoords="offset points", xytext=(4, -12 if metric["higher_is_better"] else 6))
        original = report["original"][metric["key"]]
        axes.plot([self.summary["source_bytes"] / 1e6], [original], marker="*", markersize=12, linestyle="", label="original download")
        axes.axhline(original, color="gray", linestyle="--", linewidth=0.8)
        axes.set_xlabel("download (MB)")
        axes.set_ylabel(metric["name"])
        axes.set_xlim(left=0)
        axes.set_title(f"{self.title}: p2u {self.bits}-bit base and stages")
        axes.margins(y=0.15)
        axes.grid(alpha=0.3)
        axes.legend(loc="lower right" if metric["higher_is_better"] else "upper right")
        figure.tight_layout()
        temporary = path.with_name(path.name + ".tmp")
        figure.savefig(temporary, format="png", metadata={"Software": None})
        os.replace(temporary, path)

    def _bits_label(self, index: int) -> str:
        bits = self.release.stage_bits(index)
        return f"{bits}-bit" if bits else "lossless"

    def _revision(self, index: int) -> str:
        """``main`` or ``p2u-stage-N``, linked to its Hub page when the repo is known."""
        revision = "main" if index == 0 else fmt.stage_branch(index)
        repo = self.repo_id if index == 0 else self.stage_repo_id
        return f"[`{revision}`]({constants.ENDPOINT}/{repo}/tree/{quote(revision, safe='')})" if repo else f"`{revision}`"

    def _snippet(self) -> str:
        """Python that runs as written once p2u-hub is installed (the card shows the pip line above it)."""
        repo = self.repo_id or "REPO_ID"  # where p2u push put the base
        if self.carried["library_name"] == SENTENCE_TRANSFORMERS:
            return (
                "import p2u_hub\nfrom sentence_transformers import SentenceTransformer\n"
                f'model = SentenceTransformer("{repo}")  # the {self.bits}-bit base, ready to use\n'
                'embeddings = model.encode(["A progressive release sends the low bits first."])\n'
                "p2u_hub.upgrade(model[0].auto_model)  # optional: fetch the stages and merge them in place, ending bit-exact"
            )
        auto_class = AUTO_CLASSES[self.task]
        return (
            "import p2u_hub, transformers\n"
            f'model = transformers.{auto_class}.from_pretrained("{repo}")  # the {self.bits}-bit base, ready to use\n'
            "p2u_hub.upgrade(model)  # optional: fetch the stages and merge them in place, ending bit-exact"
        )

    def _stage_table(self, indices, *, with_original: bool) -> str:
        """Bytes from ``summarize`` (as ``p2u inspect --json``), quality from the eval report: a row per stage index."""
        metrics = self.report["metrics"] if self.report else []
        header = ["stage", "revision", "bits", "bits/weight", "bytes", "% of original", "cumulative bytes"]
        header += [metric["name"] for metric in metrics] or ["quality"]
        source_bytes = self.summary["source_bytes"]
        rows = []
        for index in indices:
            stage = self.rows[fmt.stage_name(index)]
            row = [
                stage["name"], self._revision(index), str(stage["bits"] or "lossless"), f"{stage['bits_per_weight']:.2f}",
                f"{stage['bytes']:,}", _percent(stage), f"{stage['cumulative_bytes']:,}",
            ]  # fmt: skip
            rows.append((row, self._figures(index)))
        if with_original:
            row = [
                "original", f"[{self.base_model}]({constants.ENDPOINT}/{self.base_model})" if self.base_model else "source",
                "/".join(sorted({e.dtype for e in self.release.manifest.tensors.values() if e.torch_dtype.is_floating_point})),
                f"{8 * source_bytes / self.summary['parameters']:.2f}", f"{source_bytes:,}", "100.0%", f"{source_bytes:,}",
            ]  # fmt: skip
            rows.append((row, self.report["original"] if self.report else None))
        cells = [row + ([_number(figures[metric["key"]]) for metric in metrics] if figures else [NOT_EVALUATED]) for row, figures in rows]
        lines = [header, ["---"] * len(header), *cells]
        return "\n".join("| " + " | ".join(line) + " |" for line in lines)

    def _widths_section(self) -> str:
        """How many weights each base width holds, and every tensor's width and measured sensitivity."""
        widths = self.summary["widths"]
        tensors = widths["tensors"]
        total = sum(t["weights"] for t in tensors.values()) or 1
        how = {
            "uniform": "Every quantized tensor has the same width.",
            "calibration": f"Widths are chosen per tensor under the byte budget of a uniform {self.bits}-bit base, by the "
            "output error each tensor causes when quantized alone on p2u-hub's calibration sentences.",
            "weights": f"Widths are chosen per tensor under the byte budget of a uniform {self.bits}-bit base, by each "
            "tensor's relative weight error (data-free).",
        }[widths["method"]]
        lines = ["| base bits | tensors | % of quantized weights |", "| --- | --- | --- |"]
        for bits in sorted({t["bits"] for t in tensors.values()}):
            chosen = [t for t in tensors.values() if t["bits"] == bits]
            lines.append(f"| {bits} | {len(chosen)} | {100 * sum(t['weights'] for t in chosen) / total:.1f}% |")
        details = ["| tensor | weights | base bits | sensitivity |", "| --- | --- | --- | --- |"]
        for name, t in tensors.items():
            loss = f"{t['sensitivity']:.3g}" if "sensitivity" in t else "-"
            details.append(f"| `{name}` | {t['weights']:,} | {t['bits']} | {loss} |")
        corrected = sum(entry.corrected for entry in self.release.manifest.tensors.values())
        if corrected:
            how += (
                f" The base codes of {corrected} linear-layer tensors were chosen by GPTQ error compensation on the same "
                "sentences (`p2u split --gptq`): a better base, whose first stage also carries the corrections."
            )
        return (
            f"{how} On average {widths['average_bits']:.2f} bits per quantized weight, plus a float16 scale and an "
            "offset per group.\n\n"
            + "\n".join(lines)
            + "\n\n<details><summary>Every tensor</summary>\n\n"
            + "\n".join(details)
            + "\n\n</details>"
        )

    def _table_notes(self) -> str:
        notes = (
            "Bytes are what a download of that stage adds: safetensors weights and p2u metadata (tokenizer and config "
            "files excluded), as `p2u inspect --json` reports them; bits/weight = 8 x bytes / parameters."
        )
        if self.report is None:
            return notes + " No quality figures yet: run `p2u eval` on this release, then `p2u card` again."
        dataset = self.report["dataset"]
        return (
            f"{notes} Quality measured by `p2u eval` ({self.report['task']}) on {dataset['name']} "
            f"({dataset['samples']} samples, split `{dataset['split']}`, from `{dataset['source']}`"
            + (", held out: none of its texts is in the calibration text" if dataset.get("calibration_overlap") == 0 else "")
            + "). The last stage restores the original bit for bit, so its figures are the original's."
        )

    def _report(self) -> dict:
        """The eval report, for the parts of a card that exist only when the release was evaluated."""
        if self.report is None:
            raise ValueError("this release has no eval report; run `p2u eval` first")
        return self.report

    def _figures(self, index: int) -> dict | None:
        """The measured metrics of stage ``index``, None when not evaluated."""
        return None if self.report is None else _stage_metrics(self.report, index)

    def _model_index(self, index: int, model_name: str) -> dict:
        """``eval_results`` + ``model_name`` for ModelCardData (its ``model-index``), empty when not evaluated."""
        figures = self._figures(index)
        if figures is None:
            return {}
        report = self._report()
        dataset = report["dataset"]
        results = [
            EvalResult(
                task_type=HUB_TASKS[report["task"]],
                dataset_type=dataset["type"],
                dataset_name=_dataset_label(dataset),
                dataset_split=dataset["split"],
                metric_type=metric["key"],
                metric_name=metric["name"],
                metric_value=round(figures[metric["key"]], 4),
            )  # fmt: skip
            for metric in report["metrics"]
        ]
        return {"eval_results": results, "model_name": model_name}


def _stage_metrics(report: dict, index: int) -> dict:
    return next(stage["metrics"] for stage in report["stages"] if stage["name"] == fmt.stage_name(index))


def _dataset_label(dataset: dict) -> str:
    """The model-index dataset name: what was measured, so that no one reads a public benchmark's score into it."""
    return f"{dataset['name']} ({dataset['samples']} samples of {dataset['source']}, split {dataset['split']})"


def _card_base_model(readme: Path) -> str | None:
    """``base_model`` of a card p2u wrote earlier (None without one)."""
    if not readme.is_file():
        return None
    return ModelCard.load(readme, ignore_metadata_errors=True).data.base_model


def _source_metadata(readme: Path) -> dict:
    """License, language and training datasets from the source card's front matter (empty without one)."""
    if not readme.is_file():
        return {}
    data = ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
    return {key: data[key] for key in CARRIED_METADATA if data.get(key) is not None}


def _percent(stage: dict) -> str:
    return f"{100 * stage['fraction_of_source']:.1f}%"


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 10 else f"{value:,.2f}"
