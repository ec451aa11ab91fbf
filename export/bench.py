"""``glmtrt bench``: one OCR workload through transformers eager, the PyTorch reference and ONNX Runtime engines
folders, on the same seeded random weights, in one command.

Roads (each in its own subprocess, so each has its own peak memory and thread settings):

* ``transformers-fp32`` / ``transformers-bf16``: transformers' model class built from the preset's config
  (eager attention), loaded with the reference's weights (identical state-dict keys); its own image processor;
  the stages driven like ``generate`` does (vision, merge, prefill with the 3-D positions, a DynamicCache decode).
  transformers is a test-only oracle, so this road's worker is ``tests/bench_transformers.py`` (a source checkout
  has it; elsewhere the rows are skipped and say why).
* ``reference``: :mod:`glmtrt.reference` in fp32, stage by stage on the shared host functions.
* ``onnxruntime``: every engines folder given (default: the preset exported once to ``<cache>/bench-<preset>``),
  through the torch-free :class:`~glmtrt.runtime.pipeline.Pipeline`.
* ``onnxruntime-shared``: the same folders with ``share_weights=True`` (prefill and decode weights held once).

Per road, medians over ``--repeats``: preprocessing, vision, prefill (and prompt tokens/s), time to first token
(preprocess + vision + prefill + first token), decode tokens/s over the generated tokens (at the prompt's real
context), and peak RSS per stage (the kernel's high-water mark, reset before each stage through
``/proc/self/clear_refs``; the largest over repeats). Ratios are to transformers fp32 of the same run.
``--context`` adds decode steps over a synthetic past of each length (per-step cost against context).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from glmtrt.runtime.errors import GlmTrtError

DEFAULT_PRESET = "glm-ocr"
DEFAULT_PROMPT = "Text Recognition:"
ROADS = ("transformers-fp32", "transformers-bf16", "reference", "onnxruntime", "onnxruntime-shared")
STAGES = ("preprocess", "vision", "prefill", "decode")
BASE = "transformers-fp32"
# Stand-ins for the chat special tokens when a (real-size, random-weight) preset has no tokenizer.
_FALLBACK_SPECIALS = {"[gMASK]": 3, "<sop>": 4, "<|user|>": 5, "<|assistant|>": 6}
_CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
              "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")


# ---------------------------------------------------------------------------------------------- measurement

def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) if match else 0


class PeakMemory:
    """The process's resident-set high-water mark, resettable (Linux: ``echo 5 > /proc/self/clear_refs``)."""

    def __init__(self):
        self.resettable = self._reset()

    @staticmethod
    def _reset() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.resettable:
            self._reset()

    def peak_gib(self) -> float:
        return _status_kib("VmHWM") / 2**20

    @staticmethod
    def current_gib() -> float:
        return _status_kib("VmRSS") / 2**20


class Stages:
    """Times and memory of the stages of one run: the RSS high-water mark during each stage (``peaks``) and its
    rise over the RSS the stage started with (``work``: the stage's own working memory, weights excluded)."""

    def __init__(self, memory: PeakMemory):
        self.memory, self.seconds, self.peaks, self.work = memory, {}, {}, {}

    def open(self) -> None:
        """A stage starts: reset the high-water mark, note the resident set."""
        self.memory.reset()
        self._rss = self.memory.current_gib()

    def close(self, stage: str) -> None:
        peak = self.memory.peak_gib()
        self.peaks[stage], self.work[stage] = peak, max(0.0, peak - self._rss)

    def start(self) -> None:
        self.open()
        self._t = time.perf_counter()

    def stop(self, stage: str) -> None:
        self.seconds[f"{stage}_s"] = time.perf_counter() - self._t
        self.close(stage)


# ---------------------------------------------------------------------------------------------- workload

