"""Two-process DDP (gloo, CPU) end to end for one model of each package, with the commands of docs/scale.md.

For lungcls, lungseg and lungdet: `torchrun --nproc_per_node=2 … fit`, then `torchrun … validate` on the
fitted checkpoint, then a single-process `validate` on the same checkpoint; every validation metric the two
validations log must be equal. The command lines are read from the `<!-- ddp-test -->` block of
docs/scale.md, so the documented commands are the tested ones; the test appends only the data location, the
run folder and, for the two detectors, smaller networks and inference blocks.

Slow suite (`make test-slow`): nine launches of the package CLIs, a few minutes on 2 cores.
"""

from __future__ import annotations

import math
import os
import shlex
import sys
from pathlib import Path

import pytest

from common.experiments.launch import launch
from common.experiments.runs import find_checkpoint, run_versions

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "scale.md"
MARKER = "<!-- ddp-test -->"
TIMEOUT = 600


def documented_commands() -> dict[tuple[str, str], list[str]]:
    """(package, stage) → argv of the torchrun commands in the docs' DDP-test block."""
    text = DOCS.read_text()
    assert MARKER in text, f"{DOCS} lost its {MARKER} block"
    block = text.split(MARKER, 1)[1].split("```", 2)[1]
    lines, current = [], ""
    for raw in block.splitlines()[1:]:  # skip the ```bash line
        current += raw.rstrip().removesuffix("\\") + " "
        if not raw.rstrip().endswith("\\"):
            if current.strip():
                lines.append(shlex.split(current))
            current = ""
    commands = {}
    for argv in lines:
        assert argv[0] == "torchrun", argv
        package, stage = argv[argv.index("-m") + 1], argv[argv.index("-m") + 2]
        commands[(package, stage)] = argv
    return commands


def torchrun() -> list[str]:
    script = Path(sys.executable).parent / "torchrun"
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


def single_process(argv: list[str]) -> list[str]:
    """The documented validate command as one process: `python -m <package> …` on one device."""
    start = argv.index("-m")
    rest = [a for a in argv[start + 1 :] if not a.startswith(("--trainer.devices=", "--trainer.strategy="))]
    return [sys.executable, "-m", *rest, "--trainer.devices=1", "--trainer.strategy=auto"]


def _lungcls_data(tmp: Path) -> tuple[dict[str, str], list[str]]:
    from common.synth.ldfc import make_ldfc

    make_ldfc(tmp / "ldfc", n_scans=5, seed=0)
    return {"LDFC_ROOT": str(tmp / "ldfc")}, []


def _lungseg_data(tmp: Path) -> tuple[dict[str, str], list[str]]:
    from common.synth import make_lidc

    make_lidc(tmp / "lidc", n_scans=4, seed=0, size="small")
    # untrained networks: low thresholds so that detections and masks exist and the metrics are not all zero
    extra = [
        f"--data.init_args.cache_dir={tmp / 'cache'}",
        "--model.init_args.peak_threshold=0.01",
        "--model.init_args.seg_threshold=0.3",
    ]
    return {"LIDC_ROOT": str(tmp / "lidc")}, extra


def _lungdet_data(tmp: Path) -> tuple[dict[str, str], list[str]]:
    from common.synth import make_luna16

    make_luna16(tmp / "luna16", n_scans=4, seed=3, size="small")
    extra = [
        f"--data.init_args.root={tmp / 'luna16'}",
        f"--data.init_args.cache_dir={tmp / 'cache'}",
        "--data.init_args.ratios=[0.5, 0.25, 0.25]",
        "--data.init_args.samples_per_epoch=8",
        "--data.init_args.batch_size=2",
        "--model.init_args.width=4",
        "--model.init_args.head_channels=8",
        "--model.init_args.score_threshold=0.0",
        "--trainer.max_epochs=1",
        "--trainer.check_val_every_n_epoch=1",
    ]
    return {}, extra


DATA = {"lungcls": _lungcls_data, "lungseg": _lungseg_data, "lungdet": _lungdet_data}


def validation_metrics(runs: Path, name: str, version: int) -> dict[str, float]:
    folder = next(v for v in run_versions(runs / name) if v.number == version)
    assert folder.stage == "validate", f"{folder.path} is a {folder.stage} run"
    return {k: v for k, v in folder.metrics().items() if k.startswith("val/")}


def test_documented_commands_cover_fit_and_validate_of_each_package():
    commands = documented_commands()
    assert set(commands) == {(p, s) for p in DATA for s in ("fit", "validate")}
    for (_, stage), argv in commands.items():
        assert "--trainer.strategy=ddp" in argv and "--trainer.devices=2" in argv
        assert argv[argv.index("--nproc_per_node=2")] and ("--ckpt_path=CKPT" in argv) == (
            stage == "validate"
        )
        assert (REPO / argv[argv.index("--config") + 1]).is_file()


@pytest.mark.parametrize("package", sorted(DATA))
def test_two_process_ddp_validation_equals_single_process(package, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    commands = documented_commands()
    env, extra = DATA[package](tmp_path)
    env.update({"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"})
    runs = tmp_path / "runs"
    where = [f"--trainer.default_root_dir={runs}", "--run_name=ddp"]

    fit = [*torchrun(), *commands[(package, "fit")][1:], *extra, *where]
    launch(fit, tmp_path / "fit.log", env=env, timeout=TIMEOUT)
    ckpt = find_checkpoint(runs / "ddp", "last")
    assert ckpt is not None, f"2-process fit wrote no checkpoint (log: {tmp_path / 'fit.log'})"

    validate = [a.replace("CKPT", str(ckpt)) for a in commands[(package, "validate")]]
    launch([*torchrun(), *validate[1:], *extra, *where], tmp_path / "ddp.log", env=env, timeout=TIMEOUT)
    launch([*single_process(validate), *extra, *where], tmp_path / "single.log", env=env, timeout=TIMEOUT)

    numbers = sorted(v.number for v in run_versions(runs / "ddp"))
    ddp, single = validation_metrics(runs, "ddp", numbers[-2]), validation_metrics(runs, "ddp", numbers[-1])
    assert single, "the single-process validation logged no val/ metric"
    assert set(ddp) == set(single)
    different = {
        k: (ddp[k], single[k])
        for k in single
        if not (math.isnan(single[k]) and math.isnan(ddp[k]))
        and not math.isclose(ddp[k], single[k], rel_tol=1e-5, abs_tol=1e-6)
    }
    assert not different, f"{package}: 2-process validation differs from 1 process: {different}"
    assert any(v != 0 and not math.isnan(v) for k, v in single.items() if k != "val/loss"), (
        "every metric is zero: the comparison would prove nothing"
    )
    assert os.path.getsize(tmp_path / "ddp.log") > 0
