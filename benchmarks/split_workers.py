"""split and merge on 1, 2, ... worker processes: MB/s of source and peak resident memory of the whole process tree.

Usage: ``python benchmarks/split_workers.py SOURCE [--workers 1 2] [--merge-workers 1 2] [--release DIR] [--runs 3]
[--workdir /tmp/w] [--split-args '{}'] [--reference-pythonpath /work/main]``

Each split and merge runs in a fresh interpreter (imports paid before the clock starts); a sampler
sums the proportional resident memory (``Pss``: pages shared by forked workers counted once) of that
process and its worker processes every 50 ms, so "peak MB" is what the machine held at once, not
one process's peak; "CPU s" adds up the processes' user + system time after the imports, as last
sampled (up to 50 ms of each process's end is missed). MB/s are source bytes
(the safetensors files, 1 MB = 1e6 bytes; a merge writes as many) per wall second; medians of ``--runs``.
Every release, and every merged checkpoint, is checked to be the same bytes as the first (worker
counts must not change a byte); with ``--reference-pythonpath`` the first release and the first
merge are also compared with what another checkout of p2u-hub writes (e.g. before the per-file
workers). ``--release`` merges an existing release of SOURCE (``--workers`` with no value then
skips the split runs). The load (``uptime``) is printed before and after: the figures mean
something on a quiet machine only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, sys, time
from p2u_hub import merge, split
job = json.loads(sys.argv[1])
if __name__ == "__main__":
    print("ready", flush=True)
    start = time.perf_counter()
    if job["task"] == "split":
        split(job["source"], job["output"], overwrite=True, **job["options"])
    else:
        merge(job["source"], job["output"], overwrite=True, **job["options"])
    print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)
"""


def sample_tree(pid: int, cpu: dict[int, float]) -> float:
    """Proportional resident memory of ``pid`` and all its descendants now, in MB; their CPU seconds so far into ``cpu``."""
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/smaps_rollup").read_text()
            times = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:  # it ended meanwhile
            continue
        total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("Pss:")), 0) / 1024
        cpu[current] = (int(times[11]) + int(times[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        pending.extend(int(child) for child in children)
    return total


def run(job: dict, pythonpath: str) -> dict:
    """One split or merge in a fresh interpreter: wall seconds (inside the child), the tree's peak PSS and CPU seconds."""
    env = {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(job)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    before: dict[int, float] = {}
    sample_tree(child.pid, before)  # the imports, paid before the clock starts
    peak, cpu = 0.0, dict(before)
    while child.poll() is None:
        peak = max(peak, sample_tree(child.pid, cpu))
        time.sleep(0.05)
    output = child.stdout.read().strip().splitlines()
    if child.returncode != 0 or not output:
        raise RuntimeError(f"{job['task']} failed with exit code {child.returncode}")
    return {"seconds": json.loads(output[-1])["seconds"], "peak_mb": peak, "cpu_s": sum(cpu.values()) - sum(before.values())}


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="split worker counts (none: no split)")
    parser.add_argument("--merge-workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--release", type=Path, default=None, help="merge this release of SOURCE instead of the one the split runs write")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp"))
    parser.add_argument("--split-args", default="{}", help="JSON of extra split() keyword arguments, e.g. '{\"uniform\": true}'")
    parser.add_argument("--reference-pythonpath", default=None, help="also split and merge with this checkout of p2u-hub and compare bytes")
    args = parser.parse_args()
    if not args.workers and args.release is None:
        parser.error("give --release when no split runs (--workers with no value)")
    here = str(Path(__file__).resolve().parents[1])
    source_mb = sum(path.stat().st_size for path in args.source.glob("*.safetensors")) / 1e6
    release, merged = args.workdir / "split-workers-release", args.workdir / "split-workers-merged"
    merge_source = args.release or release
    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    options = json.loads(args.split_args)
    expected: dict[str, dict[str, str]] = {}
    results: dict[str, list[dict]] = {}

    def timed(step: str, job: dict, output: Path, pythonpath: str = here) -> bool:
        """Run ``job`` into ``output``; True when it wrote the same bytes as the first run of its task."""
        results.setdefault(step, []).append(run(job, pythonpath))
        found = digests(output)
        return expected.setdefault(job["task"], found) == found

    for _ in range(args.runs):
        for workers in args.workers:
            job = {"task": "split", "source": str(args.source), "output": str(release), "options": {**options, "workers": workers}}
            if not timed(f"split, {workers} worker(s)", job, release):
                raise SystemExit(f"split with {workers} workers wrote other bytes than the first run")
        for workers in args.merge_workers:
            job = {"task": "merge", "source": str(merge_source), "output": str(merged), "options": {"workers": workers}}
            if not timed(f"merge, {workers} worker(s)", job, merged):
                raise SystemExit(f"merge with {workers} workers wrote other bytes than the first run")
            shutil.rmtree(merged)
    if args.reference_pythonpath:
        job = {"task": "merge", "source": str(merge_source), "output": str(merged), "options": {}}
        print("reference checkout merges the same bytes:", timed("merge, reference checkout", job, merged, args.reference_pythonpath))
        shutil.rmtree(merged)
        if args.workers:
            job = {"task": "split", "source": str(args.source), "output": str(release), "options": options}
            print("reference checkout splits the same bytes:", timed("split, reference checkout", job, release, args.reference_pythonpath))
    if args.workers:
        shutil.rmtree(release)
    print(f"source: {args.source} ({source_mb:,.0f} MB), merged {merge_source}, split options {options}, runs: {args.runs}")
    print(f"{'step':<28} {'median s':>9} {'MB/s':>7} {'CPU s':>7} {'peak MB':>8}  all s")
    summary = {}
    for step, runs in results.items():
        seconds = statistics.median(run["seconds"] for run in runs)
        peak = statistics.median(run["peak_mb"] for run in runs)
        cpu = statistics.median(run["cpu_s"] for run in runs)
        summary[step] = {
            "seconds": round(seconds, 2),
            "mb_per_s": round(source_mb / seconds, 1),
            "cpu_s": round(cpu, 1),
            "peak_mb": round(peak),
        }
        print(
            f"{step:<28} {seconds:>9.2f} {source_mb / seconds:>7.1f} {cpu:>7.1f} {peak:>8.0f}  {[round(run['seconds'], 1) for run in runs]}"
        )
    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print(json.dumps({"source": str(args.source), "source_mb": round(source_mb), "options": options, "results": summary}))


if __name__ == "__main__":
    main()