def bench_image(size: int, seed: int = 0):
    """A page-like picture: light background, dark text-like strokes, some noise (deterministic)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    page = np.full((size, size), 235, np.float32)
    for row in range(size // 32):
        y = 8 + row * 32
        x = 16
        while x < size - 24:
            width = int(rng.integers(6, 40))
            page[y:y + 14, x:x + width] -= rng.uniform(120, 200)
            x += width + int(rng.integers(4, 14))
    page += rng.normal(0, 6, page.shape)
    rgb = np.clip(np.stack([page, page * 0.98, page * 0.95], axis=-1), 0, 255).astype(np.uint8)
    return Image.fromarray(rgb)


def prompt_ids(config: dict, image_tokens: int, text: str) -> list[int]:
    """The GLM-OCR chat prompt for one image (``glmtrt.reference.demo.ocr_prompt_ids``' layout), the same ids on
    every road: the config's image tokens, fixed stand-ins for the chat specials and one id per character
    (random weights make the ids' meaning moot; the length is what costs). ``config``: a ModelConfig dict."""
    s = _FALLBACK_SPECIALS
    encode = lambda chars: [100 + ord(ch) % 100 for ch in chars]  # noqa: E731
    return ([s["[gMASK]"], s["<sop>"], s["<|user|>"]] + encode("\n") + [int(config["image_start_token_id"])]
            + [int(config["image_token_id"])] * image_tokens + [int(config["image_end_token_id"])] + encode(text)
            + [s["<|assistant|>"]] + encode("\n"))


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _summary(runs: list[dict], prompt_tokens: int) -> dict[str, float | None]:
    keys = ("preprocess_s", "vision_s", "prefill_s", "ttft_s", "decode_s", "decode_tokens_per_s")
    out = {k: _median([r.get(k) for r in runs]) for k in keys}
    out["prefill_tokens_per_s"] = prompt_tokens / out["prefill_s"] if out["prefill_s"] else None
    return out


def random_past(layers: int, kv_heads: int, length: int, head_dim: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, kv_heads, length, head_dim), dtype=np.float32) for _ in range(2 * layers)]


# ---------------------------------------------------------------------------------------------- the roads

def _work_reference(spec: dict, memory: PeakMemory, log) -> dict:
    import torch

    from glmtrt.reference import load_reference
    from glmtrt.reference.generate import PromptBatch, host_plan
    from glmtrt.runtime.preprocess import ImageProcessorConfig, num_image_tokens, preprocess_images

    model = load_reference(spec["preset"])
    v, t = model.config.vision, model.config.text
    config = ImageProcessorConfig(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                                  merge_size=v.spatial_merge_size)
    image = bench_image(spec["image_size"])
    runs = []
    load_gib = memory.current_gib()
    for repeat in range(spec["repeats"]):
        s = Stages(memory)
        with torch.no_grad():
            s.start()
            vision_inputs = preprocess_images([image], config)
            ids = prompt_ids(model.config.to_dict(), num_image_tokens(vision_inputs.grid_thw[0], v.spatial_merge_size),
                             spec["prompt"])
            batch = PromptBatch(input_ids=np.array([ids]), pixel_values=vision_inputs.pixel_values,
                                image_grid_thw=vision_inputs.grid_thw)
            plan = host_plan(model, batch)
            s.stop("preprocess")
            s.start()
            outputs = []
            for call in plan.vision_calls:
                inputs = {k: torch.from_numpy(a) for k, a in plan.vision_inputs(call).items()}
                outputs.append(model.vision(inputs.pop("pixel_values"), **inputs))
            s.stop("vision")
            s.start()
            embeds = model.embed(torch.from_numpy(plan.input_ids)).clone()
            for kind, parts in plan.outputs_by_kind(outputs).items():
                b_idx, s_idx = plan.placeholder_index(kind)
                embeds[torch.from_numpy(b_idx), torch.from_numpy(s_idx)] = torch.cat(parts).to(embeds.dtype)
            mask = torch.from_numpy(plan.attention_mask)
            logits, keys, values = model.prefill(embeds, torch.from_numpy(plan.position_ids), mask)
            tokens = [int(logits.float().argmax(-1)[0])]
            s.stop("prefill")
            s.start()
            for step in range(spec["new_tokens"] - 1):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                logits, keys, values = model.decode_step(model.embed(torch.tensor([[tokens[-1]]])),
                                                         torch.from_numpy(plan.decode_positions(step)), mask, keys, values)
                tokens.append(int(logits.float().argmax(-1)[0]))
            s.stop("decode")
            del keys, values
        runs.append(run_record(s, tokens, spec))
        log(f"repeat {repeat + 1}: {brief(runs[-1])}")

    def step_fn(length):
        past = [torch.from_numpy(a) for a in random_past(t.num_layers, t.num_kv_heads, length, t.head_dim)]
        keys, values = past[0::2], past[1::2]
        embeds = torch.randn(1, 1, t.hidden_size, generator=torch.Generator().manual_seed(length))

        def step(i):
            nonlocal keys, values
            mask = torch.ones(1, length + i + 1, dtype=torch.int64)
            positions = torch.full((3, 1, 1), length + i, dtype=torch.int64)
            with torch.no_grad():
                _, keys, values = model.decode_step(embeds, positions, mask, keys, values)
        return step

    return {"runs": runs, "load_gib": load_gib, "prompt_tokens": len(ids), "patches": int(vision_inputs.pixel_values.shape[0]),
            "context": sweep(spec, step_fn, memory, log)}


