"""The GLM vision-language model: one class, four families as configuration variants.

Its methods are the stages the exported graphs replace, with the same inputs and outputs:

* :meth:`GlmModel.vision`       patches + host-made tables -> image embeddings (GLM-Image: VQ codes)
* :meth:`GlmModel.embed`        token ids -> embeddings
* :meth:`GlmModel.prefill`      embeddings, 3-D positions, mask -> last-position logits, present K/V
* :meth:`GlmModel.decode_step`  one token's embedding, positions, mask, past K/V -> logits, present K/V

Parameter names equal the HF checkpoint keys (``model.visual.*``, ``model.language_model.*``,
``model.vqmodel.*``, ``lm_head.weight``).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .decoder import TextModel
from .vision import Glm4vVisionModel, GlmImageVisionModel, VQTokenizer


class _Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        v = config.vision
        self.visual = GlmImageVisionModel(v) if v.kind == "glm_image" else Glm4vVisionModel(v)
        self.language_model = TextModel(config.text)
        if config.vq is not None:
            self.vqmodel = VQTokenizer(config.vq)


class GlmModel(nn.Module):
    """The reference model. See the module docstring for its stages."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = _Backbone(config)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.lm_head_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @torch.no_grad()
    def vision(self, pixel_values: torch.Tensor, **tables: torch.Tensor) -> torch.Tensor:
        """Run the vision tower.

        pixel_values: (N, patch_dim) float; tables: the tensors of ``glmtrt.runtime.vision_tables.vision_tables``
        for the same grids (rotary_cos, rotary_sin, tap_index, tap_weight, segment_ids, as the tower needs).
        Returns image embeddings (N / merge^2, hidden) in the model dtype, or for GLM-Image int64 VQ codes (N,).
        """
        visual = self.model.visual
        if self.config.vision.kind == "glm_image":
            features = visual(pixel_values, tables["tap_index"], tables["tap_weight"], tables["segment_ids"])
            return self.model.vqmodel(features)
        n = pixel_values.shape[0]
        tap_index = tables.get("tap_index", torch.zeros(n, 0, dtype=torch.int64))
        tap_weight = tables.get("tap_weight", torch.zeros(n, 0))
        return visual(pixel_values, tables["rotary_cos"], tables["rotary_sin"], tap_index, tap_weight, tables["segment_ids"])

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: int64 (B, L) -> embeddings (B, L, hidden) in the model dtype."""
        return self.model.language_model.embed_tokens(input_ids)

    @torch.no_grad()
    def prefill(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor):
        """inputs_embeds (B, S, H); position_ids int64 (3, B, S); attention_mask int64 (B, S), left-padded.

        Returns logits (B, V) of the last position in fp32-castable model dtype, and lists of present keys and
        values, one (B, kv_heads, S, head_dim) tensor per layer (keys after rotary).
        """
        hidden, keys, values = self.model.language_model(inputs_embeds, position_ids, attention_mask)
        return self.lm_head(hidden[:, -1]), keys, values

    @torch.no_grad()
    def decode_step(self, inputs_embeds, position_ids, attention_mask, past_keys, past_values):
        """inputs_embeds (B, 1, H); position_ids int64 (3, B, 1); attention_mask int64 (B, P+1);
        past_keys/past_values: per-layer (B, kv_heads, P, head_dim). Returns logits (B, V) and presents (P+1)."""
        hidden, keys, values = self.model.language_model(inputs_embeds, position_ids, attention_mask, past_keys, past_values)
        return self.lm_head(hidden[:, -1]), keys, values
