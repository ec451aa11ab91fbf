"""Parity ladder, rung 1: our reference against transformers 5.23 on the same weights (save_pretrained -> load_reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glmtrt.reference import load_reference
from glmtrt.reference.generate import PromptBatch, greedy_generate, prepare_prefill

from oracle import TINY_PRESETS

GLM4V_FAMILY = ("tiny-glm-ocr", "tiny-glm-4.1v", "tiny-glm-4.5v")
IMG, BOI, EOI = 250, 252, 253


def glm4v_case(seed: int = 0) -> tuple[PromptBatch, dict]:
    """Two images of different sizes (4x6 and 8x4 patches, larger than the 4x4 position table) between text."""
    rng = np.random.default_rng(seed)
    grids = np.array([[1, 4, 6], [1, 8, 4]], dtype=np.int64)
    ids = [10, 11, 12, BOI] + [IMG] * 6 + [EOI, 13, 14, BOI] + [IMG] * 8 + [EOI, 15, 16, 17]
    pixels = rng.standard_normal((int(grids.prod(1).sum()), 1176)).astype(np.float32)
    batch = PromptBatch(input_ids=np.array([ids]), pixel_values=pixels, image_grid_thw=grids)
    hf_kwargs = dict(input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(pixels),
                     image_grid_thw=torch.from_numpy(grids), mm_token_type_ids=torch.tensor([ids]).eq(IMG).long())
    return batch, hf_kwargs


def glm_image_case(mode: str, seed: int = 0) -> tuple[PromptBatch, dict]:
    """Text-to-image (targets 4x6 + preview 2x3) or image-to-image (a 3x4 source, a 6x6 target)."""
    rng = np.random.default_rng(seed)
    if mode == "t2i":
        ids, grids, pixels = [1, 2, 3, 4, 5, 256], np.array([[1, 4, 6], [1, 2, 3]]), None
    else:
        ids, grids = [1, 2, 256] + [310] * 12 + [257, 9, 10, 256], np.array([[1, 3, 4], [1, 6, 6]])
        pixels = rng.standard_normal((12, 768)).astype(np.float32)
    grids = grids.astype(np.int64)
    batch = PromptBatch(input_ids=np.array([ids]), pixel_values=pixels, image_grid_thw=grids,
                        images_per_sample=np.array([2]))
    hf_kwargs = dict(input_ids=torch.tensor([ids]), image_grid_thw=torch.from_numpy(grids),
                     images_per_sample=torch.tensor([2]))
    if pixels is not None:
        hf_kwargs["pixel_values"] = torch.from_numpy(pixels)
    return batch, hf_kwargs


CASES = [(name, None) for name in GLM4V_FAMILY] + [("tiny-glm-image", "t2i"), ("tiny-glm-image", "i2i")]


def make_case(name: str, mode: str | None):
    return glm_image_case(mode) if name == "tiny-glm-image" else glm4v_case()


def reset_hf_state(hf) -> None:
    hf.model.rope_deltas = None
    if hasattr(hf.model, "_cached_decode_position_ids"):
        hf.model._cached_decode_position_ids = None


@pytest.fixture(scope="module")
def loaded(hf_checkpoints):
    return {name: load_reference(folder) for name, (_, folder) in hf_checkpoints.items()}


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_state_dict_round_trip(hf_checkpoints, loaded, name):
    """Every transformers tensor lands, unchanged, under the same in-memory key."""
    hf, _ = hf_checkpoints[name]
    ours = loaded[name].state_dict()
    theirs = hf.state_dict()
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


@pytest.mark.parametrize("name,mode", CASES)
def test_last_position_logits_fp32(hf_checkpoints, loaded, name, mode):
    hf, _ = hf_checkpoints[name]
    batch, hf_kwargs = make_case(name, mode)
    reset_hf_state(hf)
    with torch.no_grad():
        expected = hf(**hf_kwargs).logits[:, -1]
    model = loaded[name]
    embeds, positions, _ = prepare_prefill(model, batch)
    logits, keys, values = model.prefill(embeds, torch.from_numpy(positions), torch.from_numpy(batch.attention_mask))
    err = (logits - expected).abs().max().item()
    print(f"{name} {mode or ''}: max abs logit difference {err:.2e}")
    assert err <= 1e-4
    assert expected.abs().max() > 1e-2  # the comparison is not between two near-zero vectors
    t = model.config.text
    assert keys[0].shape == (1, t.num_kv_heads, batch.input_ids.shape[1], t.head_dim)


@pytest.mark.parametrize("name,mode", CASES)
def test_greedy_tokens_equal_generate(hf_checkpoints, loaded, name, mode):
    """A prefill and 31 decode steps give exactly transformers' generate() tokens."""
    hf, _ = hf_checkpoints[name]
    batch, hf_kwargs = make_case(name, mode)
    new_tokens = 31 if mode == "t2i" else 32  # t2i: the decode table holds 24 + 6 + 1 positions
    reset_hf_state(hf)
    with torch.no_grad():
        out = hf.generate(**hf_kwargs, max_new_tokens=new_tokens, do_sample=False)
    expected = out[:, batch.input_ids.shape[1]:].numpy()
    ours = greedy_generate(loaded[name], batch, new_tokens)
    assert expected.shape == ours.shape
    np.testing.assert_array_equal(ours, expected)
    assert len(set(ours[0].tolist())) > 1  # not a degenerate single-token loop


