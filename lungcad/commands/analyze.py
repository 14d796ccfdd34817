"""`lungcad analyze INPUT --bundle BUNDLE --out OUT`: nodules, sizes, malignancy and Lung-RADS for new scans.

INPUT is one scan — a DICOM series folder, an ``.mhd`` (with its ``.raw``/``.zraw``) or a ``.nii``/``.nii.gz`` —
or a batch folder of them. A folder that directly holds DICOM files (``*.dcm`` or files with the ``DICM``
preamble) is ONE DICOM scan; any other folder is a batch: every ``.mhd``/``.nii``/``.nii.gz`` file under it
and every sub-folder that directly holds DICOM files is one scan (hidden entries, ``DICOMDIR`` indexes and OUT
itself are skipped).

Each scan goes read → the bundle's pipeline (`lungcad.pipeline.analyze_volume`) → files in
``OUT/<scan id>/`` (`lungcad.outputs`), every step timed, logged and shown on a progress bar. ``report.json``
is written last, so a scan whose folder holds a finished report (all listed files present, checksums
matching) is skipped: re-running the same command finishes an interrupted batch. ``--overwrite`` redoes
finished scans; a finished scan made with another bundle or other options is refused rather than mixed in.
A batch also writes ``OUT/results.csv`` (all scans, LUNA16 format) and ``OUT/nodules.csv``.

``--nodules CSV`` (LUNA16 columns ``seriesuid,coordX,coordY,coordZ[,diameter_mm]``, world mm) skips
detection: the rows whose ``seriesuid`` is the scan's series UID or file stem are segmented, measured and
classified. See docs/analyze.md.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.io import CTVolume, read_volume
from lungcad import outputs

log = logging.getLogger(__name__)

#: Steps shown on a scan's progress bar: ours (read, write) around the pipeline's.
STEPS = ("read", "preprocess", "detect", "fpr", "segment", "measure", "classify", "write")
_SCAN_SUFFIXES = (".mhd", ".nii", ".nii.gz")
_NODULE_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``analyze`` sub-command."""
    parser = subparsers.add_parser(
        "analyze",
        help="nodules, measurements, malignancy and Lung-RADS for a scan or a folder of scans",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument(
        "input", type=Path, help="DICOM series folder, .mhd, .nii/.nii.gz, or a batch folder of them"
    )
    parser.add_argument("--bundle", type=Path, required=True, help="model bundle folder (lungcad bundle)")
    parser.add_argument("--out", type=Path, required=True, help="output folder; one sub-folder per scan")
    parser.add_argument(
        "--nodules",
        type=Path,
        default=None,
        metavar="CSV",
        help="given nodule centres (seriesuid,coordX,coordY,coordZ[,diameter_mm], world mm): skip detection",
    )
    parser.add_argument(
        "--series-uid", default=None, help="the series to analyze in a DICOM folder that holds several"
    )
    parser.add_argument(
        "--dicom-tolerance",
        type=float,
        default=None,
        metavar="MM",
        help="accept DICOM slice gaps / uneven spacing up to MM (default: refuse any beyond rounding)",
    )
    parser.add_argument(
        "--anonymize",
        action="store_true",
        help="name scans by a hash of the series UID and strip the patient module from DICOM SEG/SR",
    )
    parser.add_argument("--overwrite", action="store_true", help="redo scans whose outputs are finished")
    parser.add_argument(
        "--runtime",
        choices=("torch", "onnxruntime"),
        default="torch",
        help="run the networks in PyTorch (default) or their ONNX export on onnxruntime CPU (lungcad export)",
    )
    parser.add_argument(
        "--onnx",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder written by `lungcad export` (default: BUNDLE/onnx); only with --runtime onnxruntime",
    )
    parser.set_defaults(func=run)
    return parser


# ------------------------------------------------------------------------------------------------ inputs


def is_dicom_file(path: Path) -> bool:
    """A ``.dcm`` file or one with the DICOM preamble (``DICM`` at byte 128); a DICOMDIR index is not a slice
    (a CD export's root holds one beside the series folders: that root is a batch)."""
    if not path.is_file() or path.name.startswith(".") or path.name.upper() == "DICOMDIR":
        return False
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _is_scan_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(_SCAN_SUFFIXES) and not path.name.startswith(".")


def is_dicom_folder(folder: Path) -> bool:
    """Whether ``folder`` directly holds DICOM files (then it is one scan, not a batch)."""
    return folder.is_dir() and any(is_dicom_file(p) for p in folder.iterdir())


def find_inputs(path: Path, out: Path | None = None) -> tuple[list[Path], bool]:
    """The scans named by INPUT and whether it is a batch folder (rules in the module docstring).

    Raises:
        FileNotFoundError: INPUT does not exist.
        ValueError: an unsupported file, or a batch folder without any scan.
    """
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such file or folder; pass a DICOM folder, .mhd, .nii(.gz) or batch folder"
        )
    if path.is_file():
        outputs.scan_format(path)  # raises for unsupported types
        return [path], False
    if is_dicom_folder(path):
        return [path], False
    skip = out.resolve() if out is not None else None
    found: list[Path] = []

    def walk(folder: Path) -> None:
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith(".") or (skip is not None and entry.resolve() == skip):
                continue
            if entry.is_dir():
                if is_dicom_folder(entry):
                    found.append(entry)
                else:
                    walk(entry)
            elif _is_scan_file(entry):
                found.append(entry)

    walk(path)
    if not found:
        raise ValueError(
            f"{path}: no scans found; a batch folder holds .mhd/.nii/.nii.gz files or DICOM series folders, "
            "a DICOM folder holds .dcm files"
        )
    return found, True


