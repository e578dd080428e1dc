"""The child side of ``p2u bench``: one measured job per fresh Python process.

Each job runs in its own process so that its wall time includes nothing another job left
warm (imported modules aside, which every job pays alike before its clock starts) and so
that its peak resident memory is that job's alone. The parent starts
``python -m p2u_hub.tools.bench_worker '<json job>'`` and reads one JSON object from the last line
of stdout.

Jobs (``"task"`` key):

* ``split`` / ``merge``: time and peak RSS of ``p2u_hub.split`` / ``p2u_hub.merge``.
* ``publish``: upload the original checkpoint and push the release to the Hub at ``HF_ENDPOINT``.
* ``lossless``: the zstd and ZipNN references on the source files. Their C code (ZipNN's own
  pthreads, which reorder its input in place) runs here rather than in the bench's process, so
  whatever it does to memory stays in a process that exits.
* ``load``: ``from_pretrained`` from the Hub (mode ``plain``: the original; ``usable``: the
  p2u base; ``full``: the base with ``P2UConfig(upgrade="prefetch")``, so the stages download
  while it loads, as docs/quickstart.md recommends when the full model is wanted, then
  ``p2u_hub.upgrade(model, stage="full")``), then one forward pass; ``full`` then checks every
  parameter and buffer against the source bit for bit, and reports ``decode_after_download_s``: from
  the moment every stage file is local and checked (and the base loaded) to the end of the upgrade,
  the decoding that the download did not hide.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import transformers


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB.

    Read from ``VmHWM`` in ``/proc/self/status``: that high-water mark belongs to the address space
    that ``exec`` created, whereas ``getrusage``'s ``ru_maxrss`` starts from the parent's size at
    fork and so reports the (larger) benchmark parent instead of a small job.
    """
    return _proc_status_mb("VmHWM")


def rss_mb() -> float:
    """Resident memory of this process now, in MB (``VmRSS``)."""
    return _proc_status_mb("VmRSS")


def _proc_status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) * 1024 / 1e6, 1)  # the kernel reports kB (KiB)
    raise RuntimeError(f"/proc/self/status has no {field}; p2u bench measures memory on Linux only")


def run_split(job: dict) -> dict:
    from ..core.split import split

    start = time.perf_counter()
    split(job["source"], job["output"], bits=job["bits"], compact_base=job["compact_base"])
    return {"seconds": time.perf_counter() - start}


def run_merge(job: dict) -> dict:
    from ..core.merge import merge

    start = time.perf_counter()
    merge(job["release"], job["output"], stage="full")  # merge checks every tensor's sha256 at the last stage
    return {"seconds": time.perf_counter() - start}


def run_publish(job: dict) -> dict:
    from huggingface_hub import HfApi

    from .publish import push

    api = HfApi()
    api.create_repo(job["original_repo"], exist_ok=True)
    api.upload_folder(repo_id=job["original_repo"], folder_path=job["source"], ignore_patterns=[".*"])
    push(job["release"], job["release_repo"])
    return {}


def run_load(job: dict) -> dict:
    """Time download + ``from_pretrained`` (+ upgrade) + first answer; nothing is downloaded before the clock starts."""
    from ..integrations.transformers import P2UConfig
    from ..integrations.upgrade import upgrade

    model_class = model_class_for(job["source"])
    switches = {"quantization_config": P2UConfig(upgrade="prefetch")} if job["mode"] == "full" else {}
    start = time.perf_counter()
    model = model_class.from_pretrained(job["repo_id"], **switches)
    loaded = time.perf_counter()
    stages_local: list[float] = []
    if job["mode"] == "full":
        model.hf_quantizer.prefetch.add_done_callback(lambda _: stages_local.append(time.perf_counter()))
        upgrade(model, stage="full")
    upgraded = time.perf_counter()
    peak_after_upgrade = peak_rss_mb()  # before the forward pass and the bit-exact check add their own
    answers = answer(model)
    done = time.perf_counter()
    result = {
        "seconds": done - start, "load_s": loaded - start, "upgrade_s": upgraded - loaded,
        "answer_s": done - upgraded, "answers": answers,
    }  # fmt: skip
    if job["mode"] == "full":
        result["decode_after_download_s"] = upgraded - max(stages_local[0], loaded)  # what decoding adds once the link is done
        result["peak_rss_after_upgrade_mb"] = peak_after_upgrade
        result["bit_exact"] = matches_source(model, job["source"])
    if job["mode"] == "plain":
        del model
        start = time.perf_counter()
        model_class.from_pretrained(job["repo_id"])  # now from the local cache: the cost of loading alone
        result["cached_load_s"] = time.perf_counter() - start
    return result


def run_lossless(job: dict) -> dict:
    from .bench import zipnn_reference, zstd_reference

    files = [Path(file) for file in job["files"]]
    return {"references": {"zstd": zstd_reference(files, Path(job["work"])), "zipnn": zipnn_reference(files)}}


def model_class_for(checkpoint: str | Path) -> type:
    """The class the checkpoint was saved from (``architectures[0]``), so every head's weights load; else AutoModel."""
    config = transformers.AutoConfig.from_pretrained(checkpoint)
    architectures = config.architectures or []
    return getattr(transformers, architectures[0], transformers.AutoModel) if architectures else transformers.AutoModel


def answer(model: torch.nn.Module) -> bool:
    """Run one forward pass on the model's dummy inputs; True when every output value is finite."""
    with torch.inference_mode():
        output = model.eval()(**model.dummy_inputs)
    return bool(torch.isfinite(output[0].float()).all())


def matches_source(model: torch.nn.Module, source: str | Path) -> bool:
    """True when every parameter and persistent buffer of the model equals its source tensor, bit for bit.

    Source tensors the model has no slot for (e.g. a stale ``position_ids`` buffer) are ignored, as
    ``from_pretrained`` of the original ignores them.
    """
    from ..core import format as fmt
    from ..core.split import source_weight_files
    from ..core.storage import TensorReader

    prefix = model.base_model_prefix + "."
    reader = TensorReader(source_weight_files(Path(source))[0])
    for key, actual in model.state_dict().items():
        name = next((n for n in (key, key.removeprefix(prefix), prefix + key) if n in reader), None)
        if name is None:
            return False
        expected = reader.get(name)
        if actual.dtype != expected.dtype or actual.shape != expected.shape:
            return False
        if fmt.tensor_sha256(actual) != fmt.tensor_sha256(expected):
            return False
    return True


JOBS = {"split": run_split, "merge": run_merge, "publish": run_publish, "lossless": run_lossless, "load": run_load}


def main() -> None:
    job = json.loads(sys.argv[1])
    baseline = rss_mb()  # after importing torch and transformers, before the job
    result = JOBS[job["task"]](job)
    result.update(peak_rss_mb=peak_rss_mb(), baseline_rss_mb=baseline)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
