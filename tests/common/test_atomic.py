"""`common.atomic.write_csv`: the same bytes as pandas, and no half-written table on failure."""

from __future__ import annotations

import pandas as pd
import pytest

from common import atomic


def _frame() -> pd.DataFrame:
    return pd.DataFrame({"seriesuid": ["1.2.3", "é"], "coordX": [1.0, -2.123456789], "probability": [0.5, 1]})


def test_write_csv_matches_pandas_and_leaves_no_temporaries(tmp_path):
    frame = _frame()
    frame.to_csv(tmp_path / "pandas.csv", index=False, float_format="%.6f")
    out = atomic.write_csv(tmp_path / "sub" / "ours.csv", frame, float_format="%.6f")
    assert out.read_bytes() == (tmp_path / "pandas.csv").read_bytes()
    assert [p.name for p in out.parent.iterdir()] == ["ours.csv"]
    atomic.write_csv(out, frame, index=True, fsync=True)
    assert list(pd.read_csv(out).columns) == ["Unnamed: 0", "seriesuid", "coordX", "probability"]


def test_write_csv_failure_keeps_the_old_file(tmp_path):
    path = atomic.write_csv(tmp_path / "table.csv", _frame())
    before = path.read_bytes()
    with pytest.raises(TypeError):
        atomic.write_csv(path, _frame(), no_such_option=True)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]