def _dicom_series_uids(folder: Path) -> set[str]:
    """The SeriesInstanceUIDs in a DICOM folder, from headers only (to find a finished scan without reading it)."""
    import pydicom

    uids = set()
    for path in folder.iterdir():
        if not is_dicom_file(path):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except (pydicom.errors.InvalidDicomError, OSError, ValueError):
            continue
        if "SeriesInstanceUID" in ds:
            uids.add(str(ds.SeriesInstanceUID))
    return uids


def known_scan_id(path: Path, series_uid: str | None, anonymize: bool) -> str | None:
    """The scan id without reading voxels, or None when only reading the series can tell."""
    if outputs.scan_format(path) != "dicom":
        return outputs.scan_id(_stub(None), path, anonymize)
    uids = _dicom_series_uids(path)
    uid = (
        series_uid
        if series_uid in uids
        else (next(iter(uids)) if len(uids) == 1 and series_uid is None else None)
    )
    return None if uid is None else outputs.scan_id(_stub(uid), path, anonymize)


def _stub(series_uid: str | None) -> CTVolume:
    return CTVolume(np.zeros((1, 1, 1), np.int16), (1, 1, 1), (0, 0, 0), np.eye(3), series_uid)


def read_scan(
    path: Path, series_uid: str | None = None, tolerance_mm: float | None = None
) -> tuple[CTVolume, list[Any] | None]:
    """The scan and, for DICOM, its source headers in z order (the DICOM SEG/SR reference them).

    DICOM goes through `lungcad.dicom_input.read_dicom_ct`: the CT series chosen by rule, the refusals.
    """
    fmt = outputs.scan_format(path)
    if fmt != "dicom":
        if series_uid is not None:
            raise ValueError(
                f"{path}: --series-uid picks a series in a DICOM folder; drop it for {fmt} input"
            )
        return read_volume(path), None
    from lungcad.dicom_input import read_dicom_ct

    volume, datasets = read_dicom_ct(path, series_uid, tolerance_mm=tolerance_mm)
    return volume, list(datasets)


# ---------------------------------------------------------------------------------------- given nodules


