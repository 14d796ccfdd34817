"""Slow learning check of the CLAF pipeline on synthetic LUNA16 scans, on CPU (`make test-slow`).

The demo pipeline (`lungdet.demo.run_demo`: the user's `lungdet fit/test/predict` commands with the demo
configs) on 48 synthetic scans — 24 for training, 4 for validation, 20 held out (35 nodules) — with longer
schedules than `make demo`: 6144 stage-1 crops; 12288 stage-2 crops (lr 2e-3, dropout 0.3, 80 % of the
false crops from stage 1's own false candidates, the demo config's `stage1_negative_fraction`). With 36
scans (18 training) stage 1 stalled at 0.885 (23 of 26 nodules) in every variant tried; the 48 scans give it
more distinct nodules and make one nodule 0.029 of the sensitivity instead of 0.038. Acceptance (issue 5):
on the held-out scans, with the official LUNA16 evaluation,

* stage 1 reaches a sensitivity ≥ 0.90 at ≤ 8 FP/scan, and
* re-scoring stage 1's candidates with the MPPN raises the CPM by ≥ 0.05 over the stage-1 scores of the
  same candidates (final score of `configs/demo/mppn_demo.yaml`: the mean of the MPPN and stage-1
  probabilities; the MPPN-alone CPM is printed too).

Re-scoring cannot add nodules the candidates miss, so the fused CPM is at most the candidates' recall and
the gain at most recall − stage-1 CPM (printed as the headroom). With 64 scans (36 training) stage 1 came so
close to its recall (CPM 0.872, recall 0.923) that a gain of 0.05 was out of reach even though the MPPN took
the CPM to 0.905 (docs/lungdet.md, "Learning check").

The numbers are printed (run with `-s`) and left in the report folder.
"""

from __future__ import annotations

import os

import pytest

from lungdet.demo import run_demo

SCANS = 48
SPLIT = ["--data.init_args.ratios", "[0.5, 0.08, 0.42]"]
STAGE1 = ["--trainer.max_epochs", "12", "--data.init_args.samples_per_epoch", "512", *SPLIT]
# stage 2: 768 steps of 16 crops; a faster learning rate and lighter dropout than the 128-step demo
STAGE2 = [
    "--trainer.max_epochs", "24", "--data.init_args.samples_per_epoch", "512", *SPLIT,
    "--model.init_args.lr", "0.002", "--model.init_args.dropout", "0.3",
    "--trainer.check_val_every_n_epoch", "12",
]  # fmt: skip


@pytest.mark.slow
def test_stage1_finds_nodules_and_mppn_adds_to_the_cpm(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("WANDB_MODE", "disabled")
    # two threads only where OpenMP waits passively (export OMP_WAIT_POLICY=PASSIVE, as `make demo` does):
    # spinning threads on a busy machine are slower than one
    torch.set_num_threads(2 if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" else 1)
    result = run_demo(
        tmp_path / "demo", scans=SCANS, seed=1, stage1_args=STAGE1, stage2_args=STAGE2, bootstrap=0
    )
    rows = {row["system"]: row for row in result["rows"]}
    stage1 = rows["stage 1 (CLAF candidate net)"]
    same = rows["stage 1 scores, stage-2 candidates"]
    final = rows["stage 1 + MPPN (CLAF)"]
    print()
    for name, row in rows.items():
        print(f"{name:38s} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)))
    print("timings (s):", {k: round(v) for k, v in result["timings"].items()})
    assert stage1["sens@8"] >= 0.90, f"stage-1 sensitivity at 8 FP/scan {stage1['sens@8']:.3f} < 0.90"
    gain = final["CPM"] - same["CPM"]
    # re-scoring cannot find nodules the candidates miss: the CPM of any re-scoring is at most their recall
    headroom = same["recall"] - same["CPM"]
    print(f"MPPN gain {gain:.3f} of a possible {headroom:.3f} (candidate recall {same['recall']:.3f})")
    assert gain >= 0.05, (
        f"MPPN raised the CPM by {gain:.3f} (stage 1 {same['CPM']:.3f} → {final['CPM']:.3f}; "
        f"the candidates' recall {same['recall']:.3f} caps any re-scoring)"
    )
