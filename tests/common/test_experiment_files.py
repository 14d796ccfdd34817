"""Table and sweep files are read by one YAML reader, so a bad file fails the same way in both."""

from __future__ import annotations

import pytest

from common.experiments.launch import read_yaml_mapping
from common.experiments.sweeps import SweepError, load_sweep
from common.experiments.tables import TableError, load_table

FORMATS = [(load_table, TableError, "table file"), (load_sweep, SweepError, "sweep file")]


@pytest.mark.parametrize(("load", "error", "kind"), FORMATS)
def test_bad_files_name_the_file_and_raise_the_formats_error(tmp_path, load, error, kind):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rows: [1, 2\n", encoding="utf-8")
    with pytest.raises(error, match=r"bad\.yaml: not valid YAML"):
        load(bad)
    listed = tmp_path / "listed.yaml"
    listed.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(error, match=rf"listed\.yaml: a {kind} must be a YAML mapping"):
        load(listed)


def test_unreadable_file_raises_the_callers_error(tmp_path):
    with pytest.raises(TableError, match="cannot read the table file"):
        read_yaml_mapping(tmp_path, TableError, "table file")


def test_mapping_is_returned_as_read(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("name: x\nvalues: [1, 2]\n", encoding="utf-8")
    assert read_yaml_mapping(good, ValueError, "sweep file") == {"name": "x", "values": [1, 2]}
