"""Model bundle: the four trained models of an analysis, their settings and checksums, in one folder.

```
BUNDLE/
  bundle.json     schema version, generator, per model: task class, hyperparameters, run-time settings, data
                  config, checkpoint file + sha256, expected preprocessing, training data, test metrics;
                  the detection operating point and stage fusion chosen on validation scans
  stage1.ckpt     CLAF candidate network  (lungdet.task.CandidateTask)
  mppn.ckpt       MPPN false-positive reducer (lungdet.task.FPRTask)
  seg.ckpt        GLANCE segmentation (lungseg.task.GlanceTask)
  cls.ckpt        M³Net malignancy (lungcls.task.M3NetTask)
```

Checkpoints are slimmed to ``{"state_dict", "hyper_parameters"}`` (no optimiser state) so they load with
``torch.load(weights_only=True)``. ``bundle.json`` follows ``lungcad/schemas/bundle.schema.json``.

``write_bundle`` (the ``lungcad bundle`` command) takes a run folder (``runs/<name>`` or
``runs/<name>/version_N``: its ``config.yaml``, ``run_info.json`` and best or last checkpoint) or a bare
checkpoint per model. The detection operating threshold and the stage-1 weight of the score fusion are
chosen by running the two-stage detector on the stage-1 run's validation scans (its datamodule config,
so its cache must still be there): the fusion weight w ∈ {0, 0.1, …, 1} of ``(1 − w)·p_MPPN + w·p_stage1``
with the highest validation CPM (``lungdet.fusion.choose_fusion``, the rule `lungdet fit` uses; ties: the
weight the MPPN run's `lungdet test` scores with — its validation choice under ``fusion_search``, else its
``stage1_weight`` — then the smaller w), and the lowest fused score at which the validation scans keep at
most ``fp_per_scan`` false positives per scan (default 1) under the LUNA16 hit rules. The run's own choice
is recorded beside it (``detection.run_fusion``).

``Bundle.load`` refuses a bundle (one line naming ``bundle.json`` and the key) when a file's sha256, the
schema version, or a model's recorded preprocessing differs from what this code would do with the model's
recorded data config (``expected_preprocessing``): a bundle built by an older lungcad whose resampling,
lung mask, windows or crops changed since is not silently run on differently prepared scans.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import math
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from torch.overrides import TorchFunctionMode

from common import atomic
from common.cache import PrepareSettings, sha256_file

log = logging.getLogger(__name__)

__all__ = [
    "BUNDLE_FILE",
    "MODEL_KINDS",
    "SCHEMA_VERSION",
    "Bundle",
    "BundleModel",
    "RunSource",
    "expected_preprocessing",
    "resolve_run",
    "write_bundle",
]

SCHEMA_VERSION = "1.0"
BUNDLE_FILE = "bundle.json"
FORMAT = "lungcad-bundle"
#: Model key → the task class it must be (also the only classes a bundle may name: nothing else is imported).
MODEL_KINDS: dict[str, str] = {
    "stage1": "lungdet.task.CandidateTask",
    "mppn": "lungdet.task.FPRTask",
    "seg": "lungseg.task.GlanceTask",
    "cls": "lungcls.task.M3NetTask",
}
#: Run-time arguments that describe a training run's files or its evaluation, not how a bundle analyses a scan.
_NOT_FOR_A_BUNDLE = frozenset(
    {"fp_rate", "results_csv", "stage1_checkpoint", "stage1_inference", "operating_threshold", "with_hd95"}
    | {"fusion_search"}  # the bundle's own choice (detection.stage1_weight) is what analyze scores with
    | {"predict_dir", "mask_format", "mask_grid"}
)


def runtime_keys(kind: str) -> tuple[str, ...]:
    """Run-time (non-hyperparameter) task arguments kept from each run's config: the packages' own lists
    (`lungdet.task.STAGE1_RUNTIME` / `STAGE2_RUNTIME`, `lungseg.task.RUN_SETTINGS`) minus file and
    evaluation settings."""
    from lungdet.task import STAGE1_RUNTIME, STAGE2_RUNTIME
    from lungseg.task import RUN_SETTINGS

    names = {"stage1": STAGE1_RUNTIME, "mppn": STAGE2_RUNTIME, "seg": RUN_SETTINGS, "cls": ()}[kind]
    return tuple(k for k in names if k not in _NOT_FOR_A_BUNDLE)


#: Hyperparameters that name files of the training run; they mean nothing inside a bundle.
_DROPPED_HPARAMS = ("stage1_checkpoints", "stage1_checkpoint", "results_csv", "predict_dir")


def package_version() -> str:
    try:
        return metadata.version("lungcad")
    except metadata.PackageNotFoundError:
        return "0.1.0"


def _task_class(kind: str) -> type:
    module, name = MODEL_KINDS[kind].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _jsonable(value: Any) -> Any:
    """Plain JSON types (tuples → lists, numpy → Python, paths → str)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ------------------------------------------------------------------------------------------ run folders


