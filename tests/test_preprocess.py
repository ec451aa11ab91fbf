"""runtime/preprocess.py against transformers 5.23's processors (the test-only oracle), on identical inputs."""

from __future__ import annotations

import importlib
import math
import re
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch

from glmtrt.runtime import preprocess as pp

transformers = pytest.importorskip("transformers")
from transformers import Glm4vImageProcessorPil  # noqa: E402
from transformers.image_processing_backends import PilBackend  # noqa: E402
from transformers.image_utils import PILImageResampling, SizeDict  # noqa: E402
from transformers.image_utils import load_image as hf_load_image  # noqa: E402
# Whole modules via import_module: the package's lazy attribute gives a torchvision placeholder instead.
hf_glm4v_image = importlib.import_module("transformers.models.glm4v.image_processing_pil_glm4v")
hf_glm4v_video = importlib.import_module("transformers.models.glm4v.video_processing_glm4v")
hf_glm_image = importlib.import_module("transformers.models.glm_image.image_processing_pil_glm_image")
from transformers.models.glm4v.processing_glm4v import Glm4vProcessor  # noqa: E402
from transformers.models.glm_image.processing_glm_image import GlmImageProcessor  # noqa: E402
from transformers.video_utils import VideoMetadata  # noqa: E402

TOL = 1e-5


def _noise_image(height: int, width: int, seed: int, mode: str = "RGB") -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    # Smooth gradient plus noise, so that resampling actually mixes neighbours.
    yy, xx = np.mgrid[0:height, 0:width]
    base = (yy * 7 + xx * 3)[..., None] % 256
    pixels = (base + rng.integers(0, 64, (height, width, channels))) % 256
    array = pixels.astype(np.uint8)
    return PIL.Image.fromarray(array[..., 0] if channels == 1 else array, mode=mode)


def _hf_image_processor(config: pp.ImageProcessorConfig) -> Glm4vImageProcessorPil:
    return Glm4vImageProcessorPil(**config.to_dict())


def _assert_matches_hf(ours: pp.VisionInputs, theirs) -> None:
    ref_pixels = np.asarray(theirs["pixel_values"])
    ref_grid = np.asarray(theirs["image_grid_thw"])
    assert ours.pixel_values.dtype == np.float32 and ours.grid_thw.dtype == np.int64
    assert ours.pixel_values.shape == ref_pixels.shape
    np.testing.assert_array_equal(ours.grid_thw, ref_grid)
    assert np.abs(ours.pixel_values - ref_pixels).max() <= TOL


# --------------------------------------------------------------------------------------------- smart_resize


def test_smart_resize_matches_transformers_over_many_sizes():
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 4000, size=(400, 2))]
    sizes += [(28, 28), (27, 28), (1, 28), (14, 14), (42, 42), (70, 98), (30, 3000), (3000, 30), (5, 999)]
    budgets = [(112 * 112, 28 * 28 * 15000), (12544, 9633792), (28 * 28, 28 * 28 * 8), (56 * 56, 28 * 28 * 1280)]
    checked = 0
    for (h, w) in sizes:
        for min_pixels, max_pixels in budgets:
            for num_frames in (2, 3, 4, 5, 16):
                try:
                    expected = hf_glm4v_image.smart_resize(
                        num_frames, h, w, temporal_factor=2, factor=28, min_pixels=min_pixels, max_pixels=max_pixels
                    )
                except ValueError:
                    with pytest.raises(ValueError):
                        pp.smart_resize(h, w, 28, min_pixels, max_pixels, num_frames=num_frames)
                    continue
                assert pp.smart_resize(h, w, 28, min_pixels, max_pixels, num_frames=num_frames) == expected
                checked += 1
    assert checked > 5000


