"""`make bench`: run every benchmark in one process and write `bench/results.md`.

Each benchmark module exposes `run() -> dict` (flat name → value) and prints its own lines as it goes; the
reference it compares with (SimpleITK, the official LUNA16 script, MONAI RetinaNet, the machine's matmul
peak) is measured in the same run wherever it can be, so the ratios are comparable on any machine.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
import traceback
from pathlib import Path

from common import atomic

BENCHMARKS = (
    "bench.preprocess_bench",
    "bench.froc_bench",
    "bench.lungdet_bench",
    "bench.followup_bench",
    "bench.analyze_bench",
    "bench.prepare_bench",
    "bench.train_bench",
)


def _format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="module names (e.g. froc_bench) to run")
    parser.add_argument("--out", default=str(Path(__file__).with_name("results.md")))
    args = parser.parse_args(argv)

    load = os.getloadavg()[0]
    busy = " (above the core count: other jobs shared the cores)" if load > (os.cpu_count() or 1) else ""
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {platform.machine()}, {cpu_model()}, {os.cpu_count()} CPU cores, Python "
        f"{platform.python_version()}; run {time.strftime('%Y-%m-%d %H:%M:%S')}; load average at the start "
        f"{load:.1f}{busy}. Compare ratios measured in the same run: the same machine's speed varies.",
        "",
    ]
    failed = 0
    for name in BENCHMARKS:
        if args.only and name.split(".")[-1] not in args.only:
            continue
        print(f"== {name}", flush=True)
        try:
            results = importlib.import_module(name).run()
        except Exception:  # one broken benchmark must not hide the others' numbers
            traceback.print_exc()
            failed += 1
            lines += [f"## {name}", "", "FAILED — see the console output.", ""]
            continue
        lines += [f"## {name}", "", "| measure | value |", "| --- | --- |"]
        lines += [f"| {key} | {_format_value(value)} |" for key, value in results.items()]
        lines.append("")
    atomic.write_text(args.out, "\n".join(lines))
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
