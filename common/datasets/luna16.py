"""LUNA16 (LUng Nodule Analysis 2016) in its published layout.

```
ROOT/
  subset0/ … subset9/<seriesuid>.mhd + .raw     the 888 scans; the subset index is the official fold
  seg-lungs-LUNA16/<seriesuid>.mhd + .zraw      provided lung masks (3, 4 = lungs, 5 = airways)
  annotations.csv            seriesuid,coordX,coordY,coordZ,diameter_mm      (1186 nodules, world mm)
  candidates.csv / candidates_V2.csv   seriesuid,coordX,coordY,coordZ,class
  annotations_excluded.csv   same columns as annotations.csv (findings that are neither hits nor FPs)
  seriesuids.csv             one seriesuid per line, no header
```

The CSVs are looked up at the root and where the release archives unpack them (`CSVFILES/`,
`candidates_V2/`, `evaluationScript/annotations/`); any of them can be given as a path instead.

Records: `uid` = `patient_id` = seriesuid (LUNA16 carries no patient ids; joining LIDC-IDRI patients is the
LIDC adapter's job), `fold` = subset index, nodules from `annotations.csv` and `excluded` from
`annotations_excluded.csv` (diameter −1 kept as published; the FROC code maps it to 10 mm), each with
`extras["source"] = "<csv path>:<line>"`, and `lung_mask_path` when the provided mask exists (its lung labels
3 and 4 in `extras["lung_mask_labels"]`).

Rows whose seriesuid is unknown are errors (lenient mode: logged and skipped). Unknown means: not a scan
on disk and not listed in `seriesuids.csv`. A listed scan that is simply not on disk (a partial download)
or not in the selected subsets only drops its rows, with one summary line in the log. Whether an
annotation lies inside its volume needs the scan's header, so it is checked lazily: `check_annotations`
reads the headers on request, and the preprocessed cache checks every scan it builds.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from common.datasets.base import Nodule, ScanDataset, ScanRecord
from common.datasets.geometry import ScanGeometry
from common.datasets.tables import (
    AnnotationError,
    RowPolicy,
    WorldColumns,
    cell_float,
    coerce_columns,
    csv_line,
    find_scans,
    locate_in_scan,
    mhd_data_file,
    read_table,
)

log = logging.getLogger(__name__)

ENV_VAR = "LUNA16_ROOT"
SUBSET_REGEX = re.compile(r"subset(\d+)")
CSV_FOLDERS = ("", "CSVFILES", "candidates_V2", "evaluationScript/annotations", "annotations")


@dataclass(frozen=True)
class LUNA16Columns(WorldColumns):
    """Column names of the LUNA16 CSVs (annotations, excluded, candidates), in case a copy renames them.

    The world columns are those of every LUNA16-style table (`WorldColumns`); candidates add their label.
    """

    label: str = "class"

    def world(self) -> dict[str, str]:
        return {"seriesuid": self.seriesuid, "x": self.x, "y": self.y, "z": self.z}

    def candidate_header(self) -> tuple[str, ...]:
        """The header of a candidate CSV with these names, in LUNA16's order."""
        return (*self.centre(), self.label)


#: Header of LUNA16's candidates.csv / candidates_V2.csv, the names `LUNA16Dataset.candidates` returns.
CANDIDATE_COLUMNS: tuple[str, ...] = LUNA16Columns().candidate_header()


