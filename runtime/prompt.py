"""The host-side prompt plan: everything between token ids and the prefill graph that is not a tensor program.

Both roads walk it: ``glmtrt.reference.generate`` with PyTorch modules, :mod:`glmtrt.runtime.pipeline` with
exported graphs. Given a tokenized, left-padded batch and its visual inputs, :func:`plan_prompt` says

* which vision calls to make — one per image, one per video frame (grid rows ``(1, h, w)``), with the pixel
  rows and host tables (rotary cos/sin, interpolation taps) of each call (:meth:`PromptPlan.vision_inputs`);
* where each call's output goes — the placeholder positions of that modality, filled batch-major in call
  order (:meth:`PromptPlan.merge_embeddings`), or, for GLM-Image, the token ids the VQ codes replace
  (:meth:`PromptPlan.merge_codes`);
* the 3-D M-RoPE prompt positions (:attr:`PromptPlan.position_ids`) and each decode step's positions
  (:meth:`PromptPlan.decode_positions`).

numpy only; never imports torch or transformers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError
from .positions import decode_position_ids, get_rope_index, glm_image_rope_index, mm_token_type_ids
from .vision_tables import vision_tables

__all__ = ["HostConfig", "VisionCall", "PromptPlan", "plan_prompt", "IMAGE", "VIDEO"]

IMAGE, VIDEO = 1, 2  # modality codes of mm_token_type_ids


@dataclass(frozen=True)
class HostConfig:
    """The few config facts the host side needs, read from a normalized config dict (``ModelConfig.to_dict()``,
    which is what an engines manifest stores as ``config``)."""

    model_type: str
    image_token_id: int
    image_start_token_id: int
    image_end_token_id: int
    video_token_id: int | None
    video_start_token_id: int | None
    video_end_token_id: int | None
    vision_kind: str
    vision_head_dim: int
    vision_rope_theta: float
    spatial_merge_size: int
    pos_table_side: int
    pad_token_id: int
    hidden_size: int

    @classmethod
    def from_config_dict(cls, d: Mapping[str, Any]) -> HostConfig:
        v, t = d["vision"], d["text"]
        kind = str(v["kind"])
        return cls(
            model_type=str(d["model_type"]),
            image_token_id=int(d["image_token_id"]),
            image_start_token_id=int(d["image_start_token_id"]),
            image_end_token_id=int(d["image_end_token_id"]),
            video_token_id=_opt_int(d.get("video_token_id")),
            video_start_token_id=_opt_int(d.get("video_start_token_id")),
            video_end_token_id=_opt_int(d.get("video_end_token_id")),
            vision_kind=kind,
            vision_head_dim=int(v["hidden_size"]) // int(v["num_heads"]),
            vision_rope_theta=float(v["rope_theta"]),
            spatial_merge_size=int(v["spatial_merge_size"]),
            pos_table_side=0 if kind == "glm_ocr" else int(v["image_size"]) // int(v["patch_size"]),
            pad_token_id=int(t.get("pad_token_id") or 0),
            hidden_size=int(t["hidden_size"]),
        )

    @property
    def is_glm_image(self) -> bool:
        return self.model_type == "glm_image"


def _opt_int(value) -> int | None:
    return None if value is None else int(value)


@dataclass(frozen=True)
class VisionCall:
    """One call of the vision stage: one image or one video frame.

    kind: IMAGE or VIDEO; rows: the call's rows of ``pixel_values`` (IMAGE) or ``pixel_values_videos`` (VIDEO);
    grid: int64 (1, 3) = (1, h, w) in patches; num_outputs: embeddings (or GLM-Image codes) it returns.
    """

    kind: int
    rows: slice
    grid: np.ndarray
    num_outputs: int


@dataclass
class PromptPlan:
    """A prompt batch planned for the vision / merge / prefill / decode stages (see the module docstring).

    input_ids, attention_mask: int64 (B, L), left-padded. For GLM-Image with source images, ``input_ids``
    changes in :meth:`merge_codes` (the codes replace the placeholders) and the positions are computed after it.
    """

    config: HostConfig
    input_ids: np.ndarray
    attention_mask: np.ndarray
    vision_calls: list[VisionCall]
    pixel_values: np.ndarray | None = None
    pixel_values_videos: np.ndarray | None = None
    image_grid_thw: np.ndarray | None = None
    video_grid_thw: np.ndarray | None = None
    images_per_sample: np.ndarray | None = None
    mm_types: np.ndarray | None = None
    _positions: tuple[np.ndarray, Any] | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ vision
    def vision_inputs(self, call: VisionCall) -> dict[str, np.ndarray]:
        """``pixel_values`` and host tables of one call: rotary_cos/sin, tap_index/tap_weight as the tower kind
        needs them, and segment_ids (all zero: one image per call; graphs that attend within one image drop it)."""
        c = self.config
        pixels = self.pixel_values if call.kind == IMAGE else self.pixel_values_videos
        inputs = {"pixel_values": np.ascontiguousarray(pixels[call.rows], dtype=np.float32)}
        inputs.update(vision_tables(call.grid, kind=c.vision_kind, head_dim=c.vision_head_dim,
                                    rope_theta=c.vision_rope_theta, merge_size=c.spatial_merge_size,
                                    table_side=c.pos_table_side))
        return inputs

    # ------------------------------------------------------------------ merge
    @property
    def merges_codes(self) -> bool:
        """True for GLM-Image: the vision stage yields VQ codes that replace placeholder *ids* before embedding."""
        return self.config.is_glm_image

    def placeholder_index(self, kind: int) -> tuple[np.ndarray, np.ndarray]:
        """(batch_index, seq_index) of the placeholders of modality ``kind``, batch-major — the order in which the
        concatenated outputs of that modality's calls fill them (masked_scatter order)."""
        if self.merges_codes:
            b, s = np.nonzero(self.input_ids == self.config.image_token_id)
        else:
            b, s = np.nonzero(self.mm_types == kind)
        return b.astype(np.int64), s.astype(np.int64)

    def outputs_by_kind(self, outputs: Sequence[Any]) -> dict[int, list[Any]]:
        """Group per-call outputs (in ``vision_calls`` order) by modality."""
        if len(outputs) != len(self.vision_calls):
            raise ValueError(f"{len(outputs)} vision outputs for {len(self.vision_calls)} vision calls")
        grouped: dict[int, list[Any]] = {}
        for call, out in zip(self.vision_calls, outputs):
            if out.shape[0] != call.num_outputs:
                raise ValueError(f"a vision call of grid {call.grid.tolist()} returned {out.shape[0]} rows, "
                                 f"expected {call.num_outputs}")
            grouped.setdefault(call.kind, []).append(out)
        return grouped

    def merge_embeddings(self, embeds: np.ndarray, outputs: Sequence[np.ndarray]) -> np.ndarray:
        """Write the vision outputs (one array per call, in call order) into ``embeds`` (B, L, H) in place."""
        for kind, parts in self.outputs_by_kind(outputs).items():
            b, s = self.placeholder_index(kind)
            embeds[b, s] = np.concatenate(parts, axis=0).astype(embeds.dtype, copy=False)
        return embeds

    def merge_codes(self, codes: Sequence[np.ndarray]) -> np.ndarray:
        """GLM-Image: replace the placeholder ids with the VQ codes (one int array per call); returns the new ids."""
        if not codes:
            return self.input_ids
        parts = self.outputs_by_kind(codes)[IMAGE]
        b, s = self.placeholder_index(IMAGE)
        ids = self.input_ids.copy()
        ids[b, s] = np.concatenate(parts).astype(np.int64)
        self.input_ids = ids
        self._positions = None
        return ids

    # ------------------------------------------------------------------ positions
    def _compute_positions(self) -> tuple[np.ndarray, Any]:
        if self._positions is None:
            c = self.config
            if c.is_glm_image:
                self._positions = glm_image_rope_index(self.input_ids, self.image_grid_thw, self.images_per_sample,
                                                       self.attention_mask, c.image_start_token_id,
                                                       c.image_end_token_id)
            else:
                self._positions = get_rope_index(self.input_ids, self.mm_types, self.image_grid_thw,
                                                 self.video_grid_thw, self.attention_mask, c.spatial_merge_size)
        return self._positions

    @property
    def position_ids(self) -> np.ndarray:
        """int64 (3, B, L) prompt positions (0 at padded slots)."""
        return self._compute_positions()[0]

    @property
    def max_decode_steps(self) -> int | None:
        """GLM-Image: the decode table's length (positions exist for that many decode inputs); else None."""
        if not self.config.is_glm_image:
            return None
        table = self._compute_positions()[1]
        return None if table is None else int(table.shape[2])

    def decode_positions(self, step: int) -> np.ndarray:
        """int64 (3, B, 1): positions of the input of decode step ``step`` (0 = the first generated token)."""
        first, extra = self._compute_positions()
        if self.config.is_glm_image:
            if extra is None:
                raise InputError("GLM-Image decoding needs the target grids in image_grid_thw")
            if step >= extra.shape[2]:
                raise InputError(f"GLM-Image decode step {step} is past the {extra.shape[2]} positions of the "
                                 "target grids; generate at most that many tokens")
            return np.ascontiguousarray(extra[:, :, step:step + 1].transpose(1, 0, 2))
        valid = self.attention_mask.sum(1)
        return decode_position_ids(valid + step, extra)


