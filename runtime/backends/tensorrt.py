"""TensorRT backend: one deserialized engine per graph, device buffers through cuda-python.

``glmtrt build`` writes ``vision.plan``, ``prefill.plan`` and ``decode.plan`` beside the ONNX graphs and records
in ``manifest.extra["tensorrt"]`` the TensorRT version, the GPU and its compute capability, the optimization
profiles and each plan's size and SHA-256. This backend refuses a folder whose engines were built by another
TensorRT version or for another GPU architecture *before* it deserializes anything (an engine is locked to both),
then deserializes each plan (``None`` -> the logger's errors in a :class:`GlmTrtError`).

Execution uses the name-based API of TensorRT 10/11: ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3`` on one CUDA stream. The KV cache never leaves the GPU during a generation, under either
decode contract of the manifest's ``extra.kv_cache.mode``:

* "fixed-capacity" (:class:`TrtFixedCapacityState`): one zeroed device buffer (batch, kv_heads, capacity,
  head_dim) per cache tensor, allocated once per generation and bound in place as the decode engine's past;
  prefill's presents are copied into its first slots and each step's new K/V into slot P by pitched
  device-to-device copies (``cudaMemcpy2DAsync``).
* "concat" (:class:`TrtConcatState`, older folders): two device arenas per cache tensor; decode step s reads its
  past from one and writes the grown present into the other (ping-pong), each bound by pointer with that shape.

Per step only the new token's embedding, its positions and the mask are copied to the device, and only the
logits come back.

Needs ``pip install 'glmtrt[tensorrt]'`` (tensorrt, cuda-python). Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GlmTrtError
from ..manifest import Manifest, ManifestError, sha256_file
from . import Backend, DecodeState, KVLayout

__all__ = ["TrtBackend", "TrtConcatState", "TrtFixedCapacityState", "DeviceInfo", "INSTALL_HINT",
           "compatibility_problem", "cuda_call", "cuda_device", "import_cudart", "import_tensorrt", "make_logger", "plan_records", "sm_name"]

INSTALL_HINT = "pip install 'glmtrt[tensorrt]'"


# ----------------------------------------------------------------------------------------- imports and device

def import_tensorrt():
    """The ``tensorrt`` module, or a one-line GlmTrtError saying how to install it."""
    try:
        import tensorrt
    except (ImportError, OSError) as e:  # OSError: the wheel is there but its libraries do not load
        detail = "" if isinstance(e, ModuleNotFoundError) else f" ({type(e).__name__}: {str(e).splitlines()[0]})"
        raise GlmTrtError(f"TensorRT is not installed{detail}; {INSTALL_HINT} on a machine with an NVIDIA GPU") \
            from None
    return tensorrt


def import_cudart():
    """cuda-python's runtime API: ``cuda.bindings.runtime`` (cuda-python >= 12.6), else the older ``cuda.cudart``."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise GlmTrtError(f"cuda-python is not installed; {INSTALL_HINT}") from None
    return cudart


def _error_name(cudart, err) -> str:
    try:
        name = cudart.cudaGetErrorName(err)[1]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # noqa: BLE001 — naming the error must not hide it
        return str(err)


def _ok(cudart, err) -> bool:
    return err == cudart.cudaError_t.cudaSuccess


def cuda_call(cudart, result, what: str):
    """Unpack a cuda-python ``(err, *values)`` tuple; a failure raises RuntimeError naming the call and the error."""
    err, values = result[0], result[1:]
    if not _ok(cudart, err):
        raise RuntimeError(f"CUDA {what} failed: {_error_name(cudart, err)}")
    return values[0] if len(values) == 1 else (values or None)


@dataclass(frozen=True)
class DeviceInfo:
    """One CUDA device: its index, name and compute capability ("9.0")."""

    index: int
    name: str
    compute_capability: str

    @property
    def sm(self) -> str:
        return sm_name(self.compute_capability)


def sm_name(compute_capability: str) -> str:
    """ "9.0" -> "sm_90" (how TensorRT and nvcc name a GPU architecture)."""
    return "sm_" + str(compute_capability).replace(".", "")


