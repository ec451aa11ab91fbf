"""Image and video preprocessing for the GLM vision-language family (numpy + pillow only).

Reproduces transformers 5.23's PIL-backend processors bit for bit:

* ``Glm4vImageProcessorPil`` (GLM-4.1V, GLM-4.5V, GLM-OCR, GLM-4.6V): smart resize to a multiple of
  ``patch_size * merge_size``, PIL bicubic resize, rescale, normalize, then patchify into rows laid out
  ``(C, T, py, px)`` in merge-block order, with a still image duplicated over the temporal patch.
* ``Glm4vVideoProcessor`` (frame sampling and patchify; its resize is torchvision-only in transformers,
  here it is the same PIL bicubic resize as for images).
* ``GlmImageImageProcessorPil`` (GLM-Image source images) and ``GlmImageProcessor``'s target grids.

This module never imports torch or transformers.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import PIL.ImageOps

from .errors import InputError

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "VIDEO_MAX_PIXELS",
    "GLM_IMAGE_SOURCE_CONFIG",
    "ImageProcessorConfig",
    "VisionInputs",
    "smart_resize",
    "load_image",
    "preprocess_images",
    "num_image_tokens",
    "preprocess_video",
    "sample_video_frame_indices",
    "load_video",
    "read_video_file",
    "glm_image_smart_resize",
    "glm_image_target_grids",
    "preprocess_glm_image_sources",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Glm4vVideoProcessor's default size["longest_edge"] (the image processor's is 28*28*15000) and shortest_edge.
VIDEO_MAX_PIXELS = 28 * 28 * 2 * 30000
VIDEO_MIN_PIXELS = 112 * 112
# Glm4vVideoProcessor's sampling: frames per second taken from a video file, and the longest stretch sampled at it.
VIDEO_FPS = 2.0
VIDEO_MAX_DURATION = 300.0

# PIL's enum value for bicubic, as written in preprocessor_config.json ("resample": 3).
_PIL_BICUBIC = 3


@dataclass(frozen=True)
class ImageProcessorConfig:
    """Settings of the GLM-4V style image processor (also used, with other values, for GLM-Image).

    ``min_pixels`` / ``max_pixels`` are HF's ``size["shortest_edge"]`` / ``size["longest_edge"]``: pixel
    budgets, not edge lengths.
    """

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 112 * 112
    max_pixels: int = 28 * 28 * 15000
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255

    def __post_init__(self):
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"ImageProcessorConfig.{name} must be a positive integer, got {value!r}.")
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"ImageProcessorConfig.min_pixels ({self.min_pixels}) is larger than max_pixels ({self.max_pixels}); "
                "swap them or fix the preprocessor config."
            )
        for name in ("image_mean", "image_std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"ImageProcessorConfig.{name} needs 3 values (R, G, B), got {len(value)}.")
            object.__setattr__(self, name, value)
        if any(s == 0 for s in self.image_std):
            raise ValueError("ImageProcessorConfig.image_std has a zero entry; every channel std must be non-zero.")

    @property
    def factor(self) -> int:
        """Resize granularity in pixels: ``patch_size * merge_size``."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Width of one pixel_values row: ``3 * temporal_patch_size * patch_size**2``."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    @classmethod
    def from_dict(cls, d: dict) -> ImageProcessorConfig:
        """Read an HF ``preprocessor_config.json`` dict.

        Pixel budgets come from ``size.shortest_edge`` / ``size.longest_edge``, or from the legacy top-level
        ``min_pixels`` / ``max_pixels`` keys (which win, as in GlmImageImageProcessor's constructor). Unknown
        keys are ignored. Settings this runtime cannot reproduce (no resize, no rescale, no normalize, no RGB
        conversion, a resample filter other than bicubic) raise ``ValueError``.
        """
        if not isinstance(d, dict):
            raise ValueError(f"ImageProcessorConfig.from_dict needs a dict, got {type(d).__name__}.")
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if d.get(flag, True) is False:
                raise ValueError(f"preprocessor config sets {flag}=false, which this runtime does not support.")
        if d.get("resample", _PIL_BICUBIC) not in (_PIL_BICUBIC, None):
            raise ValueError(
                f"preprocessor config sets resample={d['resample']!r}; only bicubic (3) is supported."
            )
        kwargs = {}
        size = d.get("size") or {}
        if not isinstance(size, dict):
            raise ValueError(f"preprocessor config 'size' must be a dict, got {size!r}.")
        if "shortest_edge" in size:
            kwargs["min_pixels"] = int(size["shortest_edge"])
        if "longest_edge" in size:
            kwargs["max_pixels"] = int(size["longest_edge"])
        for legacy, key in (("min_pixels", "min_pixels"), ("max_pixels", "max_pixels")):
            if d.get(legacy) is not None:
                kwargs[key] = int(d[legacy])
        if size and not ("min_pixels" in kwargs and "max_pixels" in kwargs):
            raise ValueError(
                f"preprocessor config 'size' {size} lacks 'shortest_edge'/'longest_edge' (pixel budgets); add both."
            )
        for key in ("patch_size", "temporal_patch_size", "merge_size"):
            if d.get(key) is not None:
                kwargs[key] = int(d[key])
        for key in ("image_mean", "image_std"):
            if d.get(key) is not None:
                value = d[key]
                kwargs[key] = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3))
        if d.get("rescale_factor") is not None:
            kwargs["rescale_factor"] = float(d["rescale_factor"])
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """An HF-style ``preprocessor_config.json`` dict (read back by ``from_dict``; accepted by transformers)."""
        return {
            "do_resize": True,
            "resample": _PIL_BICUBIC,
            "size": {"shortest_edge": int(self.min_pixels), "longest_edge": int(self.max_pixels)},
            "do_rescale": True,
            "rescale_factor": float(self.rescale_factor),
            "do_normalize": True,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": True,
            "patch_size": int(self.patch_size),
            "temporal_patch_size": int(self.temporal_patch_size),
            "merge_size": int(self.merge_size),
        }