@pytest.mark.parametrize("name", GLM4V_FAMILY)
def test_left_padded_batch_matches_single_prompts(loaded, name):
    """A batch of two prompts of different lengths (left-padded) gives each prompt's own greedy tokens."""
    model = loaded[name]
    full, _ = glm4v_case()
    short_ids = [20, 21, BOI] + [IMG] * 6 + [EOI, 22]
    rng = np.random.default_rng(1)
    short_pixels = rng.standard_normal((24, 1176)).astype(np.float32)
    short = PromptBatch(input_ids=np.array([short_ids]), pixel_values=short_pixels, image_grid_thw=np.array([[1, 4, 6]]))
    pad = full.input_ids.shape[1] - len(short_ids)
    batch = PromptBatch(
        input_ids=np.array([full.input_ids[0], [0] * pad + short_ids]),
        attention_mask=np.array([[1] * full.input_ids.shape[1], [0] * pad + [1] * len(short_ids)]),
        pixel_values=np.concatenate([full.pixel_values, short_pixels]),
        image_grid_thw=np.concatenate([full.image_grid_thw, short.image_grid_thw]),
    )
    together = greedy_generate(model, batch, 12)
    np.testing.assert_array_equal(together[0], greedy_generate(model, full, 12)[0])
    np.testing.assert_array_equal(together[1], greedy_generate(model, short, 12)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", TINY_PRESETS)
def test_half_precision_follows_transformers(hf_checkpoints, name, dtype):
    """In bf16/fp16 the reference computes what transformers computes (fp32 islands included): the logits agree to
    a small fraction of the distance between the half-precision and fp32 results."""
    hf, folder = hf_checkpoints[name]
    batch, hf_kwargs = make_case(name, "i2i")
    # Loaded the way users load it: from_pretrained(dtype=...) keeps the rotary inv_freq buffer in fp32.
    hf_half = type(hf).from_pretrained(folder, dtype=dtype, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = hf_half(**hf_kwargs).logits[:, -1].float()
    ours = load_reference(folder, dtype=dtype)
    assert ours.lm_head.weight.dtype == dtype
    embeds, positions, _ = prepare_prefill(ours, batch)
    logits = ours.prefill(embeds, torch.from_numpy(positions), torch.from_numpy(batch.attention_mask))[0].float()
    fp32 = load_reference(folder)
    e32, p32, _ = prepare_prefill(fp32, batch)
    logits32 = fp32.prefill(e32, torch.from_numpy(p32), torch.from_numpy(batch.attention_mask))[0]
    half_vs_fp32 = (expected - logits32).abs().max().item()
    ours_vs_hf = (logits - expected).abs().max().item()
    print(f"{name} {dtype}: ours vs transformers {ours_vs_hf:.2e}, transformers half vs fp32 {half_vs_fp32:.2e}")
    assert half_vs_fp32 > 0
    assert ours_vs_hf <= 0.1 * half_vs_fp32


@pytest.mark.parametrize("segments", [None, [0] * 20 + [1] * 17 + [2] * 13])
def test_vision_attention_in_head_chunks_equals_all_heads_at_once(segments):
    """``segment_attention`` runs HEADS_PER_PRODUCT heads per product (a quarter of the score memory on a real
    page); with 10 heads (chunks of 4, 4, 2) it equals the one-product attention over all heads."""
    from glmtrt.reference.vision import HEADS_PER_PRODUCT, segment_attention

    assert 10 % HEADS_PER_PRODUCT != 0  # the last chunk is a partial one
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(50, 10, 8, generator=gen) for _ in range(3))
    ids = None if segments is None else torch.tensor(segments)
    scores = torch.matmul(q.transpose(0, 1), k.transpose(0, 1).transpose(-1, -2)) * 8**-0.5
    if ids is not None:
        scores = torch.where(ids[:, None] == ids[None, :], scores, torch.finfo(scores.dtype).min)
    expected = torch.matmul(torch.softmax(scores, dim=-1), v.transpose(0, 1)).transpose(0, 1).flatten(1)
    torch.testing.assert_close(segment_attention(q, k, v, ids, 8**-0.5), expected, rtol=0, atol=1e-6)