def cuda_device(device: int = 0, cudart=None) -> DeviceInfo:
    """Name and compute capability of CUDA device ``device``; GlmTrtError when no GPU is visible."""
    cudart = cudart or import_cudart()
    err, count = cudart.cudaGetDeviceCount()
    if not _ok(cudart, err) or count == 0:
        why = _error_name(cudart, err) if not _ok(cudart, err) else "0 devices"
        raise GlmTrtError(f"no CUDA GPU is visible ({why}); TensorRT engines need an NVIDIA GPU and its driver")
    if not 0 <= device < count:
        raise GlmTrtError(f"CUDA device {device} does not exist; this machine has {count} (0..{count - 1})")
    prop = cuda_call(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return DeviceInfo(device, name.rstrip("\x00").strip(), f"{prop.major}.{prop.minor}")


# ----------------------------------------------------------------------------------------- compatibility

def _release(version: str) -> tuple[int, ...]:
    """major.minor.patch of a TensorRT version string ("10.13.0.35" -> (10, 13, 0)); engines are locked to it."""
    parts = []
    for piece in str(version).split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else -1)
    return tuple(parts)


def compatibility_problem(recorded: Mapping[str, Any] | None, version: str, compute_capability: str) -> str | None:
    """Why engines built as ``recorded`` (manifest ``extra.tensorrt``) cannot run under TensorRT ``version`` on a
    GPU of ``compute_capability`` ("9.0"), or None when they can.

    A TensorRT engine is locked to the TensorRT release (major.minor.patch) that built it and to the GPU
    architecture it was built for; there is no preflight API, so the manifest's record is checked before
    deserializing.
    """
    if not recorded or not recorded.get("version") or not recorded.get("compute_capability"):
        return "the manifest's TensorRT record has no version or compute capability: run `glmtrt build` again"
    built_version, built_cc = str(recorded["version"]), str(recorded["compute_capability"])
    if _release(built_version) == _release(version) and built_cc == str(compute_capability):
        return None
    return (f"engine built with TensorRT {built_version} for {sm_name(built_cc)}; this is TensorRT {version} on "
            f"{sm_name(compute_capability)}: run `glmtrt build` again")


def plan_records(manifest: Manifest) -> dict[str, Any]:
    """The manifest's ``extra.tensorrt`` record, checked for the fields this backend needs."""
    record = (manifest.extra or {}).get("tensorrt")
    if not isinstance(record, dict) or not isinstance(record.get("plans"), dict):
        raise ManifestError("this engines folder has no TensorRT engines; run `glmtrt build --engines DIR` first")
    missing = [role for role in manifest.graphs if role not in record["plans"]]
    if missing:
        raise ManifestError(f"the manifest records no TensorRT plan for {missing}; run `glmtrt build` again")
    return record




# ----------------------------------------------------------------------------------------- logger and memory

def make_logger(trt):
    """A TensorRT logger that keeps warnings and errors, so a failed deserialize or build can say why."""
    severity = trt.ILogger.Severity
    kept = {severity.INTERNAL_ERROR: "internal error", severity.ERROR: "error", severity.WARNING: "warning"}

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[tuple[str, str]] = []

        def log(self, level, msg):  # noqa: D401 — TensorRT's callback
            label = kept.get(level)
            if label is not None:
                self.messages.append((label, str(msg)))

        def errors(self) -> list[str]:
            return [m for label, m in self.messages if label != "warning"]

        def summary(self, default: str = "no message from TensorRT") -> str:
            errors = self.errors() or [m for _, m in self.messages]
            return " | ".join(e.strip().replace("\n", " ") for e in errors[-3:]) or default

    return _Logger()


