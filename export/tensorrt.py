"""``glmtrt build --engines DIR``: TensorRT engines for an engines folder's ONNX graphs.

For each graph of the manifest (vision, prefill, decode) the builder

1. runs the TensorRT lint first (:func:`glmtrt.export.lint.check_engines`): a CPU plan with ONNX Runtime contrib
   ops, a float64 tensor or an op the parser lacks is refused before TensorRT is even needed;
2. parses the ONNX file with ``OnnxParser.parse_from_file`` (so external weights load) into a
   ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` network: precision comes from the graph (fp32 / fp16 tensors,
   explicit Q/DQ), never from builder precision flags (TensorRT 11 removed them);
3. adds one optimization profile whose min/opt/max come from the manifest's symbolic dims (``batch``, ``seq``,
   ``capacity`` of a fixed-capacity decode graph or ``past`` / ``total`` of a concat one, ``num_patches``) with
   defaults derived from the config (:func:`derive_profiles`), overridable with ``--profile NAME=MIN:OPT:MAX``;
4. builds with ``build_serialized_network``, sharing one timing cache across the graphs that is read from and
   written back to a file keyed by GPU name, compute capability and TensorRT version (:func:`timing_cache_key`).

The ``.plan`` files are written beside the ONNX graphs, each atomically (temporary name, then rename, once
every engine is built), and the manifest gets ``extra.tensorrt``: TensorRT version, GPU, compute capability,
profiles per graph, and each plan's file, size and SHA-256 (the TensorRT backend checks all of these).

Only TensorRT 10.13+ / 11.x API is used: ``create_network(STRONGLY_TYPED)``, ``set_memory_pool_limit``,
``build_serialized_network``, ``create_timing_cache`` / ``set_timing_cache``; no implicit batch, no
``build_engine``, no ``max_workspace_size``, no FP16/INT8 flags. fp32 graphs are built with TF32 off (the
``TF32`` builder flag cleared) unless ``--tf32`` is given, so an fp32 engine computes in IEEE fp32 like the
reference.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmtrt.runtime.errors import GlmTrtError
from glmtrt.runtime.manifest import MANIFEST_NAME, Manifest, ManifestError, sha256_file

__all__ = ["DimRange", "DEFAULT_MAX_BATCH", "DEFAULT_MAX_CONTEXT", "build_engines", "build_command",
           "default_timing_cache_dir", "derive_profiles", "parse_profile_overrides", "record_engines",
           "timing_cache_key"]

DEFAULT_MAX_CONTEXT = 4096
DEFAULT_MAX_BATCH = 4
OPT_SEQUENCE = 512  # the opt point TensorRT tunes kernels for: a typical prompt with one image
OPT_PATCHES = 4096  # ~ an 900x900 image at patch 14


class ProfileError(GlmTrtError):
    """An optimization-profile override is malformed or inconsistent."""


@dataclass(frozen=True)
class DimRange:
    """min / opt / max of one dynamic dimension."""

    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not 1 <= self.min <= self.opt <= self.max:
            raise ProfileError(f"a profile range needs 1 <= min <= opt <= max, got {self}")

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"

    def as_list(self) -> list[int]:
        return [self.min, self.opt, self.max]

    def shifted(self, by: int) -> DimRange:
        return DimRange(self.min + by, self.opt + by, self.max + by)


# ----------------------------------------------------------------------------------------- profiles

_OVERRIDE = re.compile(r"^(?:(?P<graph>[A-Za-z_][\w]*)\.)?(?P<dim>[A-Za-z_]\w*)=(?P<range>.+)$")


def parse_profile_overrides(items: Sequence[str] | None) -> dict[tuple[str | None, str], DimRange]:
    """``["batch=1:2:4", "decode.capacity=2:512:8192", "seq=128"]`` -> {(graph or None, dim): DimRange}.

    ``NAME=MIN:OPT:MAX`` sets a dimension in every graph that has it; ``GRAPH.NAME=...`` in that graph only;
    ``NAME=N`` fixes it (N:N:N). Raises ProfileError (one line) for anything else.
    """
    out: dict[tuple[str | None, str], DimRange] = {}
    for item in items or ():
        match = _OVERRIDE.match(str(item).strip())
        if not match:
            raise ProfileError(f"--profile {item!r}: expected NAME=MIN:OPT:MAX (e.g. batch=1:2:4, seq=1:512:4096)")
        pieces = match["range"].split(":")
        if len(pieces) not in (1, 3) or not all(p.strip().isdigit() for p in pieces):
            raise ProfileError(f"--profile {item!r}: the range must be MIN:OPT:MAX or one value, in positive integers")
        values = [int(p) for p in pieces] * (3 if len(pieces) == 1 else 1)
        if not 1 <= values[0] <= values[1] <= values[2]:
            raise ProfileError(f"--profile {item!r}: needs 1 <= MIN <= OPT <= MAX")
        key = (match["graph"], match["dim"])
        if key in out:
            raise ProfileError(f"--profile gives {item.split('=')[0]!r} twice")
        out[key] = DimRange(*values)
    return out


def _graph_dims(manifest: Manifest) -> dict[str, list[str]]:
    """Each graph's symbolic input dims, in first-seen order."""
    dims: dict[str, list[str]] = {}
    for role, spec in manifest.graphs.items():
        seen: list[str] = []
        for tensor in spec.inputs:
            for d in tensor.shape:
                if isinstance(d, str) and d not in seen:
                    seen.append(d)
        dims[role] = seen
    return dims


