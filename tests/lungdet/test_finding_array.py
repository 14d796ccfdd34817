"""`finding_array`: the one place that turns a manifest finding list into centre + diameter rows."""

from __future__ import annotations

import numpy as np
import pytest

from lungdet.candidates import label_candidates
from lungdet.scan_reader import finding_array

ENTRY = {
    "nodules": [
        {"world_xyz": [10.0, -20.0, 30.0], "voxel_zyx": [3.0, 2.0, 1.0], "diameter_mm": 6.0},
        {"world_xyz": [1.5, 2.5, 3.5], "voxel_zyx": [7.0, 8.0, 9.0], "diameter_mm": -1.0},
    ],
    "excluded": [],
}


def test_world_and_voxel_rows_keep_the_diameter():
    world = finding_array(ENTRY, "nodules")
    voxel = finding_array(ENTRY, "nodules", space="voxel")
    np.testing.assert_array_equal(world, [[10.0, -20.0, 30.0, 6.0], [1.5, 2.5, 3.5, -1.0]])
    np.testing.assert_array_equal(voxel, [[3.0, 2.0, 1.0, 6.0], [7.0, 8.0, 9.0, -1.0]])
    assert world.dtype == np.float64


def test_missing_or_empty_lists_give_no_rows_and_label_nothing():
    assert finding_array(ENTRY, "excluded").shape == (0, 4)
    assert finding_array({}, "nodules", space="voxel").shape == (0, 4)
    labels, ignore = label_candidates(
        np.array([[10.0, -20.0, 31.0], [1.5, 2.5, 7.0]]),
        finding_array(ENTRY, "nodules"),
        finding_array(ENTRY, "excluded"),
    )
    # 1 mm from a 6 mm nodule is a hit; 3.5 mm from an unknown-size one (10 mm) is a hit too
    assert labels.tolist() == [1, 1] and not ignore.any()


def test_unknown_space_is_refused():
    with pytest.raises(ValueError, match="space must be 'world' or 'voxel'"):
        finding_array(ENTRY, "nodules", space="mm")
