"""Checkpoints: atomic writes, run-directory bookkeeping, and models rebuilt from checkpoints."""
import contextlib
import os
import tempfile
from typing import Any, Dict, Optional

import torch


def param_checksum(model: torch.nn.Module) -> float:
    """Sum of all parameters and buffers in float64: equal on replicas that are in sync."""
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                total += t.detach().double().sum().cpu()
    return float(total)


# ----------------------------------------------------------------------------------------------
# checkpoints


def _temp_file_for(path: str, directory: str):
    """A new temporary file next to ``path`` (hidden name, ``.tmp`` suffix) with the
    permissions an ordinary new file would get (mkstemp makes it 0600)."""
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def _replace_atomically(path: str, mode: str, write) -> None:
    """``write(f)`` into a temporary file in ``path``'s directory, then os.replace: readers see
    the old file or the complete new one, never a partial one; the temporary is removed on
    failure."""
    fd, tmp = _temp_file_for(path, os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_save(obj, path: str) -> None:
    """torch.save, atomically and flushed to disk (``_replace_atomically``); creates the directory."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(f):
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())

    _replace_atomically(path, "wb", write)


def atomic_write_text(text: str, path: str) -> None:
    _replace_atomically(path, "w", lambda f: f.write(text))


def prune_checkpoints(out_dir: str, keep: int) -> None:
    """Deletes all but the newest ``keep`` periodic checkpoints (0: keep all)."""
    if keep <= 0:
        return
    names = sorted(f for f in os.listdir(out_dir) if f.startswith("checkpoint_") and f.endswith(".pth"))
    for name in names[:-keep]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(out_dir, name))


def load_checkpoint(path: str) -> Dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def find_resume_checkpoint(out_dir: str) -> Optional[str]:
    """The newest checkpoint of a run directory: the one ``last_checkpoint`` names, else
    ``model_final.pth``."""
    marker = os.path.join(out_dir, "last_checkpoint")
    if os.path.exists(marker):
        with open(marker) as f:
            name = f.read().strip()
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            return path
    final = os.path.join(out_dir, "model_final.pth")
    return final if os.path.exists(final) else None


# What an inference checkpoint keeps of a training one (no optimizer, scheduler or RNG state).
_INFERENCE_KEYS = ("preset", "categories", "iteration", "seed", "data", "budget_elapsed")


def export_checkpoint(src: str, dst: str, dtype: Optional[torch.dtype] = torch.float16,
                      info: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Writes an inference-only copy of the trainer checkpoint ``src`` to ``dst``: the model's
    weights (floating-point ones cast to ``dtype``; None keeps them), the preset and category
    names ``model_from_checkpoint`` needs, and ``info`` (e.g. the evaluation it scored) under
    ``"info"``. The model loads back in float32: ``load_pretrained`` copies into its parameters.
    Returns the dict written."""
    ckpt = load_checkpoint(src)
    if "preset" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{src} is not a checkpoint written by the trainer (no preset or model in it)")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype or None, got {dtype}")
    out = {k: ckpt[k] for k in _INFERENCE_KEYS if k in ckpt}
    out["model"] = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous().clone()
                    for k, v in ckpt["model"].items()}
    out["info"] = dict(info or {})
    atomic_save(out, dst)
    return out


def model_from_checkpoint(path: str, device: str = "cpu"):
    """``(model in eval mode, {label: name}, preset)`` from a checkpoint written by the trainer
    (or by ``export_checkpoint``): the preset's registered architecture (``Preset.arch``) with
    its keyword arguments, and the checkpoint's weights (``load_pretrained``; float16 weights
    are copied into the float32 model)."""
    from ..weights import load_pretrained
    from .presets import Preset, build_model
    ckpt = load_checkpoint(path)
    if "preset" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint written by the trainer (no preset in it)")
    preset = Preset.from_dict(ckpt["preset"])
    model = build_model(preset)
    load_pretrained(model, ckpt["model"])
    names = {int(k): str(v) for k, v in (ckpt.get("categories") or {}).items()}
    return model.to(device).eval(), names, preset