def _per_frame(grids: np.ndarray) -> list[tuple[int, int, int]]:
    return [(1, int(h), int(w)) for t, h, w in grids for _ in range(int(t))]


def _calls(kind: int, grids_per_call: list[tuple[int, int, int]], pixels: np.ndarray | None, merge: int,
           what: str) -> list[VisionCall]:
    calls, row = [], 0
    for t, h, w in grids_per_call:
        n = t * h * w
        calls.append(VisionCall(kind=kind, rows=slice(row, row + n), grid=np.array([[t, h, w]], dtype=np.int64),
                                num_outputs=n // (merge * merge)))
        row += n
    available = 0 if pixels is None else pixels.shape[0]
    if row != available:
        raise InputError(f"the {what} grids cover {row} patch rows but {what} pixel_values has {available}; "
                         "pass the pixels and grids from the same preprocessing call")
    return calls


def plan_prompt(config: HostConfig, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                pixel_values_videos=None, video_grid_thw=None, images_per_sample=None) -> PromptPlan:
    """Plan a tokenized batch (see the module docstring).

    input_ids: int (B, L) or (L,), left-padded; attention_mask: (B, L) 1 = token, 0 = pad (default all 1).
    pixel_values: float32 (N, patch_dim) of every image of every sample, image_grid_thw int (n, 3) in the same
    order; pixel_values_videos / video_grid_thw likewise (one grid row per video, t frames).
    GLM-Image: image_grid_thw holds each sample's source grids then its target grids; images_per_sample (B,).
    Raises InputError when placeholders and visual inputs disagree.
    """
    ids = np.atleast_2d(np.asarray(input_ids, dtype=np.int64))
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise InputError(f"input_ids must be a non-empty (batch, seq_len) array, got shape {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else np.atleast_2d(np.asarray(attention_mask, dtype=np.int64))
    if mask.shape != ids.shape:
        raise InputError(f"attention_mask shape {mask.shape} does not match input_ids shape {ids.shape}")
    if (mask.sum(1) == 0).any():
        raise InputError("a request of the batch has no tokens (its attention_mask is all 0)")
    image_grid = None if image_grid_thw is None else np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    video_grid = None if video_grid_thw is None else np.asarray(video_grid_thw, dtype=np.int64).reshape(-1, 3)
    pixels = None if pixel_values is None else np.asarray(pixel_values)
    video_pixels = None if pixel_values_videos is None else np.asarray(pixel_values_videos)
    merge = config.spatial_merge_size

    if config.is_glm_image:
        ips = None if images_per_sample is None else np.asarray(images_per_sample, dtype=np.int64).reshape(-1)
        calls = []
        if pixels is not None:
            if image_grid is None:
                raise InputError("pixel_values were given without image_grid_thw")
            counts = ips if ips is not None else np.array([len(image_grid)])
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            # Each sample's grids are [sources..., target]: with pixels present (image-to-image) one target follows.
            sources = [tuple(int(v) for v in row) for s, c in zip(starts, counts) for row in image_grid[s:s + c - 1]]
            calls = _calls(IMAGE, sources, pixels, 1, "image")
            n_placeholders = int((ids == config.image_token_id).sum())
            if n_placeholders != sum(c.num_outputs for c in calls):
                raise InputError(f"prompt has {n_placeholders} image placeholder tokens but the source images give "
                                 f"{sum(c.num_outputs for c in calls)} codes")
        return PromptPlan(config, ids, mask, calls, pixel_values=pixels, image_grid_thw=image_grid,
                          images_per_sample=ips)

    if config.video_start_token_id is not None and config.video_end_token_id is not None:
        types = mm_token_type_ids(ids, config.image_token_id, config.video_start_token_id, config.video_end_token_id)
    else:
        types = np.where(ids == config.image_token_id, IMAGE, 0).astype(np.int64)
    types = types * mask  # padding is text, whatever its id
    calls: list[VisionCall] = []
    for kind, grid, pix, what in ((IMAGE, image_grid, pixels, "image"), (VIDEO, video_grid, video_pixels, "video")):
        if grid is None:
            if pix is not None:
                raise InputError(f"{what} pixel_values were given without their grid_thw")
            n = int((types == kind).sum())
            if n:
                raise InputError(f"prompt has {n} {what} placeholder tokens but no {what}s were given")
            continue
        if (grid[:, 1:] % merge).any():
            raise InputError(f"{what} grids {grid.tolist()} are not multiples of the merge size {merge}")
        per_call = [tuple(int(v) for v in row) for row in grid] if kind == IMAGE else _per_frame(grid)
        kind_calls = _calls(kind, per_call, pix, merge, what)
        n_placeholders = int((types == kind).sum())
        if n_placeholders != sum(c.num_outputs for c in kind_calls):
            raise InputError(f"prompt has {n_placeholders} {what} placeholder tokens but the {what}s give "
                             f"{sum(c.num_outputs for c in kind_calls)} embeddings")
        calls += kind_calls
    # Vision calls run images first, then video frames; each modality fills its own placeholders in order.
    plan = PromptPlan(config, ids, mask, calls, pixel_values=pixels, pixel_values_videos=video_pixels,
                      image_grid_thw=image_grid, video_grid_thw=video_grid, mm_types=types)
    try:
        plan._compute_positions()
    except InputError:
        raise
    except ValueError as e:
        raise InputError(str(e)) from None
    return plan
