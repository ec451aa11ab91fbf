"""The reference generation loop: host functions (numpy, shared with the runtime) around the model's stages.

preprocessed inputs -> vision -> embedding + placeholder merge -> 3-D positions -> prefill -> greedy decode.
This is the road the runtime walks with graphs instead of PyTorch modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from glmtrt.runtime.positions import decode_position_ids, get_rope_index, glm_image_rope_index, mm_token_type_ids
from glmtrt.runtime.vision_tables import placeholder_positions, vision_tables

from .model import GlmModel


@dataclass
class PromptBatch:
    """A tokenized batch, left-padded, with its visual inputs in prompt order.

    input_ids, attention_mask: int64 (B, L). pixel_values: float32 (N, patch_dim) of every image of every sample;
    image_grid_thw: int64 (n, 3). Videos: pixel_values_videos / video_grid_thw (one row per video, t frames).
    GLM-Image: image_grid_thw holds each sample's source grids then its target grids; images_per_sample (B,).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray | None = None
    pixel_values: np.ndarray | None = None
    image_grid_thw: np.ndarray | None = None
    pixel_values_videos: np.ndarray | None = None
    video_grid_thw: np.ndarray | None = None
    images_per_sample: np.ndarray | None = None

    def __post_init__(self):
        self.input_ids = np.atleast_2d(np.asarray(self.input_ids, dtype=np.int64))
        if self.attention_mask is None:
            self.attention_mask = np.ones_like(self.input_ids)
        self.attention_mask = np.atleast_2d(np.asarray(self.attention_mask, dtype=np.int64))


def run_vision(model: GlmModel, pixel_values: np.ndarray, grid_thw: np.ndarray) -> torch.Tensor:
    """Vision stage with host-made tables. Videos must be given per frame (grid rows with t = 1)."""
    v = model.config.vision
    tables = vision_tables(grid_thw, kind=v.kind, head_dim=v.head_dim, rope_theta=v.rope_theta,
                           merge_size=v.spatial_merge_size, table_side=v.pos_table_side)
    return model.vision(torch.from_numpy(np.asarray(pixel_values, dtype=np.float32)),
                        **{k: torch.from_numpy(a) for k, a in tables.items()})


def per_frame_grids(video_grid_thw: np.ndarray) -> np.ndarray:
    """A video grid (t, h, w) becomes t rows of (1, h, w): the vision tower encodes each frame alone."""
    grids = np.asarray(video_grid_thw, dtype=np.int64).reshape(-1, 3)
    return np.concatenate([np.tile([1, h, w], (t, 1)) for t, h, w in grids]).astype(np.int64)


def _glm_image_source_grids(batch: PromptBatch) -> np.ndarray:
    # Each sample's grids are [sources..., targets...]; with pixels present (image-to-image) one target follows.
    grids = np.asarray(batch.image_grid_thw).reshape(-1, 3)
    counts = np.asarray(batch.images_per_sample if batch.images_per_sample is not None else [len(grids)])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return np.concatenate([grids[s:s + c - 1] for s, c in zip(starts, counts)])


def prepare_prefill(model: GlmModel, batch: PromptBatch):
    """Embeddings with visual inputs merged, 3-D positions and the decode-position source.

    Returns (inputs_embeds (B, L, H), position_ids int64 np (3, B, L), decode_positions) where
    ``decode_positions(step)`` gives int64 np (3, B, 1) for the step-th generated token's input (step 0 = first).
    """
    c = model.config
    ids, mask = batch.input_ids.copy(), batch.attention_mask
    if c.model_type == "glm_image":
        if batch.pixel_values is not None:
            codes = run_vision(model, batch.pixel_values, _glm_image_source_grids(batch)).numpy()
            where = placeholder_positions(ids, c.image_token_id)
            ids[where] = codes  # GLM-Image merges VQ codes into the ids, before the embedding
        position_ids, table = glm_image_rope_index(ids, batch.image_grid_thw, batch.images_per_sample, mask,
                                                   c.image_start_token_id, c.image_end_token_id)
        embeds = model.embed(torch.from_numpy(ids))
        return embeds, position_ids, lambda step: np.ascontiguousarray(table[:, :, step:step + 1].transpose(1, 0, 2))

    embeds = model.embed(torch.from_numpy(ids)).clone()
    mm_types = mm_token_type_ids(ids, c.image_token_id, c.video_start_token_id, c.video_end_token_id)
    for kind, pixels, grids in ((1, batch.pixel_values, batch.image_grid_thw),
                                (2, batch.pixel_values_videos, batch.video_grid_thw)):
        if pixels is None:
            continue
        frames = grids if kind == 1 else per_frame_grids(grids)
        features = run_vision(model, pixels, frames)
        b_idx, s_idx = np.nonzero(mm_types == kind)
        if len(b_idx) != features.shape[0]:
            raise ValueError(f"prompt has {len(b_idx)} placeholder tokens but the visual inputs give {features.shape[0]}")
        embeds[torch.from_numpy(b_idx), torch.from_numpy(s_idx)] = features.to(embeds.dtype)
    position_ids, deltas = get_rope_index(ids, mm_types, batch.image_grid_thw, batch.video_grid_thw, mask,
                                          c.vision.spatial_merge_size)
    valid = mask.sum(1)
    return embeds, position_ids, lambda step: decode_position_ids(valid + step, deltas)


@torch.no_grad()
def greedy_generate(model: GlmModel, batch: PromptBatch, max_new_tokens: int) -> np.ndarray:
    """Greedy tokens, int64 (B, max_new_tokens): a prefill and ``max_new_tokens - 1`` decode steps (no EOS stop)."""
    embeds, position_ids, decode_positions = prepare_prefill(model, batch)
    mask = torch.from_numpy(batch.attention_mask)
    logits, keys, values = model.prefill(embeds, torch.from_numpy(position_ids), mask)
    tokens = [logits.float().argmax(-1)]
    for step in range(max_new_tokens - 1):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        step_embeds = model.embed(tokens[-1][:, None])
        logits, keys, values = model.decode_step(step_embeds, torch.from_numpy(decode_positions(step)), mask, keys, values)
        tokens.append(logits.float().argmax(-1))
    return torch.stack(tokens, dim=1).numpy()
