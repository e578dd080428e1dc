"""Per-stage quality of a release (``p2u eval``): the original, the base and every stage on one dataset.

Each checkpoint is rebuilt with ``merge`` into a temporary folder and loaded with plain
``from_pretrained``, so what is measured is exactly the model a user has after that stage, and
the measurement does not depend on the quantizer plugin. The last stage restores the source
bit for bit (merge checks every tensor's sha256), so that checkpoint is evaluated once and its
outputs are both the original's figures and the reference the other stages are compared to.

The results go to ``p2u_eval.json`` in the base folder, beside the model card that quotes them
(``card.py``); the file records the manifest's sha256, so a card never quotes figures measured
on another split. Schema (canonical JSON, see ``format.canonical_json``)::

    {"format": "p2u-eval", "format_version": 1, "manifest_sha256": str,
     "task": "embedding" | "causal-lm" | "classification",
     "dataset": {"name": str, "type": str, "source": str, "split": str, "samples": int,
                 "calibration_overlap": int},   # texts containing a calibration sentence; 0 = held out
     "metrics": [{"key": str, "name": str, "higher_is_better": bool}, ...],   # first = headline
     "settings": {"batch_size": int, "max_length": int, "device": str, ...},
     "original": {metric key: float},
     "stages": [{"name": "base" | "stage-1" | ..., "bits": int | null, "metrics": {key: float}}]}
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy
import torch
import transformers
from huggingface_hub.utils import tqdm

from ..core import format as fmt
from ..core.merge import merge
from ..core.release import Release
from ..core.tasks import CAUSAL_LM, CLASSIFICATION, EMBEDDING, resolve_task
from ..extras import require

if TYPE_CHECKING:
    import datasets

FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
"""``datasets`` packaged builder for each file suffix; ``.txt`` files give one sample per paragraph."""


class EvalDataError(ValueError):
    """The dataset cannot serve the task: missing file, unknown format, split or column (named in the message)."""


@dataclass(frozen=True)
class Metric:
    key: str  # also the model-index metric type
    name: str
    higher_is_better: bool

    def to_json(self) -> dict:
        return {"key": self.key, "name": self.name, "higher_is_better": self.higher_is_better}


def evaluate(
    release_dir: str | os.PathLike,
    *,
    task: str = "auto",
    dataset: str | os.PathLike | datasets.Dataset | datasets.DatasetDict | None = None,
    split: str | None = None,
    max_samples: int | None = None,
    text_column: str | Sequence[str] | None = None,
    label_column: str | None = None,
    batch_size: int | None = None,
    max_length: int = 256,
    device: str | None = None,
    token: str | bool | None = None,
) -> dict:
    """Evaluate the original, the base and every stage, and write ``p2u_eval.json`` into the base folder.

    Args:
        release_dir: a release folder from ``split`` (or its base folder, with local stages).
        task: ``"embedding"`` (mean-pooled, L2-normalised last hidden state), ``"causal-lm"``
            (perplexity), ``"classification"`` (accuracy), or ``"auto"``: from the config's
            architectures (``...ForCausalLM``, ``...ForSequenceClassification``, else embedding).
        dataset: a local csv/json/jsonl/parquet/txt file, a ``datasets.Dataset`` or
            ``DatasetDict``; None uses the small set shipped with p2u-hub (80 scored sentence
            pairs for embeddings, a few paragraphs of English for causal LMs; classifiers need
            a labelled dataset).
        split: split of a ``DatasetDict`` (files load as the single split ``"train"``);
            default: the only split.
        max_samples: evaluate on the first ``max_samples`` rows only.
        text_column: column(s) of text. Default: ``sentence1`` + ``sentence2`` (scored pairs)
            or ``text`` for embeddings, ``text`` otherwise. Two names mean sentence pairs.
        label_column: gold scores (embeddings: Spearman correlation) or class labels
            (classification: accuracy). Default: ``score`` or ``label`` when present.
        batch_size: texts per forward pass; default 32, or 4 for causal LMs (their logits span
            the vocabulary).
        max_length: longest input in tokens (also capped by the model's positions).
        device: torch device; default CUDA when available, else CPU.
        token: Hub token, for stages that live on the Hub.

    Returns:
        The object written to ``p2u_eval.json`` (schema in this module's docstring).

    Raises:
        EvalDataError: the dataset is missing, unreadable or lacks the columns the task needs.
        P2UFormatError: the release is incomplete or corrupt.
    """
    release = Release.open(release_dir, token=token)
    config = transformers.AutoConfig.from_pretrained(release.base_dir)
    evaluator = _EVALUATORS[resolve_task(task, config.architectures)](config)
    data, description = _load_dataset(dataset, evaluator, split)
    if max_samples is not None:
        data = data.select(range(min(max_samples, len(data))))
    inputs = evaluator.inputs(data, text_column, label_column)
    if inputs.count == 0:
        raise EvalDataError(f"{description['source']}: no samples to evaluate (split {description['split']!r})")
    description["samples"] = inputs.count
    description["calibration_overlap"] = calibration_overlap(inputs.texts)
    tokenizer = transformers.AutoTokenizer.from_pretrained(release.base_dir)
    positions = getattr(config, "max_position_embeddings", None) or max_length
    max_length = min(max_length, tokenizer.model_max_length, positions)
    batch_size = batch_size or evaluator.batch_size
    batches = evaluator.tokenize(tokenizer, inputs, batch_size, max_length)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    stage_count = release.stage_count
    with tqdm(total=stage_count + 1, desc="p2u eval", unit="checkpoint") as bar:
        bar.set_postfix_str("original")
        reference = _outputs_at(release, "full", evaluator, batches, device)
        bar.update()
        results = []
        for index in range(stage_count + 1):
            name = fmt.stage_name(index)
            if index < stage_count:
                bar.set_postfix_str(name)
                outputs = _outputs_at(release, index, evaluator, batches, device)
                bar.update()
            else:
                outputs = reference
            results.append(
                {"name": name, "bits": release.stage_bits(index), "metrics": _rounded(evaluator.metrics(outputs, reference, inputs))}
            )

    report = {
        "format": fmt.EVAL_FORMAT,
        "format_version": fmt.EVAL_FORMAT_VERSION,
        "manifest_sha256": release.manifest.sha256,
        "task": evaluator.task,
        "dataset": description,
        "metrics": [metric.to_json() for metric in evaluator.metric_list(inputs)],
        "settings": {"batch_size": batch_size, "max_length": max_length, "device": device, **evaluator.settings},
        "original": _rounded(evaluator.metrics(reference, reference, inputs)),
        "stages": results,
    }
    fmt.write_json(release.base_dir / fmt.EVAL_FILE, report)
    return report


def calibration_overlap(texts: Sequence[str]) -> int:
    """How many of ``texts`` contain a line of the calibration text split uses: 0 means the evaluation is held out."""
    from ..core.allocation import calibration_sentences

    calibration = calibration_sentences()
    return sum(any(sentence in text for sentence in calibration) for text in texts)


def read_eval(release: Release) -> dict | None:
    """The eval report of ``release``, or None when there is none or it was measured on another split."""
    path = release.base_dir / fmt.EVAL_FILE
    if not path.is_file():
        return None
    report = fmt.read_json(path)
    if report.get("format") != fmt.EVAL_FORMAT:
        raise fmt.P2UFormatError(f"{path}: not a p2u eval report (format {report.get('format')!r})")
    if report.get("format_version", 0) > fmt.EVAL_FORMAT_VERSION:
        raise fmt.P2UFormatError(f"{path}: eval format version {report['format_version']} is newer than this p2u-hub; upgrade p2u-hub")
    return report if report.get("manifest_sha256") == release.manifest.sha256 else None


def _load_dataset(dataset, evaluator: _Evaluator, split: str | None) -> tuple[datasets.Dataset, dict]:
    """The evaluation split and its description (name, type, source, split) for the report and the card."""
    datasets = require("datasets", "eval", purpose="p2u eval")
    if dataset is None:
        if evaluator.default_data is None:
            raise EvalDataError(
                f"{evaluator.task} has no default dataset (labels are model-specific): pass a labelled dataset, "
                "e.g. a csv file with 'text' and 'label' columns (p2u eval --dataset PATH)"
            )
        file_name, name = evaluator.default_data
        with resources.as_file(resources.files("p2u_hub") / "data" / file_name) as path:
            loaded = _load_file(path)
        description = {"name": name, "type": Path(file_name).stem, "source": f"p2u_hub/data/{file_name}"}
    elif isinstance(dataset, (str, os.PathLike)):
        loaded = _load_file(Path(dataset))
        description = {"name": Path(dataset).name, "type": Path(dataset).stem, "source": str(dataset)}
    elif isinstance(dataset, (datasets.Dataset, datasets.DatasetDict)):
        loaded = dataset
        some = dataset if isinstance(dataset, datasets.Dataset) else next(iter(dataset.values()))
        name = some.info.dataset_name or "in-memory dataset"
        description = {"name": name, "type": name, "source": f"{type(dataset).__name__} passed to p2u_hub.tools.evaluate"}
    else:
        raise TypeError(f"dataset must be a file path, a datasets.Dataset or DatasetDict, or None; got {type(dataset).__name__}")
    if isinstance(loaded, datasets.Dataset):
        description["split"] = split or str(loaded.split or datasets.Split.ALL)
        return loaded, description
    if split is None and len(loaded) != 1:
        raise EvalDataError(f"{description['source']}: several splits {sorted(loaded)}; choose one with split=")
    split = split or next(iter(loaded))
    if split not in loaded:
        raise EvalDataError(f"{description['source']}: no split {split!r} (splits: {sorted(loaded)})")
    description["split"] = split
    return loaded[split], description


def _load_file(path: Path) -> datasets.DatasetDict:
    datasets = require("datasets", "eval", purpose="p2u eval")
    if not path.exists():
        raise EvalDataError(f"{path}: dataset file not found")
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise EvalDataError(f"{path}: unknown dataset format; use one of {sorted(FILE_BUILDERS)}")
    options = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=str(path), **options)
    except (ValueError, datasets.exceptions.DatasetGenerationError) as error:
        raise EvalDataError(f"{path}: cannot be read as {builder} ({error})") from None


def _outputs_at(release: Release, stage: int | str, evaluator: _Evaluator, batches: list[dict], device: str):
    """Rebuild the checkpoint at ``stage`` in a temporary folder, load it, run it on every batch, free it."""
    with tempfile.TemporaryDirectory(prefix="p2u-eval-") as folder:
        checkpoint = merge(release.base_dir, Path(folder) / "model", stage=stage, token=release.token, progress=False)
        model = _load_quietly(evaluator.model_class, checkpoint).to(device).eval()
        with torch.inference_mode():
            outputs = evaluator.run(model, [{k: v.to(device) for k, v in batch.items()} for batch in batches])
        del model
    return outputs


def _load_quietly(model_class, checkpoint: Path):
    """``from_pretrained`` without transformers' own loading bar, which would nest inside eval's bar."""
    logging = transformers.utils.logging
    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        return model_class.from_pretrained(checkpoint)
    finally:
        if enabled:
            logging.enable_progress_bar()


@dataclass
class _Inputs:
    texts: list[str]  # for sentence pairs: all first sentences, then all second sentences
    labels: list | None
    pairs: bool = False

    @property
    def count(self) -> int:
        return len(self.texts) // 2 if self.pairs else len(self.texts)


class _Evaluator:
    """One task: which columns it reads, which transformers class it loads, what it measures."""

    task: str
    model_class: type
    default_data: tuple[str, str] | None = None  # (file in p2u_hub/data, display name)
    batch_size = 32
    settings: dict = {}

    def __init__(self, config: transformers.PreTrainedConfig):
        self.config = config

    def inputs(self, data: datasets.Dataset, text_column, label_column) -> _Inputs:
        texts = _column(data, text_column or "text")
        return _Inputs(texts, _optional_column(data, label_column, ("label",)))

    def tokenize(self, tokenizer, inputs: _Inputs, batch_size: int, max_length: int) -> list[dict]:
        return [
            dict(tokenizer(inputs.texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
            for i in range(0, len(inputs.texts), batch_size)
        ]

    def metric_list(self, inputs: _Inputs) -> list[Metric]:
        raise NotImplementedError

    def run(self, model, batches: list[dict]):
        raise NotImplementedError

    def metrics(self, outputs, reference, inputs: _Inputs) -> dict[str, float]:
        raise NotImplementedError


class _Embedding(_Evaluator):
    """Sentence embeddings as sentence-transformers computes them for mean-pooling models."""

    task = EMBEDDING
    model_class = transformers.AutoModel
    default_data = ("sts_pairs.csv", "p2u-hub STS pairs")
    settings = {"pooling": "mean", "normalize": True}

    def inputs(self, data: datasets.Dataset, text_column, label_column) -> _Inputs:
        if text_column is None:
            text_column = ("sentence1", "sentence2") if {"sentence1", "sentence2"} <= set(data.column_names) else "text"
        if isinstance(text_column, str):
            return _Inputs(_column(data, text_column), None)
        if len(text_column) != 2:
            raise EvalDataError(f"text_column: one column or two (a sentence pair), got {list(text_column)}")
        first, second = (_column(data, name) for name in text_column)
        scores = _optional_column(data, label_column, ("score", "label"))
        return _Inputs(first + second, [float(s) for s in scores] if scores is not None else None, pairs=True)

    def metric_list(self, inputs: _Inputs) -> list[Metric]:
        cosine = [
            Metric("cosine_mean", "cosine to original (mean)", True),
            Metric("cosine_min", "cosine to original (min)", True),
        ]
        return ([Metric("spearmanr", "Spearman vs. gold scores", True)] if inputs.labels else []) + cosine

    def run(self, model, batches: list[dict]) -> torch.Tensor:
        embeddings = []
        for batch in batches:
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            embeddings.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        return torch.cat(embeddings)

    def metrics(self, outputs: torch.Tensor, reference: torch.Tensor, inputs: _Inputs) -> dict[str, float]:
        cosine = (outputs * reference).sum(-1)
        result = {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min())}
        if inputs.labels:
            half = inputs.count
            result["spearmanr"] = spearman((outputs[:half] * outputs[half:]).sum(-1).tolist(), inputs.labels)
        return result


class _CausalLM(_Evaluator):
    """Perplexity: exp of the mean next-token negative log-likelihood over all tokens of all samples."""

    task = CAUSAL_LM
    model_class = transformers.AutoModelForCausalLM
    default_data = ("lm_text.txt", "p2u-hub sample paragraphs")
    batch_size = 4

    def inputs(self, data: datasets.Dataset, text_column, label_column) -> _Inputs:
        texts = [text for text in _column(data, text_column or "text") if text.strip()]
        return _Inputs(texts, None)

    def tokenize(self, tokenizer, inputs: _Inputs, batch_size: int, max_length: int) -> list[dict]:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked out of the loss anyway
        tokenizer.padding_side = "right"  # real tokens keep positions 0..n-1 whatever the model's default
        return super().tokenize(tokenizer, inputs, batch_size, max_length)

    def metric_list(self, inputs: _Inputs) -> list[Metric]:
        return [Metric("perplexity", "perplexity", False)]

    def run(self, model, batches: list[dict]) -> tuple[float, int]:
        total, count = 0.0, 0
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
            targets = batch["input_ids"][:, 1:]
            mask = batch["attention_mask"][:, 1:].bool()
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            total += float(losses[mask].sum())
            count += int(mask.sum())
        return total, count

    def metrics(self, outputs: tuple[float, int], reference, inputs: _Inputs) -> dict[str, float]:
        total, count = outputs
        return {"perplexity": math.exp(total / count)}


class _Classification(_Evaluator):
    """Accuracy against gold labels, and agreement with the original's predictions."""

    task = CLASSIFICATION
    model_class = transformers.AutoModelForSequenceClassification

    def inputs(self, data: datasets.Dataset, text_column, label_column) -> _Inputs:
        inputs = super().inputs(data, text_column, label_column)
        if inputs.labels is not None:
            inputs.labels = [self._label_id(label) for label in inputs.labels]
        return inputs

    def _label_id(self, label) -> int:
        if isinstance(label, str):
            label2id = self.config.label2id or {}
            if label not in label2id:
                raise EvalDataError(f"label {label!r} is not one of the model's labels {sorted(label2id)}")
            return int(label2id[label])
        return int(label)

    def metric_list(self, inputs: _Inputs) -> list[Metric]:
        agreement = [Metric("agreement", "agreement with the original's predictions", True)]
        return ([Metric("accuracy", "accuracy", True)] if inputs.labels else []) + agreement

    def run(self, model, batches: list[dict]) -> torch.Tensor:
        return torch.cat([model(**batch).logits.argmax(-1).cpu() for batch in batches])

    def metrics(self, outputs: torch.Tensor, reference: torch.Tensor, inputs: _Inputs) -> dict[str, float]:
        result = {"agreement": float((outputs == reference).float().mean())}
        if inputs.labels:
            result["accuracy"] = float((outputs == torch.tensor(inputs.labels)).float().mean())
        return result


_EVALUATORS = {evaluator.task: evaluator for evaluator in (_Embedding, _CausalLM, _Classification)}


def _rounded(metrics: dict[str, float]) -> dict[str, float]:
    """Six decimals: well below any difference worth reporting, and float32 noise (a cosine of 0.9999998) reads as 1.0."""
    return {key: round(value, 6) for key, value in metrics.items()}


def _column(data: datasets.Dataset, name: str) -> list:
    if name not in data.column_names:
        raise EvalDataError(f"dataset has no column {name!r} (columns: {data.column_names}); choose one with text_column=")
    return list(data[name])


def _optional_column(data: datasets.Dataset, name: str | None, defaults: Sequence[str]) -> list | None:
    """Column ``name`` (which must exist), else the first of ``defaults`` present, else None."""
    if name is not None:
        return _column(data, name)
    present = [candidate for candidate in defaults if candidate in data.column_names]
    return list(data[present[0]]) if present else None


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's r of the ranks, ties sharing their mean rank (as scipy)."""
    return float(numpy.corrcoef(_mean_ranks(x), _mean_ranks(y))[0, 1])


def _mean_ranks(values: Sequence[float]) -> numpy.ndarray:
    """Ranks from 1; equal values share the mean of the ranks they span."""
    _, inverse, counts = numpy.unique(numpy.asarray(values, dtype=float), return_inverse=True, return_counts=True)
    first_rank = numpy.cumsum(counts) - counts + 1
    return (first_rank + (counts - 1) / 2)[inverse]
