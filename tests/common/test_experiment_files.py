"""Table and sweep files are read by one YAML reader, so a bad file fails the same way in both."""

from __future__ import annotations

import pytest

from common.experiments.launch import read_yaml_mapping
from common.experiments.sweeps import SweepError, load_sweep
from common.experiments.tables import TableError, load_table


def test_invalid_yaml_names_the_file_in_both_formats(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rows: [1, 2\n", encoding="utf-8")
    with pytest.raises(TableError, match=r"bad\.yaml: not valid YAML"):
        load_table(bad)
    with pytest.raises(SweepError, match=r"bad\.yaml: not valid YAML"):
        load_sweep(bad)


def test_a_file_that_is_not_a_mapping_is_refused_with_its_kind(tmp_path):
    listed = tmp_path / "listed.yaml"
    listed.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(TableError, match=r"listed\.yaml: a table file must be a YAML mapping"):
        load_table(listed)
    with pytest.raises(SweepError, match=r"listed\.yaml: a sweep file must be a YAML mapping"):
        load_sweep(listed)


def test_unreadable_file_raises_the_callers_error(tmp_path):
    with pytest.raises(TableError, match="cannot read the table file"):
        read_yaml_mapping(tmp_path, TableError, "table file")


def test_mapping_is_returned_as_read(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("name: x\nvalues: [1, 2]\n", encoding="utf-8")
    assert read_yaml_mapping(good, ValueError, "sweep file") == {"name": "x", "values": [1, 2]}
