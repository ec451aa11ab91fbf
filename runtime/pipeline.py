"""The torch-free generation pipeline over an engines folder.

    preprocess (runtime.preprocess) -> GLM chat ids (runtime.chat) -> host plan (runtime.prompt)
    -> vision graph per image -> embedding gather + placeholder merge (numpy) -> prefill graph
    -> decode graph loop (runtime.sampling picks tokens; every EOS id of the manifest stops a request)

Everything is driven by ``manifest.json``. The host side is the very code the PyTorch reference walks
(``glmtrt.reference.generate``), so the two roads differ only in the tensor programs.

Usage::

    from glmtrt.runtime.pipeline import Pipeline
    pipe = Pipeline.from_engines("engines/glm-ocr")
    result = pipe.generate("Text Recognition:", images=["page.png"], max_new_tokens=256)
    print(result.text, result.timings)
    pipe.generate("What happens?", video="clip.mp4")          # or a list of frames, or "frames/*.png"
    for delta in pipe.stream("Describe the image.", images=["cat.jpg"]):
        print(delta, end="", flush=True)
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .chat import ChatFormat, IncrementalDecoder, split_thinking
from .errors import EngineError, GlmTrtError, InputError
from .manifest import Manifest, ManifestError
from .preprocess import (VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, ImageProcessorConfig, VisionInputs, load_video,
                         num_image_tokens, preprocess_images, preprocess_video)
from .prompt import HostConfig, PromptPlan, plan_prompt
from .sampling import GenerationOptions, Sampler, resolve_options

__all__ = ["Pipeline", "GenerationResult", "Request", "TextStream"]

STOP_EOS, STOP_LENGTH = "eos", "length"
_CHAT_FAMILIES = ("glm4v", "glm4v_moe", "glm_ocr")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


@dataclass
class GenerationResult:
    """One request's output.

    text: the generated text (special tokens kept, the stopping EOS token cut off); token_ids: the generated ids
    (the stopping EOS included, as transformers' ``generate`` returns it); prompt_token_ids: the request's
    prompt ids (no padding); stop_reason: "eos" or "length"; timings (seconds, shared by a batch):
    preprocess_s, vision_s, prefill_s, decode_s, ttft_s, decode_tokens_per_s; thinking: the text inside
    ``<think>…</think>`` or None; answer: the rest of the text, ``<answer>`` tags removed.
    """

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    stop_reason: str
    timings: dict[str, float] = field(default_factory=dict)
    thinking: str | None = None
    answer: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Request:
    """One chat request of a batch: a user prompt, its images (paths, PIL images or uint8 HxWx3 arrays) and
    optionally one video (see :meth:`Pipeline.preprocess_video`: frames, a frame glob or a video file)."""

    prompt: str
    images: Sequence[Any] = ()
    system: str | None = None
    video: Any = None


class TextStream:
    """Iterator of text deltas of one request (whole characters only); ``result`` is set once it is exhausted."""

    def __init__(self, deltas: Iterator[str], holder: dict):
        self._deltas, self._holder = deltas, holder

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._deltas)

    @property
    def result(self) -> GenerationResult | None:
        return self._holder.get("result")


@dataclass
class _Prepared:
    """A batch ready for the graphs: its host plan, per-row prompt ids, and preprocessing time."""

    plan: PromptPlan
    prompts: list[list[int]]
    preprocess_s: float


class Pipeline:
    """Generation over one engines folder. Build with :meth:`from_engines`."""

    def __init__(self, manifest: Manifest, folder: Path, backend, chat: ChatFormat | None):
        self.manifest, self.folder, self.backend, self.chat = manifest, Path(folder), backend, chat
        # Threads may share a pipeline. ONNX Runtime sessions run concurrently (every generation has its own bindings
        # and cache buffers); any other backend (TensorRT: one execution context and staging buffers per graph) runs
        # one graph call at a time, and its outputs are copied before the lock is released.
        self._graph_lock = None if str(getattr(backend, "name", "")).startswith("onnxruntime") else threading.Lock()
        try:
            self.host = HostConfig.from_config_dict(manifest.config)
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"the manifest's config lacks {e}; re-export the folder") from None
        try:
            self.image_config = ImageProcessorConfig.from_dict(manifest.preprocessing or {})
        except ValueError as e:
            raise ManifestError(f"the manifest's preprocessing settings are unusable: {e}") from None
        # Videos: the image processor's patching and normalization with the video processor's pixel budgets
        # (Glm4vVideoProcessor's defaults; its budget is shared by all frames).
        self.video_config = dataclasses.replace(self.image_config, min_pixels=VIDEO_MIN_PIXELS,
                                                max_pixels=VIDEO_MAX_PIXELS)
        emb = manifest.embeddings
        self.embed_table = np.load(self.folder / emb["file"], mmap_mode="r")
        if self.embed_table.ndim != 2 or self.embed_table.shape[1] != self.host.hidden_size:
            raise ManifestError(f"{emb['file']} has shape {self.embed_table.shape}, expected (vocab, "
                                f"{self.host.hidden_size}); re-export the folder")
        self.vocab = int(manifest.config["text"]["lm_head_size"])
        max_pos = manifest.config["text"].get("max_position_embeddings")
        self.max_positions = int(max_pos) if max_pos else None  # prompt + generated tokens, at most
        vision = manifest.graphs["vision"]
        self._vision_inputs = vision.input_names()
        self._vision_output = vision.output_names()[0]
        self._embeds_dtype = np.dtype({t.name: t.dtype for t in manifest.graphs["prefill"].inputs}["inputs_embeds"])

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_engines(cls, path: str | Path, provider: str = "cpu", verify_hashes: bool = True,
                     threads: int | None = None, **backend_options: Any) -> Pipeline:
        """Open an engines folder written by ``glmtrt export``.

        provider: "cpu" (default), "cuda" or "tensorrt" (onnxruntime-gpu); verify_hashes: check every file's
        SHA-256 against the manifest (sizes are always checked); threads: ONNX Runtime intra-op threads.
        """
        from .backends import load_backend

        folder = Path(path)
        manifest = Manifest.load(folder, verify_hashes=verify_hashes)
        backend = None
        try:
            backend = load_backend(manifest, folder, provider=provider, threads=threads, **backend_options)
            chat = None
            if manifest.tokenizer:
                try:
                    chat = ChatFormat.from_file(folder / manifest.tokenizer, manifest.special_tokens)
                except ManifestError:
                    raise
                except Exception as e:  # tokenizers raises plain Exception for unreadable files
                    raise ManifestError(f"cannot read {manifest.tokenizer} in {str(folder)!r} ({_first_line(e)}); "
                                        "re-export the folder") from None
            return cls(manifest, folder, backend, chat)
        except GlmTrtError:
            if backend is not None:
                backend.close()
            raise
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, OSError) as e:
            # The manifest passed the schema check but a value in it does not fit (a wrong type, a missing key or
            # file under config / embeddings / graphs ...): that is a damaged or foreign folder, not a glmtrt bug.
            if backend is not None:
                backend.close()
            raise ManifestError(f"the manifest of {str(folder)!r} does not fit this glmtrt ({type(e).__name__}: "
                                f"{_first_line(e)}); re-export the folder") from None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(self.manifest.eos_token_ids)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ prompts
    def _require_chat(self) -> ChatFormat:
        if self.chat is None:
            raise InputError(f"{str(self.folder)!r} has no tokenizer; use generate_ids with token ids instead")
        if self.host.model_type not in _CHAT_FAMILIES:
            raise InputError(f"chat prompts are for the GLM-4V family ({', '.join(_CHAT_FAMILIES)}); this folder is "
                             f"{self.host.model_type!r}: use generate_ids")
        return self.chat

    def preprocess(self, images: Sequence[Any]):
        """Images -> VisionInputs (pixel_values, grid_thw) with the manifest's preprocessing settings."""
        if not images:
            return None
        try:
            return preprocess_images(list(images), self.image_config)
        except InputError:
            raise
        except ValueError as e:
            raise InputError(str(e)) from None

    def preprocess_video(self, video: Any) -> tuple[VisionInputs, list[float]]:
        """One video -> (VisionInputs: pixel_values float32 (t*h*w, patch_dim), grid_thw int64 (1, 3) = (t, h, w);
        one timestamp in seconds per temporal patch of two frames).

        ``video``: a list of frames (PIL images, uint8 (H, W, 3) arrays or image paths) or a (T, H, W, 3) uint8 array,
        taken as sampled at 2 frames a second; a glob of frame files (``"frames/*.png"``, sorted by name), likewise;
        or a video file path, decoded with PyAV (optional: ``pip install av``) and sampled as transformers'
        Glm4vVideoProcessor does (2 frames a second, an even count, each frame's own timestamp). Frames are resized
        together (the video pixel budget counts every frame) with the image processor's settings.
        """
        if self.host.video_start_token_id is None or self.host.video_end_token_id is None:
            raise InputError(f"this {self.host.model_type} export has no video tokens; pass images instead")
        frames, timestamps = load_video(video)
        try:
            return preprocess_video(frames, self.video_config, timestamps=timestamps)
        except InputError:
            raise
        except ValueError as e:
            raise InputError(str(e)) from None

    def prompt_ids(self, prompt: str, images: Sequence[Any] = (), system: str | None = None,
                   vision_inputs=None, video: Any = None, video_inputs=None) -> list[int]:
        """The GLM chat ids of one request (images, then the video, before the text). ``vision_inputs`` /
        ``video_inputs`` are :meth:`preprocess` / :meth:`preprocess_video` results, used instead of ``images`` /
        ``video`` when given."""
        chat = self._require_chat()
        if vision_inputs is None:
            vision_inputs = self.preprocess(images)
        if video_inputs is None and video is not None:
            video_inputs = self.preprocess_video(video)
        counts = [] if vision_inputs is None else [num_image_tokens(g, self.host.spatial_merge_size)
                                                   for g in vision_inputs.grid_thw]
        frames = None
        if video_inputs is not None:
            inputs, stamps = video_inputs
            t, h, w = (int(v) for v in inputs.grid_thw[0])
            frames = (num_image_tokens((1, h, w), self.host.spatial_merge_size), list(stamps))
        if isinstance(prompt, str) and not prompt.strip() and not counts and frames is None:
            raise InputError("the prompt is empty and there is no image or video: nothing to answer; pass some text, "
                             "an image or a video")
        return chat.prompt_ids(prompt, counts, system=system, video=frames)

    def _prepare_requests(self, requests: Sequence[Request]) -> _Prepared:
        t0 = time.perf_counter()
        rows, pixels, grids, video_pixels, video_grids = [], [], [], [], []
        for request in requests:
            if isinstance(request, Mapping):
                request = Request(**request)
            elif isinstance(request, (tuple, list)):
                request = Request(*request)
            if not isinstance(request, Request):
                raise InputError(f"a request must be a Request, a dict or a (prompt, images) tuple, got "
                                 f"{type(request).__name__}")
            images = request.images
            if isinstance(images, (str, Path)) or hasattr(images, "size") and not isinstance(images, Sequence):
                images = [images]
            vision = self.preprocess(images)
            video = None if request.video is None else self.preprocess_video(request.video)
            rows.append(self.prompt_ids(request.prompt, system=request.system, vision_inputs=vision,
                                        video_inputs=video))
            if vision is not None:
                pixels.append(vision.pixel_values)
                grids.append(vision.grid_thw)
            if video is not None:
                video_pixels.append(video[0].pixel_values)
                video_grids.append(video[0].grid_thw)
        ids, mask = self._left_pad(rows)

        def joined(parts):
            return np.concatenate(parts) if parts else None

        plan = plan_prompt(self.host, ids, mask, joined(pixels), joined(grids), joined(video_pixels),
                           joined(video_grids))
        return _Prepared(plan, rows, time.perf_counter() - t0)

    def _left_pad(self, rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        if not rows:
            raise InputError("no requests given")
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.host.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for b, row in enumerate(rows):
            if len(row):
                ids[b, width - len(row):] = row
                mask[b, width - len(row):] = 1
        return ids, mask

    # ------------------------------------------------------------------ public generation
    def generate(self, prompt: str, images: Sequence[Any] = (), *, video: Any = None, system: str | None = None,
                 **options: Any) -> GenerationResult:
        """Generate a reply to one user prompt with its images and/or video.

        video: a list of frames, a (T, H, W, 3) uint8 array, a glob of frame files or a video file path (see
        :meth:`preprocess_video`); one vision call per temporal patch, 3-D positions as ``get_rope_index`` gives them.
        options: max_new_tokens, temperature (0 = greedy), top_k, top_p, repetition_penalty, seed,
        eos_token_ids (default: the manifest's EOS set); unspecified ones come from the manifest's generation
        defaults.
        """
        return self.generate_batch([Request(prompt, images, system, video)], **options)[0]

    def generate_batch(self, requests: Sequence[Request | Mapping | tuple], **options: Any) -> list[GenerationResult]:
        """Generate for several requests at once (left-padded; each stops on its own)."""
        opts = self.options(**options)
        prepared = self._prepare_requests(requests)
        return self._drain(self._generate(prepared, opts))

    def stream(self, prompt: str, images: Sequence[Any] = (), *, video: Any = None, system: str | None = None,
               **options: Any) -> TextStream:
        """Like :meth:`generate`, as an iterator of text deltas (valid text; they concatenate to the final text).
        The :class:`GenerationResult` is available as ``stream.result`` once the iterator is exhausted."""
        opts = self.options(**options)
        prepared = self._prepare_requests([Request(prompt, images, system, video)])  # input errors surface here
        holder: dict = {}

        def deltas() -> Iterator[str]:
            decoder = IncrementalDecoder(self.chat.decode)
            eos = self._eos(opts)
            steps = self._generate(prepared, opts)
            done = False
            while True:
                try:
                    tokens = next(steps)
                except StopIteration as stop:
                    holder["result"] = stop.value[0]
                    break
                token = int(tokens[0])
                if done:
                    continue
                if token in eos:
                    done = True
                    continue
                delta = decoder.push(token)
                if delta:
                    yield delta
            tail = decoder.flush(holder["result"].text)
            if tail:
                yield tail

        return TextStream(deltas(), holder)

    def generate_ids(self, input_ids, pixel_values=None, image_grid_thw=None, *, attention_mask=None,
                     pixel_values_videos=None, video_grid_thw=None, images_per_sample=None,
                     **options: Any) -> GenerationResult | list[GenerationResult]:
        """Generate from token ids and preprocessed visual inputs (what a transformers processor returns).

        input_ids: (L,) for one request -> one GenerationResult; (B, L) left-padded with ``attention_mask`` ->
        a list. pixel_values / image_grid_thw (and videos) in prompt order across the batch; GLM-Image takes its
        target grids in image_grid_thw with ``images_per_sample``. options as in :meth:`generate`.
        """
        opts = self.options(**options)
        t0 = time.perf_counter()
        ids = np.asarray(input_ids)
        single = ids.ndim == 1
        if not np.issubdtype(ids.dtype, np.integer) or ids.ndim not in (1, 2):
            raise InputError(f"input_ids must be integer (L,) or (B, L), got {ids.dtype} {ids.shape}")
        ids = np.atleast_2d(ids).astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.embed_table.shape[0]):
            raise InputError(f"input_ids hold ids outside the vocabulary 0..{self.embed_table.shape[0] - 1}")
        plan = plan_prompt(self.host, ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                           video_grid_thw, images_per_sample)
        prompts = [row[m == 1].tolist() for row, m in zip(plan.input_ids, plan.attention_mask)]
        results = self._drain(self._generate(_Prepared(plan, prompts, time.perf_counter() - t0), opts))
        return results[0] if single else results

    def options(self, **overrides: Any) -> GenerationOptions:
        """The effective generation options: the manifest's defaults with ``overrides`` (None = default)."""
        return resolve_options(self.manifest.generation, **overrides)

    # ------------------------------------------------------------------ the loop
    def _eos(self, options: GenerationOptions) -> frozenset[int]:
        return frozenset(self.eos_token_ids if options.eos_token_ids is None else options.eos_token_ids)

    @staticmethod
    def _drain(steps) -> list[GenerationResult]:
        while True:
            try:
                next(steps)
            except StopIteration as stop:
                return stop.value

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.embed_table[ids], dtype=self._embeds_dtype)

    def _vision(self, plan: PromptPlan) -> list[np.ndarray]:
        outputs = []
        for call in plan.vision_calls:
            inputs = plan.vision_inputs(call)
            missing = [n for n in self._vision_inputs if n not in inputs]
            if missing:
                raise ManifestError(f"the vision graph wants inputs {missing} the host does not make for the "
                                    f"{self.host.vision_kind!r} tower; re-export the folder")
            outputs.append(self._graph_call(self.backend.run, "vision",
                                            {n: inputs[n] for n in self._vision_inputs})[self._vision_output])
        return outputs

    def context_room(self, length: int) -> int:
        """How many tokens a batch whose padded prompt has ``length`` tokens can generate before the engines'
        context is full: prompt + generated tokens fit in the config's ``max_position_embeddings`` and, on TensorRT
        engines, in the profiles ``glmtrt build`` recorded (prefill sequence, decode cache). Raises InputError,
        naming the limits, when the prompt alone leaves no room (before any graph runs)."""
        limits, room = [], []
        if self.max_positions:
            limits.append(f"max_position_embeddings {self.max_positions} (prompt + generated tokens)")
            room.append(self.max_positions - length)
        profiles = ((self.manifest.extra or {}).get("tensorrt") or {}).get("profiles") or {}
        if getattr(self.backend, "name", "") == "trt" and profiles:
            try:
                seq_max = int(profiles["prefill"]["inputs_embeds"]["max"][1])
                cache_max = int(profiles["decode"]["attention_mask"]["max"][1])
            except (KeyError, IndexError, TypeError, ValueError):
                raise ManifestError("the manifest's TensorRT profiles lack the prefill inputs_embeds / decode "
                                    "attention_mask ranges; run `glmtrt build` again") from None
            limits.append(f"the TensorRT profiles' prefill sequence of {seq_max} and decode cache of {cache_max} "
                          "positions")
            room.append(cache_max - length + 1 if length <= seq_max else 0)
        if room and min(room) < 1:
            raise InputError(f"the prompt has {length} tokens (images included), too long for these engines: "
                             f"{'; '.join(limits)}; shorten the prompt or pass fewer or smaller images")
        return min(room) if room else 1 << 62

    def _graph_call(self, fn, *args):
        """One backend call (a graph run, a decode state's start, prefill or step); see ``_graph_lock``."""
        if self._graph_lock is None:
            return fn(*args)
        with self._graph_lock:
            out = fn(*args)
            if isinstance(out, np.ndarray):
                return out.copy()
            if isinstance(out, dict):
                return {k: np.array(v) for k, v in out.items()}
            return out

    def _check_logits(self, logits: np.ndarray, graph: str, step: int | None = None) -> None:
        """NaN or inf in a graph's logits is an engine fault: refuse it, naming the graph (float64 sum: no
        allocation and no overflow from finite float32 values, so it is finite iff every logit is)."""
        if np.isfinite(np.sum(logits, dtype=np.float64)):
            return
        where = "" if step is None else f" at decode step {step}"
        rows = sorted({int(b) for b in np.nonzero(~np.isfinite(np.asarray(logits)))[0]})
        raise EngineError(f"the {graph} graph ({self.manifest.graphs[graph].file}) returned NaN or inf logits{where} "
                          f"(batch rows {rows}); the engines are numerically broken (an fp16/int8 overflow or a "
                          f"damaged graph): check them with `glmtrt parity --engines {self.folder}` or use an fp32 "
                          "export")

    def _generate(self, prepared: _Prepared, options: GenerationOptions):
        """Generator: yields each step's tokens (B,) and returns the list of GenerationResult."""
        plan, prompts = prepared.plan, prepared.prompts
        t_start = time.perf_counter() - prepared.preprocess_s
        batch, length = plan.input_ids.shape
        max_new = options.max_new_tokens
        limit = plan.max_decode_steps
        if limit is not None and max_new > limit:
            raise InputError(f"GLM-Image generates at most {limit} tokens for these target grids "
                             f"(grid tokens + end); max_new_tokens is {max_new}")
        # A full context ends generation with stop reason "length", as max_new_tokens does.
        max_new = min(max_new, self.context_room(length))
        eos = self._eos(options)
        timings = {"preprocess_s": prepared.preprocess_s}

        t = time.perf_counter()
        outputs = self._vision(plan)
        timings["vision_s"] = time.perf_counter() - t

        t = time.perf_counter()
        if plan.merges_codes:
            plan.merge_codes([np.asarray(o).reshape(-1).astype(np.int64) for o in outputs])
        embeds = self._embed(plan.input_ids)
        if not plan.merges_codes:
            plan.merge_embeddings(embeds, outputs)
        state = self._graph_call(self.backend.start_decode, batch, length + max_new - 1)
        mask = plan.attention_mask
        logits = self._graph_call(state.prefill, embeds, plan.position_ids, mask)
        self._check_logits(logits, "prefill")
        sampler = Sampler(options, prompts, logits.shape[-1])
        tokens = sampler(logits)
        now = time.perf_counter()
        timings["prefill_s"] = now - t
        timings["ttft_s"] = now - t_start

        generated: list[list[int]] = [[] for _ in range(batch)]
        stops: list[str | None] = [None] * batch

        def record(step_tokens: np.ndarray) -> None:
            for b, token in enumerate(step_tokens.tolist()):
                if stops[b] is not None:
                    continue
                generated[b].append(token)
                if token in eos:
                    stops[b] = STOP_EOS
                elif len(generated[b]) >= max_new:
                    stops[b] = STOP_LENGTH

        record(tokens)
        yield tokens
        t = time.perf_counter()
        steps = 0
        for step in range(max_new - 1):
            if all(s is not None for s in stops):
                break
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=mask.dtype)], axis=1)
            logits = self._graph_call(state.step, self._embed(tokens[:, None]), plan.decode_positions(step), mask)
            self._check_logits(logits, "decode", step)
            tokens = sampler(logits)
            steps += 1
            record(tokens)
            yield tokens
        decode_s = time.perf_counter() - t
        timings["decode_s"] = decode_s
        timings["decode_tokens_per_s"] = steps * batch / decode_s if steps and decode_s > 0 else 0.0
        return [self._result(ids, prompt, stop, timings) for ids, prompt, stop in zip(generated, prompts, stops)]

    def _result(self, ids: list[int], prompt: list[int], stop: str | None, timings: dict) -> GenerationResult:
        text_ids = ids[:-1] if stop == STOP_EOS else ids
        text = self.chat.decode(text_ids) if self.chat is not None else ""
        thinking, answer = split_thinking(text)
        return GenerationResult(text=text, token_ids=list(ids), prompt_token_ids=list(prompt),
                                stop_reason=stop or STOP_LENGTH, timings=dict(timings), thinking=thinking,
                                answer=answer)