@dataclass
class GivenNodules:
    """The rows of a ``--nodules`` CSV; the index is the data row (0 = line 2)."""

    path: Path
    table: pd.DataFrame
    sha256: str = field(default="")

    @classmethod
    def read(cls, path: Path) -> GivenNodules:
        """Read and check the CSV; any bad value is a one-line error naming the file, row and line."""
        from common.metrics import froc_io

        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: --nodules file not found; pass a CSV seriesuid,coordX,coordY,coordZ"
            )
        header = path.read_text(encoding="utf-8", errors="replace").splitlines()[:1]
        columns = [c.strip() for c in header[0].split(",")] if header else []
        required = (*_NODULE_COLUMNS, "diameter_mm") if "diameter_mm" in columns else _NODULE_COLUMNS
        try:
            table = froc_io._read_checked(path, required, "nodules")
        except froc_io.FROCInputError as err:
            raise ValueError(str(err)) from None
        if (table["seriesuid"] == "").any():
            row = int(np.flatnonzero((table["seriesuid"] == "").to_numpy())[0])
            raise ValueError(
                f"{path}: empty seriesuid at row {row + 1} (line {row + 2}); name the scan of every row"
            )
        return cls(path, table, outputs.sha256(path))

    def for_scan(self, volume: CTVolume, input_path: Path) -> np.ndarray:
        """The rows of this scan (series UID or file stem) as (N, 3) world mm, or (N, 4) with ``diameter_mm``
        when the CSV has it (the pipeline sizes its search by it); checked to lie in the scan."""
        keys = {outputs.file_stem(input_path), input_path.name}
        if volume.series_uid:
            keys.add(volume.series_uid)
        rows = self.table.loc[self.table["seriesuid"].isin(keys)]
        xyz = rows[["coordX", "coordY", "coordZ"]].to_numpy(np.float64)
        if len(rows):
            inside = volume.contains_voxel(volume.world_to_voxel(xyz))
            if not inside.all():
                row = int(rows.index[np.flatnonzero(~inside)[0]])
                raise ValueError(
                    f"{self.path}: row {row + 1} (line {row + 2}) at ({', '.join(f'{v:g}' for v in xyz[~inside][0])}) "
                    "mm lies outside its scan; coordinates are world mm (x, y, z) in the scan's own frame"
                )
        if "diameter_mm" in rows:
            return np.column_stack([xyz, rows["diameter_mm"].to_numpy(np.float64)])
        return xyz


# ----------------------------------------------------------------------------------------------- running


class StepBar:
    """A scan's progress bar over `STEPS`; the pipeline's ``progress(step)`` moves it."""

    def __init__(self, label: str) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(STEPS), desc=label, unit="step", leave=False, disable=None)
        self.done: set[str] = set()

    def __call__(self, step: str) -> None:
        log.debug("step %s", step)
        self.bar.set_postfix_str(step)
        if step in STEPS and step not in self.done:
            self.done.add(step)
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str, bar: StepBar) -> Iterator[None]:
    bar(name)
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start


def _bundle_sha(bundle: Path) -> str | None:
    path = bundle / "bundle.json"
    return outputs.sha256(path) if path.is_file() else None


def _check_same_run(
    report: dict[str, Any], parameters: dict[str, Any], bundle_sha: str | None, folder: Path
) -> None:
    """A finished report made with another bundle or other options is not silently kept (nor overwritten)."""
    theirs = report.get("bundle", {}).get("sha256")
    if bundle_sha and theirs and theirs != bundle_sha:
        raise ValueError(
            f"{folder}: finished with another bundle (bundle.json sha256 {theirs[:12]}…); pass --overwrite to "
            "redo it or choose another --out"
        )
    old = report.get("parameters", {})
    changed = sorted(k for k in parameters if old.get(k) != parameters[k])
    if changed:
        raise ValueError(
            f"{folder}: finished with other options ({', '.join(changed)}); pass --overwrite to redo it or "
            "choose another --out"
        )