def _work_onnxruntime(spec: dict, memory: PeakMemory, log) -> dict:
    from glmtrt.runtime.pipeline import Pipeline
    from glmtrt.runtime.preprocess import num_image_tokens

    pipe = Pipeline.from_engines(spec["engines"], threads=spec["threads"], verify_hashes=False,
                                 share_weights=spec.get("share_weights", False))
    manifest = pipe.manifest
    probe = _StageProbe(pipe.backend)
    pipe.backend = probe
    image = bench_image(spec["image_size"])
    runs = []
    load_gib = memory.current_gib()
    for repeat in range(spec["repeats"]):
        s = Stages(memory)
        s.start()
        vision_inputs = pipe.preprocess([image])
        ids = prompt_ids(manifest.config, num_image_tokens(vision_inputs.grid_thw[0], pipe.host.spatial_merge_size),
                         spec["prompt"])
        s.stop("preprocess")
        probe.begin(s)
        result = pipe.generate_ids(np.array(ids), vision_inputs.pixel_values, vision_inputs.grid_thw,
                                   max_new_tokens=spec["new_tokens"], eos_token_ids=(), temperature=0.0,
                                   repetition_penalty=1.0, top_k=0, top_p=1.0)
        probe.end()
        t = result.timings
        # Stage times are the pipeline's own; its preprocess_s (host plan) adds to the image preprocessing.
        s.seconds.update(preprocess_s=s.seconds["preprocess_s"] + t["preprocess_s"], vision_s=t["vision_s"],
                         prefill_s=t["prefill_s"], decode_s=t["decode_s"])
        runs.append(run_record(s, result.token_ids, spec))
        log(f"repeat {repeat + 1}: {brief(runs[-1])}")

    text = manifest.config["text"]
    backend = probe.backend

    def step_fn(length):
        import numpy as np

        state = backend.start_decode(1, length + spec["context_steps"] + 1)
        state.load(random_past(int(text["num_layers"]), int(text["num_kv_heads"]), length, int(text["head_dim"])))
        embeds = np.random.default_rng(length).standard_normal((1, 1, int(text["hidden_size"])), dtype=np.float32)

        def step(i):
            state.step(embeds, np.full((3, 1, 1), length + i, np.int64), np.ones((1, length + i + 1), np.int64))
        return step

    out = {"runs": runs, "load_gib": load_gib, "prompt_tokens": len(ids), "patches": int(vision_inputs.pixel_values.shape[0]),
           "precision": manifest.precision, "kv_cache": (manifest.extra.get("kv_cache") or {}).get("mode", "concat"),
           "backend": backend.name, "context": sweep(spec, step_fn, memory, log)}
    return out


class _StageProbe:
    """Stands in for a Pipeline's backend to cut its memory high-water mark at the stage boundaries:
    vision ends at ``start_decode``, prefill when the decode state's prefill returns, decode at the end."""

    def __init__(self, backend):
        self.backend, self.stages = backend, None

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def begin(self, stages: Stages) -> None:
        self.stages = stages
        stages.open()

    def run(self, graph, inputs):
        return self.backend.run(graph, inputs)

    def start_decode(self, batch, capacity):
        stages = self.stages
        stages.close("vision")
        stages.open()
        state = self.backend.start_decode(batch, capacity)
        original = state.prefill

        def prefill(*args, **kwargs):
            logits = original(*args, **kwargs)
            stages.close("prefill")
            stages.open()
            return logits

        state.prefill = prefill
        return state

    def end(self) -> None:
        self.stages.close("decode")