class DeviceBuffer:
    """A cudaMalloc'd block that can grow; freed by :meth:`free` or when collected."""

    def __init__(self, cudart, nbytes: int = 0):
        self._cudart, self.ptr, self.nbytes = cudart, 0, 0
        if nbytes:
            self.ensure(nbytes)

    def ensure(self, nbytes: int) -> int:
        nbytes = max(int(nbytes), 1)
        if nbytes > self.nbytes:
            self.free()
            err, ptr = self._cudart.cudaMalloc(nbytes)
            if not _ok(self._cudart, err):
                raise GlmTrtError(f"cannot allocate {nbytes / 2**20:.1f} MiB on the GPU "
                                  f"({_error_name(self._cudart, err)}); use a smaller batch or fewer tokens")
            self.ptr, self.nbytes = int(ptr), nbytes
        return self.ptr

    def free(self) -> None:
        if self.ptr:
            try:
                self._cudart.cudaFree(self.ptr)
            except Exception:  # noqa: BLE001 — at interpreter exit the bindings may be gone
                pass
            self.ptr, self.nbytes = 0, 0

    def __del__(self):
        self.free()


@dataclass
class _Graph:
    """One engine and its execution context, with the I/O facts the backend needs."""

    role: str
    engine: Any
    context: Any
    inputs: list[str]
    outputs: list[str]
    dtypes: dict[str, np.dtype]
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # input -> (min, opt, max)
    host_inputs: set[str]  # inputs TensorRT reads on the host (shape-inference inputs)
    dims: dict[str, list]  # input -> the manifest's shape (symbolic names for dynamic dims)


