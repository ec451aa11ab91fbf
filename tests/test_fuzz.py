"""Fuzzing with hypothesis (issue 8): the image processor, the chat formatting and tokenization, and the manifest loader
raise nothing but their documented exceptions (InputError, ManifestError: GlmTrtError subclasses) on any input, and
what they accept is well formed. Example counts are modest (CI has two busy cores) and derandomized (the same every
run); FUZZ_SCALE=10 runs ten times as many, freshly random."""

from __future__ import annotations

import copy as copy_module
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmtrt.reference.tokenizer import DEFAULT_CHARACTERS, TINY_GLM4V_SPECIALS as SP, build_char_tokenizer
from glmtrt.runtime import preprocess as pp
from glmtrt.runtime.chat import ChatFormat
from glmtrt.runtime.errors import GlmTrtError, InputError
from glmtrt.runtime.manifest import MANIFEST_NAME, Manifest, ManifestError

SCALE = float(os.environ.get("FUZZ_SCALE", "1"))


def fuzz(n: int):
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, derandomize=SCALE <= 1,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


# ------------------------------------------------------------------------------------------------ image processor

CONFIG = pp.ImageProcessorConfig(min_pixels=28 * 28, max_pixels=2 * 28 * 28 * 16)  # small budget: fast examples
MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16",
         "I;16B", "I;16L", "F"]


@st.composite
def pil_images(draw):
    mode = draw(st.sampled_from(MODES))
    if draw(st.booleans()):  # ordinary sizes, or extremes (1 px, thin strips)
        height, width = draw(st.integers(1, 120)), draw(st.integers(1, 120))
    else:
        height, width = draw(st.sampled_from([(1, 1), (1, 300), (300, 1), (2, 500), (13, 2900), (27, 29)]))
    size = len(PIL.Image.new(mode, (1, 1)).tobytes()) * width * height if mode != "1" else (width + 7) // 8 * height
    seed = draw(st.integers(0, 2**32 - 1))
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    image = PIL.Image.frombytes(mode, (width, height), data)
    if mode == "P":
        image.putpalette(np.random.default_rng(seed + 1).integers(0, 256, 768, dtype=np.uint8).tobytes())
    if mode in ("L", "P", "RGB", "I") and draw(st.booleans()):  # a transparency colour in info, as PNG tRNS gives
        image.info["transparency"] = (draw(st.integers(0, 255)) if mode != "RGB"
                                      else tuple(draw(st.integers(0, 255)) for _ in range(3)))
    return image


@st.composite
def arrays(draw):
    shape = draw(st.lists(st.integers(0, 70), min_size=1, max_size=4))
    dtype = draw(st.sampled_from([np.uint8, np.uint8, np.uint8, np.float32, np.int16, np.bool_]))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).integers(0, 256, shape).astype(dtype)


def _check_accepted(out: pp.VisionInputs, count: int) -> None:
    assert out.pixel_values.dtype == np.float32 and out.grid_thw.dtype == np.int64
    assert out.grid_thw.shape == (count, 3) and (out.grid_thw[:, 0] == 1).all()
    assert (out.grid_thw[:, 1:] % CONFIG.merge_size == 0).all() and (out.grid_thw[:, 1:] >= CONFIG.merge_size).all()
    assert out.pixel_values.shape == (int(out.grid_thw.prod(1).sum()), CONFIG.patch_dim)
    assert np.isfinite(out.pixel_values).all()
    for _, h, w in out.grid_thw.tolist():  # within the budget, unless the short side is already at its minimum
        assert 2 * h * w * CONFIG.patch_size ** 2 <= CONFIG.max_pixels or min(h, w) == CONFIG.merge_size
        assert max(h, w) <= 200 * CONFIG.merge_size  # the aspect-ratio limit bounds the rest


@fuzz(150)
@given(image=pil_images())
def test_fuzz_pil_images(image):
    """Any PIL mode and size: patches, or an InputError; where transformers accepts the image, the same pixels."""
    try:
        out = pp.preprocess_images([image], CONFIG)
    except InputError as e:
        assert str(e) and "\n" not in str(e)
        return
    _check_accepted(out, 1)


@fuzz(60)
@given(image=pil_images())
def test_fuzz_pil_modes_match_transformers(image):
    transformers = pytest.importorskip("transformers")
    processor = _processor(transformers)
    try:
        theirs = processor(images=[image.copy()], return_tensors="np")
    except Exception:
        return  # transformers refuses it (e.g. extreme aspect ratios): ours may refuse or accept
    ours = pp.preprocess_images([image], CONFIG)
    np.testing.assert_array_equal(ours.grid_thw, np.asarray(theirs["image_grid_thw"]))
    np.testing.assert_array_equal(ours.pixel_values, np.asarray(theirs["pixel_values"]))


_PROCESSOR = {}


def _processor(transformers):
    if "p" not in _PROCESSOR:
        _PROCESSOR["p"] = transformers.Glm4vImageProcessorPil(**CONFIG.to_dict())
    return _PROCESSOR["p"]


@fuzz(100)
@given(array=arrays())
def test_fuzz_arrays(array):
    try:
        out = pp.preprocess_images([array], CONFIG)
    except InputError:
        return
    _check_accepted(out, 1)


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    if fmt == "GIF":
        image.convert("P").save(buf, format="GIF", save_all=True, append_images=[image.convert("P")] * 2)
    else:
        image.save(buf, format=fmt)
    return buf.getvalue()


