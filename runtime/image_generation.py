"""GLM-Image's autoregressive prior on the torch-free runtime: a prompt (and, for image-to-image, source images)
and a target size -> the preview and large token grids that GLM-Image's diffusion decoder consumes.

    target size -> large + preview grids (``preprocess.glm_image_target_grids``, as ``GlmImageProcessor``)
    prompt ids  -> {<image_start> <|image|>*h*w <image_end> per source}{text}<sop>{H} {W}<eop>[<sop>{h} {w}<eop>]<bos>
    source images -> patches (``preprocess_glm_image_sources``) -> image tokenizer graph -> VQ codes written over the
                     placeholders (``PromptPlan.merge_codes``)
    prefill -> decode loop over the decode-position table (``positions.glm_image_rope_index``), one token per grid
               cell: preview grid then large grid (text-to-image), or the large grid (image-to-image)

The loop, :func:`run_image_generation`, is written once against four stage callables (:class:`ImageStages`):
the runtime passes the exported graphs (:class:`ImageGenerator`), the PyTorch reference passes its modules
(``glmtrt.reference.image_generate``). Token selection is the project's one sampler
(:class:`glmtrt.runtime.sampling.Sampler`), so with the same seed both roads draw the same tokens from the same
logits: the roads differ only in the tensor programs.

Decisions:

* **Length.** Exactly one token per cell of the target grids (preview + large for text-to-image, large for
  image-to-image); the end token that follows them (the decode table's last slot) is not generated: the grids are
  the output. An EOS inside the grids cannot stop a request.
* **Codes only** (default). The visual head has ``vision_vocab_size`` rows (16512: 16384 codebook entries, the
  image start / end tokens and spares); transformers does not constrain them, so an unconstrained model could put
  a non-code id into a grid, which the diffusion decoder cannot take. Each step samples among the codebook's
  logits only (``logits[:, :num_codes]``), on both roads. ``codes_only=False`` samples the whole head.
* **Sampling by default**, as the diffusers pipeline calls ``generate(do_sample=True)``: the checkpoint's
  generation defaults (temperature, top-k, top-p), transformers' own defaults where it has none (temperature 1,
  top-k 50, top-p 1). ``temperature=0`` is greedy. Without a seed one is drawn and recorded in the output, so any
  run can be repeated.
* **Prompt layout.** ``GlmImageProcessor`` appends the grid suffix to the chat-templated text; GLM-Image's chat
  template renders a user turn as its content only (source images as ``<image_start><|image|><image_end>``, then
  the text), which this module reproduces with the special tokens inserted by id and user text never parsed for
  special tokens. For exact processor ids, use :meth:`ImageGenerator.prepare_ids`.

numpy only; never imports torch or transformers.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import GlmTrtError, InputError
from .manifest import ManifestError
from .preprocess import ImageProcessorConfig, glm_image_target_grids, preprocess_glm_image_sources
from .prompt import HostConfig, PromptPlan, plan_prompt
from .sampling import GenerationOptions, Sampler, resolve_options

__all__ = [
    "TEXT_TO_IMAGE", "IMAGE_TO_IMAGE", "DEFAULT_TARGET_SIZE", "TOKENS_FORMAT", "SAMPLING_DEFAULTS",
    "TargetGrids", "ImagePrompt", "ImageTokens", "ImageStages", "ImageGenerator",
    "parse_target_size", "target_grids", "glm_image_prompt_ids", "image_options", "run_image_generation",
    "check_output_path", "write_json_atomic", "run_command",
]

TEXT_TO_IMAGE, IMAGE_TO_IMAGE = "text-to-image", "image-to-image"
DEFAULT_TARGET_SIZE = (1152, 768)  # GlmImageProcessor's target_h, target_w
TARGET_FACTOR = 32  # pixels per generated token (GlmImageProcessor._get_target_shape)
TOKENS_FORMAT = "glmtrt.glm_image_tokens"
TOKENS_VERSION = 1
# transformers' GenerationConfig defaults, used where the checkpoint's generation_config.json sets nothing.
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}
_IMAGE_OPTIONS = ("temperature", "top_k", "top_p", "repetition_penalty", "seed")
_SIZE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


# ---------------------------------------------------------------------------------------------- target grids

@dataclass(frozen=True)
class TargetGrids:
    """The token grids of one request's generated image.

    target_size: (height, width) in pixels as asked; large: (token_h, token_w), one token per 32 px of the target
    floored to 32; preview: (preview_h, preview_w), about 256 tokens at the same aspect ratio, or None for
    image-to-image (GlmImageProcessor gives that mode one target grid only).
    """

    target_size: tuple[int, int]
    large: tuple[int, int]
    preview: tuple[int, int] | None

    @property
    def mode(self) -> str:
        return TEXT_TO_IMAGE if self.preview is not None else IMAGE_TO_IMAGE

    @property
    def grid_rows(self) -> np.ndarray:
        """int64 (k, 3): the target rows of ``image_grid_thw`` as the processor writes them: (1, H, W) for the
        large grid, then (1, h, w) for the preview (text-to-image)."""
        rows = [(1, *self.large)] + ([(1, *self.preview)] if self.preview is not None else [])
        return np.asarray(rows, dtype=np.int64)

    @property
    def generation_order(self) -> list[tuple[str, tuple[int, int]]]:
        """The grids in the order their tokens are generated (the decode table runs the target rows backwards)."""
        order = [("preview", self.preview)] if self.preview is not None else []
        return order + [("large", self.large)]

    @property
    def num_tokens(self) -> int:
        """Tokens generated for these grids: the sum of their cells."""
        return sum(h * w for _, (h, w) in self.generation_order)


def parse_target_size(value: Any) -> tuple[int, int]:
    """``"1152x768"`` (height x width in pixels; ``X`` or ``×`` also accepted) or an (height, width) pair ->
    (height, width) ints. Raises InputError saying what to pass for anything else."""
    if isinstance(value, str):
        match = _SIZE.match(value)
        if not match:
            raise InputError(f"target size must be HEIGHTxWIDTH in pixels, e.g. 1152x768; got {value!r}")
        height, width = int(match.group(1)), int(match.group(2))
    else:
        try:
            height, width = value
        except (TypeError, ValueError):
            raise InputError(f"target size must be HEIGHTxWIDTH in pixels (e.g. '1152x768') or a (height, width) "
                             f"pair; got {value!r}") from None
        if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in (height, width)):
            raise InputError(f"target size must be two whole numbers of pixels (height, width); got {value!r}")
        height, width = int(height), int(width)
    if height < TARGET_FACTOR or width < TARGET_FACTOR:
        raise InputError(f"target size {height}x{width} is too small: GLM-Image generates one token per "
                         f"{TARGET_FACTOR} px, so both sides must be at least {TARGET_FACTOR} px; e.g. 1152x768")
    return height, width


def target_grids(target_size: Any = DEFAULT_TARGET_SIZE, mode: str = TEXT_TO_IMAGE) -> TargetGrids:
    """The large and preview grids of a target size (see :class:`TargetGrids`); ``mode`` is TEXT_TO_IMAGE or
    IMAGE_TO_IMAGE. E.g. 1152x768 -> large (36, 24), preview (19, 13)."""
    if mode not in (TEXT_TO_IMAGE, IMAGE_TO_IMAGE):
        raise ValueError(f"mode must be {TEXT_TO_IMAGE!r} or {IMAGE_TO_IMAGE!r}, got {mode!r}")
    height, width = parse_target_size(target_size)
    large, preview = glm_image_target_grids(height, width, factor=TARGET_FACTOR)
    if mode == TEXT_TO_IMAGE and min(preview) < 1:
        raise InputError(f"target size {height}x{width} has an aspect ratio beyond what GLM-Image's preview grid "
                         f"can hold ({large[0]}x{large[1]} tokens give a {preview[0]}x{preview[1]} preview); keep "
                         "the longer side within 256 times the shorter")
    return TargetGrids((height, width), tuple(large), tuple(preview) if mode == TEXT_TO_IMAGE else None)


# ---------------------------------------------------------------------------------------------- prompts

def glm_image_prompt_ids(chat, text: str, source_token_counts: Sequence[int], targets: TargetGrids, *,
                         image_start_id: int, image_end_id: int) -> list[int]:
    """Token ids of one GLM-Image request (see the module docstring for the layout).

    chat: a :class:`glmtrt.runtime.chat.ChatFormat` (its tokenizer encodes text with special-token parsing off;
    its ``special_tokens`` give ``<|image|>``, ``<sop>``, ``<eop>``); source_token_counts: h*w per source image;
    image_start_id / image_end_id: the config's ids (the start id is also the generation BOS).
    """
    specials: Mapping[str, int] = chat.special_tokens
    missing = [t for t in ("<|image|>", "<sop>", "<eop>") if t not in specials]
    if missing:
        raise ManifestError(f"the manifest's special_tokens lack {missing}, which GLM-Image prompts need; "
                            "re-export the folder")
    image, sop, eop = specials["<|image|>"], specials["<sop>"], specials["<eop>"]
    ids: list[int] = []
    for n in source_token_counts:
        ids += [int(image_start_id)] + [image] * int(n) + [int(image_end_id)]
    ids += chat.encode_text(text)
    for _, (h, w) in [("large", targets.large)] + ([("preview", targets.preview)] if targets.preview else []):
        ids += [sop] + chat.encode_text(f"{h} {w}") + [eop]
    return ids + [int(image_start_id)]


@dataclass
class ImagePrompt:
    """A tokenized GLM-Image request, ready for either road.

    input_ids: int64 (L,), the source placeholders still in place; pixel_values: float32 (N, 3*16*16) of the
    source images in prompt order, or None (text-to-image); source_grids: int64 (n, 3) rows (1, h, w) of those
    images (n = 0 for text-to-image); targets: the grids to generate; text: the user's prompt (for the record).
    """

    input_ids: np.ndarray
    targets: TargetGrids
    pixel_values: np.ndarray | None = None
    source_grids: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=np.int64))
    text: str | None = None

    def __post_init__(self):
        self.input_ids = np.asarray(self.input_ids, dtype=np.int64).reshape(-1)
        self.source_grids = np.asarray(self.source_grids, dtype=np.int64).reshape(-1, 3)
        if (len(self.source_grids) > 0) != (self.targets.mode == IMAGE_TO_IMAGE):
            raise InputError(f"{len(self.source_grids)} source images for {self.targets.mode} target grids: "
                             "image-to-image takes source images and one target grid, text-to-image none and two")

    @property
    def image_grid_thw(self) -> np.ndarray:
        """int64 (n + k, 3): the source grids then the target grids, as GlmImageProcessor returns them."""
        return np.concatenate([self.source_grids, self.targets.grid_rows]).astype(np.int64)

    def plan(self, host: HostConfig) -> PromptPlan:
        """A fresh host plan of this prompt (a plan is consumed: its ids change when the codes are merged)."""
        grids = self.image_grid_thw
        return plan_prompt(host, self.input_ids[None], None, self.pixel_values, grids,
                           images_per_sample=np.array([len(grids)], dtype=np.int64))


# ---------------------------------------------------------------------------------------------- output

@dataclass
class ImageTokens:
    """One request's generated tokens.

    large: int64 (token_h, token_w) codebook indices in raster order; preview: int64 (preview_h, preview_w) or
    None (image-to-image); sources: int64 (h, w) VQ codes of each source image (image-to-image, the codes the
    prompt was conditioned on; the diffusion decoder takes them too); token_ids: every generated id, in order;
    prompt_token_ids: the prompt as given to prefill, placeholders in place; sampling: the options used (seed
    included); timings: seconds (preprocess_s, image_tokenizer_s, prefill_s, ttft_s, decode_s,
    decode_tokens_per_s).
    """

    mode: str
    target_size: tuple[int, int]
    large: np.ndarray
    preview: np.ndarray | None
    token_ids: list[int]
    prompt_token_ids: list[int]
    sources: list[np.ndarray] = field(default_factory=list)
    sampling: dict[str, Any] = field(default_factory=dict)
    codes_only: bool = True
    timings: dict[str, float] = field(default_factory=dict)
    text: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (format ``glmtrt.glm_image_tokens``, version 1); grids as nested lists of rows."""
        def grid(a):
            return None if a is None else {"height": int(a.shape[0]), "width": int(a.shape[1]), "tokens": a.tolist()}

        return {
            "format": TOKENS_FORMAT, "version": TOKENS_VERSION, "mode": self.mode,
            "prompt": self.text,
            "target_size": {"height": int(self.target_size[0]), "width": int(self.target_size[1])},
            "pixels_per_token": TARGET_FACTOR,
            "preview": grid(self.preview), "large": grid(self.large),
            "sources": [grid(s) for s in self.sources],
            "token_ids": [int(t) for t in self.token_ids],
            "prompt_token_ids": [int(t) for t in self.prompt_token_ids],
            "sampling": dict(self.sampling), "codes_only": bool(self.codes_only),
            "timings": {k: float(v) for k, v in self.timings.items()},
        }

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON to ``path`` atomically (a temporary file beside it, then a rename)."""
        return write_json_atomic(path, self.to_dict())


def check_output_path(path: str | Path) -> Path:
    """``path`` as a Path, if a file can be written there (not a folder, its folder exists); else InputError."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"output {str(path)!r} is a folder; pass a file path such as {str(path / 'tokens.json')!r}")
    if not path.parent.is_dir():
        raise InputError(f"the folder of output {str(path)!r} does not exist; create it or choose another path")
    return path


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write ``data`` as JSON to ``path``: a hidden temporary file in the same folder, fsynced, then renamed over
    ``path``, so a reader never sees a partial file. Raises InputError for a path that cannot be a file."""
    path = check_output_path(path)
    text = json.dumps(data, indent=1) + "\n"
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    except PermissionError:
        raise InputError(f"cannot write into {str(path.parent)!r} (permission denied); choose another output path") \
            from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------- options

def image_options(defaults: Mapping[str, Any] | None = None, **overrides: Any) -> GenerationOptions:
    """Sampling options of an image request: the checkpoint's generation defaults (manifest ``generation``) with
    sampling on, transformers' defaults where they set nothing (:data:`SAMPLING_DEFAULTS`), then the caller's
    ``overrides`` (temperature, top_k, top_p, repetition_penalty, seed; None = not given; temperature 0 = greedy).
    A sampled request without a seed gets a fresh one, recorded in the options. max_new_tokens is not an option:
    the target grids fix the length."""
    unknown = sorted(set(overrides) - set(_IMAGE_OPTIONS))
    if unknown:
        hint = "; the target grids fix the length" if "max_new_tokens" in unknown else ""
        raise InputError(f"unknown image generation options {unknown}{hint}; known: {', '.join(_IMAGE_OPTIONS)}")
    d = {k: v for k, v in dict(defaults or {}).items() if k != "max_new_tokens"}
    d = {**SAMPLING_DEFAULTS, **{k: v for k, v in d.items() if v is not None}, "do_sample": True}
    options = resolve_options(d, **overrides)
    if options.greedy:
        return replace(options, seed=None)
    if options.seed is None:
        options = replace(options, seed=secrets.randbits(32))
    return options


def _sampling_record(options: GenerationOptions) -> dict[str, Any]:
    return {"greedy": options.greedy, "temperature": options.temperature, "top_k": options.top_k,
            "top_p": options.top_p, "repetition_penalty": options.repetition_penalty, "seed": options.seed}


# ---------------------------------------------------------------------------------------------- the loop

class ImageStages(Protocol):
    """The tensor programs of one road. Arrays are numpy; each method is one stage of the graph contract."""

    def image_codes(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """One source image: ``PromptPlan.vision_inputs`` (pixel_values float32 (N, 768), tap_index int64 and
        tap_weight float32 (N, 4), segment_ids int64 (N,)) -> int64 codes (N,)."""

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """int64 (B, L) -> float32 embeddings (B, L, hidden)."""

    def start(self, batch: int, capacity: int):
        """A decode state (``prefill(embeds, position_ids, mask)`` and ``step(embeds, position_ids, mask)``, each
        returning logits (B, vision_vocab) float32) for at most ``capacity`` cached positions."""


def run_image_generation(stages: ImageStages, host: HostConfig, prompt: ImagePrompt, options: GenerationOptions,
                         *, num_codes: int, codes_only: bool = True, check_logits=None,
                         preprocess_s: float = 0.0) -> ImageTokens:
    """Generate the target grids of ``prompt`` (the module docstring's loop; shared by both roads).

    host: the config facts of the host side; options: from :func:`image_options` (``max_new_tokens`` is ignored:
    exactly ``prompt.targets.num_tokens`` tokens are generated); num_codes: the codebook size (``codes_only``:
    sample among ids below it); check_logits(logits, graph, step): an optional guard (the runtime's NaN check).
    """
    t_start = time.perf_counter() - preprocess_s
    timings = {"preprocess_s": preprocess_s}
    plan = prompt.plan(host)
    prompt_ids = plan.input_ids[0].tolist()
    t = time.perf_counter()
    codes = [np.asarray(stages.image_codes(plan.vision_inputs(call)), dtype=np.int64).reshape(-1)
             for call in plan.vision_calls]
    timings["image_tokenizer_s"] = time.perf_counter() - t
    for call, c in zip(plan.vision_calls, codes):
        if c.shape[0] != call.num_outputs or (c.size and (c.min() < 0 or c.max() >= num_codes)):
            raise GlmTrtError(f"the image tokenizer returned {c.shape[0]} codes in [{c.min(initial=0)}, "
                              f"{c.max(initial=0)}] for a {call.grid[0, 1]}x{call.grid[0, 2]} image; expected "
                              f"{call.num_outputs} codes below {num_codes}: the engines folder is damaged, "
                              "re-export it")
    plan.merge_codes(codes)

    n = prompt.targets.num_tokens
    length = plan.input_ids.shape[1]
    t = time.perf_counter()
    embeds = stages.embed(plan.input_ids)
    state = stages.start(1, length + n - 1)
    mask = plan.attention_mask
    logits = state.prefill(embeds, plan.position_ids, mask)
    if check_logits is not None:
        check_logits(logits, "prefill", None)
    width = num_codes if codes_only else logits.shape[-1]
    sampler = Sampler(options, [prompt_ids], width)
    token = sampler(logits[:, :width])
    now = time.perf_counter()
    timings["prefill_s"], timings["ttft_s"] = now - t, now - t_start
    generated = [int(token[0])]
    t = time.perf_counter()
    for step in range(n - 1):
        mask = np.concatenate([mask, np.ones((1, 1), dtype=mask.dtype)], axis=1)
        logits = state.step(stages.embed(token[:, None]), plan.decode_positions(step), mask)
        if check_logits is not None:
            check_logits(logits, "decode", step)
        token = sampler(logits[:, :width])
        generated.append(int(token[0]))
    timings["decode_s"] = time.perf_counter() - t
    timings["decode_tokens_per_s"] = (n - 1) / timings["decode_s"] if n > 1 and timings["decode_s"] > 0 else 0.0

    grids, offset = {}, 0
    for name, (h, w) in prompt.targets.generation_order:
        grids[name] = np.asarray(generated[offset:offset + h * w], dtype=np.int64).reshape(h, w)
        offset += h * w
    sources = [c.reshape(int(call.grid[0, 1]), int(call.grid[0, 2])) for call, c in zip(plan.vision_calls, codes)]
    return ImageTokens(mode=prompt.targets.mode, target_size=prompt.targets.target_size, large=grids["large"],
                       preview=grids.get("preview"), token_ids=generated, prompt_token_ids=prompt_ids,
                       sources=sources, sampling=_sampling_record(options), codes_only=codes_only,
                       timings=timings, text=prompt.text)


# ---------------------------------------------------------------------------------------------- the runtime road

class LogitsRecorder:
    """Stages (:class:`ImageStages`) that pass everything through to ``stages`` and keep every logits array
    (prefill, then each decode step) in ``logits``: what a parity check compares between two roads."""

    def __init__(self, stages: ImageStages):
        self.stages, self.logits = stages, []

    def image_codes(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.stages.image_codes(inputs)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.stages.embed(ids)

    def start(self, batch: int, capacity: int):
        return _RecordingState(self.stages.start(batch, capacity), self.logits)


class _RecordingState:
    """A decode state that appends a float32 copy of every logits array it returns to ``kept``."""

    def __init__(self, state, kept: list[np.ndarray]):
        self.state, self.kept = state, kept

    def prefill(self, *args):
        return self._keep(self.state.prefill(*args))

    def step(self, *args):
        return self._keep(self.state.step(*args))

    def _keep(self, logits) -> np.ndarray:
        self.kept.append(np.array(logits, dtype=np.float32))
        return self.kept[-1]


class _GraphStages:
    """The runtime's stages: the engines folder's graphs through a :class:`~glmtrt.runtime.pipeline.Pipeline`'s
    backend (its embedding table, graph lock and decode states)."""

    def __init__(self, pipe, codes_output: str):
        self.pipe, self.codes_output = pipe, codes_output
        self.inputs = pipe.manifest.graphs["vision"].input_names()

    def image_codes(self, inputs):
        missing = [n for n in self.inputs if n not in inputs]
        if missing:
            raise ManifestError(f"the image tokenizer graph wants inputs {missing} the host does not make; "
                                "re-export the folder")
        out = self.pipe._graph_call(self.pipe.backend.run, "vision", {n: inputs[n] for n in self.inputs})
        return out[self.codes_output]

    def embed(self, ids):
        return self.pipe._embed(ids)

    def start(self, batch, capacity):
        state = self.pipe._graph_call(self.pipe.backend.start_decode, batch, capacity)
        pipe = self.pipe

        class _Locked:  # every graph call through the pipeline's lock (TensorRT runs one at a time)
            def prefill(self, *args):
                return pipe._graph_call(state.prefill, *args)

            def step(self, *args):
                return pipe._graph_call(state.step, *args)

        return _Locked()


class ImageGenerator:
    """GLM-Image generation over one engines folder. Build with :meth:`from_engines`.

    ::

        gen = ImageGenerator.from_engines("engines/glm-image")
        tokens = gen.generate("a red fox in snow", target_size="1152x768", seed=7)
        tokens.preview.shape, tokens.large.shape        # (19, 13), (36, 24)
        tokens.save("tokens.json")
        gen.generate("make it night", images=["fox.png"], target_size=(1152, 768))   # image-to-image
    """

    def __init__(self, pipeline):
        self.pipeline = pipe = pipeline
        manifest = pipe.manifest
        if manifest.family != "glm_image":
            raise InputError(f"{str(pipe.folder)!r} holds a {manifest.family} export; image generation needs a "
                             "GLM-Image engines folder (glmtrt export of a glm_image checkpoint)")
        record = (manifest.extra or {}).get("glm_image")
        try:
            self.num_codes = int(record["num_codes"])
            self.codes_output = str(record["codes_output"])
        except (KeyError, TypeError, ValueError):
            raise ManifestError(f"the manifest of {str(pipe.folder)!r} lacks the GLM-Image record (extra.glm_image); "
                                "re-export the folder") from None
        if self.codes_output not in manifest.graphs["vision"].output_names():
            raise ManifestError(f"the image tokenizer graph has no output {self.codes_output!r}; re-export the folder")
        self.host = pipe.host
        self.source_config: ImageProcessorConfig = pipe.image_config
        self.stages = _GraphStages(pipe, self.codes_output)

    @classmethod
    def from_engines(cls, path: str | Path, provider: str = "cpu", verify_hashes: bool = True,
                     threads: int | None = None, **backend_options: Any) -> ImageGenerator:
        """Open a GLM-Image engines folder (arguments as :meth:`Pipeline.from_engines`)."""
        from .pipeline import Pipeline

        pipe = Pipeline.from_engines(path, provider=provider, verify_hashes=verify_hashes, threads=threads,
                                     **backend_options)
        try:
            return cls(pipe)
        except BaseException:
            pipe.close()
            raise

    def close(self) -> None:
        self.pipeline.close()

    def __enter__(self) -> ImageGenerator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ requests
    def options(self, **overrides: Any) -> GenerationOptions:
        """The effective sampling options (see :func:`image_options`); a sampled request gets a seed here."""
        return image_options(self.pipeline.manifest.generation, **overrides)

    def prepare(self, prompt: str, images: Sequence[Any] = (), target_size: Any = DEFAULT_TARGET_SIZE) -> ImagePrompt:
        """Tokenize one request: ``prompt`` text, source ``images`` (paths, PIL images or uint8 arrays; none for
        text-to-image) and the target size ("HxW" or (height, width) in pixels)."""
        chat = self.pipeline.chat
        if chat is None:
            raise InputError(f"{str(self.pipeline.folder)!r} has no tokenizer; tokenize the prompt with the "
                             "checkpoint's processor and use prepare_ids")
        if isinstance(images, (str, Path)) or hasattr(images, "size") and not isinstance(images, Sequence):
            images = [images]
        images = list(images)
        targets = target_grids(target_size, IMAGE_TO_IMAGE if images else TEXT_TO_IMAGE)
        if isinstance(prompt, str) and not prompt.strip():
            raise InputError("the prompt is empty; describe the image to generate")
        pixels, grids = None, np.zeros((0, 3), dtype=np.int64)
        if images:
            try:
                vision = preprocess_glm_image_sources(images, self.source_config)
            except InputError:
                raise
            except ValueError as e:
                raise InputError(str(e)) from None
            pixels, grids = vision.pixel_values, vision.grid_thw
        ids = glm_image_prompt_ids(chat, prompt, [int(h * w) for _, h, w in grids], targets,
                                   image_start_id=self.host.image_start_token_id,
                                   image_end_id=self.host.image_end_token_id)
        return ImagePrompt(np.asarray(ids, dtype=np.int64), targets, pixels, grids, text=prompt)

    def prepare_ids(self, input_ids, target_size: Any = DEFAULT_TARGET_SIZE, pixel_values=None,
                    source_grids=None) -> ImagePrompt:
        """A request from exact ids (e.g. ``GlmImageProcessor``'s ``input_ids`` for one sample) and, for
        image-to-image, its ``pixel_values`` (N, 768) and source grids (n, 3); ``target_size`` as given to the
        processor."""
        ids = np.asarray(input_ids)
        if not np.issubdtype(ids.dtype, np.integer) or ids.ndim != 1 or ids.size == 0:
            raise InputError(f"input_ids must be a non-empty integer (L,) array, got {ids.dtype} {ids.shape}")
        vocab = self.pipeline.embed_table.shape[0]
        if ids.min() < 0 or ids.max() >= vocab:
            raise InputError(f"input_ids hold ids outside the vocabulary 0..{vocab - 1}")
        grids = np.zeros((0, 3), dtype=np.int64) if source_grids is None else np.asarray(source_grids, np.int64)
        targets = target_grids(target_size, IMAGE_TO_IMAGE if len(grids.reshape(-1, 3)) else TEXT_TO_IMAGE)
        pixels = None if pixel_values is None else np.asarray(pixel_values, dtype=np.float32)
        return ImagePrompt(ids.astype(np.int64), targets, pixels, grids)

    def generate(self, prompt: str, images: Sequence[Any] = (), *, target_size: Any = DEFAULT_TARGET_SIZE,
                 codes_only: bool = True, **options: Any) -> ImageTokens:
        """Generate the token grids of one request (text-to-image without ``images``, image-to-image with).

        options: temperature (0 = greedy), top_k, top_p, repetition_penalty, seed (see :func:`image_options`).
        """
        opts = self.options(**options)  # option mistakes before any image is read
        t0 = time.perf_counter()
        prepared = self.prepare(prompt, images, target_size)
        return self.generate_prompt(prepared, codes_only=codes_only, preprocess_s=time.perf_counter() - t0,
                                    options=opts)

    def generate_prompt(self, prompt: ImagePrompt, *, codes_only: bool = True, preprocess_s: float = 0.0,
                        options: GenerationOptions | None = None, **overrides: Any) -> ImageTokens:
        """Generate from a prepared request (:meth:`prepare` / :meth:`prepare_ids`); ``options`` (from
        :meth:`options`) or option ``overrides``."""
        opts = options if options is not None else self.options(**overrides)
        length = int(prompt.input_ids.shape[0])
        room = self.pipeline.context_room(length)
        if room < prompt.targets.num_tokens:
            h, w = prompt.targets.target_size
            raise InputError(f"a {h}x{w} target needs {prompt.targets.num_tokens} generated tokens after a "
                             f"{length}-token prompt, but these engines hold only {room} more positions; choose a "
                             "smaller --target-size or shorter prompt")
        return run_image_generation(self.stages, self.host, prompt, opts, num_codes=self.num_codes,
                                    codes_only=codes_only, check_logits=self._check, preprocess_s=preprocess_s)

    def _check(self, logits, graph, step):
        self.pipeline._check_logits(logits, graph, step)


# ---------------------------------------------------------------------------------------------- the CLI

def _engines_family(folder: str) -> str | None:
    """The family a folder's manifest names, read without verification (the real load checks it); None when the
    manifest cannot be read, which the regular load then reports."""
    try:
        return str(json.loads((Path(folder) / "manifest.json").read_text()).get("family"))
    except (OSError, ValueError, AttributeError):
        return None


def run_command(args) -> int:
    """``glmtrt run``: a GLM-Image engines folder generates token grids (:func:`run_image_command`); any other
    folder answers in text through :func:`glmtrt.runtime.pipeline.run_command`."""
    family = _engines_family(args.engines)
    if family == "glm_image":
        return run_image_command(args)
    given = [flag for flag, value in (("--target-size", args.target_size), ("--out", args.out)) if value is not None]
    if given and family is not None:
        raise InputError(f"{' and '.join(given)} {'are' if len(given) > 1 else 'is'} for GLM-Image engines folders; "
                         f"{args.engines!r} holds a {family} export, which answers in text: drop {' '.join(given)}")
    from .pipeline import run_command as text_run_command

    return text_run_command(args)


def run_image_command(args) -> int:
    """``glmtrt run --engines DIR --prompt TEXT [--image SRC] [--target-size HxW] [--out tokens.json]``."""
    inapplicable = [flag for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--stream", args.stream),
                                             ("--system", args.system), ("--ignore-eos", args.ignore_eos),
                                             ("--video", getattr(args, "video", None)))
                    if value not in (None, False)]
    if inapplicable:
        raise InputError(f"{', '.join(inapplicable)} do{'es' if len(inapplicable) == 1 else ''} not apply to GLM-Image "
                         "(it takes a prompt and optional source images; the target grids fix the length; there is no text "
                         "to stream); drop "
                         f"{' '.join(inapplicable)}")
    target = parse_target_size(args.target_size) if args.target_size is not None else DEFAULT_TARGET_SIZE
    for image in args.image:
        if not Path(image).is_file():
            raise InputError(f"image {image!r} does not exist; pass an existing image file")
    if args.out is not None:
        check_output_path(args.out)  # before any graph runs
    from .pipeline import share_weights_option

    gen = ImageGenerator.from_engines(args.engines, provider=args.provider, verify_hashes=not args.no_verify,
                                      threads=args.threads, **share_weights_option(args))
    with gen:
        tokens = gen.generate(args.prompt, args.image, target_size=target, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                              seed=args.seed)
    if args.out is not None:
        tokens.save(args.out)
    if args.out is None or args.json:
        print(json.dumps(tokens.to_dict()))
    t, s = tokens.timings, tokens.sampling
    grids = " + ".join(f"{name} {h}x{w}" for name, (h, w) in target_grids(target, tokens.mode).generation_order)
    how = "greedy" if s["greedy"] else f"sampled, seed {s['seed']}"
    where = f" -> {args.out}" if args.out is not None else ""
    print(f"[{tokens.mode}: {grids} = {len(tokens.token_ids)} tokens, {how}; ttft {t['ttft_s'] * 1e3:.1f} ms, decode "
          f"{t['decode_tokens_per_s']:.1f} tok/s]{where}", file=sys.stderr)
    return 0