class TrtBackend(Backend):
    """Runs an engines folder's TensorRT plans (see the module docstring)."""

    name = "trt"

    def __init__(self, manifest: Manifest, folder: str | Path, device: int = 0, verify_plans: bool = True,
                 threads: int | None = None, **_unused: Any):
        del threads  # an ONNX Runtime option; TensorRT has none
        self.manifest, self.folder = manifest, Path(folder)
        record = plan_records(manifest)  # before importing anything: a folder never built says so first
        trt = import_tensorrt()
        cudart = import_cudart()
        self._trt, self._cudart = trt, cudart
        self.gpu = cuda_device(device, cudart)
        problem = compatibility_problem(record, trt.__version__, self.gpu.compute_capability)
        if problem:
            raise GlmTrtError(f"{self.folder}: {problem}")
        cuda_call(cudart, cudart.cudaSetDevice(device), "cudaSetDevice")
        self._stream = cuda_call(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._logger = make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self._staging: dict[tuple[str, str], DeviceBuffer] = {}
        self.graphs: dict[str, _Graph] = {}
        try:
            for role, spec in manifest.graphs.items():
                self.graphs[role] = self._load(role, spec, record["plans"][role], verify_plans)
        except BaseException:
            self.close()
            raise
        self.kv = KVLayout(manifest)

    # ------------------------------------------------------------------ loading
    def _load(self, role: str, spec, plan: Mapping[str, Any], verify: bool) -> _Graph:
        trt = self._trt
        path = self.folder / str(plan.get("file", ""))
        if not path.is_file():
            raise ManifestError(f"TensorRT plan {str(path)!r} is missing; run `glmtrt build --engines {self.folder}`")
        size = path.stat().st_size
        if "size" in plan and size != int(plan["size"]):
            raise ManifestError(f"{str(path)!r} has {size} bytes, the manifest recorded {plan['size']}; the plan is "
                                f"damaged or replaced: run `glmtrt build --engines {self.folder}` again")
        if verify and plan.get("sha256") and sha256_file(path) != plan["sha256"]:
            raise ManifestError(f"{str(path)!r} does not match its SHA-256 in the manifest; the plan is damaged or "
                                f"replaced: run `glmtrt build --engines {self.folder}` again")
        self._logger.messages.clear()
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise GlmTrtError(f"TensorRT {trt.__version__} cannot deserialize {path.name}: {self._logger.summary()}; "
                              f"run `glmtrt build --engines {self.folder}` again")
        context = engine.create_execution_context()
        if context is None:
            raise GlmTrtError(f"TensorRT cannot create an execution context for {path.name} (out of GPU memory?): "
                              f"{self._logger.summary()}")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if set(inputs) != set(spec.input_names()) or set(outputs) != set(spec.output_names()):
            raise ManifestError(f"{path.name} has inputs {sorted(inputs)} / outputs {sorted(outputs)}, the manifest says "
                                f"{spec.input_names()} / {spec.output_names()}; run `glmtrt build` again")
        dtypes = {}
        for n in names:
            try:
                dtypes[n] = np.dtype(trt.nptype(engine.get_tensor_dtype(n)))
            except TypeError:
                raise GlmTrtError(f"{path.name}: tensor {n!r} has TensorRT type {engine.get_tensor_dtype(n)}, which has "
                                  "no numpy equivalent; export its I/O as float32/float16/int64") from None
        profile = {n: tuple(tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(n, 0)) for n in inputs}
        host_inputs = {n for n in inputs if engine.is_shape_inference_io(n)}
        return _Graph(role, engine, context, inputs, outputs, dtypes, profile, host_inputs,
                      {t.name: list(t.shape) for t in spec.inputs})

    # ------------------------------------------------------------------ execution
    def _buffer(self, graph: str, name: str, nbytes: int) -> int:
        buf = self._staging.get((graph, name))
        if buf is None:
            buf = self._staging[(graph, name)] = DeviceBuffer(self._cudart)
        return buf.ensure(nbytes)

    def _check_shape(self, g: _Graph, name: str, shape: tuple[int, ...]) -> None:
        low, _, high = g.profile[name]
        if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
            dims = g.dims.get(name) or [None] * len(low)
            ranges = ", ".join(f"{d if isinstance(d, str) else 'axis ' + str(i)} {lo}..{hi}"
                               for i, (d, lo, hi) in enumerate(zip(dims, low, high)))
            dynamic = [d for (d, s, lo, hi) in zip(dims, shape, low, high) if isinstance(d, str) and not lo <= s <= hi]
            hint = (f"rebuild with `glmtrt build --profile {dynamic[0]}=MIN:OPT:MAX`" if dynamic
                    else "the input does not match the graph")
            raise GlmTrtError(f"{g.role} input {name!r} has shape {tuple(shape)}, outside the engine's profile "
                              f"({ranges}); {hint}")

    def _execute(self, graph: str, inputs: Mapping[str, np.ndarray],
                 bound_inputs: Mapping[str, tuple[int, tuple[int, ...]]] | None = None,
                 bound_outputs: Mapping[str, tuple[int, int]] | None = None,
                 fetch: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Run ``graph``: host ``inputs`` are copied in, ``bound_inputs`` (name -> device pointer, shape) are used
        in place, ``bound_outputs`` (name -> device pointer, capacity in bytes) are written in place; the other
        outputs go to staging buffers and those in ``fetch`` (default: all of them) come back as host arrays."""
        cudart, g = self._cudart, self.graphs[graph]
        bound_inputs, bound_outputs = bound_inputs or {}, bound_outputs or {}
        unknown = (set(inputs) | set(bound_inputs)) - set(g.inputs)
        missing = set(g.inputs) - set(inputs) - set(bound_inputs)
        if unknown or missing:
            raise ValueError(f"graph {graph!r}: unknown inputs {sorted(unknown)}, missing inputs {sorted(missing)}")
        ctx = g.context
        host = {n: np.ascontiguousarray(a, dtype=g.dtypes[n]) for n, a in inputs.items()}
        for name in g.inputs:
            shape = host[name].shape if name in host else tuple(bound_inputs[name][1])
            self._check_shape(g, name, tuple(shape))
            if not ctx.set_input_shape(name, tuple(int(d) for d in shape)):
                raise GlmTrtError(f"TensorRT refused shape {tuple(shape)} for {graph} input {name!r}: "
                                  f"{self._logger.summary()}")
        unresolved = ctx.infer_shapes()
        if unresolved:
            raise GlmTrtError(f"TensorRT cannot infer the {graph} output shapes (unresolved: {list(unresolved)}): "
                              f"{self._logger.summary()}")
        stream = self._stream
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        for name, array in host.items():
            if name in g.host_inputs:
                ptr = array.ctypes.data
            else:
                ptr = self._buffer(graph, name, array.nbytes)
                if array.nbytes:
                    cuda_call(cudart, cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, h2d, stream),
                              "cudaMemcpyAsync (host to device)")
            ctx.set_tensor_address(name, ptr)
        for name, (ptr, _shape) in bound_inputs.items():
            ctx.set_tensor_address(name, int(ptr))
        wanted = set(g.outputs if fetch is None else fetch)
        results: dict[str, tuple[int, np.ndarray]] = {}
        for name in g.outputs:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
            nbytes = math.prod(shape) * g.dtypes[name].itemsize
            if name in bound_outputs:
                ptr, capacity = bound_outputs[name]
                if nbytes > capacity:
                    raise RuntimeError(f"{graph} output {name!r} of shape {shape} needs {nbytes} bytes, its buffer has "
                                       f"{capacity}")
            else:
                ptr = self._buffer(graph, name, nbytes)
                if name in wanted:
                    results[name] = (ptr, np.empty(shape, dtype=g.dtypes[name]))
            ctx.set_tensor_address(name, int(ptr))
        self._logger.messages.clear()
        if not ctx.execute_async_v3(_stream_handle(stream)):
            raise RuntimeError(f"TensorRT execute_async_v3 failed for the {graph} engine: {self._logger.summary()}")
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, (ptr, array) in results.items():
            if array.nbytes:
                cuda_call(cudart, cudart.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, d2h, stream),
                          "cudaMemcpyAsync (device to host)")
        cuda_call(cudart, cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")  # host arrays live until here
        return {name: array for name, (_ptr, array) in results.items()}

    def run(self, graph: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._execute(graph, inputs)

    def start_decode(self, batch: int, capacity: int) -> DecodeState:
        if getattr(self.kv, "fixed_capacity", False):
            return TrtFixedCapacityState(self, batch, capacity)
        return TrtConcatState(self, batch, capacity)

    def _staged(self, graph: str, name: str) -> int:
        """Device address of an output ``_execute`` left in its staging buffer (valid until the graph runs again)."""
        return self._staging[(graph, name)].ptr

    def _copy_rows(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, rows: int) -> None:
        """Device-to-device copy of ``rows`` rows of ``width`` bytes between pitched layouts, on the backend's stream."""
        cudart = self._cudart
        cuda_call(cudart, cudart.cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, rows,
                                                   cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self._stream),
                  "cudaMemcpy2DAsync (device to device)")

    def close(self) -> None:
        for buf in getattr(self, "_staging", {}).values():
            buf.free()
        self._staging = {}
        self.graphs = {}
        stream = getattr(self, "_stream", None)
        if stream is not None:
            try:
                self._cudart.cudaStreamDestroy(stream)
            except Exception:  # noqa: BLE001
                pass
            self._stream = None

    def __del__(self):
        self.close()


def _stream_handle(stream) -> int:
    try:
        return int(stream)
    except TypeError:  # an old cuda-python handle without __int__: TensorRT's samples pass the object itself
        return stream


def _check_request(backend: TrtBackend, batch: int, capacity: int) -> None:
    """Refuse up front a generation the decode engine's profile cannot hold (batch, cached positions)."""
    low, _, high = backend.graphs["decode"].profile["attention_mask"]
    if batch > high[0]:
        raise GlmTrtError(f"batch {batch} is above the engines' profile maximum {high[0]}; rebuild with "
                          "`glmtrt build --profile batch=1:1:N`")
    if capacity > high[1]:
        raise GlmTrtError(f"this request needs up to {capacity} cached positions (prompt + new tokens); the decode "
                          f"engine was built for at most {high[1]}: ask for fewer tokens or rebuild with a larger "
                          "`glmtrt build --max-context`")


def _check_capacity(state, inputs_embeds: np.ndarray, new_length: int) -> None:
    """A decode state's guard: the batch it was made for, and room in its KV cache."""
    if inputs_embeds.shape[0] != state.batch:
        raise ValueError(f"batch {inputs_embeds.shape[0]} != the state's {state.batch}")
    if new_length > state.capacity:
        raise ValueError(f"the KV cache would hold {new_length} positions, its capacity is {state.capacity}")


class TrtFixedCapacityState(DecodeState):
    """A "fixed-capacity" folder (manifest ``extra.kv_cache.mode``): one zeroed device buffer per cache tensor in
    the folder's layout (``KVLayout.buffer_shape``: (batch, kv_heads, head_dim, capacity), or (batch, kv_heads,
    capacity, head_dim) for the first such exports), bound in place as the decode engine's past, with a (batch,
    capacity) slot mask. Prefill's presents go into the first slots once (on the device for "bhcd"; transposed on
    the host for "bhdc"); each step the engine returns only the new token's K/V, which one pitched device-to-device
    copy writes into slot P (for "bhdc" a column: rows * head_dim elements, capacity apart)."""

    def __init__(self, backend: TrtBackend, batch: int, capacity: int):
        self.backend, self.batch, self.capacity = backend, int(batch), max(int(capacity), 1)
        _check_request(backend, self.batch, self.capacity)
        kv = self.kv = backend.kv
        decode = backend.graphs["decode"]
        itemsize = self.itemsize = decode.dtypes[kv.past[0]].itemsize
        self.transposed = getattr(kv, "layout", "bhcd") == "bhdc"
        self.slot_bytes = kv.head_dim * itemsize
        self.rows = self.batch * kv.kv_heads  # one (capacity, head_dim) block per (batch row, kv head)
        nbytes = self.rows * self.capacity * self.slot_bytes
        cudart = backend._cudart
        self.buffers = [DeviceBuffer(cudart, nbytes) for _ in kv.past]
        for buf in self.buffers:  # unwritten slots are masked, but must be finite (0 * NaN is NaN)
            cuda_call(cudart, cudart.cudaMemsetAsync(buf.ptr, 0, nbytes, backend._stream), "cudaMemsetAsync")
        self.mask = np.zeros((self.batch, self.capacity), dtype=decode.dtypes["attention_mask"])
        self.length = 0  # cached positions = the next slot to write

    def prefill(self, inputs_embeds, position_ids, attention_mask):
        length = int(inputs_embeds.shape[1])
        self._check(inputs_embeds, length)
        backend = self.backend
        fetch = ("logits", *self.kv.present) if self.transposed else ("logits",)
        result = backend._execute("prefill", {"inputs_embeds": inputs_embeds, "position_ids": position_ids,
                                              "attention_mask": attention_mask}, fetch=fetch)
        if self.transposed:  # (B, KVH, length, D) -> the first columns of (rows * D, C): once per generation,
            # transposed on the host into the present's own staging buffer, then one pitched device copy
            cudart, h2d = backend._cudart, backend._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            columns = [np.ascontiguousarray(np.swapaxes(result[name], 2, 3)) for name in self.kv.present]
            width = length * self.itemsize
            for buf, name, array in zip(self.buffers, self.kv.present, columns):
                staged = backend._staged("prefill", name)
                cuda_call(cudart, cudart.cudaMemcpyAsync(staged, array.ctypes.data, array.nbytes, h2d, backend._stream),
                          "cudaMemcpyAsync (host to device)")
                backend._copy_rows(buf.ptr, self.capacity * self.itemsize, staged, width, width,
                                   self.rows * self.kv.head_dim)
            cuda_call(cudart, cudart.cudaStreamSynchronize(backend._stream), "cudaStreamSynchronize")  # columns live
        else:
            pitch = self.capacity * self.slot_bytes
            for buf, name in zip(self.buffers, self.kv.present):  # (rows, length, D) -> the first slots of (rows, C, D)
                backend._copy_rows(buf.ptr, pitch, backend._staged("prefill", name), length * self.slot_bytes,
                                   length * self.slot_bytes, self.rows)
        self.length = length
        return result["logits"]

    def step(self, inputs_embeds, position_ids, attention_mask):
        p = self.length
        if p == 0:
            raise RuntimeError("decode step before prefill")
        self._check(inputs_embeds, p + 1)
        backend, kv = self.backend, self.kv
        self.mask[:, :p] = np.asarray(attention_mask)[:, :p]  # the graph's mask covers the cache slots only
        shape = kv.buffer_shape(self.batch, self.capacity) if hasattr(kv, "buffer_shape") else \
            kv.shape(self.batch, self.capacity)
        pasts = {name: (buf.ptr, shape) for name, buf in zip(kv.past, self.buffers)}
        result = backend._execute("decode", {"inputs_embeds": inputs_embeds, "position_ids": position_ids,
                                             "attention_mask": self.mask}, bound_inputs=pasts, fetch=("logits",))
        for buf, name in zip(self.buffers, kv.present):  # the new token's (rows, 1, D) -> slot p
            if self.transposed:  # column p of (rows * D, C): rows * D elements, capacity apart
                backend._copy_rows(buf.ptr + p * self.itemsize, self.capacity * self.itemsize,
                                   backend._staged("decode", name), self.itemsize, self.itemsize,
                                   self.rows * kv.head_dim)
            else:
                backend._copy_rows(buf.ptr + p * self.slot_bytes, self.capacity * self.slot_bytes,
                                   backend._staged("decode", name), self.slot_bytes, self.slot_bytes, self.rows)
        self.length = p + 1
        return result["logits"]

    _check = _check_capacity

    def close(self) -> None:
        for buf in self.buffers:
            buf.free()
        self.buffers = []


class TrtConcatState(DecodeState):
    """A "concat" folder (past in, the whole grown cache out): two device arenas per cache tensor, ping-pong."""

    def __init__(self, backend: TrtBackend, batch: int, capacity: int):
        self.backend, self.batch, self.capacity = backend, int(batch), int(capacity)
        _check_request(backend, self.batch, self.capacity)
        kv = self.kv = backend.kv
        itemsize = backend.graphs["prefill"].dtypes[kv.present[0]].itemsize
        self.arena_bytes = self.batch * kv.kv_heads * max(self.capacity, 1) * kv.head_dim * itemsize
        self._arenas = [[DeviceBuffer(backend._cudart, self.arena_bytes) for _side in range(2)] for _ in kv.present]
        self.length = 0  # cached positions
        self.side = 0  # arena holding the current cache

    def prefill(self, inputs_embeds, position_ids, attention_mask):
        length = int(inputs_embeds.shape[1])
        self._check(inputs_embeds, length)
        outputs = {name: (pair[0].ptr, self.arena_bytes) for name, pair in zip(self.kv.present, self._arenas)}
        result = self.backend._execute("prefill", {"inputs_embeds": inputs_embeds, "position_ids": position_ids,
                                                   "attention_mask": attention_mask},
                                       bound_outputs=outputs, fetch=("logits",))
        self.side, self.length = 0, length
        return result["logits"]

    def step(self, inputs_embeds, position_ids, attention_mask):
        if self.length == 0:
            raise RuntimeError("decode step before prefill")
        self._check(inputs_embeds, self.length + 1)
        past_shape = self.kv.shape(self.batch, self.length)
        write = 1 - self.side
        pasts = {name: (pair[self.side].ptr, past_shape) for name, pair in zip(self.kv.past, self._arenas)}
        presents = {name: (pair[write].ptr, self.arena_bytes) for name, pair in zip(self.kv.present, self._arenas)}
        result = self.backend._execute("decode", {"inputs_embeds": inputs_embeds, "position_ids": position_ids,
                                                  "attention_mask": attention_mask},
                                       bound_inputs=pasts, bound_outputs=presents, fetch=("logits",))
        self.side, self.length = write, self.length + 1
        return result["logits"]

    _check = _check_capacity

    def close(self) -> None:
        for pair in self._arenas:
            for buf in pair:
                buf.free()
        self._arenas = []