class LUNA16Dataset(ScanDataset):
    """The LUNA16 tree as `ScanRecord`s.

    Args:
        root: dataset root (environment variable `LUNA16_ROOT`).
        annotations: nodule CSV, name or path.
        candidates: candidate CSV used by `candidates()` (`candidates.csv` for the V1 list).
        excluded: `annotations_excluded.csv`; optional (a missing file means no excluded findings).
        subsets: subset indices to include; default every `subsetN` folder present.
        seg_dir: folder of the provided lung masks, relative to root.
        columns: CSV column names, if your copy differs.
        strict: bad rows are errors (default) or logged skips.
    """

    name = "luna16"
    env_var = ENV_VAR

    def __init__(
        self,
        root: str | Path,
        annotations: str | Path = "annotations.csv",
        candidates: str | Path = "candidates_V2.csv",
        excluded: str | Path | None = "annotations_excluded.csv",
        subsets: Iterable[int] | None = None,
        seg_dir: str = "seg-lungs-LUNA16",
        columns: LUNA16Columns | None = None,
        strict: bool = True,
    ) -> None:
        super().__init__(root)
        self.annotations_name = annotations
        self.candidates_name = candidates
        self.excluded_name = excluded
        self.subsets = None if subsets is None else sorted({int(s) for s in subsets})
        self.seg_dir = self.root / seg_dir
        self.columns = coerce_columns(columns, LUNA16Columns)
        self.policy = RowPolicy(strict, log)
        self._geometry: dict[str, ScanGeometry] = {}

    # ------------------------------------------------------------------------------------------ files

    def find_file(self, name: str | Path, required: bool = True) -> Path | None:
        """Locate a LUNA16 CSV: an absolute path as given, else under the root or a release sub-folder."""
        path = Path(name)
        if path.is_absolute():
            candidates = [path]
        else:
            candidates = [self.root / folder / path for folder in CSV_FOLDERS]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        if required:
            looked = ", ".join(str(c) for c in candidates)
            raise FileNotFoundError(
                f"LUNA16 file {path.name} not found (looked in {looked}); pass its path to LUNA16Dataset or make "
                f"a stand-in with `lungdata synth luna16 --out {self.root}`"
            )
        return None

    def _subset_folders(self) -> dict[int, Path]:
        folders = {}
        for child in sorted(self.root.iterdir()):
            match = SUBSET_REGEX.fullmatch(child.name)
            if child.is_dir() and match:
                folders[int(match.group(1))] = child
        return folders

    def series_uids(self) -> list[str]:
        """The official scan list `seriesuids.csv` (no header), or [] when the file is absent."""
        path = self.find_file("seriesuids.csv", required=False)
        if path is None:
            return []
        return [line.strip().split(",")[0] for line in path.read_text().splitlines() if line.strip()]

    # ---------------------------------------------------------------------------------------- records

    def _scans(self) -> tuple[dict[str, tuple[Path, int]], set[str]]:
        """Selected scans uid → (header, subset) and every uid known to exist (on disk or in seriesuids.csv)."""
        folders = self._subset_folders()
        if not folders:
            raise FileNotFoundError(
                f"no subset0 ... subset9 folders under {self.root}; point {ENV_VAR} at the LUNA16 download or make "
                f"a stand-in with `lungdata synth luna16 --out {self.root}`"
            )
        if self.subsets is not None:
            missing = [s for s in self.subsets if s not in folders]
            if missing:
                raise FileNotFoundError(
                    f"LUNA16 subset folder(s) {', '.join(f'subset{s}' for s in missing)} not found under "
                    f"{self.root}; present: {', '.join(p.name for p in folders.values())}"
                )
        selected: dict[str, tuple[Path, int]] = {}
        known: set[str] = set(self.series_uids())
        for index, folder in folders.items():
            for uid, header in find_scans(folder, "*.mhd", check_data_files=False).items():
                known.add(uid)
                if self.subsets is not None and index not in self.subsets:
                    continue
                data = mhd_data_file(header)
                if data is not None and not data.is_file():
                    self.policy.bad_row(
                        f"{header} points to pixel data {data.name} which is missing; re-extract subset{index}"
                    )
                    continue
                selected[uid] = (header, index)
        return selected, known

    def _read_findings(
        self, name: str | Path | None, selected: dict[str, tuple[Path, int]], known: set[str], required: bool
    ) -> dict[str, list[Nodule]]:
        if name is None:
            return {}
        path = self.find_file(name, required=required)
        if path is None:
            log.info("LUNA16: no %s under %s; no findings of that kind", Path(name).name, self.root)
            return {}
        cols = self.columns
        frame = read_table(path, {**cols.world(), "diameter": cols.diameter}, "LUNA16Dataset(columns=...)")
        out: dict[str, list[Nodule]] = {}
        absent = 0
        for index in frame.index:
            line = csv_line(index)
            uid = str(frame.at[index, cols.seriesuid]).strip()
            if uid not in selected:
                if uid in known:
                    absent += 1
                else:
                    self.policy.bad_row(
                        f"{path}, line {line}: seriesuid {uid!r} has no scan under {self.root} and is not in "
                        "seriesuids.csv"
                    )
                continue
            try:
                xyz = tuple(cell_float(frame, index, c, path) for c in (cols.x, cols.y, cols.z))
                diameter = cell_float(frame, index, cols.diameter, path)
            except AnnotationError as err:
                self.policy.bad_row(str(err))
                continue
            out.setdefault(uid, []).append(
                Nodule(world_xyz=xyz, diameter_mm=diameter, extras={"source": f"{path}:{line}"})  # type: ignore[arg-type]
            )
        if absent:
            log.info("LUNA16: %d row(s) of %s belong to scans not selected or not on disk", absent, path.name)
        return out

    def _load_records(self) -> list[ScanRecord]:
        selected, known = self._scans()
        nodules = self._read_findings(self.annotations_name, selected, known, required=True)
        excluded = self._read_findings(self.excluded_name, selected, known, required=False)
        records = []
        for uid, (header, subset) in sorted(selected.items(), key=lambda item: (item[1][1], item[0])):
            mask = self.seg_dir / f"{uid}.mhd"
            records.append(
                ScanRecord(
                    uid=uid,
                    patient_id=uid,
                    image_path=header,
                    nodules=nodules.get(uid, []),
                    excluded=excluded.get(uid, []),
                    lung_mask_path=mask if mask.is_file() else None,
                    fold=subset,
                    series_uid=uid,
                    extras={"subset": f"subset{subset}", "lung_mask_labels": [3, 4]},
                )
            )
        return records

    # ------------------------------------------------------------------------------------- candidates

    def candidates(self) -> pd.DataFrame:
        """The candidate list of the selected scans, columns seriesuid, coordX, coordY, coordZ, class.

        Columns are renamed to the standard LUNA16 names whatever `columns` says, coordinates are float and
        class is int; rows of scans outside the selection are dropped.
        """
        path = self.find_file(self.candidates_name)
        cols = self.columns
        frame = read_table(path, {**cols.world(), "label": cols.label}, "LUNA16Dataset(columns=...)")
        frame = frame.rename(columns=dict(zip(cols.candidate_header(), CANDIDATE_COLUMNS)))
        frame = frame[list(CANDIDATE_COLUMNS)]
        frame["seriesuid"] = frame["seriesuid"].str.strip()
        try:
            frame = frame.astype({"coordX": float, "coordY": float, "coordZ": float, "class": int})
        except ValueError as err:
            raise AnnotationError(f"{path}: a coordinate or class is not a number ({err})") from None
        return frame[frame["seriesuid"].isin(set(self.uids))].reset_index(drop=True)

    # ------------------------------------------------------------------------------------- validation

    def geometry(self, uid: str) -> ScanGeometry:
        """Header geometry of one scan (read once, pixels untouched)."""
        if uid not in self._geometry:
            self._geometry[uid] = ScanGeometry.from_header(self[uid].image_path)
        return self._geometry[uid]

    def check_annotations(self, uids: Sequence[str] | None = None) -> list[str]:
        """Check that every nodule and excluded finding lies inside its scan; reads headers only.

        Returns:
            The problems found (lenient mode); strict mode raises `AnnotationError` on the first one.
        """
        problems = []
        for record in self.records if uids is None else [self[u] for u in uids]:
            geo = self.geometry(record.uid)
            for finding in [*record.nodules, *record.excluded]:
                where = finding.extras.get("source", "annotation")
                _, problem = locate_in_scan(geo, finding.world_xyz, where, "finding", f"scan {record.uid}")
                if problem:
                    self.policy.bad_row(problem)
                    problems.append(problem)
        return problems


LUNA16 = LUNA16Dataset
"""Short alias."""