def run_record(s: Stages, tokens, spec: dict) -> dict:
    record = dict(s.seconds)
    record["ttft_s"] = record["preprocess_s"] + record["vision_s"] + record["prefill_s"]
    steps = spec["new_tokens"] - 1
    record["decode_tokens_per_s"] = steps / record["decode_s"] if steps and record["decode_s"] > 0 else None
    record["peak_gib"] = dict(s.peaks)
    record["work_gib"] = dict(s.work)
    record["tokens"] = [int(t) for t in tokens]
    return record


def brief(run: dict) -> str:
    tps = run["decode_tokens_per_s"]
    return (f"vision {run['vision_s']:.2f} s, prefill {run['prefill_s']:.2f} s, ttft {run['ttft_s']:.2f} s, decode "
            f"{tps:.2f} tok/s, peak {max(run['peak_gib'].values()):.2f} GiB" if tps else "decode -")


def sweep(spec: dict, step_fn, memory: PeakMemory, log) -> list[dict]:
    """Per-step decode time over a synthetic past of each ``spec["contexts"]`` length: one warm-up step each, then
    the contexts take turns step by step (round robin), so a machine's changing load falls on all of them alike."""
    if not spec["contexts"]:
        return []
    memory.reset()
    steps = {length: step_fn(length) for length in spec["contexts"]}
    for step in steps.values():
        step(0)
    times: dict[int, list[float]] = {length: [] for length in steps}
    for i in range(1, spec["context_steps"] + 1):
        for length, step in steps.items():
            t0 = time.perf_counter()
            step(i)
            times[length].append(time.perf_counter() - t0)
    peak = memory.peak_gib()
    rows = []
    for length, ts in times.items():
        ms = statistics.median(ts) * 1e3
        rows.append({"context": length, "step_ms": ms, "tokens_per_s": 1e3 / ms, "steps": len(ts),
                     "min_ms": min(ts) * 1e3})
        log(f"context {length}: {ms:.1f} ms/step (min {min(ts) * 1e3:.1f})")
    rows[0]["peak_gib_all_contexts"] = peak
    return rows


WORKERS = {"reference": _work_reference, "onnxruntime": _work_onnxruntime}
# transformers is a test-only oracle (glmtrt's packages never import it): its roads run the worker of the test
# oracle, tests/bench_transformers.py, which a glmtrt source checkout (an editable install) has beside export/.
TRANSFORMERS_WORKER = Path(__file__).resolve().parents[1] / "tests" / "bench_transformers.py"


def worker_main(spec_path: str, out_path: str, workers=None) -> int:
    """Run one road (``spec["kind"]``, by ``workers``, default :data:`WORKERS`) in this process; write its result."""
    spec = json.loads(Path(spec_path).read_text())
    memory = PeakMemory()
    label = spec["label"]

    def log(line: str) -> None:
        print(f"  [{label}] {line}", file=sys.stderr, flush=True)

    if spec["kind"] != "onnxruntime":
        import torch

        torch.set_num_threads(spec["threads"])
    started = time.perf_counter()
    result = (workers or WORKERS)[spec["kind"]](spec, memory, log)
    result["seconds"] = time.perf_counter() - started
    result["peak_memory_resettable"] = memory.resettable
    Path(out_path).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------- the parent

def machine_info(threads: int) -> dict[str, Any]:
    info: dict[str, Any] = {"threads": threads, "cpus_visible": len(os.sched_getaffinity(0)),
                            "platform": platform.platform(), "python": platform.python_version(),
                            "loadavg": list(os.getloadavg())}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
        flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
        info["cpu_model"] = model.group(1).strip() if model else platform.processor()
        all_flags = flags.group(1).split() if flags else []
        info["cpu_flags"] = [f for f in _CPU_FLAGS if f in all_flags]
        info["cpu_flags_all"] = all_flags
        mem = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        info["memory_gib"] = round(int(mem.group(1)) / 2**20, 1) if mem else None
    except OSError:
        info["cpu_model"] = platform.processor()
    return info


