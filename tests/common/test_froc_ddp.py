"""Two-process DDP (gloo, CPU): the gathered validation FROC equals the single-process FROC."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from common.metrics.froc import evaluate_froc
from common.metrics.froc_io import load_froc_inputs
from common.metrics.froc_torch import LUNA16FROC
from tests.common.gloo import gloo_group, run_ranks

CASE = Path(__file__).resolve().parents[1] / "data" / "froc" / "luna_like"


def _inputs():
    return load_froc_inputs(
        CASE / "annotations.csv.gz",
        CASE / "annotations_excluded.csv.gz",
        CASE / "seriesuids.csv.gz",
        CASE / "results.csv.gz",
    )


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, world, port):
        inp = _inputs()
        scans = list(range(rank, len(inp.seriesuids), world))
        if rank == 1:
            scans.append(0)  # DistributedSampler-style padding: scan 0 is seen by both ranks
        metric = LUNA16FROC()
        for start in range(0, len(scans), 4):
            batch = scans[start : start + 4]
            cands, nods, excl = [], [], []
            for s in batch:
                c = inp.cand_scan == s
                cands.append(torch.from_numpy(np.column_stack((inp.cand_xyz[c], inp.cand_prob[c]))))
                for inc, out in ((True, nods), (False, excl)):
                    m = (inp.nod_scan == s) & (inp.nod_included == inc)
                    out.append(torch.from_numpy(np.column_stack((inp.nod_xyz[m], inp.nod_diameter[m]))))
            metric.update(batch, cands, nods, excl)
        values = {k: float(v) for k, v in metric.compute().items()}
        result = metric.compute_result()
        values["n_scans"] = result.counts.n_scans
        values["n_candidates"] = result.counts.n_candidates
        values["sensitivities"] = result.sensitivities.tolist()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(values))


def test_two_process_gloo_froc_equals_single_process(tmp_path: Path) -> None:
    run_ranks(_worker, tmp_path)
    inp = _inputs()
    ref = evaluate_froc(
        inp.cand_scan,
        inp.cand_xyz,
        inp.cand_prob,
        inp.nod_scan,
        inp.nod_xyz,
        inp.nod_diameter,
        inp.nod_included,
        len(inp.seriesuids),
    )
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["n_scans"] == len(inp.seriesuids)
        assert got["n_candidates"] == ref.counts.n_candidates
        np.testing.assert_array_equal(got["sensitivities"], ref.sensitivities)
        assert got["cpm"] == np.float32(ref.cpm)
