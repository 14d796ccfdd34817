"""A stand-in for the trained models, for tests of what surrounds them (command plumbing, outputs,
follow-up, the bad-input catalogue): `Bundle.load` accepts any folder and `analyze_volume` is the test's own."""

from __future__ import annotations

from collections.abc import Callable


def use_stand_in_models(monkeypatch, analyze_volume: Callable) -> None:
    """Patch `lungcad.bundle.Bundle` to load nothing and `lungcad.pipeline.analyze_volume` to the given one."""
    import lungcad.bundle
    import lungcad.pipeline

    class StandInBundle:
        @classmethod
        def load(cls, path, *args, **kwargs):
            return cls()

    monkeypatch.setattr(lungcad.bundle, "Bundle", StandInBundle)
    monkeypatch.setattr(lungcad.pipeline, "analyze_volume", analyze_volume)