def _round_down(value: int, unit: int) -> int:
    return max(unit, value // unit * unit)


def _patch_facts(manifest: Manifest) -> tuple[int, int]:
    """(patches per merged token, the most patches one vision call can have under the preprocessing budget)."""
    from glmtrt.runtime.preprocess import ImageProcessorConfig

    vision = manifest.config.get("vision") or {}
    merge = int(vision.get("spatial_merge_size", 1))
    unit = merge * merge
    try:
        pre = ImageProcessorConfig.from_dict(manifest.preprocessing or {})
    except ValueError as e:
        raise ManifestError(f"the manifest's preprocessing settings are unusable: {e}") from None
    patch = int(vision.get("patch_size", pre.patch_size))
    temporal = int(vision.get("temporal_patch_size", pre.temporal_patch_size))
    # smart_resize keeps frames x height x width <= max_pixels; one call covers temporal_patch_size frames.
    most = pre.max_pixels // (temporal * patch * patch)
    return unit, _round_down(most, unit)


def default_dims(manifest: Manifest, max_context: int | None = None,
                 max_batch: int = DEFAULT_MAX_BATCH) -> dict[str, DimRange]:
    """Default ranges of the known dims: batch 1..max_batch (opt 1); seq and capacity 1..C; past 1..C-1 and
    total = past + 1, where C = min(max_position_embeddings, max_context); num_patches from one merge block up to
    the preprocessing pixel budget, in multiples of spatial_merge_size²."""
    text = manifest.config.get("text") or {}
    limit = int(text.get("max_position_embeddings", DEFAULT_MAX_CONTEXT))
    context = min(limit, int(max_context or DEFAULT_MAX_CONTEXT))
    if context < 2:
        raise ProfileError(f"--max-context must be at least 2, got {max_context}")
    if max_batch < 1:
        raise ProfileError(f"the maximum batch must be at least 1, got {max_batch}")
    dims = {"batch": DimRange(1, 1, max_batch),
            "seq": DimRange(1, min(OPT_SEQUENCE, context), context),
            "past": DimRange(1, min(OPT_SEQUENCE, context - 1), context - 1)}
    dims["total"] = dims["past"].shifted(1)
    dims["capacity"] = DimRange(1, min(OPT_SEQUENCE, context), context)  # a fixed-capacity decode graph's cache
    if "vision" in manifest.graphs:
        unit, most = _patch_facts(manifest)
        dims["num_patches"] = DimRange(unit, min(most, _round_down(OPT_PATCHES, unit)), most)
    return dims


def derive_profiles(manifest: Manifest,
                    overrides: Mapping[tuple[str | None, str], DimRange] | Sequence[str] | None = None,
                    max_context: int | None = None, max_batch: int = DEFAULT_MAX_BATCH) -> dict[str, Any]:
    """The optimization profile of every graph, from the manifest's symbolic dims.

    Returns ``{"max_context": C, "dims": {graph: {dim: [min, opt, max]}}, "shapes": {graph: {input: {"min": shape,
    "opt": shape, "max": shape}}}}``. ``overrides``: parsed (see :func:`parse_profile_overrides`) or the raw
    ``--profile`` strings. In the decode graph ``total`` is always ``past + 1``: overriding one sets the other.
    """
    if overrides is None or not isinstance(overrides, Mapping):
        overrides = parse_profile_overrides(overrides)
    defaults = default_dims(manifest, max_context, max_batch)
    graph_dims = _graph_dims(manifest)
    known = sorted({d for dims in graph_dims.values() for d in dims})
    for (graph, dim) in overrides:
        if graph is not None and graph not in graph_dims:
            raise ProfileError(f"--profile {graph}.{dim}: there is no graph {graph!r}; the graphs are "
                               f"{', '.join(graph_dims)}")
        if dim not in (graph_dims[graph] if graph else known):
            where = f"the {graph} graph has" if graph else "the graphs have"
            raise ProfileError(f"--profile {(graph + '.') if graph else ''}{dim}: unknown dimension; {where} "
                               f"{', '.join(graph_dims[graph] if graph else known) or 'none'}")
    unit = defaults["num_patches"].min if "num_patches" in defaults else 1
    result_dims: dict[str, dict[str, DimRange]] = {}
    for graph, dims in graph_dims.items():
        def given(dim: str) -> DimRange | None:
            return overrides.get((graph, dim), overrides.get((None, dim)))

        ranges: dict[str, DimRange] = {}
        for dim in dims:
            rng = given(dim) or defaults.get(dim)
            if rng is None:
                raise ProfileError(f"the {graph} graph has a dimension {dim!r} with no default range; pass "
                                   f"--profile {graph}.{dim}=MIN:OPT:MAX")
            ranges[dim] = rng
        if "past" in ranges and "total" in ranges:
            past, total = given("past"), given("total")
            if past and total and total != past.shifted(1):
                raise ProfileError(f"{graph}: total ({total}) must be past + 1 ({past.shifted(1)}); give one of them")
            if past and not total:
                ranges["total"] = past.shifted(1)
            elif total and not past:
                if total.min < 2:
                    raise ProfileError(f"{graph}: total = past + 1 with past >= 1, so total's min must be at least 2")
                ranges["past"] = total.shifted(-1)
        if "num_patches" in ranges and unit > 1 and any(v % unit for v in ranges["num_patches"].as_list()):
            raise ProfileError(f"num_patches {ranges['num_patches']}: every value must be a multiple of "
                               f"spatial_merge_size² = {unit} (one merged image token)")
        result_dims[graph] = ranges
    shapes: dict[str, dict[str, dict[str, list[int]]]] = {}
    for graph, spec in manifest.graphs.items():
        shapes[graph] = {}
        for tensor in spec.inputs:
            per = {}
            for i, which in enumerate(("min", "opt", "max")):
                per[which] = [d if isinstance(d, int) else result_dims[graph][d].as_list()[i] for d in tensor.shape]
            shapes[graph][tensor.name] = per
    text = manifest.config.get("text") or {}
    context = min(int(text.get("max_position_embeddings", DEFAULT_MAX_CONTEXT)),
                  int(max_context or DEFAULT_MAX_CONTEXT))
    return {"max_context": context,
            "dims": {g: {d: r.as_list() for d, r in dims.items()} for g, dims in result_dims.items()},
            "shapes": shapes}


# ----------------------------------------------------------------------------------------- timing cache

def timing_cache_key(gpu_name: str, compute_capability: str, trt_version: str) -> str:
    """A file-name-safe key for a timing cache: tactics timed on one GPU model with one TensorRT release.

    ``("NVIDIA H100 80GB HBM3", "9.0", "10.13.0.35")`` -> ``"nvidia-h100-80gb-hbm3_sm90_trt10.13.0.35"``.
    """
    gpu = re.sub(r"[^a-z0-9]+", "-", str(gpu_name).lower()).strip("-") or "gpu"
    cc = re.sub(r"[^0-9]", "", str(compute_capability)) or "0"
    version = re.sub(r"[^A-Za-z0-9.]+", "-", str(trt_version)).strip("-") or "0"
    return f"{gpu}_sm{cc}_trt{version}"


def default_timing_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "glmtrt" / "timing-caches"


def _atomic_write(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# ----------------------------------------------------------------------------------------- manifest

def plan_file(graph_file: str) -> str:
    """``vision.onnx`` -> ``vision.plan`` (beside its graph)."""
    return str(Path(graph_file).with_suffix(".plan"))


def record_engines(folder: str | Path, info: Mapping[str, Any], plans: Mapping[str, str]) -> dict[str, Any]:
    """Write ``extra.tensorrt`` into ``folder/manifest.json`` atomically: ``info`` (version, compute_capability,
    gpu, profiles, ...) plus each plan's file, size and SHA-256. ``plans``: {graph: plan file name}. Only that key
    of the manifest changes. Returns the record written."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    raw = json.loads(path.read_text())
    record = dict(info)
    record["plans"] = {graph: {"file": name, "size": (folder / name).stat().st_size,
                               "sha256": sha256_file(folder / name)} for graph, name in plans.items()}
    raw.setdefault("extra", {})["tensorrt"] = record
    _atomic_write(path, (json.dumps(raw, indent=2) + "\n").encode())
    return record


# ----------------------------------------------------------------------------------------- the build

def _installed_trt_release() -> tuple[int, int] | None:
    """(major, minor) of the installed TensorRT without failing when it is absent (for the lint's target)."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    for dist in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu12-bindings", "tensorrt-cu13-bindings"):
        try:
            parts = version(dist).split(".")
            return int(parts[0]), int(parts[1])
        except (PackageNotFoundError, ValueError, IndexError):
            continue
    return None


def _parser_errors(parser) -> str:
    errors = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        try:
            text = err.desc()
            node = err.node_name() if hasattr(err, "node_name") else err.node()
            errors.append(f"{text} (node {node})" if node not in (None, "", -1) else text)
        except Exception:  # noqa: BLE001 — older bindings: the error's string form is enough
            errors.append(str(err))
    return "; ".join(e.strip().replace("\n", " ") for e in errors[:3]) or "no parser message"


def _set_profile(builder, config, shapes: Mapping[str, Mapping[str, list[int]]], graph: str) -> None:
    profile = builder.create_optimization_profile()
    for name, s in shapes.items():
        try:
            profile.set_shape(name, s["min"], s["opt"], s["max"])
        except RuntimeError as e:
            raise ProfileError(f"{graph}: TensorRT refused the profile of {name!r} {s}: {e}") from None
    if config.add_optimization_profile(profile) < 0:
        raise ProfileError(f"{graph}: TensorRT refused the optimization profile {dict(shapes)}")


def build_engines(engines: str | Path, profile: Sequence[str] | None = None, max_context: int | None = None,
                  timing_cache: str | Path | None = None, workspace_gb: float | None = None, tf32: bool = False,
                  device: int = 0, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Build one TensorRT engine per graph of the engines folder ``engines`` (see the module docstring).

    profile: ``--profile`` strings; max_context: cap on max_position_embeddings for seq/past/total (default 4096);
    timing_cache: the directory of timing caches (default ``~/.cache/glmtrt/timing-caches``; the file inside is
    named by :func:`timing_cache_key`); workspace_gb: TensorRT's workspace pool limit; tf32: let fp32 matmuls use
    TF32 (off by default). Returns the manifest's new ``extra.tensorrt`` record. Raises GlmTrtError (one line).
    """
    from glmtrt.runtime.backends.tensorrt import cuda_call, cuda_device, import_cudart, import_tensorrt, make_logger

    from .lint import DEFAULT_MIN_TRT, check_engines

    log = log or (lambda _line: None)
    folder = Path(engines)
    manifest = Manifest.load(folder)  # every graph file present and matching its hash
    if str(manifest.precision).startswith("cpu"):
        raise GlmTrtError(f"{folder} is a {manifest.precision} plan, made for ONNX Runtime on a CPU; TensorRT builds "
                          "fp32, fp16 and int8 folders")
    if workspace_gb is not None and not workspace_gb > 0:
        raise GlmTrtError(f"--workspace must be a positive number of GiB, got {workspace_gb}")
    profiles = derive_profiles(manifest, profile, max_context)  # override mistakes surface before TensorRT
    installed = _installed_trt_release()
    check_engines(folder, max(installed, DEFAULT_MIN_TRT) if installed else DEFAULT_MIN_TRT)  # refuses CPU plans
    trt = import_tensorrt()
    cudart = import_cudart()
    gpu = cuda_device(device, cudart)
    cuda_call(cudart, cudart.cudaSetDevice(device), "cudaSetDevice")  # the builder times tactics on this GPU
    version = str(trt.__version__)
    key = timing_cache_key(gpu.name, gpu.compute_capability, version)
    cache_path = None if timing_cache == "" else Path(timing_cache or default_timing_cache_dir()) / f"{key}.cache"
    log(f"building TensorRT {version} engines for {gpu.name} ({gpu.sm}) in {folder}"
        + (f"; timing cache {cache_path}" if cache_path else ""))

    logger = make_logger(trt)
    builder = trt.Builder(logger)
    cache = None
    cache_data = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    temporary: dict[str, Path] = {}
    built: dict[str, str] = {}
    seconds: dict[str, float] = {}
    try:
        for graph, spec in manifest.graphs.items():
            start = time.perf_counter()
            network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
            parser = trt.OnnxParser(network, logger)
            onnx_path = folder / spec.file
            if not parser.parse_from_file(str(onnx_path)):
                raise GlmTrtError(f"TensorRT {version}'s ONNX parser rejected {spec.file}: {_parser_errors(parser)}")
            inputs = [network.get_input(i) for i in range(network.num_inputs)]
            names = {t.name for t in inputs}
            if names != set(spec.input_names()):
                raise ManifestError(f"{spec.file} parses with inputs {sorted(names)}, the manifest says "
                                    f"{spec.input_names()}; re-export the folder")
            shape_tensors = [t.name for t in inputs if t.is_shape_tensor]
            if shape_tensors:
                raise GlmTrtError(f"{spec.file}: inputs {shape_tensors} are shape tensors (their values decide shapes); "
                                  "the exported graphs must take them as data")
            config = builder.create_builder_config()
            _set_profile(builder, config, profiles["shapes"][graph], graph)
            if workspace_gb is not None:
                config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
            tf32_flag = getattr(trt.BuilderFlag, "TF32", None)
            if tf32_flag is not None:  # TF32 is on by default for fp32 tensors; off keeps fp32 engines IEEE fp32
                if tf32:
                    config.set_flag(tf32_flag)
                else:
                    config.clear_flag(tf32_flag)
            if cache_path is not None:
                if cache is None:
                    try:
                        cache = config.create_timing_cache(cache_data) if cache_data else None
                    except Exception:  # noqa: BLE001 — an unreadable cache file only costs build time
                        cache = None
                    if cache is not None and not config.set_timing_cache(cache, False):
                        log(f"  timing cache {cache_path.name} does not match this GPU / TensorRT; starting a new one")
                        cache = None
                    if cache is None:
                        cache = config.create_timing_cache(b"")
                        config.set_timing_cache(cache, False)
                elif not config.set_timing_cache(cache, False):
                    raise GlmTrtError("TensorRT refused the timing cache it created; pass --timing-cache ''")
            logger.messages.clear()
            serialized = builder.build_serialized_network(network, config)
            if serialized is None:
                raise GlmTrtError(f"TensorRT could not build {spec.file}: {logger.summary()}")
            name = plan_file(spec.file)
            tmp = folder / f".{Path(name).name}.tmp-{os.getpid()}"
            temporary[graph] = tmp
            with open(tmp, "wb") as f:
                f.write(serialized)
                f.flush()
                os.fsync(f.fileno())
            del serialized, config, parser, network
            built[graph] = name
            seconds[graph] = round(time.perf_counter() - start, 2)
            dims = ", ".join(f"{d} {':'.join(map(str, r))}" for d, r in profiles["dims"][graph].items())
            log(f"  {name}: {tmp.stat().st_size / 2**20:.1f} MiB in {seconds[graph]:.1f} s ({dims})")
        for graph, tmp in temporary.items():  # every engine built: move them into place
            os.replace(tmp, folder / built[graph])
        temporary.clear()
    finally:
        for tmp in temporary.values():
            if tmp.exists():
                tmp.unlink()
    if cache_path is not None and cache is not None:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(cache_path, cache.serialize())
        except OSError as e:
            log(f"  could not write the timing cache {cache_path} ({e}); the engines are fine")
    info = {"version": version, "compute_capability": gpu.compute_capability, "gpu": gpu.name,
            "platform": sys.platform, "tf32": bool(tf32), "strongly_typed": True,
            "workspace_gb": workspace_gb, "max_context": profiles["max_context"], "timing_cache": key,
            "dims": profiles["dims"], "profiles": profiles["shapes"], "build_seconds": seconds}
    record = record_engines(folder, info, built)
    log(f"built {len(built)} engines in {sum(seconds.values()):.1f} s; manifest updated")
    return record


def build_command(args) -> int:
    build_engines(args.engines, profile=args.profile, max_context=args.max_context, timing_cache=args.timing_cache,
                  workspace_gb=args.workspace, tf32=args.tf32, device=args.device)
    return 0
