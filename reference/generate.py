"""The reference generation loop: host functions (numpy, shared with the runtime) around the model's stages.

preprocessed inputs -> vision -> embedding + placeholder merge -> 3-D positions -> prefill -> greedy decode.
This is the road the runtime walks with graphs instead of PyTorch modules; the host side of it (which vision
calls, where their outputs go, prompt and decode positions) is ``glmtrt.runtime.prompt``, shared by both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from glmtrt.runtime.prompt import HostConfig, PromptPlan, plan_prompt
from glmtrt.runtime.vision_tables import vision_tables

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
    """Vision stage over several images in one call (attention kept inside each by segment ids), with host-made
    tables. Videos must be given per frame (grid rows with t = 1). The generation road calls the tower once
    per image / frame instead (``prepare_prefill``), as the runtime calls its vision graph."""
    v = model.config.vision
    tables = vision_tables(grid_thw, kind=v.kind, head_dim=v.head_dim, rope_theta=v.rope_theta,
                           merge_size=v.spatial_merge_size, table_side=v.pos_table_side)
    return model.vision(torch.from_numpy(np.asarray(pixel_values, dtype=np.float32)),
                        **{k: torch.from_numpy(a) for k, a in tables.items()})


def per_frame_grids(video_grid_thw: np.ndarray) -> np.ndarray:
    """A video grid (t, h, w) becomes t rows of (1, h, w): the vision tower encodes each frame alone."""
    grids = np.asarray(video_grid_thw, dtype=np.int64).reshape(-1, 3)
    return np.concatenate([np.tile([1, h, w], (t, 1)) for t, h, w in grids]).astype(np.int64)


def host_plan(model: GlmModel, batch: PromptBatch) -> PromptPlan:
    """The runtime's host-side plan of a batch (vision calls, placeholder merge, 3-D and decode positions)."""
    return plan_prompt(HostConfig.from_config_dict(model.config.to_dict()), batch.input_ids, batch.attention_mask,
                       batch.pixel_values, batch.image_grid_thw, batch.pixel_values_videos, batch.video_grid_thw,
                       batch.images_per_sample)


def prepare_prefill(model: GlmModel, batch: PromptBatch):
    """Embeddings with visual inputs merged, 3-D positions and the decode-position source.

    Walks the runtime's host plan (``glmtrt.runtime.prompt``): one vision call per image / video frame, outputs
    merged at the placeholders, positions from the plan. Returns (inputs_embeds (B, L, H), position_ids int64 np
    (3, B, L), decode_positions) where ``decode_positions(step)`` gives int64 np (3, B, 1) for the step-th
    generated token's input (step 0 = first).
    """
    plan = host_plan(model, batch)
    outputs = []
    for call in plan.vision_calls:
        inputs = {k: torch.from_numpy(a) for k, a in plan.vision_inputs(call).items()}
        outputs.append(model.vision(inputs.pop("pixel_values"), **inputs))
    if plan.merges_codes:
        ids = plan.merge_codes([o.numpy() for o in outputs])  # GLM-Image: VQ codes replace the ids before embedding
        return model.embed(torch.from_numpy(ids)), plan.position_ids, plan.decode_positions
    embeds = model.embed(torch.from_numpy(plan.input_ids)).clone()
    for kind, parts in plan.outputs_by_kind(outputs).items():
        b_idx, s_idx = plan.placeholder_index(kind)
        embeds[torch.from_numpy(b_idx), torch.from_numpy(s_idx)] = torch.cat(parts).to(embeds.dtype)
    return embeds, plan.position_ids, plan.decode_positions


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
