"""The ``p2u`` command line: one sub-command per public function, arguments named as in the Python API.

Each command imports its module lazily (this module imports the standard library only), so
``p2u --help`` answers without loading torch. Errors in user input end with one line on stderr and
exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..core.tasks import AUTO, TASKS


def _split(args: argparse.Namespace) -> None:
    from ..core.split import split

    output = split(
        args.source, args.output, bits=args.bits, group_size=args.group_size, stages=args.stages,
        keep=args.keep, uniform=args.uniform, sensitivity=args.sensitivity, gptq=args.gptq,
        max_shard_bytes=int(args.max_shard_gb * 1024**3), workers=args.workers, overwrite=args.overwrite,
        stage_shard_bytes=None if args.stage_shard_mb is None else int(args.stage_shard_mb * 1024**2),
        compact_base=args.compact_base,
    )  # fmt: skip
    _print_summary(output, as_json=False)


def _merge(args: argparse.Namespace) -> None:
    from ..core.merge import merge

    print(merge(args.source, args.destination, stage=args.stage, overwrite=args.overwrite, workers=args.workers))


def _inspect(args: argparse.Namespace) -> None:
    _print_summary(args.path, as_json=args.json)


def _print_summary(path, *, as_json: bool) -> None:
    from ..core.summary import format_table, summarize

    summary = summarize(path)
    print(json.dumps(summary, indent=2) if as_json else format_table(summary))


def _verify(args: argparse.Namespace) -> None:
    from ..core.release import verify

    release = verify(args.path)
    print(f"{release.base_dir}: all {len(release.manifest.tensors)} tensors rebuild bit-exact at full precision")


def _push(args: argparse.Namespace) -> None:
    from .publish import push

    result = push(
        args.release, args.repo_id, layout=args.layout, private=args.private, commit_message=args.commit_message,
        base_model=args.base_model,
    )  # fmt: skip
    print(f"base    {result.repo_id}@main  {result.commit}")
    for stage in result.stages:
        print(f"stage   {stage.repo_id}@{stage.branch}  {stage.commit}")


def _eval(args: argparse.Namespace) -> None:
    from .evaluate import evaluate

    text_column = args.text_column.split(",") if args.text_column and "," in args.text_column else args.text_column
    report = evaluate(
        args.release, task=args.task, dataset=args.dataset, split=args.split, max_samples=args.max_samples,
        text_column=text_column, label_column=args.label_column, batch_size=args.batch_size,
        max_length=args.max_length, device=args.device,
    )  # fmt: skip
    keys = [metric["key"] for metric in report["metrics"]]
    print("stage     " + "  ".join(f"{key:>12}" for key in keys))
    print("original  " + "  ".join(f"{report['original'][key]:>12.6f}" for key in keys))
    for stage in report["stages"]:
        print(f"{stage['name']:<10}" + "  ".join(f"{stage['metrics'][key]:>12.6f}" for key in keys))


def _card(args: argparse.Namespace) -> None:
    from .card import write_cards

    for path in write_cards(args.release, base_model=args.base_model, repo_id=args.repo_id, stage_repo_id=args.stage_repo_id):
        print(path)


def _bench(args: argparse.Namespace) -> None:
    from .bench import bench, format_table, write_synthetic_llama

    if args.synthetic_gb:
        write_synthetic_llama(args.source, args.synthetic_gb)
    result = bench(
        args.source, bits=args.bits, bandwidths=args.bandwidth, json_path=args.json, workdir=args.workdir,
        repeats=args.repeats, compact_base=args.compact_base,
    )  # fmt: skip
    print(format_table(result))


def _demo(args: argparse.Namespace) -> None:
    from .demo import format_demo, run_demo

    result = run_demo(rate_mbps=args.rate)
    print(format_demo(result))
    demo = result["demo"]
    if not (demo["full_state_dict_bit_exact"] and demo["full_last_hidden_state_equal"]) or demo["full_has_quantization_config"]:
        raise SystemExit("p2u demo: the upgraded model is not the original bit for bit")


def _serve_hub(args: argparse.Namespace) -> None:
    from ..testing import serve

    serve(args.root, port=args.port, rate_mbps=args.rate, token=args.token)


def _stage(value: str) -> str | int:
    """``--stage``: 'full', 'base' or a stage number, checked before any work starts."""
    if value in ("full", "base"):
        return value
    if value.isdigit():
        return int(value)
    raise argparse.ArgumentTypeError(f"expected 'full', 'base' or a stage number, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2u", description="Progressive precision releases for Hugging Face models.")
    commands = parser.add_subparsers(dest="command", required=True)

    split = commands.add_parser("split", help="split a checkpoint into a low-bit base and delta stages")
    split.add_argument("source", help="checkpoint folder, or Hub repo id with optional @revision")
    split.add_argument("output", help="release folder to create (base/, stage-1/, ...)")
    split.add_argument(
        "--bits", type=int, default=4,
        help="base budget, 2-8 (default 4): the bytes of a uniform base this wide, widths allocated per tensor by sensitivity",
    )  # fmt: skip
    split.add_argument("--uniform", action="store_true", help="one width (--bits) for every tensor instead of the allocation")
    split.add_argument(
        "--sensitivity", choices=("auto", "calibration", "weights"), default="auto",
        help="how tensors are measured for the allocation: run the model on the bundled calibration text, the data-free "
        "weight error, or auto (calibration when the model runs here, default)",
    )  # fmt: skip
    split.add_argument(
        "--gptq", action="store_true",
        help="choose the linear layers' base codes by GPTQ error compensation on the bundled calibration text: "
        "a better base, a larger first stage",
    )  # fmt: skip
    split.add_argument("--group-size", type=int, default=64, help="weights per scale (default 64)")
    split.add_argument(
        "--stages", type=int, nargs="*", default=None,
        help="widths of the intermediate integer stages (default 8 when --bits is below 8, else none; "
        "an empty list: base then lossless)",
    )  # fmt: skip
    split.add_argument("--keep", action="append", default=[], metavar="PATTERN", help="glob of tensor names kept exact")
    split.add_argument("--max-shard-gb", type=float, default=2.0, help="largest safetensors shard (default 2 GiB)")
    split.add_argument(
        "--workers", type=int, default=None, metavar="N",
        help="processes coding the source's safetensors files in parallel (default: one per CPU, at most one per file and per 256 MiB)",
    )  # fmt: skip
    split.add_argument(
        "--stage-shard-mb", type=float, default=None, metavar="MB",
        help="largest shard of a stage's weight files, in MiB (default: 1/32 of the source, at least 4 MiB, at most "
        "--max-shard-gb): an upgrade decodes the first shards while the next ones download",
    )  # fmt: skip
    split.add_argument(
        "--compact-base", action="store_true",
        help="entropy-code the base's codes too (a base 5-7%% smaller; its codes take ~2.5 ns a weight to decode at load)",
    )  # fmt: skip
    split.add_argument("--overwrite", action="store_true", help="replace the output folder")
    split.set_defaults(run=_split)

    merge = commands.add_parser("merge", help="merge base + stages back into a plain checkpoint")
    merge.add_argument("source", help="release folder, or base folder whose config locates the stages")
    merge.add_argument("destination", help="checkpoint folder to create")
    merge.add_argument("--stage", type=_stage, default="full", help="'full' (bit-exact, default), 'base' or a stage number")
    merge.add_argument(
        "--workers", type=int, default=1, metavar="N",
        help="processes writing the output's safetensors files in parallel (default 1: this process, on one thread per CPU)",
    )  # fmt: skip
    merge.add_argument("--overwrite", action="store_true", help="replace the destination folder")
    merge.set_defaults(run=_merge)

    inspect = commands.add_parser("inspect", help="bytes and bits per weight of every stage")
    inspect.add_argument("path", help="release folder or base folder")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(run=_inspect)

    verify = commands.add_parser("verify", help="rebuild every tensor at full precision and check its sha256")
    verify.add_argument("path", help="release folder or base folder")
    verify.set_defaults(run=_verify)

    push = commands.add_parser("push", help="publish a release to the Hub (token from HF_TOKEN / hf auth login)")
    push.add_argument("release", help="release folder from p2u split")
    push.add_argument("repo_id", help="repo of the base, e.g. org/model-p2u")
    push.add_argument("--layout", choices=("branches", "repos"), default="branches", help="where stages go")
    push.add_argument("--private", action="store_true", help="create new repos as private")
    push.add_argument("--commit-message", default=None, help="message of the commits")
    push.add_argument(
        "--base-model",
        default=None,
        help="source repo id for the cards' base_model (default: kept from an earlier card, else from the split)",
    )
    push.set_defaults(run=_push)

    evaluate = commands.add_parser("eval", help="quality of the original, the base and every stage on a dataset")
    evaluate.add_argument("release", help="release folder from p2u split")
    evaluate.add_argument("--task", choices=(AUTO, *TASKS), default=AUTO)
    evaluate.add_argument("--dataset", default=None, help="csv / json / jsonl / parquet / txt file (default: bundled set)")
    evaluate.add_argument("--split", default=None, help="dataset split (default: the first)")
    evaluate.add_argument("--max-samples", type=int, default=None, help="evaluate at most this many samples")
    evaluate.add_argument("--text-column", default=None, help="text column, or two comma-separated for sentence pairs")
    evaluate.add_argument("--label-column", default=None, help="label / score column")
    evaluate.add_argument("--batch-size", type=int, default=None, help="batch size (default: task dependent)")
    evaluate.add_argument("--max-length", type=int, default=256, help="truncate inputs to this many tokens")
    evaluate.add_argument("--device", default=None, help="torch device (default cpu, or cuda when available)")
    evaluate.set_defaults(run=_eval)

    card = commands.add_parser("card", help="write model cards (README.md) into the base and stage folders")
    card.add_argument("release", help="release folder from p2u split")
    card.add_argument("--base-model", default=None, help="source repo id for base_model (default: from the split)")
    card.add_argument("--repo-id", default=None, help="repo the release is published to (links and snippet)")
    card.add_argument("--stage-repo-id", default=None, help="repo of the stages when not --repo-id (repos layout)")
    card.set_defaults(run=_card)

    bench = commands.add_parser("bench", help="bytes and time to usable / full precision vs plain download")
    bench.add_argument("source", help="checkpoint folder or Hub repo id")
    bench.add_argument("--bits", type=int, default=4, help="base width (default 4; ladder bits -> 8 -> lossless)")
    bench.add_argument("--bandwidth", type=float, nargs="+", default=[20.0, 100.0], metavar="MBPS", help="link speeds")
    bench.add_argument("--json", default=None, metavar="FILE", help="write the result as JSON (and a PNG plot beside it)")
    bench.add_argument("--repeats", type=int, default=1, help="runs per measurement; the median is reported")
    bench.add_argument("--workdir", default=None, metavar="DIR", help="keep the release, local Hub and caches there")
    bench.add_argument("--compact-base", action="store_true", help="split with --compact-base")
    bench.add_argument(
        "--synthetic-gb", type=float, default=None, metavar="GB",
        help="first write a synthetic Llama-shaped bf16 checkpoint of at least GB GB to SOURCE (must not exist)",
    )  # fmt: skip
    bench.set_defaults(run=_bench)

    demo = commands.add_parser("demo", help="split, publish, load and upgrade the bundled all-MiniLM-L6-v2, offline")
    demo.add_argument("--rate", type=float, default=20.0, metavar="MBPS", help="simulated link speed (default 20)")
    demo.set_defaults(run=_demo)

    serve = commands.add_parser("serve-hub", help="a local Hub-compatible server on 127.0.0.1 (tests, demos, offline CI)")
    serve.add_argument("--root", required=True, help="folder holding the repos")
    serve.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default 8765)")
    serve.add_argument("--rate", type=float, default=None, metavar="MBPS", help="throttle downloads to MB/s")
    serve.add_argument(
        "--token", default=None,
        help="require this token (Authorization: Bearer) for writes and for reading private repos; clients set HF_TOKEN",
    )  # fmt: skip
    serve.set_defaults(run=_serve_hub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except Exception as error:
        if not isinstance(error, _user_errors()):
            raise
        message = " ".join(str(error).split())  # one line, whatever the message holds
        print(f"p2u {args.command}: error: {message}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print(f"p2u {args.command}: interrupted; nothing was left half-written", file=sys.stderr)
        raise SystemExit(130) from None


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors a command reports in one line: bad input, a missing extra, an unreachable or refusing Hub.

    Imported only once a command has failed: by then the modules that raise them are loaded.
    """
    from huggingface_hub.errors import HfHubHTTPError

    from ..errors import P2UError
    from ..extras import MissingExtraError

    return (P2UError, MissingExtraError, FileExistsError, FileNotFoundError, ValueError, HfHubHTTPError)


if __name__ == "__main__":
    main()