def test_smart_resize_rejects_extreme_aspect_ratio_and_too_few_frames():
    with pytest.raises(ValueError, match="aspect ratio"):
        pp.smart_resize(10, 2500)  # upscaled to 28 x 7000: ratio 250
    with pytest.raises(ValueError, match="aspect ratio"):
        pp.smart_resize(100, 20101)
    with pytest.raises(ValueError):  # transformers agrees both are errors
        hf_glm4v_image.smart_resize(2, 100, 20101)
    with pytest.raises(ValueError, match="frames"):
        pp.smart_resize(100, 100, num_frames=1)
    with pytest.raises(ValueError, match="positive"):
        pp.smart_resize(0, 100)


# ------------------------------------------------------------------------------------------------- images

IMAGE_SIZES = [
    (1, 1), (5, 7), (20, 30), (27, 27), (28, 28), (29, 57), (13, 200), (30, 3000), (3000, 30),
    (101, 77), (111, 113), (224, 224), (333, 517), (480, 640), (640, 480), (57, 1001), (768, 1024),
    (250, 31), (199, 1), (1, 150), (143, 857),
]


@pytest.mark.parametrize("height,width", IMAGE_SIZES)
def test_image_patches_match_transformers(height, width):
    config = pp.ImageProcessorConfig()
    image = _noise_image(height, width, seed=height * 10007 + width)
    ours = pp.preprocess_images([image], config)
    theirs = _hf_image_processor(config)(images=[image], return_tensors="np")
    _assert_matches_hf(ours, theirs)
    hf_patches = _hf_image_processor(config).get_number_of_image_patches(height, width)
    assert pp.num_image_tokens(ours.grid_thw[0], config.merge_size) == hf_patches // config.merge_size**2


def test_image_near_small_max_pixels_budget():
    # Budget of 8 merged tokens (2 frames): images are pulled down to it, and one just under it is kept.
    config = pp.ImageProcessorConfig(min_pixels=28 * 28, max_pixels=2 * 28 * 28 * 8)
    processor = _hf_image_processor(config)
    for height, width in [(300, 400), (112, 56), (113, 57), (84, 84), (29, 400), (141, 141)]:
        image = _noise_image(height, width, seed=height + width)
        ours = pp.preprocess_images([image], config)
        _assert_matches_hf(ours, processor(images=[image], return_tensors="np"))
        t, h, w = ours.grid_thw[0]
        assert 2 * h * w * 14 * 14 <= config.max_pixels or min(h, w) == 2


def test_batch_of_mixed_inputs_matches_transformers():
    config = pp.ImageProcessorConfig(min_pixels=56 * 56, max_pixels=28 * 28 * 600)
    rng = np.random.default_rng(3)
    images = [
        _noise_image(120, 90, 1),
        rng.integers(0, 256, (64, 200, 3), dtype=np.uint8),
        _noise_image(33, 47, 2, mode="RGBA"),
        _noise_image(77, 66, 4, mode="L"),
    ]
    ours = pp.preprocess_images(images, config)
    _assert_matches_hf(ours, _hf_image_processor(config)(images=images, return_tensors="np"))
    assert ours.grid_thw.shape == (4, 3)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P_transparent", "RGB_trns"])
def test_non_rgb_pil_modes_match_transformers(mode):
    if mode == "P_transparent":
        image = _noise_image(90, 61, 5).quantize(colors=16)
        image.info["transparency"] = 3
    elif mode == "RGB_trns":
        image = _noise_image(61, 90, 6)
        image.info["transparency"] = tuple(int(v) for v in np.asarray(image)[0, 0])
    else:
        image = _noise_image(90, 61, 7, mode=mode)
    config = pp.ImageProcessorConfig()
    ours = pp.preprocess_images([image], config)
    _assert_matches_hf(ours, _hf_image_processor(config)(images=[image], return_tensors="np"))


