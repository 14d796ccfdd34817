"""Synthetic trees shared by the lungcls tests, generated once per session (they cost seconds each)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def lidc_tree(tmp_path_factory):
    """Six small LIDC-layout scans, 15 clustered nodules (3 malignant in 3 patients)."""
    from common.synth import make_lidc

    root = tmp_path_factory.mktemp("lidc6")
    make_lidc(root, n_scans=6, seed=0)
    return root


@pytest.fixture(scope="session")
def ldfc_tree(tmp_path_factory):
    """Five LDFC patients: 12 training and 3 test classification images, every class in both."""
    from common.synth.ldfc import make_ldfc

    root = tmp_path_factory.mktemp("ldfc5")
    make_ldfc(root, n_scans=5, seed=0)
    return root


@pytest.fixture(scope="session")
def patch_cache_dir(lidc_tree, tmp_path_factory):
    """A patch cache of `lidc_tree` at the test crop sizes, built once."""
    from tests.lungcls.test_data import small_datamodule

    cache = tmp_path_factory.mktemp("patch_cache")
    small_datamodule(lidc_tree, cache).prepare_data()
    return cache