# ---------------------------------------------------------------------------------------------- the CLI

def share_weights_option(args) -> dict[str, bool]:
    """``--share-weights`` as a backend option (only when given: the TensorRT backend takes no such option)."""
    return {"share_weights": True} if getattr(args, "share_weights", False) else {}


def run_command(args) -> int:
    """``glmtrt run``: one request through the runtime; text (or --json) on stdout."""
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                   eos_token_ids=() if args.ignore_eos else None)
    pipe = Pipeline.from_engines(args.engines, provider=args.provider, verify_hashes=not args.no_verify,
                                 threads=args.threads, **share_weights_option(args))
    pipe.options(**options)  # validate before any image is read
    for image in args.image:
        if not Path(image).is_file():
            raise InputError(f"image {image!r} does not exist; pass an existing image file")
    video = getattr(args, "video", None)
    if args.stream:
        out = sys.stderr if args.json else sys.stdout  # --json keeps stdout for the one JSON object
        stream = pipe.stream(args.prompt, args.image, video=video, system=args.system, **options)
        for delta in stream:
            out.write(delta)
            out.flush()
        out.write("\n")
        result = stream.result
    else:
        result = pipe.generate(args.prompt, args.image, video=video, system=args.system, **options)
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    elif not args.stream:
        print(result.text)
    if not args.json:
        t = result.timings
        print(f"[{len(result.token_ids)} tokens, stop: {result.stop_reason}; ttft {t['ttft_s'] * 1e3:.1f} ms, "
              f"decode {t['decode_tokens_per_s']:.1f} tok/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    from .cli import main

    sys.exit(main(["run", *sys.argv[1:]]))