class Analyzer:
    """Runs one bundle over the inputs of one command line."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"{self.out}: --out is a file; pass a folder")
        if not args.bundle.is_dir():
            raise FileNotFoundError(
                f"{args.bundle}: bundle folder not found; write one with `lungcad bundle`"
            )
        runtime = getattr(args, "runtime", "torch")
        onnx_dir = getattr(args, "onnx", None)
        if onnx_dir is not None and runtime != "onnxruntime":
            raise ValueError(f"--onnx {onnx_dir} is only used with --runtime onnxruntime")
        if runtime == "onnxruntime":
            from lungcad.commands.export import DEFAULT_SUBFOLDER
            from lungcad.runtime import read_export

            read_export(onnx_dir or args.bundle / DEFAULT_SUBFOLDER)  # missing export: fail before any scan
        self.given = GivenNodules.read(args.nodules) if args.nodules is not None else None
        self.bundle_sha = _bundle_sha(args.bundle)
        self.parameters: dict[str, Any] = {
            "nodules_csv": args.nodules.name if args.nodules is not None else None,
            "nodules_csv_sha256": self.given.sha256 if self.given is not None else None,
            "series_uid_requested": args.series_uid,
            "dicom_tolerance_mm": args.dicom_tolerance,
            "anonymize": bool(args.anonymize),
            "runtime": getattr(args, "runtime", "torch"),
        }
        self._bundle = None
        self.done: dict[str, Path] = {}

    @property
    def bundle(self):
        """Loaded on first use, so a batch of finished scans never loads the models."""
        if self._bundle is None:
            from lungcad.bundle import Bundle

            start = time.perf_counter()
            self._bundle = Bundle.load(self.args.bundle)
            if getattr(self.args, "runtime", "torch") == "onnxruntime":
                from lungcad.commands.export import DEFAULT_SUBFOLDER
                from lungcad.runtime import use_exported_models

                use_exported_models(self._bundle, self.args.onnx or self.args.bundle / DEFAULT_SUBFOLDER)
            log.info("bundle loaded in %.1f s", time.perf_counter() - start)
        return self._bundle

    def _finished(self, scan_id: str) -> dict[str, Any] | None:
        folder = self.out / scan_id
        report = outputs.finished_report(folder)
        if report is None or self.args.overwrite:
            return None
        _check_same_run(report, self.parameters, self.bundle_sha, folder)
        return report

    def _claim(self, scan_id: str, path: Path) -> None:
        if scan_id in self.done and self.done[scan_id] != path:
            raise ValueError(
                f"{path}: same scan id {scan_id} as {self.done[scan_id]}; analyze them into different --out folders"
            )
        self.done[scan_id] = path

    def analyze(self, path: Path, label: str) -> tuple[str, dict[str, Any], bool]:
        """Analyze one input (or find it finished); returns (scan id, report, skipped)."""
        from lungcad.pipeline import analyze_volume

        args = self.args
        scan_id = known_scan_id(path, args.series_uid, args.anonymize)
        if scan_id is not None and (report := self._finished(scan_id)) is not None:
            self._claim(scan_id, path)
            log.info("%s: %s is finished, skipped", label, scan_id)
            return scan_id, report, True
        timings: dict[str, float] = {}
        bar = StepBar(label)
        try:
            with _timed(timings, "read", bar):
                volume, datasets = read_scan(path, args.series_uid, args.dicom_tolerance)
            scan_id = outputs.scan_id(volume, path, args.anonymize)
            self._claim(scan_id, path)
            if (report := self._finished(scan_id)) is not None:
                log.info("%s: %s is finished, skipped", label, scan_id)
                return scan_id, report, True
            bar.bar.set_description_str(f"{label} {scan_id[-12:]}")
            log.info(
                "%s: scan %s (%s, %s voxels, spacing %s mm) read in %.1f s",
                label, scan_id, outputs.scan_format(path), "x".join(map(str, volume.shape)),
                "/".join(f"{s:g}" for s in volume.spacing), timings["read"],
            )  # fmt: skip
            given = self.given.for_scan(volume, path) if self.given is not None else None
            if given is not None and len(given) == 0:
                log.warning(
                    "%s: %s has no rows in %s; nothing to measure", label, scan_id, self.given.path.name
                )
            analysis = analyze_volume(volume, self.bundle, nodules_world_mm=given, progress=bar)
            timings.update({k: float(v) for k, v in analysis.timings_s.items() if k != "read"})
            bar("write")
            paths = outputs.write_outputs(
                analysis,
                self.out / scan_id,
                scan_id,
                outputs.scan_format(path),
                source_datasets=datasets,
                anonymize=args.anonymize,
                parameters=self.parameters,
                timings_s=timings,
            )
        finally:
            bar.close()
        report = outputs.finished_report(self.out / scan_id)
        log.info(
            "%s: %s: %d nodule(s), scan category %s; %s; %s",
            label, scan_id, report["summary"]["n_nodules"], report["summary"]["scan_category"],
            ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()), ", ".join(sorted(paths)),
        )  # fmt: skip
        return scan_id, report, False


def write_batch_tables(out: Path, reports: list[dict[str, Any]]) -> dict[str, Path]:
    """``OUT/results.csv`` (all scans' candidates, LUNA16 format) and ``OUT/nodules.csv`` of a batch."""
    frames = []
    for report in reports:
        path = out / report["scan"]["id"] / outputs.RESULTS_CSV
        frames.append(pd.read_csv(path, dtype={"seriesuid": str}))
    results = pd.concat(frames, ignore_index=True) if frames else outputs.results_frame(None, "")
    return {
        "results": outputs.write_results_csv(results, out / outputs.RESULTS_CSV),
        "nodules": outputs.write_nodules_csv(reports, out / outputs.NODULES_CSV),
    }


def run(args: argparse.Namespace) -> int:
    """Analyze every input; a batch goes on past a failing scan and ends with exit status 2 if any failed."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    inputs, batch = find_inputs(args.input, args.out)
    if batch and args.series_uid is not None:
        raise ValueError(
            f"{args.input}: --series-uid picks one series in one DICOM folder, not in a batch folder"
        )
    analyzer = Analyzer(args)
    reports: list[dict[str, Any]] = []
    failed: list[str] = []
    counts = {"analyzed": 0, "skipped": 0}
    started = time.perf_counter()
    with logging_redirect_tqdm():
        for k, path in enumerate(tqdm(inputs, desc="scans", unit="scan", disable=None if batch else True)):
            label = f"[{k + 1}/{len(inputs)}]"
            try:
                scan_id, report, skipped = analyzer.analyze(path, label)
            except (FileNotFoundError, ValueError, KeyError, RuntimeError) as err:
                if not batch:
                    raise
                failed.append(f"{path}: {err}" if str(path) not in str(err) else str(err))
                log.error("%s %s", label, failed[-1])
                continue
            counts["skipped" if skipped else "analyzed"] += 1
            reports.append(report)
            print(f"{args.out / scan_id}{' (finished earlier, skipped)' if skipped else ''}")
    if batch:
        paths = write_batch_tables(args.out, reports)
        print(f"batch tables: {paths['results']}, {paths['nodules']}")
    log.info(
        "%d scan(s) analyzed, %d skipped as finished, %d failed in %.1f s",
        counts["analyzed"], counts["skipped"], len(failed), time.perf_counter() - started,
    )  # fmt: skip
    if failed:
        raise ValueError(f"{len(failed)} of {len(inputs)} scans failed (first: {failed[0]})")
    return 0


__all__ = ["find_inputs", "is_dicom_folder", "read_scan", "register", "run", "write_batch_tables"]
