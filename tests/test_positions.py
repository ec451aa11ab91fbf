"""runtime/positions.py against transformers 5.23 (tiny random models as the oracle), on identical inputs."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from glmtrt.runtime import positions as ps

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import torch.nn.functional as F  # noqa: E402
from transformers import (  # noqa: E402
    Glm4vConfig,
    Glm4vModel,
    Glm4vVisionConfig,
    GlmImageConfig,
    GlmImageModel,
    GlmOcrVisionConfig,
)
from transformers.models.glm4v.modeling_glm4v import (  # noqa: E402
    Glm4vVisionEmbeddings,
    Glm4vVisionRotaryEmbedding,
)
from transformers.models.glm4v.processing_glm4v import Glm4vProcessor  # noqa: E402
from transformers.models.glm_image.modeling_glm_image import GlmImageVisionEmbeddings  # noqa: E402
from transformers.models.glm_ocr.modeling_glm_ocr import GlmOcrVisionRotaryEmbedding  # noqa: E402
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids  # noqa: E402

# Token ids of the tiny configs (glm-family.md 8.2).
IMAGE, VIDEO, BOI, EOI, BOV, EOV = 250, 251, 252, 253, 254, 255
GI_IMAGE, GI_START, GI_END = 310, 256, 257


@pytest.fixture(scope="module")
def glm4v():
    torch.manual_seed(0)
    vision = dict(
        depth=1, hidden_size=32, num_heads=2, patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
        image_size=56, rms_norm_eps=1e-5, intermediate_size=96, out_hidden_size=64,
    )
    text = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5, mrope_section=[2, 1, 1]),
    )
    config = Glm4vConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE, video_token_id=VIDEO,
        image_start_token_id=BOI, image_end_token_id=EOI, video_start_token_id=BOV, video_end_token_id=EOV,
    )
    return Glm4vModel(config).eval()


@pytest.fixture(scope="module")
def glm_image():
    torch.manual_seed(0)
    config = GlmImageConfig(
        vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=16, image_size=64),
        text_config=dict(
            vocab_size=320, vision_vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, pad_token_id=300, eos_token_id=257,
            rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5, mrope_section=[2, 1, 1]),
        ),
        vq_config=dict(embed_dim=16, num_embeddings=256, latent_channels=32),
        image_token_id=GI_IMAGE, image_start_token_id=GI_START, image_end_token_id=GI_END,
    )
    return GlmImageModel(config).eval()


def _image(grid, merge=2):
    return [BOI] + [IMAGE] * (int(np.prod(grid)) // merge**2) + [EOI]


def _video(frame_grid, timestamps):
    """<|begin_of_video|> then per temporal patch: BOI, tokens, EOI, the timestamp text; then <|end_of_video|>."""
    tokens_per_frame = frame_grid[1] * frame_grid[2] // 4
    ids = [BOV]
    for stamp in timestamps:
        ids += [BOI] + [IMAGE] * tokens_per_frame + [EOI] + [10 + d for d in map(int, str(stamp))]
    return ids + [EOV]


def _hf_mm_types(ids: np.ndarray) -> np.ndarray:
    fake = SimpleNamespace(image_token_id=IMAGE, video_start_id=BOV, video_end_id=EOV)
    return np.array(Glm4vProcessor.create_mm_token_type_ids(fake, list(ids)))


def _compare_rope_index(model, ids, image_grid=None, video_grid=None, mask=None):
    ids = np.asarray(ids, dtype=np.int64)
    types = ps.mm_token_type_ids(ids, IMAGE, BOV, EOV)
    np.testing.assert_array_equal(types, _hf_mm_types(ids))
    as_t = lambda a: None if a is None else torch.tensor(np.asarray(a), dtype=torch.long)  # noqa: E731
    ref_pos, ref_delta = model.get_rope_index(
        as_t(ids), as_t(types), image_grid_thw=as_t(image_grid), video_grid_thw=as_t(video_grid), attention_mask=as_t(mask)
    )
    pos, delta = ps.get_rope_index(ids, types, image_grid, video_grid, mask, spatial_merge_size=2)
    assert pos.dtype == np.int64 and delta.dtype == np.int64
    assert pos.shape == (3, *ids.shape) and delta.shape == (ids.shape[0], 1)
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    np.testing.assert_array_equal(delta, ref_delta.numpy())
    return pos, delta


# ------------------------------------------------------------------------------------------ GLM-4V rope index


def test_rope_index_text_only(glm4v):
    ids = [[5, 6, 7, 8, 9, 10, 11]]
    pos, delta = _compare_rope_index(glm4v, ids)
    assert delta[0, 0] == 0
    # mm_token_type_ids may be omitted for text.
    np.testing.assert_array_equal(ps.get_rope_index(np.array(ids))[0], pos)


def test_rope_index_one_image(glm4v):
    ids = [[1, 2, 3] + _image((1, 4, 6)) + [7, 8, 9]]
    pos, delta = _compare_rope_index(glm4v, ids, image_grid=[[1, 4, 6]])
    assert delta[0, 0] == -3  # the documented example (glm-family.md 3.2)


def test_rope_index_two_images(glm4v):
    ids = [[1, 2] + _image((1, 6, 4)) + [3, 4, 5] + _image((1, 2, 10)) + [6, 7]]
    _compare_rope_index(glm4v, ids, image_grid=[[1, 6, 4], [1, 2, 10]])


def test_rope_index_left_padded_batch(glm4v):
    sample_a = [1, 2] + _image((1, 4, 4)) + [3, 4, 5, 6]
    sample_b = [9] + _image((1, 2, 6)) + [8] + _image((1, 4, 2)) + [7]
    length = max(len(sample_a), len(sample_b)) + 2
    ids = np.zeros((2, length), dtype=np.int64)
    mask = np.zeros((2, length), dtype=np.int64)
    for row, sample in enumerate((sample_a, sample_b)):
        ids[row, length - len(sample) :] = sample
        mask[row, length - len(sample) :] = 1
    pos, _ = _compare_rope_index(glm4v, ids, image_grid=[[1, 4, 4], [1, 2, 6], [1, 4, 2]], mask=mask)
    assert (pos[:, 0, : length - len(sample_a)] == 0).all()


def test_rope_index_four_frame_video_with_timestamps(glm4v):
    # 4 frames -> t = 2 temporal patches of a 4x6 grid; timestamp text "0" and "12" between them.
    ids = [[1, 2] + _video((2, 4, 6), [0, 12]) + [3, 4]]
    pos, delta = _compare_rope_index(glm4v, ids, video_grid=[[2, 4, 6]])
    types = ps.mm_token_type_ids(np.array(ids), IMAGE, BOV, EOV)
    assert (types == 2).sum() == 12 and (types == 1).sum() == 0


def test_rope_index_image_and_video_in_one_prompt(glm4v):
    ids = [[1] + _image((1, 2, 2)) + [2] + _video((2, 2, 4), [0, 1]) + [3] + _image((1, 4, 2)) + [4]]
    _compare_rope_index(glm4v, ids, image_grid=[[1, 2, 2], [1, 4, 2]], video_grid=[[2, 2, 4]])


def test_rope_index_mm_types_on_unbatched_ids():
    ids = np.array([1, BOV, BOI, IMAGE, EOI, EOV, IMAGE, 3])
    np.testing.assert_array_equal(ps.mm_token_type_ids(ids, IMAGE, BOV, EOV), _hf_mm_types(ids[None])[0])


def test_rope_index_mistakes_raise_value_error(glm4v):
    ids = np.array([[1] + _image((1, 4, 6)) + [2]])
    types = ps.mm_token_type_ids(ids, IMAGE, BOV, EOV)
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        ps.get_rope_index(ids, None, [[1, 4, 6]])
    with pytest.raises(ValueError, match="does not match its grid"):
        ps.get_rope_index(ids, types, [[1, 4, 4]])
    with pytest.raises(ValueError, match="more image token runs"):
        ps.get_rope_index(ids, types, None)
    with pytest.raises(ValueError, match="grids but only"):
        ps.get_rope_index(ids, types, [[1, 4, 6], [1, 2, 2]])
    with pytest.raises(ValueError, match="multiples of merge_size"):
        ps.get_rope_index(ids, types, [[1, 3, 8]])
    with pytest.raises(ValueError, match="no real tokens"):
        ps.get_rope_index(ids, types, [[1, 4, 6]], None, np.zeros_like(ids))


# -------------------------------------------------------------------------------------------- decode steps


def test_decode_positions_match_compute_3d_position_ids(glm4v):
    ids = np.array([[1, 2, 3] + _image((1, 4, 6)) + [7, 8, 9]])
    _, delta = ps.get_rope_index(ids, ps.mm_token_type_ids(ids, IMAGE, BOV, EOV), [[1, 4, 6]])
    glm4v.rope_deltas = torch.tensor(delta)
    try:
        for past, new in [(ids.shape[1], 1), (ids.shape[1] + 5, 1), (ids.shape[1] + 2, 3)]:
            cache = SimpleNamespace(get_seq_length=lambda past=past: past)
            expected = glm4v.compute_3d_position_ids(
                input_ids=None, inputs_embeds=torch.zeros(1, new, 64), past_key_values=cache
            )
            np.testing.assert_array_equal(ps.decode_position_ids(past, delta, new), expected.numpy())
    finally:
        glm4v.rope_deltas = None


def test_decode_positions_continue_each_left_padded_row(glm4v):
    # generate() continues every row from its own last prefill position (+1 per step).
    sample_a, sample_b = [1, 2] + _image((1, 4, 4)) + [3], [4] + _image((1, 2, 6)) + [5, 6, 7, 8]
    length = max(len(sample_a), len(sample_b))
    ids, mask = np.zeros((2, length), np.int64), np.zeros((2, length), np.int64)
    for row, sample in enumerate((sample_a, sample_b)):
        ids[row, length - len(sample) :], mask[row, length - len(sample) :] = sample, 1
    pos, delta = _compare_rope_index(glm4v, ids, image_grid=[[1, 4, 4], [1, 2, 6]], mask=mask)
    steps = ps.decode_position_ids(mask.sum(1), delta, 4)
    np.testing.assert_array_equal(steps, pos[:, :, -1:] + 1 + np.arange(4))


# ------------------------------------------------------------------------------------------- GLM-Image LM


def _compare_glm_image(model, ids, grids, images_per_sample, mask=None):
    as_t = lambda a: None if a is None else torch.tensor(np.asarray(a), dtype=torch.long)  # noqa: E731
    ref_pos, ref_delta = model.get_rope_index(
        as_t(ids), image_grid_thw=as_t(grids), images_per_sample=as_t(images_per_sample), attention_mask=as_t(mask)
    )
    pos, table = ps.glm_image_rope_index(ids, grids, images_per_sample, mask, GI_START, GI_END)
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    assert (ref_delta == 0).all()
    ref_table = model._cached_decode_position_ids
    if ref_table is None:
        assert table is None
    else:
        assert table.dtype == np.int64
        np.testing.assert_array_equal(table, ref_table.numpy())
    return pos, table


def test_glm_image_text_to_image(glm_image):
    ids = np.array([[1, 2, 3, 4, 5, GI_START]])
    pos, table = _compare_glm_image(glm_image, ids, [[1, 4, 6], [1, 2, 3]], [2])
    # Documented example (glm-family.md 4.5): preview first, then the large grid, then the end marker.
    assert table[0, 0].tolist() == [6] * 6 + [9] * 24 + [15]
    # Each decode step reads the cached table at past_len - prefill_len.
    glm_image.rope_deltas = torch.zeros(1, 1, dtype=torch.long)
    try:
        for step in (0, 5, 29, 30):
            cache = SimpleNamespace(get_seq_length=lambda step=step: ids.shape[1] + step)
            expected = glm_image.compute_3d_position_ids(
                input_ids=None, image_grid_thw=None, images_per_sample=None,
                inputs_embeds=torch.zeros(1, 1, 64), attention_mask=None, past_key_values=cache,
            )
            np.testing.assert_array_equal(ps.glm_image_decode_positions(table, step), expected.numpy())
    finally:
        glm_image.rope_deltas = None


def test_glm_image_image_to_image(glm_image):
    ids = np.array([[1, 2, GI_START] + [GI_IMAGE] * 12 + [GI_END, 9, 10, GI_START]])
    _compare_glm_image(glm_image, ids, [[1, 3, 4], [1, 2, 2]], [2])


def test_glm_image_padded_batch_two_sources(glm_image):
    src = lambda n: [GI_START] + [GI_IMAGE] * n + [GI_END]  # noqa: E731
    sample_a = [1] + src(6) + [2] + src(4) + [3, GI_START]
    sample_b = [4, 5, 6] + src(6) + src(4) + [GI_START]
    length = max(len(sample_a), len(sample_b)) + 1
    ids, mask = np.full((2, length), 300, np.int64), np.zeros((2, length), np.int64)
    for row, sample in enumerate((sample_a, sample_b)):
        ids[row, length - len(sample) :], mask[row, length - len(sample) :] = sample, 1
    grids = [[1, 2, 3], [1, 2, 2], [1, 4, 4], [1, 3, 2], [1, 2, 2], [1, 6, 2]]
    pos, table = _compare_glm_image(glm_image, ids, grids, [3, 3], mask)
    assert (pos[:, :, 0] == 1).all()  # padded slots hold 1 in GLM-Image


def test_glm_image_without_grids_is_plain_text(glm_image):
    ids = np.array([[1, 2, 3, 4]])
    pos, table = _compare_glm_image(glm_image, ids, None, None)
    assert table is None


def test_glm_image_mistakes_raise_value_error():
    ids = np.array([[1, GI_START] + [GI_IMAGE] * 5 + [GI_END, GI_START]])
    with pytest.raises(ValueError, match="do not match the grids"):
        ps.glm_image_rope_index(ids, [[1, 2, 2], [1, 4, 4]], [2], None, GI_START, GI_END)
    with pytest.raises(ValueError, match="images_per_sample"):
        ps.glm_image_rope_index(ids, [[1, 2, 2], [1, 4, 4]], [3], None, GI_START, GI_END)
    with pytest.raises(ValueError, match="outside the table"):
        ps.glm_image_decode_positions(np.zeros((1, 3, 5), np.int64), 5)


# ----------------------------------------------------------------------------------------------- vision side

GRIDS = [
    [[1, 4, 6]],
    [[1, 2, 2], [1, 8, 4], [1, 6, 10]],
    [[2, 4, 4], [1, 2, 8]],  # a video entry (t = 2) then an image
    [[1, 34, 46]],  # a 640x480 image
]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("merge", [1, 2])
def test_vision_position_ids_match_vision_utils(grid, merge):
    expected = get_vision_position_ids(torch.tensor(grid), merge).numpy()
    ours = ps.vision_position_ids(np.array(grid), merge)
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("grid", GRIDS)
def test_vision_segments_match_cu_seqlens(grid):
    expected = get_vision_cu_seqlens(torch.tensor(grid)).numpy()
    cu = ps.vision_cu_seqlens(np.array(grid))
    assert cu.dtype == np.int32
    np.testing.assert_array_equal(cu, expected)
    # The tower's per-patch segment id: (arange(N)[None] >= cumsum(lengths)[:, None]).sum(0).
    lengths = torch.tensor(expected[1:] - expected[:-1])
    tower_seq_ids = (torch.arange(int(expected[-1]))[None] >= lengths.cumsum(0)[:, None]).sum(0).numpy()
    segments = ps.vision_segment_ids(np.array(grid))
    assert segments.dtype == np.int64
    np.testing.assert_array_equal(segments, tower_seq_ids)


def test_vision_rotary_matches_tiny_tower(glm4v):
    grid = torch.tensor([[1, 4, 6], [2, 8, 4], [1, 40, 62]])
    position_ids = get_vision_position_ids(grid, 2)
    cos, sin = glm4v.visual.rotary_pos_emb(torch.zeros(1), position_ids)
    ours_cos, ours_sin = ps.vision_rotary_cos_sin(grid.numpy(), 16, 10000.0, 2)
    assert ours_cos.dtype == np.float32 and ours_cos.shape == tuple(cos.shape)
    assert np.abs(ours_cos - cos.numpy()).max() <= 1e-6
    assert np.abs(ours_sin - sin.numpy()).max() <= 1e-6


@pytest.mark.parametrize(
    "rotary_cls,config_cls,hidden,heads",
    [
        (Glm4vVisionRotaryEmbedding, Glm4vVisionConfig, 1536, 12),  # GLM-4.1V / 4.5V: head_dim 128
        (GlmOcrVisionRotaryEmbedding, GlmOcrVisionConfig, 1024, 16),  # GLM-OCR: head_dim 64
        (Glm4vVisionRotaryEmbedding, Glm4vVisionConfig, 96, 3),  # head_dim 32
    ],
)
def test_vision_rotary_matches_real_head_dims_at_large_positions(rotary_cls, config_cls, hidden, heads):
    rotary = rotary_cls(config_cls(hidden_size=hidden, num_heads=heads))
    grid = torch.tensor([[1, 244, 122], [1, 2, 400]])  # the largest grids a 11.76 Mpx budget allows
    cos, sin = rotary(torch.zeros(1), get_vision_position_ids(grid, 2))
    ours_cos, ours_sin = ps.vision_rotary_cos_sin(grid.numpy(), hidden // heads, rotary.config.rope_parameters["rope_theta"], 2)
    assert np.abs(ours_cos - cos.numpy()).max() <= 1e-6
    assert np.abs(ours_sin - sin.numpy()).max() <= 1e-6


def _grid_sample_reference(table: np.ndarray, grid: np.ndarray, mode: str, merge: int) -> np.ndarray:
    """The towers' own recipe: normalised coords from per-patch (h, w) and the image's (H, W), then grid_sample."""
    side = int(round(table.shape[0] ** 0.5))
    pos = get_vision_position_ids(torch.tensor(grid), merge).float()
    counts = torch.tensor(grid).prod(1)
    heights = torch.repeat_interleave(torch.tensor(grid)[:, 1], counts).float()
    widths = torch.repeat_interleave(torch.tensor(grid)[:, 2], counts).float()
    norm = torch.stack(((pos[:, 1] + 0.5) / widths * 2 - 1, (pos[:, 0] + 0.5) / heights * 2 - 1), dim=-1)
    image = torch.tensor(table).view(side, side, -1).permute(2, 0, 1)[None]
    out = F.grid_sample(image, norm[None, :, None], mode=mode, align_corners=False, padding_mode="border")
    return out[0, :, :, 0].T.numpy()


@pytest.mark.parametrize("mode,merge", [("bicubic", 2), ("bilinear", 1), ("bicubic", 1), ("bilinear", 2)])
@pytest.mark.parametrize("side", [4, 24])
def test_interpolation_taps_match_grid_sample(mode, merge, side):
    rng = np.random.default_rng(side)
    table = rng.standard_normal((side * side, 8)).astype(np.float32)
    # Grids smaller than, equal to and larger than the table; a t = 2 entry; non-square.
    grids = np.array([[1, 2, 2], [1, side, side], [1, 2 * side + 2, 6], [2, 4, 8], [1, 50, 78], [1, 6, 2]])
    idx, weights = ps.interpolation_taps(grids, side, mode, merge)
    assert idx.dtype == np.int64 and weights.dtype == np.float32
    assert idx.shape == weights.shape == (int(grids.prod(1).sum()), 16 if mode == "bicubic" else 4)
    assert idx.min() >= 0 and idx.max() < side * side
    ours = (table[idx] * weights[..., None]).sum(1)
    assert np.abs(ours - _grid_sample_reference(table, grids, mode, merge)).max() <= 1e-5


@pytest.mark.parametrize(
    "embeddings_cls,mode,merge,patch,image_size",
    [(Glm4vVisionEmbeddings, "bicubic", 2, 14, 336), (GlmImageVisionEmbeddings, "bilinear", 1, 16, 256)],
)
def test_interpolation_taps_match_tower_embeddings(embeddings_cls, mode, merge, patch, image_size):
    # The towers' embedding modules themselves (t = 1 grids, as they assume), added onto zeros.
    torch.manual_seed(1)
    config = SimpleNamespace(hidden_size=24, image_size=image_size, patch_size=patch)
    module = embeddings_cls(config).eval()
    grid = torch.tensor([[1, 34, 46], [1, 4, 4], [1, 10, 30]])
    position_ids = get_vision_position_ids(grid, merge)
    cu = get_vision_cu_seqlens(grid)
    with torch.no_grad():
        expected = module(
            torch.zeros(int(cu[-1]), 24), cu[1:] - cu[:-1], grid, position_ids[:, 0], position_ids[:, 1]
        ).numpy()
    table = module.position_embedding.weight.detach().numpy()
    idx, weights = ps.interpolation_taps(grid.numpy(), image_size // patch, mode, merge)
    assert np.abs((table[idx] * weights[..., None]).sum(1) - expected).max() <= 1e-5


def test_vision_mistakes_raise_value_error():
    with pytest.raises(ValueError, match="bicubic"):
        ps.interpolation_taps([[1, 2, 2]], 4, "nearest", 1)
    with pytest.raises(ValueError, match="multiple of 4"):
        ps.vision_rotary_cos_sin([[1, 2, 2]], 18, 1e4, 2)
    with pytest.raises(ValueError, match=r"\(num_images, 3\)"):
        ps.vision_cu_seqlens([[1, 2]])
    with pytest.raises(ValueError, match="positive integers"):
        ps.vision_position_ids([[1, 0, 2]], 1)