# GLM-Image source images: the Conv2d(16x16) tower wants patch 16, no temporal axis and no merge, so rows
# of 3*16*16 = 768. Pixel budgets are GlmImageImageProcessor's class defaults.
GLM_IMAGE_SOURCE_CONFIG = ImageProcessorConfig(
    patch_size=16, temporal_patch_size=1, merge_size=1, min_pixels=56 * 56, max_pixels=28 * 28 * 1280
)


@dataclass
class VisionInputs:
    """Patches and grids for the vision tower.

    pixel_values: float32 (N, C*T*P*P); each row is one patch laid out (C, T, py, px); rows of one image are
        in merge-block order (block_row, block_col, in_row, in_col); images are concatenated.
    grid_thw: int64 (num_images_or_videos, 3) = (t, h, w) in patch units, N = sum(t*h*w).
    """

    pixel_values: np.ndarray
    grid_thw: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=np.int64))

    @property
    def num_patches(self) -> int:
        return int(self.pixel_values.shape[0])


def _check_positive_size(height, width) -> tuple[int, int]:
    if isinstance(height, bool) or isinstance(width, bool):
        raise InputError(f"image height/width must be positive integers, got {height!r} x {width!r}.")
    try:
        h, w = int(height), int(width)
    except (TypeError, ValueError):
        raise InputError(f"image height/width must be positive integers, got {height!r} x {width!r}.") from None
    if h != height or w != width or h < 1 or w < 1:
        raise InputError(f"image height/width must be positive integers, got {height!r} x {width!r}.")
    return h, w


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 112 * 112,
    max_pixels: int = 28 * 28 * 15000,
    num_frames: int = 2,
    temporal_factor: int = 2,
) -> tuple[int, int]:
    """Target (height, width) in pixels, multiples of ``factor``, as transformers' glm4v ``smart_resize``.

    Sides under ``factor`` are first scaled up (int truncation) so the shorter one is ``factor``; then each side
    is rounded to a multiple of ``factor`` with Python's banker's rounding; the pixel budget counts the
    ``num_frames`` (rounded to a multiple of ``temporal_factor``), so a still image (2 frames) gets half of
    ``max_pixels``. Defaults are Glm4vImageProcessor's size (the transformers function's own max default,
    14*14*2*2*2*6144, is never used by the processor).

    Raises InputError (a ValueError) for an aspect ratio above 200 and for fewer frames than ``temporal_factor``.
    """
    height, width = _check_positive_size(height, width)
    if num_frames < temporal_factor:
        raise InputError(
            f"a clip needs at least temporal_factor={temporal_factor} frames, got {num_frames}; repeat the frame."
        )
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height = int(height * scale)
        width = int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise InputError(
            f"image aspect ratio {max(height, width) / min(height, width):.1f} is above 200; crop or pad the image."
        )
    # Python round() on floats: banker's rounding, exactly as transformers.
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _pil_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """RGB conversion of transformers' image processors: transparency is composited onto white. An RGB image
    without transparency is returned as is (no full-size copy; nothing downstream writes into it)."""
    try:
        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        if has_alpha:
            rgba = image.convert("RGBA")
            background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(background, rgba).convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")
    except MemoryError:
        raise
    except Exception as e:  # PIL: ValueError (no conversion for this mode), OSError (a lazily loaded, broken file)
        raise InputError(f"cannot convert a PIL image of mode {image.mode!r} and size {image.size} to RGB "
                         f"({type(e).__name__}: {e}); convert it to RGB first.") from None


