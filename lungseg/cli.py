"""``lungseg``: the GLANCE command line.

Sub-commands::

    lungseg fit       --config configs/glance_lidc.yaml [--config configs/glance/wo_cscf.yaml] [--trainer.* …]
    lungseg validate  --config … --ckpt_path run/checkpoints/last.ckpt
    lungseg test      --config … --ckpt_path …
    lungseg predict   --config … --ckpt_path … [--data.init_args.predict_root DIR_OF_SCANS]
    lungseg complexity --config configs/glance_lidc.yaml [--config configs/glance/wo_gct.yaml] [--size 512]
                       [--memory --batch 8]

``fit`` … ``predict`` are LightningCLI (:class:`common.lightning.cli.LungCLI`: YAML with ``class_path``,
omegaconf interpolation, run folder with the resolved config, CSV + wandb logging, seed 0). A second
``--config`` layers a table row over a dataset config: ``configs/glance/<row>.yaml`` only sets
``model.init_args.variant`` (and, for Table 7, the λdet preset), so ablations need no code edits.
``data.init_args.image_size`` and ``context_slices`` are linked to the same ``model.init_args``.

``complexity`` prints the parameter / FLOP report of :mod:`lungseg.complexity` per component (stem, GCT,
MRGAM, CSCF, PRD, heads) for the model the configs describe (variant + ``model_overrides``), at
``--size`` (default 512); ``--memory`` measures peak CPU memory of training steps instead. It is the same
code as ``python -m lungseg.complexity``, which takes the variant by name instead of from configs.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser

from common.lightning.cli import LungCLI, run_main

__all__ = ["GlanceCLI", "complexity_command", "main", "model_from_configs"]


class GlanceCLI(LungCLI):
    """LungCLI with the working size shared between the datamodule and the task.

    With ``--ckpt_path``, LightningCLI (2.6) replaces the model section of the config by the checkpoint's
    hyperparameters and resets every other constructor argument to its default. GLANCE keeps its
    inference / evaluation / output settings out of checkpoints (:data:`lungseg.task.RUN_SETTINGS`), so
    they are restored here from the command's own config: ``lungseg predict --ckpt_path … --model.init_args.
    predict_dir out/`` writes to ``out/``.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.link_arguments("data.init_args.image_size", "model.init_args.image_size")
        parser.link_arguments("data.init_args.context_slices", "model.init_args.context_slices")

    def _parse_ckpt_path(self) -> None:
        from lungseg.task import RUN_SETTINGS

        subcommand = self.config.get("subcommand")
        section = self.config.get(subcommand) if subcommand else None
        init_args = section.get("model.init_args") if section is not None else None
        kept = {
            k: copy.deepcopy(init_args[k]) for k in RUN_SETTINGS if init_args is not None and k in init_args
        }
        super()._parse_ckpt_path()
        if kept:
            restored = self.config[subcommand].get("model.init_args")
            for key, value in kept.items():
                restored[key] = value


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def model_from_configs(paths: Sequence[str | Path]) -> tuple[str, dict[str, Any]]:
    """The variant and ``GlanceNet`` overrides that a stack of ``lungseg`` YAML configs describes.

    Later files win (as in ``lungseg fit --config a --config b``). ``${…}`` interpolations are resolved with
    omegaconf; the working size (``data.init_args.image_size``) becomes ``img_size``.
    """
    from omegaconf import OmegaConf

    merged: dict[str, Any] = {}
    for path in paths:
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
        merged = _deep_merge(merged, loaded)
    resolved = OmegaConf.to_container(OmegaConf.create(merged), resolve=True)
    model_args = ((resolved.get("model") or {}).get("init_args")) or {}
    data_args = ((resolved.get("data") or {}).get("init_args")) or {}
    overrides = dict(model_args.get("model_overrides") or {})
    size = data_args.get("image_size", model_args.get("image_size"))
    if size is not None:
        overrides.setdefault("img_size", int(size))
    context = int(data_args.get("context_slices", model_args.get("context_slices", 0)) or 0)
    if context:
        overrides.setdefault("in_channels", 2 * context + 1)
    return str(model_args.get("variant", "full")), overrides


def complexity_command(argv: Sequence[str]) -> int:
    """``lungseg complexity``: the per-component parameter/FLOP report (or training memory) of a config."""
    from lungseg import complexity

    parser = argparse.ArgumentParser(
        prog="lungseg complexity",
        description="Parameters and FLOPs per GLANCE component (GCT, MRGAM, CSCF, PRD, …) of a config's model.",
    )
    parser.add_argument("--config", action="append", default=[], help="lungseg YAML config (repeatable)")
    parser.add_argument("--variant", help="preset name instead of (or over) the configs' variant")
    parser.add_argument("--size", type=int, default=512, help="square input size (default 512, the paper's)")
    parser.add_argument(
        "--reference", default="plain_unet", help="single-stream preset for Eq. 2; 'none' skips"
    )
    parser.add_argument("--output", help="also write the markdown report here")
    parser.add_argument("--memory", action="store_true", help="measure peak RSS of training steps instead")
    parser.add_argument("--batch", type=int, default=8, help="batch size for --memory")
    parser.add_argument("--steps", type=int, default=1, help="training steps for --memory")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for --memory")
    args = parser.parse_args(list(argv))
    variant, overrides = model_from_configs(args.config) if args.config else ("full", {})
    variant = args.variant or variant
    overrides["img_size"] = args.size
    if args.memory:
        result = complexity.measure_training_memory(
            variant, args.size, args.batch, args.steps, threads=args.threads, **overrides
        )
        print(json.dumps(result, indent=2))
        return 0
    reference = None if args.reference.lower() == "none" else args.reference
    print(complexity.report(variant, args.size, reference, args.output, **overrides), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lungseg`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "complexity":
        return complexity_command(args[1:])
    from lungseg.data import GlanceDataModule
    from lungseg.task import GlanceTask

    return run_main(
        "lungseg", lambda a: GlanceCLI(GlanceTask, GlanceDataModule, package="lungseg", args=a), args
    )
