"""Atomic file writes: a reader (or a killed run) never sees half a file.

Every writer in the toolkit goes through `atomic_path`: the data is written to a temporary file beside the
target and renamed into place with `os.replace` (atomic on POSIX within one folder); on any error the
temporary file is removed and the old file, if there was one, is untouched. That is what lets the
preprocessing cache, split files, synthetic trees and prediction outputs resume after an interruption.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

TMP_MARKER = ".tmp"


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a unique temporary path beside `path`; rename it into place on success, remove it on failure.

    Args:
        path: the final file.
        suffix: end the temporary name with this extension, for writers that pick the format from it
            (SimpleITK's DICOM and NIfTI writers: ".dcm", ".nii.gz").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TMP_MARKER}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes, fsync: bool = False) -> Path:
    """Write `data` atomically; `fsync` also forces it to disk before the rename (for manifests)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        if fsync:
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def write_text(path: str | Path, text: str, fsync: bool = False) -> Path:
    """Write UTF-8 text with Unix newlines atomically."""
    return write_bytes(path, text.encode("utf-8"), fsync=fsync)


def csv_text(header: Sequence[str] | None, rows: Iterable[Sequence[Any]], lineterminator: str = "\n") -> str:
    """CSV text (for `write_text`) with a header line (None: none); quotes only where a field needs them."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator=lineterminator)
    if header is not None:
        writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def json_ready(data: Any) -> Any:
    """`data` with NaN and infinities replaced by None: JSON has no NaN, and a bare ``NaN`` token makes the
    file unreadable for strict parsers (jq, JavaScript, jsonschema), so an undefined number is ``null``."""
    if isinstance(data, dict):
        return {key: json_ready(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [json_ready(value) for value in data]
    if isinstance(data, float | np.floating):
        return float(data) if np.isfinite(data) else None
    return data


def write_json(
    path: str | Path, data: Any, indent: int = 1, fsync: bool = False, sort_keys: bool = True
) -> Path:
    """Write `data` as indented JSON (sorted keys: stable bytes for the same data) atomically; NaN → null."""
    text = json.dumps(json_ready(data), indent=indent, sort_keys=sort_keys, allow_nan=False)
    return write_text(path, text + "\n", fsync=fsync)


def write_csv(
    path: str | Path, frame: pd.DataFrame, index: bool = False, fsync: bool = False, **to_csv
) -> Path:
    """Write `frame` as a UTF-8 CSV atomically (the same bytes `frame.to_csv(path, ...)` writes).

    Args:
        path: the CSV file.
        frame: the table.
        index: write the row index as a first column (off: toolkit tables carry their keys as columns).
        fsync: force the file to disk before the rename (for tables a manifest points at).
        **to_csv: further `DataFrame.to_csv` options (`float_format`, `header`, ...).
    """
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        frame.to_csv(handle, index=index, **to_csv)
        if fsync:
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


class _HashingWriter:
    """File-like wrapper that feeds everything written through SHA-256, so big arrays are never re-read."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.sha = hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.handle.write(data)


def save_npy(path: str | Path, array: np.ndarray, fsync: bool = True) -> str:
    """Save `array` as `.npy` atomically; returns the SHA-256 of the written file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        writer = _HashingWriter(handle)
        np.lib.format.write_array(writer, np.ascontiguousarray(array), allow_pickle=False)
        if fsync:
            handle.flush()
            os.fsync(handle.fileno())
    return writer.sha.hexdigest()