# warnings.catch_warnings swaps process-wide state: one thread at a time (it spans only the header parse).
_OPEN_LOCK = threading.Lock()


def _open_guarded(fp, path: str) -> PIL.Image.Image:
    """``PIL.Image.open`` with PIL's decompression-bomb guard turned into an InputError: an image of more than
    ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (PIL warns above it and refuses above twice it) is refused before
    anything is decoded. Only the header is read here."""
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
        try:
            return PIL.Image.open(fp)
        except (PIL.Image.DecompressionBombWarning, PIL.Image.DecompressionBombError) as e:
            raise InputError(f"image {path!r} is too large to decode safely ({str(e).rstrip('.')}; the limit is "
                             f"PIL.Image.MAX_IMAGE_PIXELS = {PIL.Image.MAX_IMAGE_PIXELS}); downscale it first.") \
                from None


def load_image(path_or_image) -> PIL.Image.Image:
    """Open an image file (str / os.PathLike) or take a ``PIL.Image.Image``, and return an RGB ``PIL.Image.Image``.

    A path is opened as transformers' ``image_utils.load_image`` does (EXIF orientation applied, then
    ``convert("RGB")``, which drops alpha), which is what the HF processor sees when a chat message names an
    image by path; an animated image (GIF, APNG, WebP) gives its first frame, as there. An Image object is
    converted as the image processor does (alpha composited onto white).

    Raises InputError for a missing, empty, unreadable or truncated file, and for a file of more than
    ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (PIL's decompression-bomb guard; checked before decoding). A file
    within that guard is decoded once, without further full-size copies.
    """
    if isinstance(path_or_image, PIL.Image.Image):
        return _pil_to_rgb(path_or_image)
    if isinstance(path_or_image, (str, os.PathLike)):
        path = os.fspath(path_or_image)
        if not os.path.isfile(path):
            raise InputError(f"image file not found: {path!r}; pass an existing file path or a PIL image.")
        try:
            with open(path, "rb") as fp:
                image = _open_guarded(fp, path)
                image.load()
                PIL.ImageOps.exif_transpose(image, in_place=True)
                return image if image.mode == "RGB" else image.convert("RGB")
        except (InputError, MemoryError):
            raise
        except PIL.UnidentifiedImageError:
            raise InputError(f"cannot read {path!r} as an image; pass a PNG/JPEG/... file or a PIL image.") from None
        except Exception as e:  # a truncated or corrupt file: OSError, SyntaxError, ValueError, zlib/struct errors
            raise InputError(f"cannot decode {path!r} ({type(e).__name__}: {e}); the file is truncated or damaged: "
                             "pass a complete image file.") from None
    raise InputError(
        f"expected an image path or a PIL.Image.Image, got {type(path_or_image).__name__}; "
        "arrays go to preprocess_images directly."
    )


