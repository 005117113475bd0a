"""``load_pretrained(model, source)``: one entry point for weights.

``source`` is a path to a file saved with ``torch.save``, a state dict, or a checkpoint dict
holding one under ``"model"`` (the trainer's checkpoints, torchvision's references). The key
layout is recognised by the registered layouts (``register_layout``), tried in order:

- ``instseg_ops``: this project's names (also accepted with DDP's ``module.`` prefix);
- ``torchvision``: torchvision's detection models (Mask R-CNN's names are this project's;
  trainable BatchNorm's ``num_batches_tracked`` counters are dropped for frozen BatchNorm).

Model families add their checkpoints' layouts (official repositories, transformers) with
``register_layout``. Missing and unexpected keys are reported by name; ``strict=True`` (the
default) raises on any.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Union

import torch
from torch import Tensor, nn

StateDict = Dict[str, Tensor]


@dataclass
class Layout:
    """``detect(state_dict, model) -> bool`` says whether a state dict is in this layout;
    ``convert(state_dict, model) -> state_dict`` renames its keys to the model's."""

    name: str
    detect: Callable[[Mapping[str, Tensor], nn.Module], bool]
    convert: Callable[[Mapping[str, Tensor], nn.Module], StateDict]


@dataclass
class LoadResult:
    layout: str
    missing_keys: List[str] = field(default_factory=list)
    unexpected_keys: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"layout {self.layout!r}: {len(self.missing_keys)} missing keys {self.missing_keys}, "
                f"{len(self.unexpected_keys)} unexpected keys {self.unexpected_keys}")


_LAYOUTS: List[Layout] = []


def register_layout(name: str, detect, convert, first: bool = False) -> None:
    """Adds a checkpoint key layout (``first``: try it before the others)."""
    layout = Layout(name, detect, convert)
    _LAYOUTS.insert(0, layout) if first else _LAYOUTS.append(layout)


def _overlap(keys, model: nn.Module) -> float:
    own = set(model.state_dict().keys())
    keys = set(keys)
    return len(keys & own) / max(1, len(own))


def _strip_ddp(sd: Mapping[str, Tensor]) -> StateDict:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def _is_own(sd, model) -> bool:
    return _overlap(_strip_ddp(sd).keys(), model) >= 0.5


def _own(sd, model) -> StateDict:
    return _strip_ddp(sd)


def _is_torchvision(sd, model) -> bool:
    return any(k.endswith("num_batches_tracked") for k in sd) and _overlap(sd.keys(), model) >= 0.5


def _torchvision(sd, model) -> StateDict:
    own = model.state_dict()
    # torchvision's checkpoints may carry BatchNorm step counters where this model has frozen
    # BatchNorm (which keeps none).
    return {k: v for k, v in sd.items() if not (k.endswith("num_batches_tracked") and k not in own)}


register_layout("torchvision", _is_torchvision, _torchvision)
register_layout("instseg_ops", _is_own, _own)


def read_state_dict(source: Union[str, Mapping]) -> StateDict:
    """The state dict in ``source``: a path, a state dict, or a dict with one under "model"."""
    sd = source
    if not isinstance(sd, Mapping):
        sd = torch.load(sd, map_location="cpu", weights_only=True)
    if "model" in sd and isinstance(sd["model"], Mapping):
        sd = sd["model"]
    return dict(sd)


def load_pretrained(model: nn.Module, source: Union[str, Mapping], strict: bool = True,
                    layout: Optional[str] = None) -> LoadResult:
    """Loads ``source`` (see the module docstring) into ``model``, converting its key layout
    (recognised, or the registered layout named ``layout``). Returns the ``LoadResult``
    (layout, missing and unexpected keys); with ``strict`` any missing or unexpected key, or
    a shape mismatch, raises a RuntimeError naming them."""
    sd = read_state_dict(source)
    if layout is not None:
        chosen = [lay for lay in _LAYOUTS if lay.name == layout]
        if not chosen:
            raise KeyError(f"unknown layout {layout!r}; registered: {[lay.name for lay in _LAYOUTS]}")
    else:
        chosen = [lay for lay in _LAYOUTS if lay.detect(sd, model)]
        if not chosen:
            raise RuntimeError(f"load_pretrained: the checkpoint's keys match no known layout for "
                               f"{type(model).__name__} (tried {[lay.name for lay in _LAYOUTS]}); "
                               f"first keys: {list(sd)[:5]}")
    lay = chosen[0]
    converted = lay.convert(sd, model)
    result = model.load_state_dict(converted, strict=False)
    report = LoadResult(lay.name, list(result.missing_keys), list(result.unexpected_keys))
    if strict and (report.missing_keys or report.unexpected_keys):
        raise RuntimeError(f"load_pretrained: {report}")
    return report


def load_torchvision_weights(model: nn.Module, state_dict_or_path) -> nn.Module:
    """Loads a torchvision Mask R-CNN checkpoint with strict key checking (``load_pretrained``
    with the torchvision layout); returns the model."""
    load_pretrained(model, state_dict_or_path, strict=True, layout="torchvision")
    return model
