"""`lungdata sweep run|show`: run a wandb sweep file with no W&B server.

    lungdata sweep show configs/sweeps/glance_lambda_det.yaml                 # the trials' commands
    lungdata sweep run  configs/sweeps/glance_lambda_det.yaml                 # every grid point
    lungdata sweep run  configs/sweeps/claf_lr_anchors.yaml --count 8 --seed 1
    lungdata sweep run  configs/sweeps/claf_lr_anchors.yaml --method grid --count 2

Each trial is the command `wandb agent` would run, with WANDB_MODE=offline (upload later with
`wandb sync <trial>/…/wandb/offline-run-*`); the results, ranked by the file's `metric`, go to
`<out>/results.csv` after every trial. With a server, the same file runs as
`wandb sweep FILE` then `wandb agent ENTITY/PROJECT/ID` (docs/scale.md).
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from common.experiments.sweeps import (
    SUMMARIES,
    build_command,
    format_results,
    load_sweep,
    local_command,
    run_sweep,
)


def _show(args: argparse.Namespace) -> int:
    spec = load_sweep(args.file)
    trials = spec.trials(args.method, args.count, args.seed)
    print(
        f"sweep {spec.name}: {len(trials)} trial(s), {args.method or spec.method}, metric {spec.metric} ({spec.goal})"
    )
    for params in trials:
        print(shlex.join(local_command(build_command(spec, params))))
    return 0


def _run(args: argparse.Namespace) -> int:
    spec = load_sweep(args.file)
    results, csv_path = run_sweep(
        args.file,
        args.out,
        method=args.method,
        count=args.count,
        seed=args.seed,
        summary=args.summary,
        wandb_mode="disabled" if args.no_wandb else "offline",
        timeout=args.timeout,
    )
    print(format_results(results, spec))
    print(f"lungdata sweep: wrote {csv_path}")
    return 0 if any(r.status == "ok" for r in results) else 1


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="wandb sweep file (configs/sweeps/*.yaml)")
    parser.add_argument("--method", choices=("grid", "random"), help="override the file's method")
    parser.add_argument("--count", type=int, help="number of trials (grid: the first N)")
    parser.add_argument("--seed", type=int, default=0, help="random-search seed (same seed → same trials)")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `lungdata sweep` with its `run` and `show` sub-commands."""
    parser = subparsers.add_parser(
        "sweep", help="run a wandb sweep file locally (no server)", description=__doc__.splitlines()[0]
    )
    actions = parser.add_subparsers(dest="sweep_command", required=True, metavar="ACTION")
    run = actions.add_parser("run", help="run the trials and write the ranked results CSV")
    _common(run)
    run.add_argument(
        "--out", type=Path, help="folder for trials and results.csv (default runs/sweeps/<name>)"
    )
    run.add_argument(
        "--summary",
        choices=SUMMARIES,
        default="last",
        help="metric value per trial: last logged (wandb) or best",
    )
    run.add_argument("--timeout", type=float, help="seconds per trial before it is stopped")
    run.add_argument("--no-wandb", action="store_true", help="WANDB_MODE=disabled instead of offline")
    run.set_defaults(func=_run)
    show = actions.add_parser("show", help="print the trials' commands without running them")
    _common(show)
    show.set_defaults(func=_show)
    return parser


__all__ = ["register"]