def test_rgba_and_gray_arrays_match_transformers():
    rng = np.random.default_rng(11)
    config = pp.ImageProcessorConfig()
    processor = _hf_image_processor(config)
    rgba = rng.integers(0, 256, (70, 45, 4), dtype=np.uint8)
    rgba[..., 3] = rng.choice([0, 1, 127, 128, 254, 255], size=(70, 45))  # blends that round at .5
    gray = rng.integers(0, 256, (45, 70, 1), dtype=np.uint8)
    for array in (rgba, gray):
        _assert_matches_hf(pp.preprocess_images([array], config), processor(images=[array], return_tensors="np"))
    # transformers refuses 2-D arrays; ours treats them as (H, W, 1) grayscale.
    two_d = pp.preprocess_images([gray[..., 0]], config)
    _assert_matches_hf(two_d, processor(images=[gray], return_tensors="np"))


def test_load_image_from_path_matches_transformers(tmp_path):
    rgba = _noise_image(40, 64, 8, mode="RGBA")
    png = tmp_path / "rgba.png"
    rgba.save(png)
    # A JPEG with EXIF orientation 6 (rotate 90): both loaders must hand back the upright image.
    jpeg = tmp_path / "rotated.jpg"
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    _noise_image(30, 50, 9).save(jpeg, exif=exif)
    for path in (png, jpeg):
        ours = pp.load_image(str(path))
        theirs = hf_load_image(str(path))
        assert ours.mode == "RGB" and ours.size == theirs.size
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    assert pp.load_image(jpeg).size == (30, 50)  # PathLike accepted; rotated upright
    config = pp.ImageProcessorConfig()
    ours = pp.preprocess_images([str(png), jpeg], config)
    theirs = _hf_image_processor(config)(images=[hf_load_image(str(png)), hf_load_image(str(jpeg))], return_tensors="np")
    _assert_matches_hf(ours, theirs)


def test_user_mistakes_raise_value_error(tmp_path):
    config = pp.ImageProcessorConfig()
    with pytest.raises(ValueError, match="not found"):
        pp.load_image(tmp_path / "missing.png")
    (tmp_path / "not_an_image.png").write_text("hello")
    with pytest.raises(ValueError, match="cannot read"):
        pp.load_image(tmp_path / "not_an_image.png")
    with pytest.raises(ValueError, match="uint8"):
        pp.preprocess_images([np.zeros((30, 30, 3), np.float32)], config)
    with pytest.raises(ValueError, match="channels-last"):
        pp.preprocess_images([np.zeros((3, 30, 30), np.uint8)], config)
    with pytest.raises(ValueError, match="at least one image"):
        pp.preprocess_images([], config)
    with pytest.raises(ValueError, match="aspect ratio"):
        pp.preprocess_images([np.zeros((10, 2500, 3), np.uint8)], config)
    with pytest.raises(ValueError, match="min_pixels"):
        pp.ImageProcessorConfig(min_pixels=100, max_pixels=10)


# ------------------------------------------------------------------------------------------------- config


def test_config_dict_round_trip_and_transformers_acceptance():
    config = pp.ImageProcessorConfig(
        patch_size=14, merge_size=2, min_pixels=12544, max_pixels=9633792,
        image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.25, 0.3), rescale_factor=1 / 255,
    )
    assert pp.ImageProcessorConfig.from_dict(config.to_dict()) == config
    processor = Glm4vImageProcessorPil(**config.to_dict())
    # What transformers writes for that processor reads back to the same config.
    assert pp.ImageProcessorConfig.from_dict(processor.to_dict()) == config
    image = _noise_image(200, 300, 12)
    _assert_matches_hf(pp.preprocess_images([image], config), processor(images=[image], return_tensors="np"))
    # Default transformers processor <-> default config.
    assert pp.ImageProcessorConfig.from_dict(Glm4vImageProcessorPil().to_dict()) == pp.ImageProcessorConfig()


