"""glmtrt.reference: the PyTorch reference model, the numerical source of truth (never imports transformers)."""

from .config import ModelConfig, preset, preset_names
from .model import GlmModel
from .weights import load_reference, save_checkpoint, save_preset_checkpoint

__all__ = ["GlmModel", "ModelConfig", "load_reference", "preset", "preset_names", "save_checkpoint",
           "save_preset_checkpoint"]