def library_versions() -> dict[str, str | None]:
    from importlib import metadata

    versions = {}
    for name in ("glmtrt", "torch", "transformers", "onnxruntime", "onnx", "numpy", "tokenizers", "pillow"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _engines_folders(args, preset: str, log) -> list[Path]:
    if args.engines:
        folders = [Path(e) for e in args.engines]
        for folder in folders:
            if not folder.is_dir():
                raise GlmTrtError(f"engines folder {str(folder)!r} does not exist")
        return folders
    folder = Path(args.cache) / f"bench-{preset}"
    from glmtrt.runtime.manifest import MANIFEST_NAME

    if not (folder / MANIFEST_NAME).is_file():
        from .folder import export_model

        log(f"exporting {preset} once to {folder} (reused by later runs) ...")
        t0 = time.perf_counter()
        export_model(preset, folder, force=folder.exists(), progress=False)
        log(f"exported in {time.perf_counter() - t0:.0f} s")
    return [folder]


def _check_folder(folder: Path, preset: str) -> str | None:
    """Refuse a folder not exported from ``preset``; returns why it cannot run with shared weights, or None."""
    from glmtrt.reference.config import preset as preset_config
    from glmtrt.runtime.backends.onnxruntime import prepack_only_ops
    from glmtrt.runtime.manifest import Manifest

    manifest = Manifest.load(folder, verify_hashes=False)
    source = manifest.extra.get("source")
    want = json.loads(json.dumps(preset_config(preset).to_dict()))
    if manifest.config != want or source != preset or not manifest.extra.get("random_weights"):
        raise GlmTrtError(f"{str(folder)!r} was not exported from the preset {preset!r} (its source: {source!r}); the "
                          f"bench compares the same seeded weights on every road: pass folders exported from {preset}")
    if not manifest.shared_weights:
        return "exported before the prefill and decode weights were stored once: re-export"
    prepack_only = prepack_only_ops(manifest)
    if prepack_only:
        return f"its {', '.join(prepack_only)} kernels need their own prepacked weights"
    return None


def _transformers_unavailable() -> str | None:
    """Why the transformers roads cannot run here, or None."""
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed"
    if not TRANSFORMERS_WORKER.is_file():
        return (f"its worker {TRANSFORMERS_WORKER.name} (the test oracle) comes with a glmtrt source checkout, not "
                "with this install")
    return None


def _run_worker(spec: dict, log) -> dict:
    env = dict(os.environ)
    threads = str(spec["threads"])
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads,
               TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory(prefix="glmtrt-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        log(f"{spec['label']}: running")
        program = [str(TRANSFORMERS_WORKER)] if spec["kind"] == "transformers" else ["-m", "glmtrt.export.bench"]
        proc = subprocess.run([sys.executable, *program, "--worker", str(spec_path), str(out_path)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for line in proc.stderr.splitlines():
            if line.startswith("  ["):
                log(line.strip())
        if proc.returncode != 0 or not out_path.is_file():
            tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
            return {"status": "failed", "note": f"worker exited with {proc.returncode}: {tail[0]}",
                    "stderr_tail": proc.stderr[-4000:]}
        result = json.loads(out_path.read_text())
    result["status"] = "ok"
    return result


def run_bench(args, log=None) -> dict[str, Any]:
    """Run the benchmark described by the CLI ``args``; returns the JSON-ready report."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    from glmtrt.reference.config import preset_names

    preset = args.preset
    if preset not in preset_names():
        raise GlmTrtError(f"--preset {preset!r} is not a preset; choose one of: {', '.join(preset_names())}")
    for name, value, low in (("--repeats", args.repeats, 1), ("--new-tokens", args.new_tokens, 2),
                             ("--threads", args.threads, 1), ("--image-size", args.image_size, 28),
                             ("--context-steps", args.context_steps, 1)):
        if value < low:
            raise GlmTrtError(f"{name} must be at least {low}, got {value}")
    contexts = _parse_contexts(args.context)
    roads = _parse_roads(args.roads)
    spec_base = {"preset": preset, "image_size": args.image_size, "prompt": args.prompt, "new_tokens": args.new_tokens,
                 "repeats": args.repeats, "threads": args.threads, "contexts": contexts,
                 "context_steps": args.context_steps}
    jobs: list[dict] = []
    notes: list[str] = []
    hf_missing = _transformers_unavailable()
    for road in roads:
        if road.startswith("transformers"):
            jobs.append({"label": road, "kind": "transformers", "dtype": road.split("-")[1],
                         **({"skip": hf_missing} if hf_missing else {})})
        elif road == "reference":
            jobs.append({"label": "reference-fp32", "kind": "reference", "dtype": "fp32"})
        else:
            shared = road == "onnxruntime-shared"
            for folder in _engines_folders(args, preset, log):
                not_shareable = _check_folder(folder, preset)
                if shared and not_shareable:
                    jobs.append({"label": f"onnxruntime {folder.name} (shared weights)", "kind": "onnxruntime",
                                 "skip": not_shareable})
                    continue
                jobs.append({"label": f"onnxruntime {folder.name}{' (shared weights)' if shared else ''}",
                             "kind": "onnxruntime", "engines": str(folder), "share_weights": shared})
    if hf_missing and any(r.startswith("transformers") for r in roads):
        notes.append(f"transformers roads skipped ({hf_missing}): no ratios are given")

    from glmtrt.reference.config import preset as preset_config

    config = preset_config(preset)
    load_before = list(os.getloadavg())
    started = time.perf_counter()
    rows = []
    for job in jobs:
        row = {"name": job["label"], "kind": job["kind"], "dtype": job.get("dtype"), "engines": job.get("engines")}
        if "skip" in job:
            row.update(status="skipped", note=job["skip"])
        else:
            row.update(_run_worker({**spec_base, **job}, log))
        rows.append(row)
    machine = machine_info(args.threads)
    machine.pop("loadavg")
    machine["loadavg_before"], machine["loadavg_after"] = load_before, list(os.getloadavg())  # other work skews timings
    report = {
        "glmtrt_version": library_versions()["glmtrt"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "glmtrt " + " ".join(args.argv) if getattr(args, "argv", None) is not None else None,
        "machine": machine,
        "libraries": library_versions(),
        "workload": {"preset": preset, "parameters": _parameter_count(config), "image_size": [args.image_size] * 2,
                     "prompt": args.prompt, "new_tokens": args.new_tokens, "repeats": args.repeats,
                     "threads": args.threads, "contexts": contexts, "context_steps": args.context_steps},
        "roads": rows,
        "notes": notes,
        "seconds": time.perf_counter() - started,
    }
    _finish(report)
    return report


def _parameter_count(config) -> int:
    import torch

    from glmtrt.reference.model import GlmModel

    with torch.device("meta"):
        return sum(p.numel() for p in GlmModel(config).parameters())


def _parse_contexts(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise GlmTrtError(f"--context takes comma-separated past lengths, e.g. 64,1024,4096; got {text!r}") from None
    if not values or min(values) < 1:
        raise GlmTrtError(f"--context lengths must be positive, got {text!r}")
    return values


def _parse_roads(text: str | None) -> list[str]:
    if not text:
        return list(ROADS)
    roads = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in roads if r not in ROADS]
    if unknown or not roads:
        raise GlmTrtError(f"--roads: unknown {unknown}; choose from {', '.join(ROADS)}")
    return roads


def _finish(report: dict) -> None:
    """Medians, ratios to transformers fp32, token agreement, workload facts and the goals."""
    rows = [r for r in report["roads"] if r.get("status") == "ok"]
    for row in rows:
        row["median"] = _summary(row["runs"], row["prompt_tokens"])
        peaks, work = [r["peak_gib"] for r in row["runs"]], [r["work_gib"] for r in row["runs"]]
        row["peak_gib"] = {stage: max(p.get(stage, 0.0) for p in peaks) for stage in STAGES}
        row["peak_gib"]["whole"] = max(row["peak_gib"].values())
        row["work_gib"] = {stage: max(p.get(stage, 0.0) for p in work) for stage in STAGES}
        row["tokens"] = row["runs"][0]["tokens"]
    workload = report["workload"]
    if rows:
        workload["patches"], workload["prompt_tokens"] = rows[0]["patches"], rows[0]["prompt_tokens"]
        differing = sorted({r["name"] for r in rows if (r["patches"], r["prompt_tokens"]) != (rows[0]["patches"],
                                                                                               rows[0]["prompt_tokens"])})
        if differing:
            report["notes"].append(f"these roads saw another input size than {rows[0]['name']}: {differing}")
    base = next((r for r in rows if r["name"] == BASE), None)
    report["base"] = BASE if base else None
    if base is None and rows:
        report["notes"].append("no transformers fp32 row: ratios are not given")
    for row in rows:
        row["ratios"] = _ratios(row, base) if base else None
        if base:
            ours, theirs = row["tokens"], base["tokens"]
            match = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            row["tokens_match_base"] = f"{match}/{len(theirs)}"
        if row["context"]:
            first = row["context"][0]["step_ms"]
            for c in row["context"]:
                c["step_vs_first"] = c["step_ms"] / first
                if base and base["context"]:
                    same = next((b for b in base["context"] if b["context"] == c["context"]), None)
                    c["speedup_vs_base"] = same["step_ms"] / c["step_ms"] if same else None
    report["goals"] = _goals(rows, base, report)


def _ratios(row: dict, base: dict) -> dict[str, float | None]:
    """value / transformers fp32 value per metric (times and memory: lower is better; tokens/s: higher)."""
    out = {}
    for key, value in row["median"].items():
        ref = base["median"].get(key)
        out[key] = value / ref if value is not None and ref else None
    for stage, value in row["peak_gib"].items():
        ref = base["peak_gib"].get(stage)
        out[f"peak_{stage}"] = value / ref if ref else None
    ref = base["work_gib"]["vision"]
    out["work_vision"] = row["work_gib"]["vision"] / ref if ref else None
    return out


def _goals(rows: list[dict], base: dict | None, report: dict) -> list[dict]:
    """The issue's fp32 goals, judged on the ONNX Runtime fp32 rows of this run."""
    goals = []
    fp32 = [r for r in rows if r["kind"] == "onnxruntime" and r.get("precision") == "fp32"]
    for row in fp32:
        name = row["name"]
        if base:
            ratio = row["ratios"]["decode_tokens_per_s"]
            goals.append({"road": name, "goal": f"fp32 decode at {row['prompt_tokens']} context >= 1.3x transformers fp32 tok/s",
                          "value": ratio, "met": ratio is not None and ratio >= 1.3})
            r = row["ratios"]
            t_ratio, m_ratio, w_ratio = r["vision_s"], r["peak_vision"], r["work_vision"]
            goals.append({"road": name, "goal": "vision fp32 time <= 1.0x transformers fp32, peak memory no higher",
                          "value": {"time": t_ratio, "peak_memory": m_ratio, "working_memory": w_ratio},
                          "met": t_ratio is not None and m_ratio is not None and t_ratio <= 1.0 and m_ratio <= 1.0})
        contexts = {c["context"]: c["step_ms"] for c in row["context"]}
        if len(contexts) >= 2:
            lo, hi = min(contexts), max(contexts)
            ratio = contexts[hi] / contexts[lo]
            goals.append({"road": name, "goal": f"decode step at {hi} context <= 1.3x a step at {lo}",
                          "value": ratio, "met": ratio <= 1.3 if (lo <= 64 and hi >= 4096) else None})
    return goals


# ---------------------------------------------------------------------------------------------- output

def _fmt(value, fmt: str = ".2f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{unit}"


def _with_ratio(value, ratio, fmt=".2f") -> str:
    if value is None:
        return "-"
    return f"{value:{fmt}}" + (f" ({ratio:.2f}x)" if ratio is not None else "")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def format_table(report: dict) -> str:
    w, m = report["workload"], report["machine"]
    lines = [f"glmtrt bench: {w['preset']} ({_count(w['parameters'])} parameters, random weights), "
             f"{w['image_size'][0]}x{w['image_size'][1]} image -> {w.get('patches', '?')} patches, "
             f"{w.get('prompt_tokens', '?')} prompt tokens, {w['new_tokens']} new tokens; median of {w['repeats']}",
             f"{m.get('cpu_model', '?')} ({', '.join(m.get('cpu_flags', []))}); {m['threads']} threads; load average "
             f"{m['loadavg_before'][0]:.1f} -> {m['loadavg_after'][0]:.1f}; "
             + ", ".join(f"{k} {v}" for k, v in report["libraries"].items() if v and k in ("torch", "transformers", "onnxruntime")),
             "",
             "| road | preprocess s | vision s | prefill s | prefill tok/s | TTFT s | decode tok/s "
             "| peak GiB vision | vision working GiB | peak GiB prefill | peak GiB decode | peak GiB whole | tokens = base |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["roads"]:
        if row.get("status") != "ok":
            lines.append(f"| {row['name']} | {row['status']}: {row.get('note', '')} |" + " |" * 11)
            continue
        med, r, p = row["median"], row.get("ratios") or {}, row["peak_gib"]
        lines.append(
            f"| {row['name']} | {_with_ratio(med['preprocess_s'], r.get('preprocess_s'), '.3f')} "
            f"| {_with_ratio(med['vision_s'], r.get('vision_s'))} | {_with_ratio(med['prefill_s'], r.get('prefill_s'))} "
            f"| {_with_ratio(med['prefill_tokens_per_s'], r.get('prefill_tokens_per_s'), '.0f')} "
            f"| {_with_ratio(med['ttft_s'], r.get('ttft_s'))} | {_with_ratio(med['decode_tokens_per_s'], r.get('decode_tokens_per_s'))} "
            f"| {_with_ratio(p['vision'], r.get('peak_vision'))} | {_with_ratio(row['work_gib']['vision'], r.get('work_vision'))} "
            f"| {_with_ratio(p['prefill'], r.get('peak_prefill'))} "
            f"| {_with_ratio(p['decode'], r.get('peak_decode'))} | {_with_ratio(p['whole'], r.get('peak_whole'))} "
            f"| {row.get('tokens_match_base', '-')} |")
    lines.append("")
    lines.append("ratios (in parentheses) are to transformers fp32 of this run: below 1 is better for seconds and GiB, "
                 "above 1 for tok/s. Peak GiB: the road's process RSS high-water mark during that stage (resident "
                 "weights of all its graphs included); working GiB: that peak's rise over the stage's starting RSS.")
    swept = [r for r in report["roads"] if r.get("status") == "ok" and r.get("context")]
    if swept:
        contexts = [c["context"] for c in swept[0]["context"]]
        lines += ["", f"decode step at a synthetic past (median of {report['workload']['context_steps']} steps, ms; "
                      "in parentheses: vs the shortest context)", "",
                  "| road | " + " | ".join(f"past {c}" for c in contexts) + " |",
                  "|---|" + "---|" * len(contexts)]
        for row in swept:
            cells = [f"{c['step_ms']:.1f} ({c['step_vs_first']:.2f}x)" for c in row["context"]]
            lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    if report.get("goals"):
        lines += ["", "goals:"]
        for g in report["goals"]:
            value = g["value"]
            shown = ", ".join(f"{k} {_fmt(v)}x" for k, v in value.items()) if isinstance(value, dict) else f"{_fmt(value)}x"
            verdict = {True: "MET", False: "not met", None: "n/a (needs contexts 64 and 4096)"}[g["met"]]
            lines.append(f"- {g['road']}: {g['goal']}: {shown} -> {verdict}")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def bench_command(args) -> int:
    args.argv = getattr(args, "argv", None) or sys.argv[1:]
    report = run_bench(args)
    print(format_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    failed = [r["name"] for r in report["roads"] if r.get("status") == "failed"]
    if failed:
        print(f"glmtrt bench: roads failed: {', '.join(failed)}", file=sys.stderr)
        for row in report["roads"]:
            if row.get("status") == "failed":
                print(row.get("stderr_tail", ""), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # the per-road worker: python -m glmtrt.export.bench --worker SPEC OUT
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2], sys.argv[3]))
    from glmtrt.runtime.cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