def test_config_from_checkpoint_style_dicts():
    glm_ocr = {  # GLM-OCR's preprocessor_config.json shape
        "size": {"shortest_edge": 12544, "longest_edge": 9633792},
        "do_rescale": True, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": list(pp.OPENAI_CLIP_MEAN), "image_std": list(pp.OPENAI_CLIP_STD),
        "image_processor_type": "Glm46VImageProcessor", "processor_class": "Glm46VProcessor",
    }
    config = pp.ImageProcessorConfig.from_dict(glm_ocr)
    assert (config.min_pixels, config.max_pixels) == (12544, 9633792)
    legacy = pp.ImageProcessorConfig.from_dict({"min_pixels": 3136, "max_pixels": 1003520, "patch_size": 16})
    assert (legacy.min_pixels, legacy.max_pixels, legacy.patch_size) == (3136, 1003520, 16)
    for bad in ({"do_normalize": False}, {"resample": 2}, {"size": {"height": 224, "width": 224}}):
        with pytest.raises(ValueError):
            pp.ImageProcessorConfig.from_dict(bad)


# -------------------------------------------------------------------------------------------------- video


@pytest.mark.parametrize(
    "total_frames,video_fps,duration",
    [(1, 30.0, None), (2, 30.0, None), (7, 2.0, None), (48, 24.0, None), (100, 29.97, None), (300, 25.0, 12.0),
     (301, 1.0, None), (9000, 30.0, None), (20000, 30.0, 666.7), (50, 0.5, None), (601, 2.0, 300.5), (31, 3.0, None)],
)
@pytest.mark.parametrize("fps", [2.0, 1.0, 3.0])
def test_frame_sampling_matches_transformers(total_frames, video_fps, duration, fps):
    processor = hf_glm4v_video.Glm4vVideoProcessor()
    metadata = VideoMetadata(total_num_frames=total_frames, fps=video_fps, duration=duration)
    expected = processor.sample_frames(metadata, fps=fps)
    ours = pp.sample_video_frame_indices(total_frames, video_fps, fps=fps, duration=duration)
    assert ours.dtype == np.int64 and len(ours) % 2 == 0
    np.testing.assert_array_equal(ours, expected)


def _hf_video_equivalent(frames: list[PIL.Image.Image], config: pp.ImageProcessorConfig):
    """transformers' video path without torchvision: the video smart_resize (real frame count), the image
    processor's PIL resize/rescale/normalize per frame (the video processor's resize/normalize need
    torchvision, which is not installed), then Glm4vVideoProcessor.patchify itself (pads odd frame counts)."""
    image_processor = _hf_image_processor(config)
    height, width = frames[0].height, frames[0].width
    target_h, target_w = hf_glm4v_video.smart_resize(
        len(frames), height, width, temporal_factor=config.temporal_patch_size, factor=config.factor,
        min_pixels=config.min_pixels, max_pixels=config.max_pixels,
    )
    size = SizeDict(height=target_h, width=target_w)
    processed = []
    for frame in frames:
        chw = np.moveaxis(np.asarray(frame.convert("RGB")), -1, 0)
        # The generic PIL resize to an explicit size (Glm4vImageProcessorPil.resize would re-run smart_resize
        # with the image frame count).
        chw = PilBackend.resize(image_processor, chw, size=size, resample=PILImageResampling.BICUBIC)
        chw = image_processor.normalize(image_processor.rescale(chw, config.rescale_factor), config.image_mean, config.image_std)
        processed.append(chw)
    videos = torch.from_numpy(np.stack(processed))[None]
    patches, gt, gh, gw = hf_glm4v_video.Glm4vVideoProcessor.patchify(
        None, videos, patch_size=config.patch_size, merge_size=config.merge_size,
        temporal_patch_size=config.temporal_patch_size,
    )
    return patches[0].numpy(), np.array([[gt, gh, gw]])


