"""p2u eval and p2u card: per-stage figures in p2u_eval.json, and cards whose tables match p2u inspect."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub import ModelCard

from p2u_hub import split
from p2u_hub.core import format as fmt
from p2u_hub.tools.card import NOT_EVALUATED, write_cards
from p2u_hub.tools.cli import main
from p2u_hub.tools.evaluate import EvalDataError, evaluate, spearman

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
EXAMPLE_DIR = Path(__file__).parents[1] / "docs" / "examples" / "minilm-4bit"
SOURCE_CARD = "---\nlicense: mit\nlanguage: en\ndatasets:\n- some-org/some-data\ntags:\n- source-only-tag\n---\n# Tiny\n"


def save_tiny(folder: Path, model_class, config: transformers.PretrainedConfig, tokenizer_dir: Path) -> Path:
    """A random-init model with the MiniLM tokenizer (so real text can be fed) and a source card."""
    torch.manual_seed(0)
    model_class(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, folder / name)
    (folder / "README.md").write_text(SOURCE_CARD)
    return folder


def tiny_config(config_class, **extra):
    sizes = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    return config_class(vocab_size=30522, max_position_embeddings=128, **sizes, **extra)


@pytest.fixture(scope="module")
def bert_release(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bert")
    source = save_tiny(folder / "source", transformers.BertModel, tiny_config(transformers.BertConfig), minilm_dir)
    return split(source, folder / "release", bits=4, group_size=32, stages=(8,))


def table_rows(card: ModelCard) -> dict[str, list[str]]:
    """The stage table's rows, by stage name, as lists of cell texts."""
    rows = {}
    for line in card.text.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("| ") and (cells[0] in ("base", "original") or cells[0].startswith("stage-")):
            rows[cells[0]] = cells
    return rows


def inspect_json(path: Path, capsys: pytest.CaptureFixture) -> dict:
    capsys.readouterr()
    main(["inspect", str(path), "--json"])
    return json.loads(capsys.readouterr().out)


def test_embedding_eval_and_card(bert_release: Path, capsys: pytest.CaptureFixture):
    report = evaluate(bert_release)
    assert report == json.loads((bert_release / fmt.BASE_DIR / fmt.EVAL_FILE).read_text())
    assert report["task"] == "embedding" and report["dataset"]["samples"] == 80
    assert [m["key"] for m in report["metrics"]] == ["spearmanr", "cosine_mean", "cosine_min"]
    assert [(s["name"], s["bits"]) for s in report["stages"]] == [("base", 4), ("stage-1", 8), ("stage-2", None)]
    for stage in report["stages"]:
        assert set(stage["metrics"]) == {"spearmanr", "cosine_mean", "cosine_min"}
    base, eight_bit, full = (stage["metrics"] for stage in report["stages"])
    assert full["cosine_mean"] == full["cosine_min"] == 1.0
    assert full == report["original"]
    assert base["cosine_mean"] < eight_bit["cosine_mean"] < 1.0

    written = write_cards(bert_release, base_model="some-org/tiny-bert", repo_id="me/tiny-bert-p2u")
    base_dir = bert_release / fmt.BASE_DIR
    assert written[:2] == [base_dir / fmt.README_FILE, base_dir / fmt.QUALITY_PLOT_FILE]
    assert (base_dir / fmt.QUALITY_PLOT_FILE).read_bytes().startswith(b"\x89PNG")
    card = ModelCard.load(base_dir / fmt.README_FILE)
    data = card.data
    assert data.base_model == "some-org/tiny-bert" and data.base_model_relation == "quantized"
    assert data.library_name == "transformers"
    assert {"p2u", "progressive-precision", "4-bit"} <= set(data.tags) and "source-only-tag" not in data.tags
    assert (data.license, data.language, data.datasets) == ("mit", "en", ["some-org/some-data"])
    assert {r.metric_type: r.metric_value for r in data.eval_results} == {k: round(v, 4) for k, v in base.items()}
    assert {r.dataset_name for r in data.eval_results} == {"p2u-hub STS pairs (80 samples of p2u_hub/data/sts_pairs.csv, split train)"}
    assert data.pipeline_tag == "sentence-similarity" and "pip install p2u-hub" in card.text
    assert f"]({fmt.QUALITY_PLOT_FILE})" in card.text and "tree/p2u-stage-1" in card.text
    assert 'from_pretrained("me/tiny-bert-p2u")' in card.text and "p2u_hub.upgrade(model)" in card.text

    summary = inspect_json(bert_release, capsys)
    rows = table_rows(card)
    assert list(rows) == ["base", "stage-1", "stage-2", "original"]
    for stage in summary["stages"]:
        cells = rows[stage["name"]]
        assert int(cells[4].replace(",", "")) == stage["bytes"]
        assert int(cells[6].replace(",", "")) == stage["cumulative_bytes"]
    assert int(rows["original"][4].replace(",", "")) == summary["source_bytes"]

    stage_card = ModelCard.load(bert_release / "stage-1" / fmt.README_FILE)
    assert stage_card.data.base_model == "me/tiny-bert-p2u" and "8-bit" in stage_card.data.tags
    assert list(table_rows(stage_card)) == ["stage-1"]