@dataclass
class RunSource:
    """Where one model comes from: its checkpoint and, for a run folder, its resolved config and run info."""

    checkpoint: Path
    run_dir: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)
    run_info: dict[str, Any] = field(default_factory=dict)

    @property
    def model_args(self) -> dict[str, Any]:
        return dict((self.config.get("model") or {}).get("init_args") or {})

    @property
    def data_class(self) -> str | None:
        return (self.config.get("data") or {}).get("class_path")

    @property
    def data_args(self) -> dict[str, Any]:
        return dict((self.config.get("data") or {}).get("init_args") or {})


def _pick_checkpoint(folder: Path) -> Path | None:
    """The best checkpoint of a run (the single non-``last`` one ModelCheckpoint kept), else ``last.ckpt``."""
    ckpts = sorted(folder.rglob("*.ckpt"))
    if not ckpts:
        return None
    best = [p for p in ckpts if not p.stem.startswith("last")]
    if len(best) == 1:
        return best[0]
    last = [p for p in ckpts if p.stem == "last"]
    return last[0] if last else max(ckpts, key=lambda p: p.stat().st_mtime)


def resolve_run(path: str | Path) -> RunSource:
    """A run folder (``runs/<name>`` → its newest ``version_N`` with a checkpoint) or a checkpoint file."""
    path = Path(path)
    if path.is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        run_dir = run_dir if (run_dir / "config.yaml").is_file() else None
        return _with_config(RunSource(path, run_dir))
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is neither a run folder nor a checkpoint file; give runs/<name>[/version_N]"
        )
    versions = sorted(
        (p for p in path.glob("version_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[-1] or 0)
    )
    for run_dir in [*reversed(versions), path]:
        ckpt = _pick_checkpoint(run_dir)
        if ckpt is not None:
            return _with_config(RunSource(ckpt, run_dir if (run_dir / "config.yaml").is_file() else None))
    raise FileNotFoundError(
        f"{path} holds no checkpoint (*.ckpt); train the model first or give a .ckpt file"
    )


def _with_config(source: RunSource) -> RunSource:
    if source.run_dir is not None:
        source.config = yaml.safe_load((source.run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        info = source.run_dir / "run_info.json"
        source.run_info = json.loads(info.read_text(encoding="utf-8")) if info.is_file() else {}
    return source


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors come in many types: name the file and the fix
        raise ValueError(
            f"{path}: cannot load with weights_only=True ({err}); give a Lightning checkpoint"
        ) from err


def _test_metrics(run_dir: Path | None) -> dict[str, float] | None:
    """The last logged value of every ``test/…`` metric of a run (its metrics.csv), or None."""
    if run_dir is None or not (run_dir / "metrics.csv").is_file():
        return None
    frame = pd.read_csv(run_dir / "metrics.csv")
    out = {}
    for column in frame.columns:
        if column.startswith("test/"):
            values = frame[column].dropna()
            if len(values):
                out[column] = float(values.iloc[-1])
    return out or None


# ------------------------------------------------------------------------------------------ preprocessing


def _default(cls: type, name: str) -> Any:
    """A constructor default of `name` anywhere along `cls`'s bases (datamodules pass **kwargs upwards)."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        param = inspect.signature(init).parameters.get(name)
        if param is not None and param.default is not inspect.Parameter.empty:
            return param.default
    raise KeyError(name)


def _args(data_class: str, data_args: Mapping[str, Any]) -> Callable[[str], Any]:
    module, name = data_class.rsplit(".", 1)
    if module.split(".")[0] not in ("lungdet", "lungseg", "lungcls"):
        raise ValueError(f"data class {data_class} is not one of lungcad's datamodules")
    cls = getattr(importlib.import_module(module), name)
    return lambda key: data_args[key] if key in data_args else _default(cls, key)


def expected_preprocessing(kind: str, data_class: str, data_args: Mapping[str, Any]) -> dict[str, Any]:
    """What this code does to a scan before model `kind` sees it, given the model's datamodule config.

    The same values ``lungcad.pipeline`` prepares new scans with; ``Bundle.load`` compares them with the
    ones recorded at bundle time.
    """
    arg = _args(data_class, data_args)
    if kind in ("stage1", "mppn", "seg"):
        spacing = float(arg("spacing"))
        cache = PrepareSettings(spacing=(spacing,) * 3).to_dict()
        cache["lung_mask"] = "computed"  # new scans come without a provided lung mask
    if kind in ("stage1", "mppn"):
        from lungdet.models.mppn import MPPN_CROP_SIZES
        from lungdet.scan_reader import fill_value

        window = [float(v) for v in arg("window")]
        out = {
            "cache": cache,
            "window_hu": window,
            "mask_outside_lung": bool(arg("mask_outside_lung")),
            "outside_hu": float(arg("outside_hu")),
            "lung_margin": int(arg("lung_margin")),
            "fill_value": fill_value(window, bool(arg("mask_outside_lung")), float(arg("outside_hu"))),
        }
        if kind == "mppn":
            out["crop_sizes_zyx"] = [list(s) for s in MPPN_CROP_SIZES]
        return out
    if kind == "seg":
        from lungseg.slices import AIR_HU

        return {
            "cache": cache,
            "window_hu": [float(v) for v in arg("window_hu")],
            "image_size": int(arg("image_size")),
            "lung_crop": bool(arg("lung_crop")),
            "crop_margin_mm": float(arg("crop_margin_mm")),
            "context_slices": int(arg("context_slices")),
            "context_step": int(arg("context_step")),
            "outside_hu": float(AIR_HU),
        }
    if kind == "cls":
        from common.preprocess import HU_MAX, HU_MIN
        from lungcls.data import NodulePatchDataModule
        from lungcls.patches import AIR_HU, PATCH_CACHE_VERSION

        scales = [int(s) for s in arg("scales")]
        overrides = {int(k): int(v) for k, v in (arg("patch_sizes") or {}).items()}
        dm = NodulePatchDataModule(
            scales=scales,
            patch_sizes=overrides,
            depth=int(arg("depth")),
            context=arg("context"),
            context_depth=arg("context_depth"),
            boundary=str(arg("boundary")),
            augmentation=arg("augmentation"),
        )
        return {
            "spacing": "native",
            "hu_range": [float(HU_MIN), float(HU_MAX)],
            "sizes": {str(s): int(dm.sizes[s]) for s in scales},
            "depth": int(dm.depth),
            "context": int(dm.patch_settings.context),
            "context_depth": int(dm.patch_settings.context_depth),
            "boundary": dm.patch_settings.boundary,
            "outside_hu": float(AIR_HU),
            "patch_version": PATCH_CACHE_VERSION,
            "normalization": str(arg("normalization")),
            "window_hu": [float(v) for v in arg("window")],
        }
    raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(MODEL_KINDS)}")


def _first_difference(recorded: Any, current: Any, key: str) -> tuple[str, Any, Any] | None:
    if isinstance(recorded, Mapping) and isinstance(current, Mapping):
        for k in sorted(set(recorded) | set(current)):
            diff = _first_difference(recorded.get(k), current.get(k), f"{key}.{k}")
            if diff:
                return diff
        return None
    if (
        isinstance(recorded, float | int)
        and isinstance(current, float | int)
        and not isinstance(recorded, bool)
    ):
        return (
            None
            if math.isclose(float(recorded), float(current), rel_tol=1e-9, abs_tol=1e-12)
            else (key, recorded, current)
        )
    if isinstance(recorded, list) and isinstance(current, list) and len(recorded) == len(current):
        for i, (a, b) in enumerate(zip(recorded, current)):
            diff = _first_difference(a, b, f"{key}[{i}]")
            if diff:
                return diff
        return None
    return None if recorded == current else (key, recorded, current)


# ------------------------------------------------------------------------------------------ loading


@dataclass
class BundleModel:
    """One model of a loaded bundle: its entry in bundle.json and the task with its weights (eval mode)."""

    kind: str
    entry: dict[str, Any]
    task: Any

    @property
    def preprocessing(self) -> dict[str, Any]:
        return self.entry["preprocessing"]


@dataclass
class Bundle:
    """A verified bundle (``Bundle.load``); ``models`` maps stage1 / mppn / seg / cls to `BundleModel`."""

    path: Path
    manifest: dict[str, Any]
    models: dict[str, BundleModel]
    sha256: str

    @property
    def detection(self) -> dict[str, Any]:
        return self.manifest["detection"]

    @property
    def operating_threshold(self) -> float:
        return float(self.detection["operating_threshold"])

    @property
    def stage1_weight(self) -> float:
        return float(self.detection["stage1_weight"])

    def info(self) -> dict[str, Any]:
        """What a report says about the bundle (``Analysis.bundle_info``)."""
        return {
            "name": self.manifest.get("name") or self.path.name,
            "sha256": self.sha256,
            "schema_version": self.manifest["schema_version"],
            "generator": self.manifest["generator"],
            "operating_threshold": self.operating_threshold,
            "fp_per_scan": self.detection["fp_per_scan"],
            "fusion": {"stage1_weight": self.stage1_weight, "formula": "(1 - w) * p_mppn + w * p_stage1"},
        }

    @classmethod
    def load(
        cls, path: str | Path, device: str | torch.device = "cpu", *, check_preprocessing: bool = True
    ) -> Bundle:
        """Read, verify and load a bundle folder (or its bundle.json).

        Raises:
            FileNotFoundError: no bundle.json or a listed file is missing.
            ValueError: schema version, a checksum or a model's preprocessing disagrees (one line naming the
                bundle file and the key).
        """
        path = Path(path)
        folder = path.parent if path.name == BUNDLE_FILE else path
        manifest_path = folder / BUNDLE_FILE
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{manifest_path} does not exist; build a bundle with `lungcad bundle … --out {folder}`"
            )
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{manifest_path}: not valid JSON ({err}); rebuild it with `lungcad bundle`"
            ) from err
        version = str(manifest.get("schema_version"))
        if manifest.get("format") != FORMAT or version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
            raise ValueError(
                f"{manifest_path}: schema_version {version!r} (format {manifest.get('format')!r}) is not readable "
                f"by this lungcad (schema {SCHEMA_VERSION}); rebuild the bundle with `lungcad bundle`"
            )
        for name, digest in sorted((manifest.get("files") or {}).items()):
            file = folder / name
            if Path(name).name != name or not file.is_file():
                raise FileNotFoundError(
                    f"{manifest_path}: files.{name} is missing from {folder}; copy the whole bundle folder"
                )
            actual = sha256_file(file)
            if actual != digest:
                raise ValueError(
                    f"{manifest_path}: files.{name} sha256 is {actual[:12]}… but bundle.json records {digest[:12]}…; "
                    "the file was changed or damaged, rebuild or re-copy the bundle"
                )
        models_entry = manifest.get("models") or {}
        missing = [k for k in MODEL_KINDS if k not in models_entry]
        if missing:
            raise ValueError(
                f"{manifest_path}: models.{missing[0]} is missing; a bundle holds {sorted(MODEL_KINDS)}"
            )
        for kind, entry in models_entry.items():
            if entry.get("task") != MODEL_KINDS.get(kind):
                raise ValueError(
                    f"{manifest_path}: models.{kind}.task must be {MODEL_KINDS.get(kind)}, not {entry.get('task')}"
                )
            if entry.get("checkpoint") not in (manifest.get("files") or {}):
                raise ValueError(
                    f"{manifest_path}: models.{kind}.checkpoint {entry.get('checkpoint')} has no sha256 in files"
                )
            if check_preprocessing:
                current = expected_preprocessing(
                    kind, entry["data"]["class_path"], entry["data"]["init_args"]
                )
                diff = _first_difference(entry.get("preprocessing"), current, f"models.{kind}.preprocessing")
                if diff:
                    key, recorded, now = diff
                    raise ValueError(
                        f"{manifest_path}: {key} is {json.dumps(recorded)} but this lungcad prepares scans with "
                        f"{json.dumps(now)}; rebuild the bundle from its runs with this version (`lungcad bundle`)"
                    )
        models = {
            kind: BundleModel(kind, models_entry[kind], _load_task(kind, folder, models_entry[kind], device))
            for kind in MODEL_KINDS
        }
        return cls(folder, manifest, models, sha256_file(manifest_path))


class _SkipInit(TorchFunctionMode):
    """Builds a task without initialising its weights: ``torch.nn.init`` calls and in-place random fills
    (timm's initialisers call ``Tensor.uniform_`` / ``normal_`` directly) leave the tensor as allocated.

    Why: the strict checkpoint load that follows sets every parameter and persistent buffer, so the random
    initialisation is wasted work: building M³Net's paper preset (185 M parameters) takes 2.2–3.2 s with it
    and 0.1–0.7 s without, on 2 CPU cores. (The tasks' non-persistent buffers, class weights of the losses,
    are not random.)
    """

    FILLS = frozenset(
        {torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.erfinv_, torch.Tensor.exponential_}
    )

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init" or func in self.FILLS:
            return kwargs["tensor"] if "tensor" in kwargs else args[0]
        return func(*args, **kwargs)


def _load_task(kind: str, folder: Path, entry: Mapping[str, Any], device: str | torch.device) -> Any:
    """Build the task from the recorded hyperparameters + run-time settings and load its weights (weights only)."""
    path = folder / entry["checkpoint"]
    data = _load_checkpoint(path)
    with _SkipInit():
        task = _task_class(kind)(**entry["hyperparameters"], **entry.get("runtime", {}))
    task.load_state_dict(data["state_dict"], strict=True)
    return task.to(device).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------ writing


def _model_entry(
    kind: str, source: RunSource, ckpt: dict[str, Any], file_name: str, digest: str
) -> dict[str, Any]:
    hparams = {k: v for k, v in dict(ckpt.get("hyper_parameters") or {}).items() if k not in _DROPPED_HPARAMS}
    hparams.pop("_instantiator", None)
    hparams.pop("_class_path", None)
    model_args = source.model_args
    runtime = {k: model_args[k] for k in runtime_keys(kind) if k in model_args}
    data_class = source.data_class
    data_args = source.data_args
    if not data_class:  # a bare checkpoint: the datamodule's own saved hyperparameters
        data_args = dict(ckpt.get("datamodule_hyper_parameters") or {})
        data_class = {
            "stage1": "lungdet.data.CandidateDataModule",
            "mppn": "lungdet.data.FPRDataModule",
            "seg": "lungseg.data.GlanceDataModule",
            "cls": "lungcls.data.NodulePatchDataModule",
        }[kind]
    if kind in ("seg",) and "image_size" in hparams and "image_size" not in data_args:
        data_args["image_size"] = hparams["image_size"]
    training = {
        key: data_args.get(key)
        for key in (
            "dataset",
            "split",
            "fold",
            "ratios",
            "seed",
            "split_level",
            "min_diameter",
            "one_scan_per_patient",
        )
        if key in data_args
    }
    return {
        "task": MODEL_KINDS[kind],
        "checkpoint": file_name,
        "sha256": digest,
        "hyperparameters": _jsonable(hparams),
        "runtime": _jsonable(runtime),
        "data": {"class_path": data_class, "init_args": _jsonable(data_args)},
        "preprocessing": expected_preprocessing(kind, data_class, data_args),
        "training_data": _jsonable(training),
        "test_metrics": _test_metrics(source.run_dir),
        "source": {
            "run": source.run_dir.name if source.run_dir else None,
            "run_name": source.run_dir.parent.name if source.run_dir else None,
            "checkpoint": source.checkpoint.name,
            "git_commit": source.run_info.get("git_commit"),
            "epoch": ckpt.get("epoch"),
            "global_step": ckpt.get("global_step"),
        },
    }


def write_bundle(
    sources: Mapping[str, str | Path],
    out: str | Path,
    *,
    fp_per_scan: float = 1.0,
    search_fusion: bool = True,
    name: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write a bundle folder from four runs or checkpoints (keys stage1, mppn, seg, cls).

    Args:
        sources: model key → run folder or checkpoint.
        out: bundle folder (created; an existing bundle.json in it is replaced).
        fp_per_scan: false positives per scan at the detection operating threshold.
        search_fusion: choose the stage-1 weight on the validation scans (else the MPPN run's own weight).
        name: bundle name (default: the folder name).
        progress: called with a line per step.

    Returns:
        The path of bundle.json.
    """
    say = progress or (lambda line: log.info("%s", line))
    missing = [k for k in MODEL_KINDS if k not in sources]
    if missing:
        raise ValueError(f"a bundle needs all four models; missing --{missing[0]}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    resolved = {kind: resolve_run(sources[kind]) for kind in MODEL_KINDS}
    entries: dict[str, dict[str, Any]] = {}
    files: dict[str, str] = {}
    run_fusion: dict[str, Any] = {}
    for kind, source in resolved.items():
        say(f"{kind}: {source.checkpoint}")
        ckpt = _load_checkpoint(source.checkpoint)
        if "state_dict" not in ckpt:
            raise ValueError(
                f"{source.checkpoint}: no state_dict; give a Lightning checkpoint of {MODEL_KINDS[kind]}"
            )
        file_name = f"{kind}.ckpt"
        slim = {
            "state_dict": ckpt["state_dict"],
            "hyper_parameters": dict(ckpt.get("hyper_parameters") or {}),
        }
        tmp = out / f".{file_name}.tmp"
        torch.save(slim, tmp)
        tmp.replace(out / file_name)
        files[file_name] = sha256_file(out / file_name)
        entries[kind] = _model_entry(kind, source, ckpt, file_name, files[file_name])
        if kind == "mppn":
            run_fusion = _run_fusion(source, ckpt)
    # The two-stage system is what `lungdet test` of the MPPN run scores: its stage1_inference overrides (e.g.
    # max_candidates 32) apply to the chained stage-1 model, so the bundle keeps them too (no drift).
    stage1_overrides = resolved["mppn"].model_args.get("stage1_inference") or {}
    if stage1_overrides:
        from lungdet.inference import Stage1Inference

        Stage1Inference().updated(stage1_overrides)  # unknown names refused with the run's own message
        entries["stage1"]["runtime"].update(_jsonable(dict(stage1_overrides)))
    if entries["stage1"]["preprocessing"]["cache"] != entries["mppn"]["preprocessing"]["cache"] or any(
        entries["stage1"]["preprocessing"][k] != entries["mppn"]["preprocessing"][k]
        for k in ("window_hu", "mask_outside_lung", "outside_hu", "lung_margin")
    ):
        raise ValueError(
            f"{resolved['mppn'].checkpoint} was trained on scans prepared differently from stage 1 "
            f"{resolved['stage1'].checkpoint}; use runs with the same preprocessing"
        )
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "format": FORMAT,
        "name": name or out.name,
        "generator": {"name": "lungcad", "version": package_version()},
        "created_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "models": entries,
        "files": files,
    }
    # The models are loaded from the bundle's own files, so the operating point describes exactly them.
    atomic.write_json(
        out / BUNDLE_FILE, {**manifest, "detection": _placeholder_detection(entries, fp_per_scan)}, indent=2
    )
    bundle = Bundle.load(out)
    say("choosing the operating threshold and fusion on the stage-1 run's validation scans")
    manifest["detection"] = choose_operating_point(
        bundle,
        entries["stage1"]["data"],
        fp_per_scan=fp_per_scan,
        search_fusion=search_fusion,
        preferred=run_fusion["stage1_weight"],
        run_fusion=run_fusion,
    )
    atomic.write_json(out / BUNDLE_FILE, _jsonable(manifest), indent=2)
    say(
        f"operating threshold {manifest['detection']['operating_threshold']:.4f} at {fp_per_scan:g} FP/scan, "
        f"stage1_weight {manifest['detection']['stage1_weight']:g}"
    )
    return out / BUNDLE_FILE


def _run_fusion(source: RunSource, ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The fusion the MPPN run's `lungdet test` scores with (``FPRTask.fusion_info``'s fields), from its
    config and the validation choice its checkpoint holds."""
    from lungdet.fusion import CHECKPOINT_KEY

    args = source.model_args
    configured = float(args.get("stage1_weight", 0.0))
    search = bool(args.get("fusion_search", False))
    saved = ckpt.get(CHECKPOINT_KEY)
    searched = search and bool(saved)
    return {
        "stage1_weight": float(saved["stage1_weight"]) if searched else configured,
        "source": "validation" if searched else "configured",
        "fusion_search": search,
        "configured_stage1_weight": configured,
        "validation": _jsonable(saved) if saved else None,
    }


def _placeholder_detection(entries: Mapping[str, Any], fp_per_scan: float) -> dict[str, Any]:
    weight = float(entries["mppn"]["runtime"].get("stage1_weight", 0.0))
    return {
        "operating_threshold": 0.5,
        "fp_per_scan": fp_per_scan,
        "stage1_weight": weight,
        "method": "pending",
    }


# ------------------------------------------------------------------------------------------ operating point


def _validation_scores(bundle: Bundle, data: Mapping[str, Any]) -> list[Any]:
    """Two-stage scores of every validation scan of the stage-1 run (``lungdet.fusion.ScoredScan``s)."""
    from lungdet.fusion import ScoredScan
    from lungdet.inference import candidates_to_world, score_candidates

    module, name = data["class_path"].rsplit(".", 1)
    if module != "lungdet.data":
        raise ValueError(f"stage-1 data class {data['class_path']} is not a lungdet datamodule")
    dm = getattr(importlib.import_module(module), name)(**data["init_args"])
    try:
        dm.prepare_data()
        dm.setup("validate")
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(
            f"cannot open the stage-1 run's validation scans to choose the operating threshold ({err}); "
            "run `lungcad bundle` where the run's dataset and cache are"
        ) from err
    stage1, mppn = bundle.models["stage1"].task, bundle.models["mppn"].task
    stage1.pad_value = mppn.pad_value = float(dm.fill_value)
    rows = []
    for batch in dm.val_dataloader():
        for scan in batch:
            cands = stage1.detect(scan["image"])
            p = score_candidates(
                mppn.model,
                scan["image"],
                cands[:, 1:4],
                chunk_size=mppn.chunk_size,
                pad_value=mppn.pad_value,
                mirror=mppn.mirror_tta,
            )
            world = candidates_to_world(cands[:, 1:4], scan["entry"])
            rows.append(ScoredScan.from_scan(scan, world, p, cands[:, 0]))
    if not rows:
        raise ValueError("the stage-1 run's validation part is empty; bundle runs that have validation scans")
    return rows


def _operating_point(scans: list[Any], weight: float, fp_per_scan: float):
    """``common.metrics.detection.operating_point_at_fp_rate`` on the LUNA16-matched fused marks."""
    from common.metrics.detection import operating_point_at_fp_rate
    from common.metrics.froc import match_candidates
    from lungdet.fusion import froc_inputs

    entries, _ = match_candidates(*froc_inputs(scans, weight).args())
    return operating_point_at_fp_rate(entries, fp_per_scan)


def choose_operating_point(
    bundle: Bundle,
    data: Mapping[str, Any],
    *,
    fp_per_scan: float = 1.0,
    search_fusion: bool = True,
    preferred: float | None = None,
    run_fusion: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Fusion weight (``lungdet.fusion.choose_fusion``) and the threshold at ``fp_per_scan`` FP/scan.

    ``preferred`` (default: the MPPN task's ``stage1_weight``) wins ties and is the only weight scored
    without ``search_fusion``. The threshold is the lowest fused score at which the validation scans keep
    at most ``fp_per_scan`` false positives per scan under the LUNA16 hit rules
    (``operating_point_at_fp_rate``: a score the detector really produced, no interpolation).
    """
    from lungdet.fusion import FUSION_GRID, choose_fusion

    scans = _validation_scores(bundle, data)
    configured = float(bundle.models["mppn"].task.stage1_weight)
    preferred = configured if preferred is None else float(preferred)
    choice = choose_fusion(scans, preferred, FUSION_GRID if search_fusion else (preferred,))
    weight = choice.stage1_weight
    point = _operating_point(scans, weight, fp_per_scan)
    # No validation candidate at all: a threshold above every probability (JSON has no infinity).
    threshold = float(point.threshold) if math.isfinite(point.threshold) else float(np.nextafter(1.0, 2.0))
    return {
        "operating_threshold": threshold,
        "fp_per_scan": float(fp_per_scan),
        "validation_fp_per_scan": float(point.fps_per_scan),
        "validation_sensitivity": float(point.recall),
        "stage1_weight": float(weight),
        "configured_stage1_weight": configured,
        "preferred_stage1_weight": preferred,
        "fusion_search": choice.to_dict()["validation_cpm"],
        "validation_cpm": choice.cpm,
        "validation_scans": choice.validation_scans,
        "validation_nodules": choice.validation_nodules,
        "run_fusion": _jsonable(dict(run_fusion)) if run_fusion is not None else None,
        "method": "two-stage detector run on the stage-1 run's validation scans (official LUNA16 hit rules)",
    }


def copy_bundle(src: str | Path, dst: str | Path) -> Path:
    """Copy a bundle folder (tests and demos use it to make tampered copies)."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return Path(dst)