@pytest.mark.parametrize("num_frames,height,width", [(4, 90, 130), (3, 64, 64), (5, 200, 120), (2, 28, 300)])
def test_video_patches_match_transformers_equivalent_path(num_frames, height, width):
    config = pp.ImageProcessorConfig(max_pixels=pp.VIDEO_MAX_PIXELS)
    frames = [_noise_image(height, width, seed=100 + i) for i in range(num_frames)]
    ours, timestamps = pp.preprocess_video(frames, config, fps=2.0)
    ref_pixels, ref_grid = _hf_video_equivalent(frames, config)
    np.testing.assert_array_equal(ours.grid_thw, ref_grid)
    assert ours.pixel_values.shape == ref_pixels.shape
    assert np.abs(ours.pixel_values - ref_pixels).max() <= TOL
    assert len(timestamps) == ours.grid_thw[0, 0] == math.ceil(num_frames / 2)


def test_video_budget_counts_real_frames():
    # 16 frames share the budget: the frames come out smaller than one still image would.
    config = pp.ImageProcessorConfig(min_pixels=28 * 28, max_pixels=28 * 28 * 64)
    frames = np.stack([np.asarray(_noise_image(280, 420, seed=i)) for i in range(16)])
    ours, _ = pp.preprocess_video(frames, config)
    ref_pixels, ref_grid = _hf_video_equivalent([PIL.Image.fromarray(f) for f in frames], config)
    np.testing.assert_array_equal(ours.grid_thw, ref_grid)
    assert np.abs(ours.pixel_values - ref_pixels).max() <= TOL
    still = pp.preprocess_images([frames[0]], config)
    assert ours.grid_thw[0, 1] * ours.grid_thw[0, 2] < still.grid_thw[0, 1] * still.grid_thw[0, 2]


@pytest.mark.parametrize("num_frames,frame_fps", [(4, 2.0), (6, 0.5), (3, 1.0), (8, 0.25)])
def test_video_timestamps_match_glm4v_processor_prompt(num_frames, frame_fps):
    # The processor writes int(timestamp) after each frame's <|end_of_image|>, taking metadata.timestamps[::2].
    config = pp.ImageProcessorConfig()
    frames = [_noise_image(56, 56, seed=i) for i in range(num_frames)]
    inputs, timestamps = pp.preprocess_video(frames, config, fps=frame_fps)
    fake = SimpleNamespace(video_processor=SimpleNamespace(merge_size=2), image_token="<|image|>")
    fake.replace_frame_token_id = lambda ts, num_image_tokens=1: Glm4vProcessor.replace_frame_token_id(fake, ts, num_image_tokens)
    metadata = VideoMetadata(total_num_frames=num_frames, fps=frame_fps, frames_indices=list(range(num_frames)))
    prompt = Glm4vProcessor.replace_video_token(
        fake, {"video_grid_thw": torch.tensor(inputs.grid_thw), "video_metadata": [metadata]}, 0
    )
    assert [int(t) for t in timestamps] == [int(s) for s in re.findall(r"<\|end_of_image\|>(\d+)", prompt)]
    per_frame_tokens = pp.num_image_tokens(inputs.grid_thw[0], 2) // inputs.grid_thw[0, 0]
    assert prompt.count("<|image|>") == per_frame_tokens * inputs.grid_thw[0, 0]
    # Explicit timestamps are taken every second frame.
    explicit = [0.25 * i + 1.0 for i in range(num_frames)]
    assert pp.preprocess_video(frames, config, timestamps=explicit)[1] == explicit[::2]


def test_video_mistakes_raise_value_error():
    config = pp.ImageProcessorConfig()
    with pytest.raises(ValueError, match="at least 2 frames"):
        pp.preprocess_video([_noise_image(56, 56, 0)], config)
    with pytest.raises(ValueError, match="same size"):
        pp.preprocess_video([_noise_image(56, 56, 0), _noise_image(56, 84, 1)], config)
    with pytest.raises(ValueError, match="timestamps"):
        pp.preprocess_video([_noise_image(56, 56, 0)] * 2, config, timestamps=[0.0])
    with pytest.raises(ValueError, match="video_fps"):
        pp.sample_video_frame_indices(10, 0.0)


