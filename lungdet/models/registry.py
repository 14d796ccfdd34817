"""A small name → constructor registry (timm-style) so configs can pick a lungdet network by string."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lungdet.models.candidate_net import CANDIDATE_VARIANTS, build_candidate_net
from lungdet.models.mppn import build_mppn

__all__ = ["build_model", "list_models", "register_model"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a constructor under ``name``; a duplicate name is an error."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"a lungdet model named {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    """Registered names, sorted."""
    return sorted(_REGISTRY)


def build_model(name: str, **kwargs) -> nn.Module:
    """Instantiate a registered network, e.g. ``build_model("claf_ascrm", width=8)``.

    Raises:
        KeyError: for an unknown name, listing the known ones.
    """
    if name not in _REGISTRY:
        raise KeyError(f"unknown lungdet model {name!r}; registered: {', '.join(list_models())}")
    return _REGISTRY[name](**kwargs)


def _candidate_constructor(variant: str) -> Callable[..., nn.Module]:
    def build(**kwargs) -> nn.Module:
        return build_candidate_net(variant, **kwargs)

    build.__doc__ = f"Stage-1 candidate net, variant {variant!r} (see ``CandidateNet``)."
    return build


for _variant in CANDIDATE_VARIANTS:
    register_model(f"claf_{_variant}")(_candidate_constructor(_variant))
register_model("mppn")(build_mppn)
