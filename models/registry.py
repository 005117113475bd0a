"""Model registry: builder functions by name, as torchvision's ``get_model`` and
segment-anything's ``sam_model_registry``.

A model family registers its builders with ``@register_model()``; ``get_model(name,
**overrides)`` calls the builder with the overrides as keyword arguments.
"""
from typing import Callable, Dict, List

from torch import nn

_BUILDERS: Dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str = None):
    """Decorator: registers a builder under ``name`` (default: the function's name)."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__
        if key in _BUILDERS and _BUILDERS[key] is not fn:
            raise ValueError(f"a model named {key!r} is already registered")
        _BUILDERS[key] = fn
        return fn

    return wrap


def get_model(name: str, **overrides) -> nn.Module:
    """Builds the registered model ``name`` with random weights (nothing is downloaded;
    ``load_pretrained`` loads a checkpoint you bring); ``overrides`` go to its builder."""
    if name not in _BUILDERS:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    return _BUILDERS[name](**overrides)


def list_models() -> List[str]:
    """The registered model names, sorted."""
    return sorted(_BUILDERS)