def _array_to_rgb(array: np.ndarray) -> PIL.Image.Image:
    """Channels-last uint8 array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> RGB image, as transformers converts it."""
    if array.dtype != np.uint8:
        raise InputError(
            f"image arrays must be uint8 (0..255), got {array.dtype}; convert with (x * 255).round().astype(np.uint8)."
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise InputError(
            f"image arrays must be channels-last (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {array.shape}; "
            "for channels-first use np.moveaxis(a, 0, -1)."
        )
    channels = array.shape[-1]
    if channels == 1:
        array = np.repeat(array, 3, axis=-1)
    elif channels == 4:
        # transformers' numpy path: float64 blend onto white, rounded (half to even) back to uint8.
        alpha = array[..., 3:4] / 255
        composite = alpha * array[..., :3] + (1 - alpha) * 255
        array = np.round(composite).astype(np.uint8)
    return PIL.Image.fromarray(np.ascontiguousarray(array), mode="RGB")


def _as_rgb_image(image) -> PIL.Image.Image:
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    if isinstance(image, PIL.Image.Image):
        return _pil_to_rgb(image)
    # A path: transformers' load_image, then its processor's RGB conversion, which composites a transparency
    # colour that ``convert("RGB")`` kept in ``info`` (palette and tRNS PNGs, GIFs) onto white.
    return _pil_to_rgb(load_image(image))


def _normalize(rgb_uint8_hwc: np.ndarray, config: ImageProcessorConfig) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, H, W): rescale in float64 then cast, normalize in float32 (transformers' order).

    The float64 step runs in bands of rows and the rest in place, so a big image needs no full-size float64 copy
    (the values are those of the one-shot expression, bit for bit)."""
    height = rgb_uint8_hwc.shape[0]
    scaled = np.empty(rgb_uint8_hwc.shape, dtype=np.float32)
    band = max(1, (1 << 21) // max(1, rgb_uint8_hwc[:1].size))  # about 2M values (16 MB of float64) at a time
    for top in range(0, height, band):
        scaled[top:top + band] = rgb_uint8_hwc[top:top + band].astype(np.float64) * config.rescale_factor
    scaled -= np.asarray(config.image_mean, dtype=np.float32)
    scaled /= np.asarray(config.image_std, dtype=np.float32)
    return np.ascontiguousarray(scaled.transpose(2, 0, 1))


def _resize_normalize(image: PIL.Image.Image, height: int, width: int, config: ImageProcessorConfig) -> np.ndarray:
    resized = image.resize((width, height), resample=PIL.Image.Resampling.BICUBIC)
    return _normalize(np.asarray(resized), config)


def _patchify_frames(frames_chw: np.ndarray, config: ImageProcessorConfig) -> tuple[np.ndarray, int, int, int]:
    """float32 (T, C, H, W) with T a multiple of temporal_patch_size -> (gt*gh*gw, C*Tp*P*P) rows, gt, gh, gw."""
    num_frames, channels, height, width = frames_chw.shape
    p, m, tp = config.patch_size, config.merge_size, config.temporal_patch_size
    gt, gh, gw = num_frames // tp, height // p, width // p
    patches = frames_chw.reshape(gt, tp, channels, gh // m, m, p, gw // m, m, p)
    # -> (gt, block_row, block_col, in_row, in_col, C, Tp, py, px): merge-block order, rows laid out (C, T, py, px).
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(patches).reshape(gt * gh * gw, channels * tp * p * p), gt, gh, gw


def _patchify_image(image_chw: np.ndarray, config: ImageProcessorConfig) -> tuple[np.ndarray, int, int]:
    # A still image is its own temporal partner: every temporal slot holds the same pixels.
    frames = np.broadcast_to(image_chw[None], (config.temporal_patch_size, *image_chw.shape))
    rows, _, gh, gw = _patchify_frames(frames, config)
    return rows, gh, gw


def _as_image_list(images) -> list:
    if isinstance(images, (PIL.Image.Image, str, os.PathLike)):
        return [images]
    if isinstance(images, np.ndarray):
        # One (H, W[, C]) image, or a stack (B, H, W, C).
        return list(images) if images.ndim == 4 else [images]
    if not isinstance(images, Sequence) or len(images) == 0:
        raise InputError("preprocess needs at least one image (PIL image, path or uint8 HxWx3 array).")
    return list(images)


def _preprocess_with(images, config: ImageProcessorConfig, resize_fn) -> VisionInputs:
    rows, grids = [], []
    for image in _as_image_list(images):
        rgb = _as_rgb_image(image)
        height, width = resize_fn(rgb.height, rgb.width)
        normalized = _resize_normalize(rgb, height, width, config)
        del rgb  # the decoded full-size image is not needed past the resize
        patches, gh, gw = _patchify_image(normalized, config)
        del normalized
        rows.append(patches)
        grids.append((1, gh, gw))
    return VisionInputs(
        pixel_values=(rows[0] if len(rows) == 1 else np.concatenate(rows, axis=0)).astype(np.float32, copy=False),
        grid_thw=np.asarray(grids, dtype=np.int64).reshape(-1, 3),
    )


def preprocess_images(images: Sequence, config: ImageProcessorConfig) -> VisionInputs:
    """Images -> patches, exactly as transformers' ``Glm4vImageProcessorPil``.

    images: a sequence of PIL images, paths, or channels-last uint8 arrays (H, W[, 1|3|4]) (a single one is
        accepted too). Each is converted to RGB, resized with PIL bicubic to ``smart_resize`` of its size,
        rescaled, normalized and patchified with its frame duplicated over the temporal patch.
    Returns VisionInputs: pixel_values float32 (sum h*w, 3*T*P*P); grid_thw int64 (num_images, 3) rows (1, h, w).
    """

    def resize_fn(height, width):
        return smart_resize(
            height,
            width,
            factor=config.factor,
            min_pixels=config.min_pixels,
            max_pixels=config.max_pixels,
            num_frames=config.temporal_patch_size,
            temporal_factor=config.temporal_patch_size,
        )

    return _preprocess_with(images, config, resize_fn)


def num_image_tokens(grid_thw_row, merge_size: int) -> int:
    """Number of LM placeholder tokens for one grid row (t, h, w): ``t*h*w // merge_size**2``."""
    t, h, w = (int(v) for v in np.asarray(grid_thw_row).reshape(3))
    return t * h * w // (merge_size * merge_size)


def preprocess_video(
    frames: Sequence,
    config: ImageProcessorConfig,
    timestamps: Sequence[float] | None = None,
    fps: float = 2.0,
) -> tuple[VisionInputs, list[float]]:
    """Already-sampled video frames -> patches, as transformers' ``Glm4vVideoProcessor`` (without its sampling).

    frames: a sequence of same-size frames (PIL images, paths or uint8 arrays) or a (T, H, W, C) uint8 array,
        at least ``temporal_patch_size`` of them. The size is ``smart_resize`` with ``num_frames=len(frames)``;
        an odd count is padded by repeating the last frame, as transformers does. Pass the video processor's
        pixel budgets in ``config`` (its max is ``VIDEO_MAX_PIXELS``, not the image processor's).
    timestamps: seconds of each frame (len(frames) values); default ``i / fps``.
    Returns (VisionInputs with pixel_values float32 (t*h*w, 3*T*P*P) and grid_thw int64 (1, 3) = (t, h, w) with
    t = ceil(len(frames) / temporal_patch_size), one timestamp per temporal patch: ``timestamps[::2]``, padded
    with its last value to t entries as the GLM-4V processor does).

    Note: transformers resizes videos with torchvision only; this uses the image processor's PIL bicubic.
    """
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4:
            raise InputError(f"a video array must be (T, H, W, C) uint8, got shape {frames.shape}.")
        frame_list = list(frames)
    elif isinstance(frames, Sequence) and not isinstance(frames, (str, bytes)):
        frame_list = list(frames)
    else:
        raise InputError(f"frames must be a list of frames or a (T, H, W, C) array, got {type(frames).__name__}.")
    tp = config.temporal_patch_size
    if len(frame_list) < tp:
        raise InputError(
            f"a video needs at least {tp} frames, got {len(frame_list)}; repeat the frame or use preprocess_images."
        )
    rgb_frames = [_as_rgb_image(f) for f in frame_list]
    sizes = {(f.height, f.width) for f in rgb_frames}
    if len(sizes) != 1:
        raise InputError(f"all video frames must have the same size, got {sorted(sizes)}; resize them first.")
    (height, width) = sizes.pop()
    num_frames = len(rgb_frames)
    if timestamps is None:
        if not fps > 0:
            raise InputError(f"fps must be positive, got {fps!r}.")
        timestamps = [i / fps for i in range(num_frames)]
    timestamps = [float(t) for t in timestamps]
    if len(timestamps) != num_frames:
        raise InputError(f"got {len(timestamps)} timestamps for {num_frames} frames; pass one per frame.")

    resized_h, resized_w = smart_resize(
        height,
        width,
        factor=config.factor,
        min_pixels=config.min_pixels,
        max_pixels=config.max_pixels,
        num_frames=num_frames,
        temporal_factor=tp,
    )
    stack = np.stack([_resize_normalize(f, resized_h, resized_w, config) for f in rgb_frames])
    if pad := -num_frames % tp:
        stack = np.concatenate([stack, np.repeat(stack[-1:], pad, axis=0)], axis=0)
    rows, gt, gh, gw = _patchify_frames(stack, config)

    per_patch = timestamps[::2]
    selected = per_patch[:gt]
    while len(selected) < gt:
        selected.append(selected[-1] if selected else 0.0)
    inputs = VisionInputs(pixel_values=rows.astype(np.float32, copy=False), grid_thw=np.array([[gt, gh, gw]], np.int64))
    return inputs, selected


def sample_video_frame_indices(
    total_frames: int,
    video_fps: float,
    fps: float = 2.0,
    max_duration: float = 300.0,
    duration: float | None = None,
) -> np.ndarray:
    """Frame indices to decode, as ``Glm4vVideoProcessor.sample_frames`` picks them.

    total_frames / video_fps: the decoded video's frame count and native frame rate. ``duration`` (seconds) is
    the container's value when known; otherwise ``round((total_frames - 1) / video_fps) + 1`` as transformers.
    Up to ``max_duration`` seconds: ``fps`` frames per second at ``ceil(i * video_fps / fps)``; longer videos:
    ``max_duration * fps`` frames spread evenly. Duplicates are dropped (first seen kept) and an odd count is
    padded by repeating the last index. Returns int64 (n,), n even and >= 2.
    """
    if isinstance(total_frames, bool) or int(total_frames) != total_frames or total_frames < 1:
        raise InputError(f"total_frames must be a positive integer, got {total_frames!r}.")
    if not video_fps or video_fps <= 0:
        raise InputError(f"video_fps must be positive (the video's native frame rate), got {video_fps!r}.")
    if not fps or fps <= 0:
        raise InputError(f"fps must be positive, got {fps!r}.")
    total_frames = int(total_frames)
    max_frame_idx = total_frames - 1
    duration = duration or round(max_frame_idx / video_fps) + 1
    if duration <= max_duration:
        n = max(int(math.floor(duration * fps)), 1)
        indices = [min(max_frame_idx, int(math.ceil(i * video_fps / fps))) for i in range(n)]
    else:
        num_samples = int(max_duration * fps)
        if num_samples >= total_frames:
            indices = list(range(total_frames))
        else:
            target_seconds = np.linspace(0, duration, num_samples, endpoint=True)
            indices = [min(max_frame_idx, int(math.ceil(t * video_fps))) for t in target_seconds]
    unique = list(dict.fromkeys(indices))
    if len(unique) % 2:
        unique.append(unique[-1])
    return np.asarray(unique, dtype=np.int64)


_GLOB_CHARS = set("*?[")


def load_video(video, fps: float = VIDEO_FPS, max_duration: float = VIDEO_MAX_DURATION) -> tuple[list, list[float] | None]:
    """A video as the runtime takes it -> (frames, timestamps in seconds or None).

    ``video`` is one of:

    * frames: a sequence of PIL images, uint8 (H, W, 3) arrays or image paths, or a (T, H, W, 3) uint8 array. They
      are the sampled frames themselves; timestamps None (``preprocess_video`` then counts ``fps`` frames a second,
      i.e. frames taken the way a video file is sampled);
    * a str / path with glob characters (``frames/*.png``): the matching files, sorted by name, as frames;
    * the path of a video file: decoded with PyAV (:func:`read_video_file`; an optional dependency, ``pip install
      av``) and sampled as transformers' ``Glm4vVideoProcessor`` does, with each frame's timestamp.

    Raises InputError (one line) for a missing file, a pattern that matches nothing, a folder, or an unreadable
    video. Frames themselves are checked by ``preprocess_video``.
    """
    if isinstance(video, (str, os.PathLike)):
        path = os.fspath(video)
        if os.path.isfile(path):
            return read_video_file(path, fps=fps, max_duration=max_duration)
        if _GLOB_CHARS & set(path):
            import glob

            files = sorted(f for f in glob.glob(path) if os.path.isfile(f))
            if not files:
                raise InputError(f"no frame files match {path!r}; pass a pattern like 'frames/*.png' or a video file.")
            return files, None
        if os.path.isdir(path):
            raise InputError(f"{path!r} is a folder; pass a glob of its frames, e.g. {os.path.join(path, '*.png')!r}, "
                             "or a video file.")
        raise InputError(f"video {path!r} does not exist; pass a video file, a glob of frame images such as "
                         "'frames/*.png', or a list of frames.")
    if isinstance(video, np.ndarray) or (isinstance(video, Sequence) and not isinstance(video, (bytes, bytearray))):
        return (list(video) if isinstance(video, np.ndarray) else list(video)), None
    raise InputError(f"a video must be a list of frames, a (T, H, W, 3) uint8 array, a frame glob or a video file "
                     f"path, got {type(video).__name__}.")


def read_video_file(path: str, fps: float = VIDEO_FPS, max_duration: float = VIDEO_MAX_DURATION
                    ) -> tuple[list[np.ndarray], list[float]]:
    """Decode the frames of a video file that GLM-4V's video processor would sample -> (uint8 (H, W, 3) frames,
    timestamps in seconds).

    As transformers' PyAV reader and ``Glm4vVideoProcessor.sample_frames``: the first video stream's frame count
    and average frame rate give the duration (count / rate), :func:`sample_video_frame_indices` picks ``fps``
    frames a second (an even count), frames are decoded in order and converted to RGB, and a frame's timestamp is
    its index / the frame rate. PyAV is imported here only; without it this raises InputError saying how to get it.
    """
    try:
        import av
    except ImportError:
        raise InputError(f"reading the video file {path!r} needs PyAV, which is not installed: pip install av (or "
                         "'glmtrt[video]'), or pass the frames as images or a frame glob.") from None
    try:
        container = av.open(path)
    except Exception as e:  # av.error.FFmpegError and its subclasses, OSError
        raise InputError(f"cannot read {path!r} as a video ({type(e).__name__}: {_first_line(e)}); pass a video file "
                         "FFmpeg can decode.") from None
    with container:
        if not container.streams.video:
            raise InputError(f"{path!r} has no video stream; pass a video file.")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate or float(rate) <= 0:
            raise InputError(f"{path!r} does not say its frame rate; pass its frames as images or a frame glob instead.")
        rate = float(rate)
        try:
            total = int(stream.frames) or sum(1 for _ in container.decode(video=0))  # 0: the header does not say
            if total < 1:
                raise InputError(f"{path!r} has no video frames; pass a video with at least one frame.")
            indices = sample_video_frame_indices(total, rate, fps=fps, max_duration=max_duration, duration=total / rate)
            wanted, frames, last = set(indices.tolist()), {}, int(indices[-1])
            container.seek(0)
            for i, frame in enumerate(container.decode(video=0)):
                if i > last:
                    break
                if i in wanted:
                    frames[i] = frame.to_ndarray(format="rgb24")
        except InputError:
            raise
        except Exception as e:  # a damaged stream: av.error.FFmpegError subclasses
            raise InputError(f"cannot decode {path!r} ({type(e).__name__}: {_first_line(e)}); the file is truncated "
                             "or damaged: pass a complete video file.") from None
    missing = sorted(wanted - set(frames))
    if missing:
        raise InputError(f"{path!r} says it has {total} frames but frame {missing[0]} could not be decoded; the file is "
                         "truncated or damaged.")
    return [frames[i] for i in indices.tolist()], [i / rate for i in indices.tolist()]


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def glm_image_smart_resize(
    height: int,
    width: int,
    factor: int = 16,
    min_pixels: int = 512 * 512,
    max_pixels: int = 2048 * 2048,
) -> tuple[int, int]:
    """Target (height, width) of a GLM-Image source image, as transformers' glm_image ``smart_resize``.

    Unlike GLM-4V's: sides under ``factor`` raise, the aspect-ratio limit is 4, the budgets are turned into edge
    lengths (round(sqrt)), and the image is **halved** before rounding to ``factor`` (source tokens live on the
    same 1/32 scale as the generated grid).
    """
    height, width = _check_positive_size(height, width)
    if height < factor or width < factor:
        raise InputError(f"GLM-Image source images need both sides >= {factor} px, got {height}x{width}.")
    if max(height, width) / min(height, width) > 4:
        raise InputError(
            f"GLM-Image source aspect ratio {max(height, width) / min(height, width):.2f} is above 4; crop the image."
        )
    shortest_edge = int(round(math.sqrt(min_pixels)))
    longest_edge = int(round(math.sqrt(max_pixels)))
    min_side, max_side = min(height, width), max(height, width)
    scale = 1.0
    if min_side < shortest_edge:
        scale = shortest_edge / min_side
    if max_side * scale > longest_edge:
        scale = longest_edge / max_side
    height, width = height // 2, width // 2
    h_bar = max(factor, int(round(height * scale / factor)) * factor)
    w_bar = max(factor, int(round(width * scale / factor)) * factor)
    if max(h_bar, w_bar) > longest_edge:
        beta = max(h_bar, w_bar) / longest_edge
        h_bar = max(factor, int(math.floor((h_bar / beta) / factor)) * factor)
        w_bar = max(factor, int(math.floor((w_bar / beta) / factor)) * factor)
    return h_bar, w_bar


def glm_image_target_grids(
    target_height: int, target_width: int, factor: int = 32
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Token grids of the image GLM-Image will generate, as ``GlmImageProcessor._get_target_shape``.

    Returns ((token_h, token_w), (preview_h, preview_w)): the target floored to ``factor`` px, one token per
    ``factor`` px; the preview keeps the aspect ratio at about (factor/2)**2 = 256 tokens.
    E.g. 1152x768 -> (36, 24), (19, 13).
    """
    target_height, target_width = _check_positive_size(target_height, target_width)
    if target_height < factor or target_width < factor:
        raise InputError(
            f"GLM-Image target size must be at least {factor}x{factor} px, got {target_height}x{target_width}."
        )
    token_h = (target_height // factor * factor) // factor
    token_w = (target_width // factor * factor) // factor
    ratio = token_h / token_w
    preview_h = int(math.sqrt(ratio) * (factor // 2))
    preview_w = int(math.sqrt(1 / ratio) * (factor // 2))
    return (token_h, token_w), (preview_h, preview_w)


def preprocess_glm_image_sources(images, config: ImageProcessorConfig = GLM_IMAGE_SOURCE_CONFIG) -> VisionInputs:
    """GLM-Image source images -> patches, exactly as transformers' ``GlmImageImageProcessorPil``.

    With the tower's settings (``GLM_IMAGE_SOURCE_CONFIG``: patch 16, temporal 1, merge 1) rows are 768 wide,
    raster order, and each image is first halved by ``glm_image_smart_resize``.
    Returns VisionInputs: pixel_values float32 (sum h*w, 3*T*P*P), grid_thw int64 (num_images, 3) rows (1, h, w).
    """

    def resize_fn(height, width):
        return glm_image_smart_resize(
            height, width, factor=config.factor, min_pixels=config.min_pixels, max_pixels=config.max_pixels
        )

    return _preprocess_with(images, config, resize_fn)
