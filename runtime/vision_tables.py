"""Host-made tables a vision tower needs for a given set of image grids (numpy only).

Both roads use this: the reference passes the tables to its PyTorch vision tower, the runtime feeds
them to the vision graph. The tower itself then has no data-dependent structure.
"""

from __future__ import annotations

import numpy as np

from .positions import interpolation_taps, vision_rotary_cos_sin, vision_segment_ids


def vision_tables(grid_thw: np.ndarray, *, kind: str, head_dim: int, rope_theta: float, merge_size: int,
                  table_side: int) -> dict[str, np.ndarray]:
    """Tables for one vision call over all patches of ``grid_thw`` (int64 (n, 3)).

    kind: "glm4v", "glm_ocr" or "glm_image" (the tower kind). Returns a dict with, as the tower needs them:
    ``rotary_cos``/``rotary_sin`` float32 (N, head_dim); ``tap_index`` int64 (N, K) and ``tap_weight``
    float32 (N, K) (K = 16 bicubic for glm4v, 4 bilinear for glm_image); ``segment_ids`` int64 (N,).
    """
    grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    tables = {"segment_ids": vision_segment_ids(grid_thw)}
    if kind in ("glm4v", "glm_ocr"):
        tables["rotary_cos"], tables["rotary_sin"] = vision_rotary_cos_sin(grid_thw, head_dim, rope_theta, merge_size)
    if kind in ("glm4v", "glm_image"):
        mode = "bicubic" if kind == "glm4v" else "bilinear"
        tables["tap_index"], tables["tap_weight"] = interpolation_taps(grid_thw, table_side, mode, merge_size)
    return tables


def placeholder_positions(input_ids: np.ndarray, token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Where the image placeholders are, in the order masked_scatter fills them (batch-major, then sequence).

    input_ids: int64 (B, L). Returns (batch_index, seq_index), each int64 (n,).
    """
    batch_index, seq_index = np.nonzero(np.asarray(input_ids) == token_id)
    return batch_index.astype(np.int64), seq_index.astype(np.int64)
