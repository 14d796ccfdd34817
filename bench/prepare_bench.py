"""`lungdata prepare` throughput: scans/s with 1 and 2 worker processes on the same synthetic scans.

The scans are the training benchmark's synthetic LUNA16 tree (``bench.train_bench.synthetic_data``: four
``medium`` phantoms, 128 × 256² voxels each); each run builds a fresh cache in a temporary folder with
``PreprocessedCache.build(workers=N)`` — exactly what ``lungdata prepare --workers N`` does — and the two
caches must be byte-identical. ``--shard I/N`` runs are plain builds of a subset, so scans/s per shard is
the 1-worker figure on that shard's machine.

Run: ``python -m bench.prepare_bench``, or ``run()`` from ``make bench``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from common.cache import PreprocessedCache
from common.datasets.luna16 import LUNA16Dataset


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run(data: str | Path | None = None, workers: tuple[int, ...] = (1, 2)) -> dict[str, Any]:
    """Scans/s of a full build with each worker count, and whether the caches are identical."""
    from bench.train_bench import DEFAULT_DATA, synthetic_data

    records = LUNA16Dataset(synthetic_data(Path(data) if data else DEFAULT_DATA)["luna16"]).records
    results: dict[str, Any] = {"scans": len(records)}
    caches = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in workers:
            cache = PreprocessedCache(Path(tmp) / f"workers{n}")
            start = time.perf_counter()
            cache.build(records, workers=n)
            seconds = time.perf_counter() - start
            results[f"workers{n}_s"] = seconds
            results[f"workers{n}_scans_per_s"] = len(records) / seconds
            caches[n] = _files(cache.root)
            print(f"prepare --workers {n}: {len(records)} scans in {seconds:.1f} s", flush=True)
        first = caches[workers[0]]
        results["caches_identical"] = all(files == first for files in caches.values())
    if len(workers) > 1:
        results[f"speedup_{workers[-1]}_over_{workers[0]}"] = (
            results[f"workers{workers[-1]}_scans_per_s"] / results[f"workers{workers[0]}_scans_per_s"]
        )
    return results


if __name__ == "__main__":
    for key, value in run().items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
