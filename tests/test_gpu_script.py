"""`bench/gpu.sh` on a machine without CUDA: one line saying so, exit 0, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_script_without_cuda_says_so_in_one_line_and_exits_0(tmp_path):
    out = tmp_path / "results_gpu.md"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}  # no device, even on a GPU box
    done = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh"), "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [
        "bench/gpu.sh: no CUDA device (torch.cuda.is_available() is False); nothing measured, exit 0"
    ]
    assert not out.exists()


def test_gpu_inference_part_runs_fp32_and_bf16_autocast_in_miniature_on_cpu():
    """The script's inference part (two stages, fp32 and bf16 autocast) works end to end, tiny, on the CPU."""
    from bench.gpu_bench import inference

    rows: list[str] = []
    inference(rows, device="cpu", shape=(32, 48, 48), widths=(2, 2), block=32, candidates=4)
    table = [r for r in rows if r.startswith("| fp32") or r.startswith("| bf16 autocast")]
    assert len(table) == 2
    assert any(r.startswith("bf16 vs fp32, candidates in rank order:") for r in rows)
