"""The TensorRT engine builder and backend.

Three kinds of tests:

* pure logic that runs anywhere (no TensorRT, no GPU): optimization-profile derivation from a manifest and its
  ``--profile`` overrides, the engine compatibility check, the timing-cache key, the manifest record, and
  ``glmtrt build`` refusing a CPU plan (the lint) and a machine without TensorRT;
* the builder and backend end to end against a fake of the TensorRT / cuda-python API surface they use (runs
  anywhere; proves their bookkeeping, not TensorRT);
* ``@pytest.mark.tensorrt`` tests that build the tiny GLM-OCR fp32 engines with real TensorRT and run them; they
  skip with the reason ("TensorRT is not installed" / "no CUDA GPU") where either is missing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from glmtrt.export.tensorrt import (
    DimRange,
    ProfileError,
    derive_profiles,
    parse_profile_overrides,
    record_engines,
    timing_cache_key,
)
from glmtrt.runtime.backends import load_backend
from glmtrt.runtime.backends.tensorrt import compatibility_problem, plan_records, sm_name
from glmtrt.runtime.cli import build_parser, main
from glmtrt.runtime.errors import GlmTrtError
from glmtrt.runtime.manifest import GraphSpec, Manifest, ManifestError, TensorSpec


def _gpu_skip_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001 — ImportError, or a wheel whose libraries do not load
        return "TensorRT is not installed"
    try:
        from glmtrt.runtime.backends.tensorrt import cuda_device

        cuda_device()
    except GlmTrtError as e:
        return str(e) if str(e).startswith("cuda-python") else f"no CUDA GPU ({e})"
    return None


SKIP_REASON = _gpu_skip_reason()
TRT_INSTALLED = SKIP_REASON != "TensorRT is not installed"
gpu = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")


# ------------------------------------------------------------------------------------------ a manifest by hand

HIDDEN, KV_HEADS, HEAD_DIM, LAYERS, VOCAB = 48, 2, 16, 2, 256


def _specs(items):
    return [TensorSpec(name, dtype, list(shape)) for name, dtype, shape in items]


def fake_manifest(kv_cache: str = "fixed-capacity", max_positions: int = 32768, max_pixels: int = 11760000,
                  extra_dim: str | None = None) -> Manifest:
    """The tiny GLM-OCR interface (both decode contracts), without exporting anything."""
    cache = "capacity" if kv_cache == "fixed-capacity" else "past"
    mask = "capacity" if kv_cache == "fixed-capacity" else "total"
    new = 1 if kv_cache == "fixed-capacity" else "total"
    kv_in = [(f"past_key_values.{i}.{k}", "float32", ["batch", KV_HEADS, cache, HEAD_DIM])
             for i in range(LAYERS) for k in ("key", "value")]
    kv_out = [(f"present.{i}.{k}", "float32", ["batch", KV_HEADS, new, HEAD_DIM])
              for i in range(LAYERS) for k in ("key", "value")]
    prefill_out = [(f"present.{i}.{k}", "float32", ["batch", KV_HEADS, "seq", HEAD_DIM])
                   for i in range(LAYERS) for k in ("key", "value")]
    vision_in = [("pixel_values", "float32", ["num_patches", 1176]), ("rotary_cos", "float32", ["num_patches", 16]),
                 ("rotary_sin", "float32", ["num_patches", 16])]
    if extra_dim:
        vision_in.append(("frames", "int64", [extra_dim]))
    graphs = {
        "vision": GraphSpec("vision.onnx", _specs(vision_in), _specs([("image_embeds", "float32", ["num_tokens", 48])])),
        "prefill": GraphSpec("prefill.onnx", _specs([("inputs_embeds", "float32", ["batch", "seq", HIDDEN]),
                                                     ("position_ids", "int64", [3, "batch", "seq"]),
                                                     ("attention_mask", "int64", ["batch", "seq"])]),
                             _specs([("logits", "float32", ["batch", VOCAB])] + prefill_out)),
        "decode": GraphSpec("decode.onnx", _specs([("inputs_embeds", "float32", ["batch", 1, HIDDEN]),
                                                   ("position_ids", "int64", [3, "batch", 1]),
                                                   ("attention_mask", "int64", ["batch", mask])] + kv_in),
                            _specs([("logits", "float32", ["batch", VOCAB])] + kv_out)),
    }
    config = {"model_type": "glm_ocr",
              "vision": {"kind": "glm_ocr", "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2},
              "text": {"max_position_embeddings": max_positions, "num_kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                       "lm_head_size": VOCAB, "hidden_size": HIDDEN}}
    preprocessing = {"size": {"shortest_edge": 12544, "longest_edge": max_pixels}, "patch_size": 14,
                     "temporal_patch_size": 2, "merge_size": 2}
    extra = {"kv_cache": {"mode": kv_cache}} if kv_cache == "fixed-capacity" else {}
    return Manifest(family="glm_ocr", config=config, precision="fp32", opset=20, graphs=graphs,
                    embeddings={"file": "embed_tokens.npy", "dtype": "float32", "shape": [VOCAB, HIDDEN]},
                    special_tokens={}, eos_token_ids=[1], preprocessing=preprocessing, extra=extra)


# ------------------------------------------------------------------------------------------ profiles

def test_default_profiles_follow_the_manifest():
    plan = derive_profiles(fake_manifest())
    # patches: one call holds at most max_pixels / (temporal_patch * patch²) = 11760000 / (2 * 196) = 30000
    # patches, in multiples of one merged token (2 x 2 patches); context capped at 4096 by default.
    assert plan["max_context"] == 4096
    assert plan["dims"] == {"vision": {"num_patches": [4, 4096, 30000]},
                            "prefill": {"batch": [1, 1, 4], "seq": [1, 512, 4096]},
                            "decode": {"batch": [1, 1, 4], "capacity": [1, 512, 4096]}}
    shapes = plan["shapes"]
    assert shapes["vision"]["pixel_values"] == {"min": [4, 1176], "opt": [4096, 1176], "max": [30000, 1176]}
    assert shapes["prefill"]["position_ids"] == {"min": [3, 1, 1], "opt": [3, 1, 512], "max": [3, 4, 4096]}
    assert shapes["decode"]["past_key_values.1.value"] == {"min": [1, 2, 1, 16], "opt": [1, 2, 512, 16],
                                                           "max": [4, 2, 4096, 16]}
    assert shapes["decode"]["attention_mask"] == {"min": [1, 1], "opt": [1, 512], "max": [4, 4096]}
    assert set(shapes["decode"]) == set(fake_manifest().graphs["decode"].input_names())


def test_concat_decode_keeps_total_equal_to_past_plus_one():
    plan = derive_profiles(fake_manifest("concat"))
    assert plan["dims"]["decode"] == {"batch": [1, 1, 4], "total": [2, 513, 4096], "past": [1, 512, 4095]}
    assert derive_profiles(fake_manifest("concat"), ["past=1:64:255"])["dims"]["decode"]["total"] == [2, 65, 256]
    assert derive_profiles(fake_manifest("concat"), ["total=2:65:256"])["dims"]["decode"]["past"] == [1, 64, 255]
    with pytest.raises(ProfileError, match="total .* must be past \\+ 1"):
        derive_profiles(fake_manifest("concat"), ["past=1:64:255", "total=2:64:256"])
    with pytest.raises(ProfileError, match="total's min must be at least 2"):
        derive_profiles(fake_manifest("concat"), ["total=1:64:256"])


def test_context_is_capped_by_the_model_and_by_max_context():
    assert derive_profiles(fake_manifest(max_positions=1024))["dims"]["prefill"]["seq"] == [1, 512, 1024]
    plan = derive_profiles(fake_manifest(), max_context=100)
    assert plan["max_context"] == 100
    assert plan["dims"]["prefill"]["seq"] == [1, 100, 100]
    assert plan["dims"]["decode"]["capacity"] == [1, 100, 100]
    with pytest.raises(ProfileError, match="at least 2"):
        derive_profiles(fake_manifest(), max_context=1)


def test_patch_budget_follows_preprocessing():
    # 28*28*1280 pixels (GLM-Image's budget) / (2 * 14 * 14) = 2560 patches.
    assert derive_profiles(fake_manifest(max_pixels=28 * 28 * 1280))["dims"]["vision"]["num_patches"] == [4, 2560, 2560]


def test_overrides_global_then_per_graph():
    plan = derive_profiles(fake_manifest(), ["batch=1:2:8", "decode.batch=1:1:2", "num_patches=4:64:1024", "seq=77"])
    assert plan["dims"]["prefill"]["batch"] == [1, 2, 8]
    assert plan["dims"]["decode"]["batch"] == [1, 1, 2]
    assert plan["dims"]["vision"]["num_patches"] == [4, 64, 1024]
    assert plan["dims"]["prefill"]["seq"] == [77, 77, 77]
    assert plan["shapes"]["prefill"]["inputs_embeds"]["max"] == [8, 77, HIDDEN]


def test_parse_profile_overrides():
    assert parse_profile_overrides(["batch=1:2:4", "decode.capacity=2:64:512", "seq=128"]) == {
        (None, "batch"): DimRange(1, 2, 4), ("decode", "capacity"): DimRange(2, 64, 512),
        (None, "seq"): DimRange(128, 128, 128)}
    assert parse_profile_overrides(None) == {} == parse_profile_overrides([])


@pytest.mark.parametrize("bad", ["batch", "batch=", "batch=1:2", "batch=4:2:1", "batch=0:1:2", "batch=a:b:c",
                                 "=1:2:3", "batch=1:2:3:4", "batch=-1:2:3", "de-code.batch=1:2:3", "batch=1.5"])
def test_bad_override_syntax_is_a_one_line_error(bad):
    with pytest.raises(GlmTrtError) as info:
        parse_profile_overrides([bad])
    assert "\n" not in str(info.value) and bad in str(info.value)


def test_override_mistakes_name_what_exists():
    with pytest.raises(ProfileError, match="given 'batch' twice|gives 'batch' twice"):
        parse_profile_overrides(["batch=1:1:2", "batch=1:1:4"])
    with pytest.raises(ProfileError, match="unknown dimension; the graphs have batch, capacity, num_patches, seq"):
        derive_profiles(fake_manifest(), ["past=1:2:3"])
    with pytest.raises(ProfileError, match="the vision graph has num_patches"):
        derive_profiles(fake_manifest(), ["vision.seq=1:2:3"])
    with pytest.raises(ProfileError, match="no graph 'encoder'"):
        derive_profiles(fake_manifest(), ["encoder.batch=1:2:3"])
    with pytest.raises(ProfileError, match="multiple of spatial_merge_size² = 4"):
        derive_profiles(fake_manifest(), ["num_patches=4:66:1024"])
    with pytest.raises(ProfileError, match="'frames' with no default range; pass --profile vision.frames"):
        derive_profiles(fake_manifest(extra_dim="frames"))
    assert derive_profiles(fake_manifest(extra_dim="frames"), ["vision.frames=1:2:4"])["dims"]["vision"] == {
        "num_patches": [4, 4096, 30000], "frames": [1, 2, 4]}


# ------------------------------------------------------------------------------------------ compatibility, keys

def test_compatibility_check():
    built = {"version": "10.13.0.35", "compute_capability": "9.0"}
    assert compatibility_problem(built, "10.13.0.35", "9.0") is None
    assert compatibility_problem(built, "10.13.0.99", "9.0") is None  # engines are locked to major.minor.patch
    assert compatibility_problem(built, "10.14.1.48", "9.0") == (
        "engine built with TensorRT 10.13.0.35 for sm_90; this is TensorRT 10.14.1.48 on sm_90: "
        "run `glmtrt build` again")
    assert compatibility_problem(built, "10.13.0.35", "8.9") == (
        "engine built with TensorRT 10.13.0.35 for sm_90; this is TensorRT 10.13.0.35 on sm_89: "
        "run `glmtrt build` again")
    assert compatibility_problem(built, "11.3.0", "10.0").startswith("engine built with TensorRT 10.13.0.35 for sm_90")
    for incomplete in (None, {}, {"version": "10.13.0.35"}, {"compute_capability": "9.0"}):
        assert "run `glmtrt build` again" in compatibility_problem(incomplete, "10.13.0.35", "9.0")
    assert sm_name("9.0") == "sm_90" and sm_name("12.1") == "sm_121"


def test_timing_cache_key():
    key = timing_cache_key("NVIDIA H100 80GB HBM3", "9.0", "10.13.0.35")
    assert key == "nvidia-h100-80gb-hbm3_sm90_trt10.13.0.35"
    assert key == timing_cache_key("NVIDIA H100 80GB HBM3", "9.0", "10.13.0.35")
    others = {timing_cache_key("NVIDIA H200", "9.0", "10.13.0.35"), timing_cache_key("NVIDIA H100 80GB HBM3", "8.9",
              "10.13.0.35"), timing_cache_key("NVIDIA H100 80GB HBM3", "9.0", "11.3.0")}
    assert len(others) == 3 and key not in others
    odd = timing_cache_key("GPU / with:odd*chars", "9.0", "10.13.0.35+cuda12")
    assert all(ch.isalnum() or ch in "-_." for ch in odd) and "/" not in odd


# ------------------------------------------------------------------------------------------ manifest record

def test_record_engines_writes_only_extra_tensorrt(tmp_path):
    manifest = fake_manifest()
    manifest.save(tmp_path)
    before = json.loads((tmp_path / "manifest.json").read_text())
    plans = {}
    for role in manifest.graphs:
        (tmp_path / f"{role}.plan").write_bytes(role.encode() * 100)
        plans[role] = f"{role}.plan"
    info = {"version": "10.13.0.35", "compute_capability": "9.0", "gpu": "NVIDIA H100", "profiles": {}}
    record = record_engines(tmp_path, info, plans)
    after = json.loads((tmp_path / "manifest.json").read_text())
    assert after["extra"]["tensorrt"] == record
    assert {k: v for k, v in after.items() if k != "extra"} == {k: v for k, v in before.items() if k != "extra"}
    assert after["extra"]["kv_cache"] == before["extra"]["kv_cache"]
    import hashlib

    assert record["plans"]["decode"] == {"file": "decode.plan", "size": 600,
                                         "sha256": hashlib.sha256(b"decode" * 100).hexdigest()}
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left nothing behind
    manifest.extra["tensorrt"] = record
    assert plan_records(manifest)["version"] == "10.13.0.35"


def test_trt_backend_needs_built_engines_first(tmp_path):
    with pytest.raises(ManifestError, match="no TensorRT engines; run `glmtrt build --engines DIR` first"):
        load_backend(fake_manifest(), tmp_path, provider="trt")
    manifest = fake_manifest()
    manifest.extra["tensorrt"] = {"version": "10.13.0.35", "compute_capability": "9.0", "plans": {"vision": {}}}
    with pytest.raises(ManifestError, match=r"no TensorRT plan for \['prefill', 'decode'\]"):
        load_backend(manifest, tmp_path, provider="trt")


@pytest.mark.skipif(TRT_INSTALLED, reason="TensorRT is installed here")
def test_trt_backend_without_tensorrt_says_how_to_install(tmp_path):
    manifest = fake_manifest()
    manifest.extra["tensorrt"] = {"version": "10.13.0.35", "compute_capability": "9.0",
                                  "plans": {r: {"file": f"{r}.plan"} for r in manifest.graphs}}
    with pytest.raises(GlmTrtError, match=r"TensorRT is not installed; pip install 'glmtrt\[tensorrt\]'"):
        load_backend(manifest, tmp_path, provider="trt")


# ------------------------------------------------------------------------------------------ the CLI

def test_cli_knows_build_and_parity_backend():
    parser = build_parser()
    args = parser.parse_args(["build", "--engines", "e", "--profile", "batch=1:1:2", "--profile", "seq=1:8:64",
                              "--max-context", "512", "--workspace", "2.5", "--timing-cache", "tc"])
    assert (args.engines, args.profile, args.max_context, args.workspace, args.timing_cache, args.tf32) == \
        ("e", ["batch=1:1:2", "seq=1:8:64"], 512, 2.5, "tc", False)
    assert parser.parse_args(["parity", "--engines", "e"]).backend == "onnxruntime"
    assert parser.parse_args(["parity", "--engines", "e", "--backend", "trt"]).backend == "trt"
    with pytest.raises(SystemExit):
        parser.parse_args(["parity", "--engines", "e", "--backend", "tensorflow"])


def _contrib_copy(exported, tmp_path) -> Path:
    """A consistent copy of the fp32 export whose decode graph uses a com.microsoft op, like a CPU plan."""
    import onnx

    folder = shutil.copytree(exported("tiny-glm-ocr"), tmp_path / "cpu-plan")
    manifest = Manifest.load(folder)
    model = onnx.load(str(folder / manifest.graphs["decode"].file))
    model.graph.node[0].domain = "com.microsoft"
    onnx.save(model, str(folder / manifest.graphs["decode"].file))
    manifest.record_files(folder)
    manifest.save(folder)
    return folder


def test_build_refuses_a_cpu_plan_before_needing_tensorrt(exported, tmp_path, capsys):
    folder = _contrib_copy(exported, tmp_path)
    assert main(["build", "--engines", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("glmtrt build: error:") and "decode" in err and "com.microsoft" in err
    assert "pip install" not in err
    assert not list(folder.glob("*.plan"))
    assert "tensorrt" not in json.loads((folder / "manifest.json").read_text())["extra"]


def test_build_refuses_a_bad_profile(exported, capsys):
    assert main(["build", "--engines", str(exported("tiny-glm-ocr")), "--profile", "batch=4:2:1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "batch=4:2:1" in err


@pytest.mark.skipif(TRT_INSTALLED, reason="TensorRT is installed here")
def test_build_without_tensorrt_exits_2_naming_the_extra(exported, capsys):
    folder = exported("tiny-glm-ocr")
    assert main(["build", "--engines", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("glmtrt build: error: TensorRT is not installed") and "pip install 'glmtrt[tensorrt]'" in err
    assert not list(Path(folder).glob("*.plan"))


# ------------------------------------------------------------------------------------------ a fake TensorRT on a CPU

# No GPU here, so the backend's and builder's own bookkeeping (shapes, pointers, the two cache contracts, slot
# writes, the manifest record, the timing cache) is exercised against a fake of the documented API surface they
# use: tensorrt (Builder, OnnxParser, IBuilderConfig, Runtime, ICudaEngine, IExecutionContext) and cuda-python's
# runtime (cudaMalloc, cudaMemcpyAsync, cudaMemcpy2DAsync, ...). "Device" memory is host memory filled with 0xFF
# bytes (NaN as float32, so an unzeroed cache slot poisons the result); an "engine" runs its ONNX graph with ONNX
# Runtime on whatever its tensor addresses hold. The fake has only the TensorRT 10/11 API: a removed call
# (build_engine, max_workspace_size, FP16/INT8 flags, execute_async_v2, ...) is an AttributeError. This proves the
# bookkeeping, not TensorRT: the `tensorrt`-marked tests below do that on a GPU.

class FakeCuda:
    """cuda.bindings.runtime over host memory, checking every pointer it is handed."""

    def __init__(self):
        import types
        from types import SimpleNamespace

        self.blocks: dict[int, object] = {}
        self.calls: list[str] = []
        mod = self.module = types.ModuleType("cuda.bindings.runtime")
        mod.cudaError_t = SimpleNamespace(cudaSuccess=0, cudaErrorMemoryAllocation=2)
        mod.cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2,
                                             cudaMemcpyDeviceToDevice=3)
        for name in ("cudaGetDeviceCount", "cudaGetDeviceProperties", "cudaSetDevice", "cudaStreamCreate",
                     "cudaStreamDestroy", "cudaStreamSynchronize", "cudaMalloc", "cudaFree", "cudaMemcpyAsync",
                     "cudaMemcpy2DAsync", "cudaMemsetAsync", "cudaGetErrorName"):
            setattr(mod, name, getattr(self, name))

    def on_device(self, ptr: int, nbytes: int) -> bool:
        import ctypes

        return any(base <= ptr and ptr + nbytes <= base + ctypes.sizeof(buf) for base, buf in self.blocks.items())

    def cudaGetDeviceCount(self):
        return 0, 1

    def cudaGetDeviceProperties(self, device):
        from types import SimpleNamespace

        return 0, SimpleNamespace(name=b"Fake GPU 80GB", major=9, minor=0)

    def cudaSetDevice(self, device):
        return (0,)

    def cudaStreamCreate(self):
        class Stream:
            def __int__(self):
                return 0x5EED

        return 0, Stream()

    def cudaStreamDestroy(self, stream):
        return (0,)

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaGetErrorName(self, err):
        return 0, b"cudaErrorFake"

    def cudaMalloc(self, nbytes):
        import ctypes

        buf = (ctypes.c_ubyte * nbytes)()
        ctypes.memset(buf, 0xFF, nbytes)
        self.blocks[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def cudaFree(self, ptr):
        assert self.blocks.pop(int(ptr), None) is not None, "cudaFree of a pointer cudaMalloc did not return"
        return (0,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        import ctypes

        assert self.on_device(dst, nbytes) == (kind in (1, 3)), "bad destination for this copy kind"
        assert self.on_device(src, nbytes) == (kind in (2, 3)), "bad source for this copy kind"
        ctypes.memmove(dst, src, nbytes)
        return (0,)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        import ctypes

        assert kind == 3 and width <= dpitch and width <= spitch
        assert self.on_device(dst, dpitch * (height - 1) + width) and self.on_device(src, spitch * (height - 1) + width)
        for row in range(height):
            ctypes.memmove(dst + row * dpitch, src + row * spitch, width)
        self.calls.append("cudaMemcpy2DAsync")
        return (0,)

    def cudaMemsetAsync(self, ptr, value, nbytes, stream):
        import ctypes

        assert self.on_device(ptr, nbytes)
        ctypes.memset(ptr, value, nbytes)
        return (0,)


def make_fake_tensorrt(cuda: FakeCuda, version: str = "10.13.0.35"):
    import ctypes
    import enum
    import types

    import onnxruntime

    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.log = []  # what the builder was asked, for the tests

    Severity = enum.Enum("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE")

    class ILogger:
        def __init__(self):
            pass

    ILogger.Severity = Severity

    class DataType(enum.Enum):
        FLOAT, HALF, INT32, INT64, BOOL = range(5)

    numpy_of = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT32: np.int32,
                DataType.INT64: np.int64, DataType.BOOL: np.bool_}
    onnx_types = {"tensor(float)": DataType.FLOAT, "tensor(float16)": DataType.HALF, "tensor(int32)": DataType.INT32,
                  "tensor(int64)": DataType.INT64, "tensor(bool)": DataType.BOOL}

    def nptype(dtype):
        if dtype not in numpy_of:
            raise TypeError("no numpy type")
        return numpy_of[dtype]

    TensorIOMode = enum.Enum("TensorIOMode", "NONE INPUT OUTPUT")
    NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 1})
    BuilderFlag = enum.IntEnum("BuilderFlag", {"TF32": 6, "REFIT": 4})
    MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape, self.is_shape_tensor = name, shape, False

    class Network:
        def __init__(self, flags):
            self.flags, self.inputs, self.onnx = flags, [], None

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class ParserError:
        def __init__(self, text):
            self.text = text

        def desc(self):
            return self.text

        def node(self):
            return -1

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.errors = network, []

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

        def parse_from_file(self, path):
            import onnx

            try:
                model = onnx.load(path, load_external_data=False)
            except Exception as e:  # noqa: BLE001
                self.errors.append(ParserError(f"cannot read {path}: {e}"))
                return False
            self.network.onnx = str(path)
            for vi in model.graph.input:
                dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim)
                self.network.inputs.append(Tensor(vi.name, dims))
            return True

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, low, opt, high):
            if not (len(low) == len(opt) == len(high) and all(a <= b <= c for a, b, c in zip(low, opt, high))):
                raise RuntimeError("Shape provided for min is inconsistent with other shapes.")
            self.shapes[name] = [list(low), list(opt), list(high)]

    class TimingCache:
        def __init__(self, data):
            self.loaded, self.entries = bytes(data), 0

        def serialize(self):
            return b"FAKECACHE" + bytes([self.entries % 256]) + self.loaded[:16]

    class BuilderConfig:
        __slots__ = ("profiles", "flags", "pools", "cache")  # a removed attribute (max_workspace_size) cannot be set

        def __init__(self):
            self.profiles, self.flags, self.pools, self.cache = [], {BuilderFlag.TF32}, {}, None

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = size

        def set_flag(self, flag):
            self.flags.add(flag)

        def clear_flag(self, flag):
            self.flags.discard(flag)

        def create_timing_cache(self, data):
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            return BuilderConfig()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            assert network.flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)), "not strongly typed"
            assert len(config.profiles) == 1
            shapes = config.profiles[0].shapes
            assert set(shapes) == {t.name for t in network.inputs}
            for t in network.inputs:
                for bound in shapes[t.name]:
                    assert all(d == -1 or d == b for d, b in zip(t.shape, bound)), (t.name, t.shape, bound)
            if config.cache is not None:
                config.cache.entries += 1
            trt.log.append({"onnx": Path(network.onnx).name, "tf32": BuilderFlag.TF32 in config.flags,
                            "pools": dict(config.pools), "cache_loaded": config.cache.loaded if config.cache else None,
                            "profile": shapes})
            return b"FAKEPLAN" + json.dumps({"onnx": network.onnx, "profile": shapes}).encode()

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses, self.out_shapes = engine, {}, {}, {}

        def set_input_shape(self, name, shape):
            low, _, high = self.engine.profile[name]
            if len(shape) != len(low) or not all(a <= s <= c for a, s, c in zip(low, shape, high)):
                return False
            self.shapes[name] = tuple(shape)
            return True

        def infer_shapes(self):
            missing = [n for n in self.engine.inputs if n not in self.shapes]
            if not missing:
                key = tuple(self.shapes[n] for n in self.engine.inputs)
                if key not in self.engine.shape_cache:
                    feed = {n: np.zeros(self.shapes[n], nptype(self.engine.dtypes[n])) for n in self.engine.inputs}
                    outs = self.engine.session.run(self.engine.outputs, feed)
                    self.engine.shape_cache[key] = {n: o.shape for n, o in zip(self.engine.outputs, outs)}
                self.out_shapes = self.engine.shape_cache[key]
            return missing

        def get_tensor_shape(self, name):
            return self.shapes[name] if name in self.shapes else self.out_shapes[name]

        def set_tensor_address(self, name, ptr):
            assert isinstance(ptr, int) and ptr
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream_handle):
            assert isinstance(stream_handle, int)
            eng, spans = self.engine, {}
            for name in eng.inputs + eng.outputs:
                shape = self.get_tensor_shape(name)
                nbytes = int(np.prod(shape)) * np.dtype(nptype(eng.dtypes[name])).itemsize
                assert cuda.on_device(self.addresses[name], max(nbytes, 1)), f"{name} is not in device memory"
                spans[name] = (self.addresses[name], self.addresses[name] + nbytes)
            for out in eng.outputs:  # TensorRT: an output may not alias any other I/O tensor
                for other, (lo, hi) in spans.items():
                    if other != out and lo < spans[out][1] and spans[out][0] < hi:
                        raise AssertionError(f"output {out} overlaps {other}")
            feed = {}
            for name in eng.inputs:
                dtype = np.dtype(nptype(eng.dtypes[name]))
                lo, hi = spans[name]
                raw = (ctypes.c_ubyte * (hi - lo)).from_address(lo)
                feed[name] = np.frombuffer(raw, dtype=dtype).reshape(self.shapes[name]).copy()
            for name, value in zip(eng.outputs, eng.session.run(eng.outputs, feed)):
                value = np.ascontiguousarray(value, dtype=nptype(eng.dtypes[name]))
                assert value.shape == tuple(self.out_shapes[name])
                ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
            return True

    class Engine:
        def __init__(self, plan):
            self.session = onnxruntime.InferenceSession(plan["onnx"], providers=["CPUExecutionProvider"])
            self.inputs = [i.name for i in self.session.get_inputs()]
            self.outputs = [o.name for o in self.session.get_outputs()]
            self.dtypes = {i.name: onnx_types[i.type] for i in self.session.get_inputs() + self.session.get_outputs()}
            self.profile = {n: [tuple(s) for s in shapes] for n, shapes in plan["profile"].items()}
            self.shape_cache = {}

        @property
        def num_io_tensors(self):
            return len(self.inputs) + len(self.outputs)

        def get_tensor_name(self, i):
            return (self.inputs + self.outputs)[i]

        def get_tensor_mode(self, name):
            return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return self.dtypes[name]

        def get_tensor_profile_shape(self, name, profile_index):
            assert profile_index == 0
            return list(self.profile[name])

        def is_shape_inference_io(self, name):
            return False

        def create_execution_context(self):
            return Context(self)

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            if not bytes(data[:8]) == b"FAKEPLAN":
                self.logger.log(Severity.ERROR, "fake: the serialization tag does not match this TensorRT")
                return None
            return Engine(json.loads(bytes(data[8:])))

    for name, value in dict(ILogger=ILogger, DataType=DataType, nptype=nptype, TensorIOMode=TensorIOMode,
                            NetworkDefinitionCreationFlag=NetworkDefinitionCreationFlag, BuilderFlag=BuilderFlag,
                            MemoryPoolType=MemoryPoolType, OnnxParser=OnnxParser, Builder=Builder,
                            Runtime=Runtime).items():
        setattr(trt, name, value)
    return trt


@pytest.fixture
def fake_trt(monkeypatch, exported):
    """Install the fake tensorrt and cuda-python modules for one test (after the fp32 export, which must not see
    them: torch.onnx probes for a real tensorrt)."""
    import sys
    import types

    exported("tiny-glm-ocr")
    cuda = FakeCuda()
    trt = make_fake_tensorrt(cuda)
    package, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    bindings.runtime, package.bindings = cuda.module, bindings
    for name, module in (("tensorrt", trt), ("cuda", package), ("cuda.bindings", bindings),
                         ("cuda.bindings.runtime", cuda.module)):
        monkeypatch.setitem(sys.modules, name, module)
    return trt, cuda


def _build_fake(exported, tmp_path, *extra) -> tuple[Path, Path]:
    folder = shutil.copytree(exported("tiny-glm-ocr"), tmp_path / "engines")
    cache = tmp_path / "timing-caches"
    assert main(["build", "--engines", str(folder), "--timing-cache", str(cache), *GPU_PROFILE, *extra]) == 0
    return folder, cache


def test_fake_build_uses_the_documented_api_and_records_it(exported, tmp_path, fake_trt, capsys):
    trt, _ = fake_trt
    folder, cache = _build_fake(exported, tmp_path, "--workspace", "1.5")
    out = capsys.readouterr().out
    assert "building TensorRT 10.13.0.35 engines for Fake GPU 80GB (sm_90)" in out and "manifest updated" in out
    manifest = Manifest.load(folder)
    record = manifest.extra["tensorrt"]
    assert (record["version"], record["compute_capability"], record["gpu"]) == ("10.13.0.35", "9.0", "Fake GPU 80GB")
    assert [b["onnx"] for b in trt.log] == ["vision.onnx", "prefill.onnx", "decode.onnx"]
    assert all(not b["tf32"] and b["pools"] == {trt.MemoryPoolType.WORKSPACE: int(1.5 * 2**30)} for b in trt.log)
    expected = derive_profiles(manifest, GPU_PROFILE[3::2], max_context=256)
    assert record["profiles"] == expected["shapes"] and record["dims"] == expected["dims"]
    assert [b["profile"] for b in trt.log] == [
        {n: [s["min"], s["opt"], s["max"]] for n, s in expected["shapes"][g].items()} for g in manifest.graphs]
    key = timing_cache_key("Fake GPU 80GB", "9.0", "10.13.0.35")
    assert record["timing_cache"] == key
    cached = (cache / f"{key}.cache").read_bytes()
    assert cached.startswith(b"FAKECACHE") and trt.log[0]["cache_loaded"] == b""  # one cache shared by the graphs
    assert not list(folder.glob(".*tmp*"))
    # A second build reads the cache back; --tf32 sets the flag.
    trt.log.clear()
    assert main(["build", "--engines", str(folder), "--timing-cache", str(cache), "--tf32", *GPU_PROFILE]) == 0
    assert trt.log[0]["cache_loaded"] == cached and all(b["tf32"] for b in trt.log)
    assert Manifest.load(folder).extra["tensorrt"]["tf32"] is True


def test_fake_trt_backend_generates_what_onnxruntime_does(exported, tmp_path, fake_trt, sample_image):
    from glmtrt.runtime.pipeline import Pipeline, Request

    _, cuda = fake_trt
    folder, _ = _build_fake(exported, tmp_path)
    ort = Pipeline.from_engines(folder)
    options = dict(max_new_tokens=12, eos_token_ids=(), temperature=0.0)
    requests = [Request("Text Recognition:", [sample_image]), Request("Say something.")]
    with Pipeline.from_engines(folder, provider="trt") as pipe:
        assert pipe.backend.name == "trt"
        fixed = getattr(pipe.backend.kv, "fixed_capacity", False)
        single = pipe.generate("Text Recognition:", [sample_image], **options)
        assert single.token_ids == ort.generate("Text Recognition:", [sample_image], **options).token_ids
        got = [r.token_ids for r in pipe.generate_batch(requests, **options)]
        assert got == [r.token_ids for r in ort.generate_batch(requests, **options)]
        assert ("cudaMemcpy2DAsync" in cuda.calls) == fixed  # slot writes stay on the device
        # The decode profile holds 256 cached positions: a full cache ends generation with "length" (issue 8).
        capped = pipe.generate("Text Recognition:", [sample_image], max_new_tokens=400, eos_token_ids=())
        assert capped.stop_reason == "length"
        assert len(capped.prompt_token_ids) + len(capped.token_ids) - 1 == 256
        with pytest.raises(GlmTrtError, match=r"batch 3 is above the engines' profile maximum 2"):
            pipe.generate_batch(requests + requests[:1], **options)
        staged = [buf.ptr for buf in pipe.backend._staging.values()]
        assert staged and all(ptr in cuda.blocks for ptr in staged)
    assert pipe.backend._staging == {} and not any(ptr in cuda.blocks for ptr in staged)  # close() freed them


def test_fake_parity_runs_on_the_trt_backend(exported, tmp_path, fake_trt, sample_image):
    from glmtrt.export.parity import ParityCase, run_parity

    folder, _ = _build_fake(exported, tmp_path)
    report = run_parity(folder, cases=[ParityCase("sample", "Text Recognition:", [sample_image])], steps=6,
                        backend="trt")
    assert report["backend"] == "trt"
    (case,) = report["cases"]
    assert case["teacher_forced_top1"] == 1.0 and case["greedy_identical"]


def test_fake_refusals(exported, tmp_path, fake_trt):
    from glmtrt.runtime.pipeline import Pipeline

    folder, _ = _build_fake(exported, tmp_path)
    raw = json.loads((folder / "manifest.json").read_text())
    raw["extra"]["tensorrt"]["version"] = "10.12.0.36"
    (folder / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(GlmTrtError, match=r"engine built with TensorRT 10\.12\.0\.36 for sm_90; this is TensorRT "
                                          r"10\.13\.0\.35 on sm_90: run `glmtrt build` again"):
        Pipeline.from_engines(folder, provider="trt")
    raw["extra"]["tensorrt"]["version"] = "10.13.0.35"
    (folder / "manifest.json").write_text(json.dumps(raw))
    Pipeline.from_engines(folder, provider="trt").close()
    # A plan that is not an engine: the size/hash check first, then (re-recorded) the deserializer's own words.
    record = raw["extra"]["tensorrt"]
    (folder / "decode.plan").write_bytes(b"not an engine")
    with pytest.raises(ManifestError, match="decode.plan' has 13 bytes, the manifest recorded"):
        Pipeline.from_engines(folder, provider="trt")
    record_engines(folder, {k: v for k, v in record.items() if k != "plans"},
                   {role: p["file"] for role, p in record["plans"].items()})
    with pytest.raises(GlmTrtError, match="cannot deserialize decode.plan: fake: the serialization tag does not match"):
        Pipeline.from_engines(folder, provider="trt")


@pytest.fixture(scope="module")
def concat_export(exported, tmp_path_factory):
    """The tiny GLM-OCR export with a decode graph of the earlier "concat" contract (past in, the grown cache out),
    as folders exported before the fixed-capacity contract have; None where this glmtrt exports only one."""
    import inspect

    from glmtrt.export import graphs

    folder = shutil.copytree(exported("tiny-glm-ocr"), tmp_path_factory.mktemp("concat") / "engines")
    manifest = Manifest.load(folder)
    if not manifest.extra.get("kv_cache"):
        return folder  # the fixture's export already is a concat one
    if "kv_cache" not in inspect.signature(graphs.decode_graph).parameters:
        return None
    from glmtrt.export.onnx import export_graph
    from glmtrt.reference import load_reference

    graph = graphs.decode_graph(load_reference("tiny-glm-ocr"), "concat")
    export_graph(graph, folder)
    spec = graph.interface()
    manifest.graphs["decode"] = GraphSpec(graph.file, [TensorSpec(**t) for t in spec["inputs"]],
                                          [TensorSpec(**t) for t in spec["outputs"]])
    del manifest.extra["kv_cache"]
    manifest.record_files(folder)
    manifest.save(folder)
    return folder


def test_fake_build_of_a_concat_folder(concat_export, tmp_path, fake_trt, sample_image):
    """Folders exported before the fixed-capacity decode contract build and run too."""
    from glmtrt.runtime.pipeline import Pipeline

    if concat_export is None:
        pytest.skip("this glmtrt exports only one decode contract")
    concat = shutil.copytree(concat_export, tmp_path / "concat")
    assert main(["build", "--engines", str(concat), "--timing-cache", "", *GPU_PROFILE]) == 0
    assert Manifest.load(concat).extra["tensorrt"]["dims"]["decode"] == {"batch": [1, 1, 2], "total": [2, 256, 256],
                                                                         "past": [1, 255, 255]}
    options = dict(max_new_tokens=10, eos_token_ids=(), temperature=0.0)
    with Pipeline.from_engines(concat, provider="trt") as pipe:
        assert not getattr(pipe.backend.kv, "fixed_capacity", False)
        got = pipe.generate("Text Recognition:", [sample_image], **options).token_ids
    assert got == Pipeline.from_engines(concat).generate("Text Recognition:", [sample_image], **options).token_ids


# ------------------------------------------------------------------------------------------ on a GPU

# fp32 engines are built with TF32 off (the builder clears BuilderFlag.TF32), so every TensorRT kernel computes in
# IEEE fp32 and differs from ONNX Runtime / PyTorch on a CPU only by summation order and fused kernels (fast exp /
# rsqrt: a few ulp). Through two tiny layers that is ~1e-6 relative on logits of magnitude ~1; 1e-3 max-abs leaves
# ~100x headroom yet fails on any real mistake (a wrong cache slot, mask or position is an O(0.1..1) error).
# With TF32 (`glmtrt build --tf32`, 10-bit mantissa products) the same figures grow to ~1e-3..1e-2.
FP32_TRT_MAX_ABS = 1e-3
TF32_TRT_MAX_ABS = 2e-2
GPU_PROFILE = ["--max-context", "256", "--profile", "batch=1:1:2", "--profile", "num_patches=4:64:1024"]


@pytest.fixture(scope="module")
def trt_engines(exported, tmp_path_factory):
    """The tiny GLM-OCR fp32 export with engines built by `glmtrt build` (and the timing-cache folder)."""
    if SKIP_REASON is not None:
        pytest.skip(SKIP_REASON)
    root = tmp_path_factory.mktemp("trt")
    folder = shutil.copytree(exported("tiny-glm-ocr"), root / "tiny-glm-ocr")
    cache = root / "timing-caches"
    assert main(["build", "--engines", str(folder), "--timing-cache", str(cache), *GPU_PROFILE]) == 0
    return folder, cache


@pytest.mark.tensorrt
@gpu
def test_build_records_engines_in_the_manifest(trt_engines):
    import tensorrt as trt

    from glmtrt.runtime.backends.tensorrt import cuda_device
    from glmtrt.runtime.manifest import sha256_file

    folder, cache = trt_engines
    manifest = Manifest.load(folder)
    record = manifest.extra["tensorrt"]
    device = cuda_device()
    assert record["version"] == trt.__version__
    assert record["compute_capability"] == device.compute_capability and record["gpu"] == device.name
    assert record["strongly_typed"] is True and record["tf32"] is False
    for role, spec in manifest.graphs.items():
        plan = record["plans"][role]
        assert plan["file"] == Path(spec.file).with_suffix(".plan").name
        assert plan["sha256"] == sha256_file(folder / plan["file"])
        assert set(record["profiles"][role]) == set(spec.input_names())
    assert record["dims"]["vision"]["num_patches"] == [4, 64, 1024]
    assert record["dims"]["prefill"]["seq"] == [1, 256, 256]
    key = timing_cache_key(device.name, device.compute_capability, trt.__version__)
    assert record["timing_cache"] == key and (cache / f"{key}.cache").stat().st_size > 0
    assert not list(Path(folder).glob(".*tmp*"))


@pytest.mark.tensorrt
@gpu
def test_trt_parity_with_the_reference(trt_engines, tmp_path):
    from glmtrt.export.parity import run_parity

    folder, _ = trt_engines
    report = run_parity(folder, steps=16, backend="trt")
    assert report["backend"] == "trt"
    tol = TF32_TRT_MAX_ABS if Manifest.load(folder).extra["tensorrt"]["tf32"] else FP32_TRT_MAX_ABS
    for case in report["cases"]:
        for key in ("vision_max_abs", "prefill_logits_max_abs", "prefill_cache_max_abs",
                    "teacher_forced_max_logit_error"):
            assert (case[key] or 0.0) <= tol, (case["name"], key, case[key])
        assert case["prefill_logits_cosine"] > 0.99999
        assert case["teacher_forced_top1"] == 1.0, case
        assert case["greedy_identical"], case
    # The CLI: same harness, the report names the backend.
    out = tmp_path / "parity.json"
    main(["parity", "--engines", str(folder), "--backend", "trt", "--steps", "4", "--json", str(out)])
    assert json.loads(out.read_text())["backend"] == "trt"


@pytest.mark.tensorrt
@gpu
def test_trt_pipeline_matches_onnxruntime(trt_engines, sample_image):
    from glmtrt.runtime.pipeline import Pipeline, Request

    folder, _ = trt_engines
    ort = Pipeline.from_engines(folder)
    with Pipeline.from_engines(folder, provider="trt") as trt_pipe:
        assert trt_pipe.backend.name == "trt"
        # Each graph on identical inputs.
        plan_inputs = {"inputs_embeds": np.random.default_rng(0).standard_normal((2, 9, HIDDEN)).astype(np.float32),
                       "position_ids": np.tile(np.arange(9), (3, 2, 1)),
                       "attention_mask": np.array([[0, 0] + [1] * 7, [1] * 9])}
        ours, theirs = trt_pipe.backend.run("prefill", plan_inputs), ort.backend.run("prefill", plan_inputs)
        assert set(ours) == set(theirs)
        for name in theirs:
            assert ours[name].shape == theirs[name].shape
            assert np.abs(ours[name] - theirs[name]).max() <= FP32_TRT_MAX_ABS, name
        # Whole generations: one request, and a left-padded batch of two (the decode state's batch path).
        options = dict(max_new_tokens=24, eos_token_ids=(), temperature=0.0)
        single = trt_pipe.generate("Text Recognition:", [sample_image], **options)
        assert single.token_ids == ort.generate("Text Recognition:", [sample_image], **options).token_ids
        requests = [Request("Text Recognition:", [sample_image]), Request("Say something.")]
        got = [r.token_ids for r in trt_pipe.generate_batch(requests, **options)]
        assert got == [r.token_ids for r in ort.generate_batch(requests, **options)]
        # A request past the decode profile's 256 cached positions stops there with "length" (issue 8).
        capped = trt_pipe.generate("Text Recognition:", [sample_image], max_new_tokens=400, eos_token_ids=())
        assert capped.stop_reason == "length"
        assert len(capped.prompt_token_ids) + len(capped.token_ids) - 1 == 256


@pytest.mark.tensorrt
@gpu
def test_trt_refuses_engines_of_another_tensorrt_or_gpu(trt_engines, tmp_path):
    from glmtrt.runtime.pipeline import Pipeline

    folder, _ = trt_engines
    for key, value, expected in (("version", "9.9.9", r"built with TensorRT 9\.9\.9 for sm_\d+; this is TensorRT "),
                                 ("compute_capability", "1.0", r"built with TensorRT .* for sm_10; this is TensorRT ")):
        copy = shutil.copytree(folder, tmp_path / key)
        raw = json.loads((copy / "manifest.json").read_text())
        raw["extra"]["tensorrt"][key] = value
        (copy / "manifest.json").write_text(json.dumps(raw))
        with pytest.raises(GlmTrtError, match=expected + r".*run `glmtrt build` again") as info:
            Pipeline.from_engines(copy, provider="trt")
        assert "\n" not in str(info.value)


@pytest.mark.tensorrt
@gpu
def test_trt_refuses_a_damaged_plan(trt_engines, tmp_path):
    from glmtrt.runtime.pipeline import Pipeline

    folder, _ = trt_engines
    copy = shutil.copytree(folder, tmp_path / "damaged")
    record = json.loads((copy / "manifest.json").read_text())["extra"]["tensorrt"]
    plan = copy / record["plans"]["decode"]["file"]
    plan.write_bytes(plan.read_bytes()[: plan.stat().st_size // 2])
    with pytest.raises(ManifestError, match="damaged or replaced"):  # the recorded size no longer matches
        Pipeline.from_engines(copy, provider="trt")
    # Re-recorded (a consistent manifest over a broken plan): deserialization fails, the logger says why.
    record_engines(copy, {k: v for k, v in record.items() if k != "plans"},
                   {role: p["file"] for role, p in record["plans"].items()})
    with pytest.raises(GlmTrtError, match="cannot deserialize decode.plan"):
        Pipeline.from_engines(copy, provider="trt")
