"""Training engine: the loop and its hooks (``trainer``, ``hooks``), checkpoints and models
from checkpoints (``checkpoint``), distributed helpers, optimizers and schedules (``solver``),
data order (``loader``), RNG state (``rng``), evaluation, metrics logs and the presets."""
from .checkpoint import model_from_checkpoint
from .hooks import HookBase
from .presets import Preset, build_model, get_preset, preset_names, register_preset
from .trainer import Trainer, train

__all__ = ["HookBase", "Preset", "Trainer", "build_model", "get_preset", "model_from_checkpoint", "preset_names",
           "register_preset", "train"]
