"""Peak memory of ``p2u_hub.upgrade`` on a local release, against the "final model + one shard" budget.

Usage: ``python benchmarks/upgrade_memory.py OUT`` where OUT is a ``p2u split`` output folder
(e.g. of the synthetic 2 GB Llama: ``p2u bench /tmp/syn-2gb --synthetic-gb 2 --workdir /tmp/w``
leaves it in ``/tmp/w/release``). Run it in a fresh process: VmHWM covers this process only.
"""

import sys
import time
from pathlib import Path

import transformers

import p2u_hub
from p2u_hub.core import format as fmt
from p2u_hub.tools.bench_worker import model_class_for, peak_rss_mb

release = Path(sys.argv[1])
manifest = fmt.read_manifest(release / fmt.BASE_DIR)
stage_shards = [
    path
    for index in range(1, len(manifest.ladder.stage_bits) + 2)
    for path in fmt.weight_files(release / fmt.stage_dir_name(index), fmt.DELTA_WEIGHTS_NAME)
]
largest_shard = max(path.stat().st_size for path in stage_shards) / 1e6
interpreter = peak_rss_mb()
model = model_class_for(release / fmt.BASE_DIR).from_pretrained(release / fmt.BASE_DIR)
loaded = peak_rss_mb()
start = time.perf_counter()
p2u_hub.upgrade(model)
seconds = time.perf_counter() - start
final = manifest.source_bytes() / 1e6
peak = peak_rss_mb()
print(f"transformers {transformers.__version__}; final model {final:,.0f} MB, largest stage shard {largest_shard:,.0f} MB")
print(f"peak RSS: after imports {interpreter:,.0f} MB, after loading the base {loaded:,.0f} MB, after upgrade {peak:,.0f} MB")
print(
    f"upgrade {seconds:.1f} s ({final / seconds:.1f} MB/s of source); peak - imports = {peak - interpreter:,.0f} MB "
    f"vs final + one shard = {final + largest_shard:,.0f} MB"
)