FORMATS = {fmt: _encoded(fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")}


@st.composite
def damaged_files(draw):
    data = bytearray(FORMATS[draw(st.sampled_from(sorted(FORMATS)))])
    for _ in range(draw(st.integers(0, 6))):  # flipped bytes
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]  # truncated
    if draw(st.integers(0, 9)) == 0:
        data = bytearray(draw(st.binary(max_size=64)))  # anything at all
    return bytes(data)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL's notes on corrupt TIFF/EXIF tags
@fuzz(200)
@given(data=damaged_files())
def test_fuzz_damaged_image_files(scratch, data):
    path = scratch / "image"
    path.write_bytes(data)
    try:
        out = pp.preprocess_images([str(path)], CONFIG)
    except InputError as e:
        assert str(e) and "\n" not in str(e)
        return
    _check_accepted(out, 1)


# ------------------------------------------------------------------------------------------------ chat formatting

CHAT = ChatFormat(build_char_tokenizer(SP), SP)
SPECIAL_STRINGS = sorted(SP) + ["<|begin_of_box|>", "<|", "|>", "[gMASK", "<sop"]
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=30)  # surrogates included
texts = st.lists(st.one_of(any_text, st.sampled_from(SPECIAL_STRINGS), st.text(DEFAULT_CHARACTERS, max_size=12)),
                 max_size=6).map("".join)
prompts = st.one_of(texts, texts, texts, st.binary(max_size=10), st.none(), st.integers(), st.floats())


def _valid(text) -> bool:
    if not isinstance(text, str):
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@fuzz(200)
@given(text=prompts, system=st.one_of(st.none(), texts, st.binary(max_size=4)),
       counts=st.lists(st.integers(1, 40), max_size=3))
def test_fuzz_chat_prompt_ids(text, system, counts):
    """Any text, system prompt and image count: the GLM layout with the specials only where the template puts them, or
    an InputError exactly when the text is not a str of valid Unicode."""
    expect_error = not _valid(text) or (system is not None and not _valid(system))
    try:
        ids = CHAT.prompt_ids(text, counts, system=system)
    except InputError as e:
        assert expect_error, e
        assert "\n" not in str(e)
        return
    assert not expect_error
    assert all(isinstance(i, int) and 0 <= i < 256 for i in ids)
    assert ids[:2] == [SP["[gMASK]"], SP["<sop>"]] and ids[-2] == SP["<|assistant|>"]
    for token, n in (("[gMASK]", 1), ("<sop>", 1), ("<|user|>", 1), ("<|assistant|>", 1),
                     ("<|system|>", int(system is not None)), ("<|image|>", sum(counts)),
                     ("<|begin_of_image|>", len(counts)), ("<|end_of_image|>", len(counts))):
        assert ids.count(SP[token]) == n, token
    for token in ("<think>", "</think>", "<|endoftext|>", "<|observation|>", "<eop>", "<|video|>"):
        assert SP[token] not in ids  # user text never becomes a special token


@fuzz(150)
@given(text=texts)
def test_fuzz_tokenization_round_trip(text):
    """Text in the tokenizer's alphabet (special-token strings included) decodes back to itself from plain ids."""
    text = "".join(ch for ch in text if ch in DEFAULT_CHARACTERS)
    ids = CHAT.encode_text(text)
    assert not set(ids) & set(SP.values())
    assert CHAT.decode(ids) == text


# ------------------------------------------------------------------------------------------------ manifest loader

@pytest.fixture(scope="module")
def engines(exported, tmp_path_factory):
    folder = tmp_path_factory.mktemp("manifest-fuzz") / "engines"
    shutil.copytree(exported("tiny-glm-ocr"), folder)
    return folder, json.loads((folder / MANIFEST_NAME).read_text())


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 2**40), st.floats(allow_nan=False), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)


@st.composite
def mutated(draw, raw: dict, under: tuple[str, ...] = ()):
    """1-3 random edits of ``raw``: delete a key / item, or replace a value with any JSON value, at any depth."""
    raw = copy_module.deepcopy(raw)
    for _ in range(draw(st.integers(1, 3))):
        node = raw
        if under:
            node = node[draw(st.sampled_from(under))]
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = draw(st.sampled_from(keys))
            child = node[key]
            if isinstance(child, (dict, list)) and child and draw(st.integers(0, 2)) > 0:
                node = child
                continue
            if draw(st.booleans()):
                del node[key]
            else:
                node[key] = draw(json_values)
            break
    return raw


@fuzz(200)
@given(data=st.data())
def test_fuzz_manifest_loader(engines, data):
    folder, raw = engines
    if data.draw(st.integers(0, 19)) == 0:
        text = data.draw(st.binary(max_size=80))
        (folder / MANIFEST_NAME).write_bytes(text)
    else:
        (folder / MANIFEST_NAME).write_text(json.dumps(data.draw(mutated(raw))))
    try:
        Manifest.load(folder)
    except ManifestError as e:
        assert str(e) and "\n" not in str(e)


@fuzz(80)
@given(data=st.data())
def test_fuzz_pipeline_from_a_mutated_manifest(engines, data):
    """Mutations of what the pipeline reads beyond the loader's schema (config, tokens, settings, graph interfaces):
    opening the folder succeeds or raises a GlmTrtError, never anything else."""
    from glmtrt.runtime.pipeline import Pipeline

    folder, raw = engines
    keys = ("config", "special_tokens", "eos_token_ids", "preprocessing", "generation", "embeddings", "graphs", "extra")
    (folder / MANIFEST_NAME).write_text(json.dumps(data.draw(mutated(raw, keys))))
    try:
        pipe = Pipeline.from_engines(folder, verify_hashes=False)
    except GlmTrtError as e:
        assert str(e) and "\n" not in str(e)
        return
    pipe.close()

