"""The reference road of GLM-Image generation: the runtime's own loop
(:func:`glmtrt.runtime.image_generation.run_image_generation`: host plan, decode-position table, the shared numpy
sampler, grid assembly) with the PyTorch model's stages in place of the exported graphs.

Because the loop and the sampler are the very code the runtime runs, greedy and seeded-sampling outputs of the
two roads differ only if the tensor programs' logits do.
"""

from __future__ import annotations

import numpy as np
import torch

from glmtrt.runtime.image_generation import ImagePrompt, ImageTokens, run_image_generation
from glmtrt.runtime.prompt import HostConfig
from glmtrt.runtime.sampling import GenerationOptions

from .model import GlmModel


class _ReferenceDecodeState:
    """Prefill and decode steps of the reference model with its own K/V lists (concat cache)."""

    def __init__(self, model: GlmModel):
        self.model, self.keys, self.values = model, None, None

    def prefill(self, inputs_embeds: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        logits, self.keys, self.values = self.model.prefill(
            torch.from_numpy(np.asarray(inputs_embeds)).to(self.model.dtype), torch.from_numpy(position_ids),
            torch.from_numpy(attention_mask))
        return logits.float().numpy()

    def step(self, inputs_embeds: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        logits, self.keys, self.values = self.model.decode_step(
            torch.from_numpy(np.asarray(inputs_embeds)).to(self.model.dtype), torch.from_numpy(position_ids),
            torch.from_numpy(attention_mask), self.keys, self.values)
        return logits.float().numpy()


class ReferenceImageStages:
    """:class:`glmtrt.runtime.image_generation.ImageStages` of the PyTorch reference: ``GlmModel.vision`` (tower +
    VQ tokenizer) for the codes, ``embed_tokens`` for embeddings, ``prefill`` / ``decode_step`` for logits."""

    def __init__(self, model: GlmModel):
        if model.config.model_type != "glm_image":
            raise ValueError(f"GLM-Image generation needs a glm_image model, got {model.config.model_type}")
        self.model = model

    @torch.no_grad()
    def image_codes(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        tensors = {k: torch.from_numpy(np.asarray(a)) for k, a in inputs.items()}
        return self.model.vision(tensors.pop("pixel_values"), **tensors).numpy()

    @torch.no_grad()
    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.model.embed(torch.from_numpy(np.asarray(ids, dtype=np.int64))).float().numpy()

    def start(self, batch: int, capacity: int) -> _ReferenceDecodeState:
        return _ReferenceDecodeState(self.model)


def generate_image_tokens(model: GlmModel, prompt: ImagePrompt, options: GenerationOptions,
                          codes_only: bool = True) -> ImageTokens:
    """The reference's token grids for a prepared request (``ImageGenerator.prepare`` / ``prepare_ids``) with the
    given options (``ImageGenerator.options`` / ``image_options``: pass the same object to both roads)."""
    host = HostConfig.from_config_dict(model.config.to_dict())
    return run_image_generation(ReferenceImageStages(model), host, prompt, options,
                                num_codes=int(model.config.vq.num_embeddings), codes_only=codes_only)