@pytest.mark.parametrize("eval_file", ["missing", "of another split"])
def test_card_without_eval_says_so(bert_release: Path, tmp_path: Path, eval_file: str):
    release = shutil.copytree(bert_release, tmp_path / "release")
    (release / fmt.BASE_DIR / fmt.README_FILE).unlink(missing_ok=True)  # an earlier card would give its base_model
    (release / fmt.BASE_DIR / fmt.EVAL_FILE).unlink(missing_ok=True)
    (release / fmt.BASE_DIR / fmt.QUALITY_PLOT_FILE).write_bytes(b"stale")
    if eval_file == "of another split":
        report = {"format": "p2u-eval", "format_version": 1, "manifest_sha256": "0" * 64}
        (release / fmt.BASE_DIR / fmt.EVAL_FILE).write_text(json.dumps(report))
    written = write_cards(release)
    assert release / fmt.BASE_DIR / fmt.QUALITY_PLOT_FILE not in written
    assert not (release / fmt.BASE_DIR / fmt.QUALITY_PLOT_FILE).exists()
    for path in written:
        card = ModelCard.load(path)
        assert NOT_EVALUATED in card.text and card.data.eval_results is None
        assert card.data.base_model is None and card.data.get("base_model_relation") is None
    assert "`p2u-stage-1`" in ModelCard.load(written[0]).text


def test_merge_output_keeps_the_source_card(bert_release: Path, tmp_path: Path):
    from p2u_hub import merge

    write_cards(bert_release)
    merged = merge(bert_release, tmp_path / "merged", stage="base")
    assert (merged / "README.md").read_text() == SOURCE_CARD
    assert not any(path.name.startswith(fmt.P2U_FILE_PREFIX) for path in merged.iterdir())


def test_causal_lm_perplexity(minilm_dir: Path, tmp_path: Path):
    config = transformers.GPT2Config(vocab_size=30522, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    source = save_tiny(tmp_path / "gpt2", transformers.GPT2LMHeadModel, config, minilm_dir)
    release = split(source, tmp_path / "release", bits=3, group_size=32, stages=())
    report = evaluate(release, max_samples=3)
    assert report["task"] == "causal-lm" and report["dataset"]["samples"] == 3
    assert report["settings"]["max_length"] == 64
    base, full = (stage["metrics"]["perplexity"] for stage in report["stages"])
    assert full == report["original"]["perplexity"] and base != full and base > 1


def test_classification_accuracy(minilm_dir: Path, tmp_path: Path):
    config = tiny_config(transformers.BertConfig, num_labels=2)
    source = save_tiny(tmp_path / "cls", transformers.BertForSequenceClassification, config, minilm_dir)
    release = split(source, tmp_path / "release", bits=2, group_size=32, stages=())
    with pytest.raises(EvalDataError, match="labelled dataset"):
        evaluate(release)
    data = tmp_path / "labelled.csv"
    data.write_text("text,label\n" + "".join(f"sentence number {i},{i % 2}\n" for i in range(10)))
    report = evaluate(release, dataset=str(data))
    assert report["task"] == "classification" and [m["key"] for m in report["metrics"]] == ["accuracy", "agreement"]
    assert report["stages"][-1]["metrics"] == report["original"] and report["original"]["agreement"] == 1.0
    base, original = report["stages"][0]["metrics"], report["original"]
    assert round(base["accuracy"] * 10, 6).is_integer()  # 10 samples
    assert abs(base["accuracy"] - original["accuracy"]) <= 1 - base["agreement"] + 1e-9  # only disagreements move it


def test_dataset_errors_name_the_fault(bert_release: Path, tmp_path: Path):
    with pytest.raises(EvalDataError, match="not found"):
        evaluate(bert_release, dataset=str(tmp_path / "missing.csv"))
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(EvalDataError, match="unknown dataset format"):
        evaluate(bert_release, dataset=str(tmp_path / "data.xml"))
    (tmp_path / "data.csv").write_text("question,answer\na,b\n")
    with pytest.raises(EvalDataError, match="no column 'text'"):
        evaluate(bert_release, dataset=str(tmp_path / "data.csv"))


@pytest.mark.slow
def test_minilm_stages_and_the_committed_example_card(minilm_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    release = split(minilm_dir, tmp_path / "release", bits=4, group_size=64, stages=(8,))
    report = evaluate(release, max_samples=16)
    base, eight_bit, full = (stage["metrics"] for stage in report["stages"])
    assert full == report["original"] and full["cosine_min"] == 1.0
    assert 0.8 < base["cosine_mean"] < eight_bit["cosine_mean"] < 1.0
    assert abs(eight_bit["spearmanr"] - full["spearmanr"]) < 0.05

    # docs/examples/minilm-4bit is this release's card (benchmarks/eval_minilm_bits.py): its bytes must be true
    card = ModelCard.load(EXAMPLE_DIR / fmt.README_FILE)
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2" and card.data.base_model_relation == "quantized"
    assert card.data.license == "apache-2.0" and {"p2u", "4-bit"} <= set(card.data.tags)
    assert {r.metric_type for r in card.data.eval_results} == {"spearmanr", "cosine_mean", "cosine_min"}
    assert (EXAMPLE_DIR / fmt.QUALITY_PLOT_FILE).is_file()
    summary = inspect_json(release, capsys)
    rows = table_rows(card)
    for stage in summary["stages"]:
        assert int(rows[stage["name"]][4].replace(",", "")) == stage["bytes"]
        assert int(rows[stage["name"]][6].replace(",", "")) == stage["cumulative_bytes"]


def test_spearman_matches_scipy():
    from scipy import stats

    x, y = [0.1, 0.4, 0.4, 0.9, 0.2, 0.7], [1, 3, 2, 5, 1, 4]
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)
