"""Host-side position tables for the GLM vision-language family (numpy only).

Everything here is data-dependent bookkeeping that transformers does with Python loops inside the model
(``get_rope_index``, ``vision_utils``) and that the exported graphs take as plain inputs instead:

* LM side: the GLM-4V multimodal token types, 3-D M-RoPE position ids and rope deltas for the prompt, decode
  positions, and GLM-Image's prompt positions plus its precomputed decode table.
* Vision side: per-patch (h, w) indices in block-major order, the 2-D rotary cos/sin, the learned
  position-table interpolation taps (replacing ``F.grid_sample``), and per-image attention segments.

This module never imports torch or transformers.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "mm_token_type_ids",
    "get_rope_index",
    "decode_position_ids",
    "glm_image_rope_index",
    "glm_image_decode_positions",
    "vision_position_ids",
    "vision_rotary_cos_sin",
    "interpolation_taps",
    "vision_segment_ids",
    "vision_cu_seqlens",
]

TEXT, IMAGE, VIDEO = 0, 1, 2


# ----------------------------------------------------------------------------------------------- helpers


def _as_ids_2d(input_ids, name: str = "input_ids") -> np.ndarray:
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"{name} must be 2-D (batch, seq_len), got shape {ids.shape}; add a batch axis with ids[None].")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {ids.dtype}.")
    return ids.astype(np.int64, copy=False)


def _as_grid(grid_thw, name: str = "grid_thw") -> np.ndarray:
    grid = np.asarray(grid_thw)
    if grid.ndim == 1 and grid.shape[0] == 3:
        grid = grid[None]
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(f"{name} must have shape (num_images, 3) holding (t, h, w), got {grid.shape}.")
    if grid.size and (not np.issubdtype(grid.dtype, np.integer) or (grid < 1).any()):
        raise ValueError(f"{name} must hold positive integers (t, h, w) in patch units, got {grid.tolist()}.")
    return grid.astype(np.int64, copy=False)


def _as_mask(attention_mask, shape: tuple[int, int]) -> np.ndarray | None:
    if attention_mask is None:
        return None
    mask = np.asarray(attention_mask)
    if mask.shape != shape:
        raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids shape {shape}.")
    return mask == 1


def _check_merge(grid: np.ndarray, merge_size: int, name: str = "grid_thw") -> None:
    if merge_size < 1:
        raise ValueError(f"merge_size must be >= 1, got {merge_size}.")
    if grid.size and ((grid[:, 1] % merge_size).any() or (grid[:, 2] % merge_size).any()):
        raise ValueError(f"{name} h and w must be multiples of merge_size={merge_size}, got {grid.tolist()}.")


def _grid_positions(start: int, t: int, h: int, w: int) -> np.ndarray:
    """(3, t*h*w) M-RoPE positions of a (t, h, w) token grid in raster order: T = start+ti, H = start+r, W = start+c."""
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]).astype(np.int64) + start


def _runs(values: np.ndarray) -> list[tuple[int, int, int]]:
    """Maximal runs of equal values as (value, start, end) — itertools.groupby over the sequence."""
    if values.size == 0:
        return []
    cuts = np.flatnonzero(np.diff(values)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [values.size]])
    return [(int(values[s]), int(s), int(e)) for s, e in zip(starts, ends)]


# ----------------------------------------------------------------------------------------- GLM-4V (LM side)


def mm_token_type_ids(input_ids: np.ndarray, image_token_id: int, video_start_id: int, video_end_id: int) -> np.ndarray:
    """Multimodal token types as the GLM-4V processor builds them (``Glm4vProcessor.create_mm_token_type_ids``).

    input_ids: int (B, L) (or (L,)). Returns int64 of the same shape: 0 for text, 1 for ``image_token_id``
    outside ``<|begin_of_video|>...<|end_of_video|>``, 2 for it inside (videos reuse the image token).
    """
    ids = np.asarray(input_ids)
    if ids.ndim not in (1, 2):
        raise ValueError(f"input_ids must be (L,) or (B, L), got shape {ids.shape}.")
    # Inside a video once more starts than ends have been seen so far (cumulative along the sequence).
    inside_video = np.cumsum(ids == video_start_id, axis=-1) > np.cumsum(ids == video_end_id, axis=-1)
    is_image_token = ids == image_token_id
    types = np.zeros(ids.shape, dtype=np.int64)
    types[is_image_token & inside_video] = VIDEO
    types[is_image_token & ~inside_video] = IMAGE
    return types


def get_rope_index(
    input_ids,
    mm_token_type_ids=None,
    image_grid_thw=None,
    video_grid_thw=None,
    attention_mask=None,
    spatial_merge_size: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """3-D M-RoPE positions of a prompt, exactly as transformers' ``Glm4vModel.get_rope_index``.

    input_ids: int (B, L). mm_token_type_ids: int (B, L), 0 text / 1 image / 2 video (see ``mm_token_type_ids``);
    may be None only for a text-only prompt. image_grid_thw: int (num_images, 3); video_grid_thw:
    int (num_videos, 3) — grids are consumed in order across the whole batch, one per run of image/video tokens
    (a video's grid is split into t frames of (1, h, w), one per run). attention_mask: (B, L) 1 = token, 0 = pad.

    Text runs get ``cur..cur+n-1`` on all three axes; a vision run of merged grid (gh, gw) gets T = cur,
    H = cur + row, W = cur + col, then ``cur += max(h, w) // spatial_merge_size``.
    Returns position_ids int64 (3, B, L) (0 at padded slots) and rope_deltas int64 (B, 1) =
    max(position) + 1 - number of real tokens.
    """
    ids = _as_ids_2d(input_ids)
    batch, seq_len = ids.shape
    has_grids = image_grid_thw is not None or video_grid_thw is not None
    if mm_token_type_ids is None:
        if has_grids:
            raise ValueError(
                "image/video grids were given but mm_token_type_ids is None; build it with mm_token_type_ids(input_ids, ...)."
            )
        types = np.zeros_like(ids)
    else:
        types = np.asarray(mm_token_type_ids)
        if types.shape != ids.shape:
            raise ValueError(f"mm_token_type_ids shape {types.shape} does not match input_ids shape {ids.shape}.")
    mask = _as_mask(attention_mask, ids.shape)

    grids = {IMAGE: [], VIDEO: []}
    if image_grid_thw is not None:
        image_grid = _as_grid(image_grid_thw, "image_grid_thw")
        _check_merge(image_grid, spatial_merge_size, "image_grid_thw")
        grids[IMAGE] = [tuple(int(v) for v in row) for row in image_grid]
    if video_grid_thw is not None:
        video_grid = _as_grid(video_grid_thw, "video_grid_thw")
        _check_merge(video_grid, spatial_merge_size, "video_grid_thw")
        # Frames are separated by timestamp text, so each temporal patch is its own (1, h, w) run.
        grids[VIDEO] = [(1, int(h), int(w)) for t, h, w in video_grid for _ in range(int(t))]
    next_grid = {IMAGE: 0, VIDEO: 0}
    names = {IMAGE: "image", VIDEO: "video frame"}

    position_ids = np.zeros((3, batch, seq_len), dtype=np.int64)
    rope_deltas = np.zeros((batch, 1), dtype=np.int64)
    for b in range(batch):
        valid = mask[b] if mask is not None else np.ones(seq_len, dtype=bool)
        n_valid = int(valid.sum())
        if n_valid == 0:
            raise ValueError(f"sample {b} has no real tokens (attention_mask is all 0); drop it from the batch.")
        current = 0
        pieces = []
        for kind, start, end in _runs(types[b][valid]):
            length = end - start
            if kind == TEXT:
                pieces.append(np.broadcast_to(np.arange(length, dtype=np.int64) + current, (3, length)))
                current += length
                continue
            if kind not in grids:
                raise ValueError(f"mm_token_type_ids holds {kind}; only 0 (text), 1 (image), 2 (video) are allowed.")
            if next_grid[kind] >= len(grids[kind]):
                raise ValueError(
                    f"more {names[kind]} token runs than {names[kind]} grids (sample {b}); "
                    f"pass one grid per {names[kind]} in prompt order."
                )
            t, h, w = grids[kind][next_grid[kind]]
            next_grid[kind] += 1
            gh, gw = h // spatial_merge_size, w // spatial_merge_size
            if t * gh * gw != length:
                raise ValueError(
                    f"a run of {length} {names[kind]} tokens (sample {b}) does not match its grid {(t, h, w)}, which "
                    f"needs {t * gh * gw}; adjacent images must be separated by text (<|begin_of_image|> etc.)."
                )
            pieces.append(_grid_positions(current, t, gh, gw))
            current += max(h, w) // spatial_merge_size
        positions = np.concatenate(pieces, axis=1)
        position_ids[:, b, valid] = positions
        rope_deltas[b, 0] = int(positions.max()) + 1 - n_valid
    for kind in (IMAGE, VIDEO):
        if next_grid[kind] != len(grids[kind]):
            raise ValueError(
                f"{len(grids[kind])} {names[kind]} grids but only {next_grid[kind]} {names[kind]} token runs in the "
                "prompt; every grid needs its placeholder tokens."
            )
    return position_ids, rope_deltas


def decode_position_ids(cache_position, rope_deltas, length: int = 1) -> np.ndarray:
    """M-RoPE positions for decode steps: all three axes equal ``cache_position + k + rope_delta``.

    cache_position: int or int (B,) — how many real tokens of that sample are already in the cache (the prompt's
        non-pad length for the first decode step; with left padding pass the per-sample counts, as ``generate``
        continues each row from its own last position).
    rope_deltas: int (B, 1) or (B,) from ``get_rope_index``. length: number of new tokens (k = 0..length-1).
    Returns int64 (3, B, length).
    """
    deltas = np.asarray(rope_deltas, dtype=np.int64).reshape(-1)
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}.")
    cache = np.asarray(cache_position, dtype=np.int64).reshape(-1)
    if cache.size not in (1, deltas.size):
        raise ValueError(f"cache_position has {cache.size} entries for a batch of {deltas.size}; pass one or B.")
    positions = cache[:, None] + np.arange(length, dtype=np.int64)[None, :] + deltas[:, None]
    return np.ascontiguousarray(np.broadcast_to(positions[None], (3, deltas.size, length)))


# ---------------------------------------------------------------------------------------- GLM-Image (LM side)


def glm_image_rope_index(
    input_ids,
    image_grid_thw,
    images_per_sample,
    attention_mask,
    image_start_token_id: int,
    image_end_token_id: int,
) -> tuple[np.ndarray, np.ndarray | None]:
    """GLM-Image prompt positions and decode-position table, as ``GlmImageModel.get_rope_index``.

    input_ids: int (B, L). image_grid_thw: int (G, 3) — per sample its source-image grids then its target grids
    (t2i: large, preview; i2i: large), samples concatenated; None for plain text. images_per_sample: int (B,)
    grids per sample (None: every sample uses all G grids). attention_mask: (B, L) or None.

    Prompt: text (up to and including each ``image_start``) is ``arange`` from cur; a source image's h*w tokens
    get T = cur, H = cur + r, W = cur + c, then ``cur += max(h, w)``; the rest is text. Padded slots hold 1
    (transformers initialises with ones). Decode: target grids from the **last** to the first, each in raster
    order from d (starting at the position after the prompt), ``d += max(h, w)``, then one end-marker at d;
    rows replicate-padded to the longest sample.
    Returns position_ids int64 (3, B, L) and the decode table int64 (B, 3, Ld) (None when there are no grids).
    The decode step s (tokens generated so far) uses ``table[:, :, s:s+n]`` — see ``glm_image_decode_positions``.
    """
    ids = _as_ids_2d(input_ids)
    batch, seq_len = ids.shape
    # transformers ignores a mask of another length (assisted decoding); mirror that.
    mask = None
    if attention_mask is not None:
        mask_arr = np.asarray(attention_mask)
        if mask_arr.ndim != 2 or mask_arr.shape[0] != batch:
            raise ValueError(f"attention_mask shape {mask_arr.shape} does not match input_ids shape {ids.shape}.")
        if mask_arr.shape[1] == seq_len:
            mask = mask_arr == 1

    if image_grid_thw is not None:
        grid = _as_grid(image_grid_thw, "image_grid_thw")
        if images_per_sample is not None:
            counts = np.asarray(images_per_sample, dtype=np.int64).reshape(-1)
            if counts.size != batch or (counts < 0).any() or counts.sum() != grid.shape[0]:
                raise ValueError(
                    f"images_per_sample {counts.tolist()} must have one count per sample summing to the "
                    f"{grid.shape[0]} grids in image_grid_thw."
                )
            bounds = np.concatenate([[0], np.cumsum(counts)])
            grids_per_sample = [grid[bounds[b] : bounds[b + 1]] for b in range(batch)]
        else:
            grids_per_sample = [grid] * batch
    else:
        grids_per_sample = [None] * batch

    text_positions = np.arange(seq_len, dtype=np.int64)
    position_ids = np.ones((3, batch, seq_len), dtype=np.int64)
    decode_rows = []
    for b in range(batch):
        sample_ids = ids[b] if mask is None else ids[b][mask[b]]
        sample_grids = grids_per_sample[b]
        ends = np.flatnonzero(sample_ids == image_end_token_id)
        starts = np.flatnonzero(sample_ids == image_start_token_id) + 1
        current, prev_end, pieces = 0, 0, []
        for img_idx, (start, end) in enumerate(zip(starts, ends)):
            if sample_grids is None or img_idx >= len(sample_grids):
                break
            # Text up to and including this image's start token (slice semantics as transformers).
            text = text_positions[current : current + int(start - prev_end)]
            current += text.size
            _, h, w = (int(v) for v in sample_grids[img_idx])
            pieces.append(np.broadcast_to(text, (3, text.size)))
            pieces.append(_grid_positions(current, 1, h, w))
            current += max(h, w)
            prev_end = int(end)
        text = text_positions[current : current + (sample_ids.size - prev_end)]
        current += text.size
        pieces.append(np.broadcast_to(text, (3, text.size)))
        positions = np.concatenate(pieces, axis=1)
        if positions.shape[1] != sample_ids.size:
            raise ValueError(
                f"sample {b}: the image tokens between image_start/image_end do not match the grids "
                f"({positions.shape[1]} positions for {sample_ids.size} tokens); each source image needs h*w tokens."
            )
        if mask is None:
            position_ids[:, b, :] = positions
        else:
            position_ids[:, b, mask[b]] = positions

        if sample_grids is not None and len(sample_grids) > 0:
            num_decode_grids = max(len(sample_grids) - len(ends), 0)
            cursor, rows = current, []
            for i in range(1, num_decode_grids + 1):
                _, h, w = (int(v) for v in sample_grids[-i])
                rows.append(_grid_positions(cursor, 1, h, w))
                cursor += max(h, w)
            rows.append(np.full((3, 1), cursor, dtype=np.int64))  # the EOS slot
            decode_rows.append(np.concatenate(rows, axis=1))
        elif sample_grids is not None:
            decode_rows.append(None)

    if not decode_rows:
        return position_ids, None
    if any(r is None for r in decode_rows) or len(decode_rows) != batch:
        raise ValueError("every sample needs its target grids in image_grid_thw (images_per_sample has a 0).")
    decode_len = max(r.shape[1] for r in decode_rows)
    table = np.stack([np.pad(r, ((0, 0), (0, decode_len - r.shape[1])), mode="edge") for r in decode_rows])
    return position_ids, table


def glm_image_decode_positions(decode_table: np.ndarray, step: int, length: int = 1) -> np.ndarray:
    """Positions of GLM-Image decode tokens ``step .. step+length-1`` (counted after the prompt).

    decode_table: int64 (B, 3, Ld) from ``glm_image_rope_index``. Returns int64 (3, B, length), i.e.
    ``table[:, :, step:step+length]`` with axes swapped, as ``GlmImageModel.compute_3d_position_ids``.
    """
    table = np.asarray(decode_table)
    if table.ndim != 3 or table.shape[1] != 3:
        raise ValueError(f"decode_table must be (B, 3, Ld), got shape {table.shape}.")
    if step < 0 or step + length > table.shape[2]:
        raise ValueError(
            f"decode steps {step}..{step + length - 1} are outside the table's {table.shape[2]} entries; "
            "stop generating after the target grids and the end token."
        )
    return np.ascontiguousarray(table[:, :, step : step + length].transpose(1, 0, 2)).astype(np.int64, copy=False)


# ------------------------------------------------------------------------------------------- vision side


def vision_position_ids(grid_thw, merge_size: int) -> np.ndarray:
    """(h_idx, w_idx) of every patch, as ``transformers.vision_utils.get_vision_position_ids``.

    grid_thw: int (K, 3). Patches of each (t, h, w) entry are in merge-block order
    (block_row, block_col, in_row, in_col) — raster when merge_size is 1 — repeated for each of the t frames.
    Returns int64 (sum t*h*w, 2).
    """
    grid = _as_grid(grid_thw)
    _check_merge(grid, merge_size)
    out = []
    for t, h, w in grid.tolist():
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // merge_size, merge_size, w // merge_size, merge_size)
        rows = rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        cols = cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([rows, cols], axis=-1), (t, 1)))
    return np.concatenate(out, axis=0).astype(np.int64) if out else np.zeros((0, 2), np.int64)


def _vision_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """float32 (head_dim // 4,) = 1 / theta ** (2j / (head_dim/2)), rounded like torch's float32 pipeline."""
    spatial_dim = head_dim // 2
    exponents = np.arange(0, spatial_dim, 2, dtype=np.float32) / np.float32(spatial_dim)
    # pow in float64 and round once: the correctly rounded float32, which is what torch's float32 pow returns here.
    powers = (np.float64(theta) ** exponents.astype(np.float64)).astype(np.float32)
    return (np.float32(1.0) / powers).astype(np.float32)


def vision_rotary_cos_sin(grid_thw, head_dim: int, theta: float, merge_size: int) -> tuple[np.ndarray, np.ndarray]:
    """2-D rotary tables of the GLM-4V / GLM-OCR vision tower (``Glm4vVisionRotaryEmbedding``).

    head_dim must be a multiple of 4: F = head_dim/4 frequencies; per patch u = [h*inv_freq, w*inv_freq]
    (head_dim/2) and cos = [cos u, cos u] (half-split pairing), all in float32 as torch computes it.
    inv_freq equals torch's bit for bit at theta 1e4 for every head_dim up to 128 (all GLM towers); elsewhere
    torch's vectorised float32 pow may differ by 1 ulp, which moves cos/sin by ~1e-5 at positions ~200.
    Returns cos, sin: float32 (sum t*h*w, head_dim), patches ordered as ``vision_position_ids``.
    """
    if head_dim < 4 or head_dim % 4:
        raise ValueError(f"vision head_dim must be a positive multiple of 4, got {head_dim}.")
    positions = vision_position_ids(grid_thw, merge_size).astype(np.float32)  # (N, 2)
    freqs = positions[:, :, None] * _vision_inv_freq(head_dim, theta)[None, None, :]  # (N, 2, F) float32
    angles = freqs.reshape(freqs.shape[0], -1)  # [h freqs, w freqs]
    cos, sin = np.cos(angles), np.sin(angles)
    return (
        np.concatenate([cos, cos], axis=-1).astype(np.float32, copy=False),
        np.concatenate([sin, sin], axis=-1).astype(np.float32, copy=False),
    )


def _axis_taps(index: np.ndarray, size: np.ndarray, side: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis taps (int64) and weights (float32) for target cells ``index`` of an axis of ``size`` cells.

    Mirrors the float32 arithmetic of the towers and of torch's CPU ``grid_sample`` step by step (normalise to
    [-1, 1], then unnormalise as ``(x + 1) * (side / 2) - 0.5``), so the taps and weights are the ones torch uses.
    """
    f32 = np.float32
    normalized = ((index.astype(f32) + f32(0.5)) / size.astype(f32)) * f32(2) - f32(1)
    src = (normalized + f32(1)) * f32(side / 2) - f32(0.5)  # align_corners=False
    if mode == "bilinear":
        src = np.clip(src, f32(0), f32(side - 1))  # border padding clips the coordinate itself
    floor = np.floor(src)
    frac = (src - floor)[:, None]
    offsets = np.arange(0, 2) if mode == "bilinear" else np.arange(-1, 3)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)  # border padding: clamp the taps
    if mode == "bilinear":
        weights = np.concatenate([f32(1) - frac, frac], axis=1)
    else:
        a = f32(-0.75)  # Keys cubic kernel, as torch's bicubic

        def near(x):  # |x| <= 1
            return ((a + f32(2)) * x - (a + f32(3))) * x * x + f32(1)

        def far(x):  # 1 < |x| < 2
            return ((a * x - f32(5) * a) * x + f32(8) * a) * x - f32(4) * a

        weights = np.concatenate([far(frac + f32(1)), near(frac), near(f32(1) - frac), far(f32(2) - frac)], axis=1)
    return taps, weights.astype(f32, copy=False)


def interpolation_taps(grid_thw, table_side: int, mode: str, merge_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Gather taps that replace the vision tower's ``F.grid_sample`` of its learned position table.

    The table is S x S (S = ``table_side``), flattened row-major to (S*S, D); each patch (h, w) of a grid (H, W)
    samples it at y = (h+0.5)*S/H - 0.5, x = (w+0.5)*S/W - 0.5 (align_corners=False, border padding).
    mode: "bicubic" (GLM-4V: 4x4 Keys taps, a=-0.75) or "bilinear" (GLM-Image: 2x2 taps).
    Patch order is the tower's: ``vision_position_ids(grid_thw, merge_size)``.
    Returns idx int64 (N, K) into the flattened table and weights float32 (N, K), K = 16 or 4; the position
    embedding is ``(table[idx] * weights[..., None]).sum(1)``.
    """
    if mode not in ("bicubic", "bilinear"):
        raise ValueError(f"interpolation mode must be 'bicubic' or 'bilinear', got {mode!r}.")
    if table_side < 1:
        raise ValueError(f"table_side must be >= 1, got {table_side}.")
    grid = _as_grid(grid_thw)
    positions = vision_position_ids(grid, merge_size)
    counts = grid[:, 0] * grid[:, 1] * grid[:, 2]
    heights = np.repeat(grid[:, 1], counts)
    widths = np.repeat(grid[:, 2], counts)
    h_taps, h_weights = _axis_taps(positions[:, 0], heights, table_side, mode)
    w_taps, w_weights = _axis_taps(positions[:, 1], widths, table_side, mode)
    n = h_taps.shape[1]
    idx = (h_taps[:, :, None] * table_side + w_taps[:, None, :]).reshape(-1, n * n)
    weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, n * n)
    return idx.astype(np.int64), weights.astype(np.float32)


def _frame_lengths(grid_thw) -> np.ndarray:
    grid = _as_grid(grid_thw)
    return np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])


def vision_segment_ids(grid_thw) -> np.ndarray:
    """Attention segment of every patch: one segment per (image, frame), numbered 0.. in order.

    grid_thw: int (K, 3). Returns int64 (sum t*h*w,); patches attend only within their segment
    (the tower's ``seq_ids`` / the block-diagonal mask of ``cu_seqlens``).
    """
    lengths = _frame_lengths(grid_thw)
    return np.repeat(np.arange(lengths.size, dtype=np.int64), lengths)


def vision_cu_seqlens(grid_thw) -> np.ndarray:
    """Cumulative segment boundaries as ``vision_utils.get_vision_cu_seqlens``: int32 (num_segments + 1,), from 0."""
    lengths = _frame_lengths(grid_thw)
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