# ---------------------------------------------------------------------------------------------- GLM-Image


def test_glm_image_smart_resize_matches_transformers():
    rng = np.random.default_rng(5)
    sizes = [(int(h), int(w)) for h, w in rng.integers(8, 4000, size=(500, 2))]
    sizes += [(1024, 768), (16, 16), (15, 40), (100, 401), (4096, 1024)]
    checked = 0
    for h, w in sizes:
        for min_pixels, max_pixels in [(56 * 56, 28 * 28 * 1280), (512 * 512, 2048 * 2048), (32 * 32, 256 * 256)]:
            try:
                expected = hf_glm_image.smart_resize(h, w, 16, min_pixels, max_pixels)
            except ValueError:
                with pytest.raises(ValueError):
                    pp.glm_image_smart_resize(h, w, 16, min_pixels, max_pixels)
                continue
            assert pp.glm_image_smart_resize(h, w, 16, min_pixels, max_pixels) == expected
            checked += 1
    assert checked > 300


@pytest.mark.parametrize("height,width", [(1024, 768), (64, 64), (300, 900), (517, 333), (2000, 1500), (48, 170)])
def test_glm_image_sources_match_transformers(height, width):
    config = pp.GLM_IMAGE_SOURCE_CONFIG
    processor = hf_glm_image.GlmImageImageProcessorPil(**config.to_dict())
    image = _noise_image(height, width, seed=height ^ width)
    ours = pp.preprocess_glm_image_sources([image], config)
    _assert_matches_hf(ours, processor(images=[image], return_tensors="np"))
    assert ours.pixel_values.shape[1] == 768
    assert pp.num_image_tokens(ours.grid_thw[0], 1) == processor.get_number_of_image_patches(height, width)


def test_glm_image_sources_default_processor_settings():
    # The transformers class with the tower's patch/temporal/merge and its own default pixel budgets.
    processor = hf_glm_image.GlmImageImageProcessorPil(patch_size=16, temporal_patch_size=1, merge_size=1)
    assert pp.ImageProcessorConfig.from_dict(processor.to_dict()) == pp.GLM_IMAGE_SOURCE_CONFIG
    images = [_noise_image(400, 300, 1), _noise_image(128, 200, 2, mode="RGBA")]
    _assert_matches_hf(pp.preprocess_glm_image_sources(images), processor(images=images, return_tensors="np"))


@pytest.mark.parametrize(
    "height,width", [(1152, 768), (1024, 1024), (768, 1344), (2048, 512), (33, 95), (1000, 999), (512, 2048), (64, 4096)]
)
def test_glm_image_target_grids_match_processor(height, width):
    token_h, token_w, prev_h, prev_w = GlmImageProcessor._get_target_shape(None, height=height, width=width)
    assert pp.glm_image_target_grids(height, width) == ((token_h, token_w), (prev_h, prev_w))


def test_glm_image_target_grid_documented_example_and_errors():
    assert pp.glm_image_target_grids(1152, 768) == ((36, 24), (19, 13))
    with pytest.raises(ValueError, match="at least 32x32"):
        pp.glm_image_target_grids(16, 768)
    with pytest.raises(ValueError, match="aspect ratio"):
        pp.glm_image_smart_resize(100, 500)
    with pytest.raises(ValueError, match=">= 16"):
        pp.glm_image_smart_resize(15, 40)


def test_runtime_modules_do_not_import_torch_or_transformers():
    import ast
    import pathlib

    for module in (pp, pytest.importorskip("glmtrt.runtime.positions")):
        tree = ast.parse(pathlib.Path(module.__file__).read_text())
        imported = {
            (alias.name if isinstance(node, ast.Import) else node.module or "").split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in (node.names if isinstance(node, ast.Import) else [node])
        }
        assert not imported & {"torch", "transformers", "torchvision"}, (module.__name__, imported)
