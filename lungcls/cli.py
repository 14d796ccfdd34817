"""`lungcls`: the LightningCLI of the M³Net and pathology tasks, plus the efficiency report.

    lungcls fit      --config configs/m3net/stage1_scale32.yaml        # stage 1, one run per scale
    lungcls fit      --config configs/m3net_lidc.yaml                  # stage 2 (loads the three stage-1 ckpts)
    lungcls test     --config configs/m3net_lidc.yaml --ckpt_path runs/m3net/stage2/best.ckpt
    lungcls predict  --config configs/m3net_lidc.yaml --ckpt_path …   # predict_predictions.csv in the run folder
    lungcls fit      --config configs/pathology_ldfc.yaml
    lungcls complexity [--config configs/m3net/table7_efficiency.yaml] [--preset paper] [--out FILE]

`fit` / `validate` / `test` / `predict` are `common.lightning.LungCLI` (LightningCLI in subclass mode:
`model.class_path` names `lungcls.task.ScaleTask`, `M3NetTask` or `PathologyTask`, `data.class_path` a
datamodule of `lungcls.data` or `lungcls.pathology_data`). `complexity` prints paper Table 7 for our models — parameters, MACs and
FLOPs per branch at the given input sizes (`lungcls.complexity`) — for every preset and token mode the
config lists, and writes it as markdown when `--out` is given.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from common.lightning.cli import LungCLI, run_main
from lungcls import data as _data  # noqa: F401  (registers the datamodules for short class names)
from lungcls.task import ClassificationTask

EFFICIENCY_DEFAULTS = {"presets": ["paper"], "token_modes": ["spatial"], "sizes": ["paper", "reference"]}


def efficiency_report(argv: Sequence[str]) -> int:
    """`lungcls complexity`: the Table 7 efficiency report (see the module docstring)."""
    import torch

    from lungcls.complexity import (
        PAPER_INPUT_SIZES,
        PAPER_TABLE7,
        REFERENCE_PROFILE_SIZES,
        format_complexity_table,
        measure_complexity,
    )
    from lungcls.models import create_m3net

    parser = argparse.ArgumentParser(prog="lungcls complexity", description=efficiency_report.__doc__)
    parser.add_argument(
        "--config", help="YAML with presets, token_modes, sizes (paper | reference | {32: [z, y, x], …})"
    )
    parser.add_argument("--preset", action="append", help="preset(s) to report (overrides the config)")
    parser.add_argument("--out", help="also write the report as markdown to this file")
    args = parser.parse_args(list(argv))
    settings = dict(EFFICIENCY_DEFAULTS)
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise SystemExit(f"lungcls complexity: error: config {path} does not exist")
        settings.update(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    if args.preset:
        settings["presets"] = args.preset
    named = {"paper": PAPER_INPUT_SIZES, "reference": REFERENCE_PROFILE_SIZES}
    sections = []
    for preset in settings["presets"]:
        for token_mode in settings["token_modes"]:
            with torch.device("meta"):
                model = create_m3net(preset, token_mode=token_mode)
            for sizes in settings["sizes"]:
                table = named[sizes] if isinstance(sizes, str) else {int(k): v for k, v in sizes.items()}
                rows = measure_complexity(model, table)
                label = sizes if isinstance(sizes, str) else "custom"
                total = rows[-1]
                sections.append(
                    f"### preset {preset}, token mode {token_mode}, input sizes {label}\n\n"
                    f"{format_complexity_table(rows)}\n\n"
                    f"total: {total.params / 1e6:.3f} M parameters, {total.macs / 1e9:.3f} GMACs = "
                    f"{total.flops / 1e9:.3f} GFLOPs (paper Table 7: {PAPER_TABLE7['params_m']} M, "
                    f"{PAPER_TABLE7['gflops_reported']} 'GFLOPs' = thop MACs with every branch at 32×32×56)\n"
                )
    report = "\n".join(sections)
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("# M³Net efficiency (paper Table 7)\n\n" + report, encoding="utf-8")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lungcls` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "complexity":
        return efficiency_report(args[1:])
    return run_main("lungcls", lambda a: LungCLI(ClassificationTask, None, package="lungcls", args=a), args)


if __name__ == "__main__":
    sys.exit(main())
