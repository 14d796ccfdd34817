"""`common.synth.tree_matches`: a recipe reuses a synthetic tree only when it was made with its settings."""

from common.synth import make_lidc, tree_matches


def test_tree_matches_its_own_settings_only(tmp_path):
    root = tmp_path / "lidc"
    assert not tree_matches(root, n_scans=2, seed=3, size="small")
    make_lidc(root, n_scans=2, seed=3, size="small")
    assert tree_matches(root, n_scans=2, seed=3, size="small")
    assert not tree_matches(root, n_scans=3, seed=3, size="small")
    assert not tree_matches(root, n_scans=2, seed=4, size="small")
    assert not tree_matches(root, n_scans=2, seed=3, size="medium")
