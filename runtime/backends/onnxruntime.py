"""ONNX Runtime backend: one InferenceSession per graph; prefill and decode through IO binding.

The KV cache never round-trips through Python objects between steps. Two decode contracts (the manifest's
``extra.kv_cache.mode``, see ``glmtrt.export.graphs.KV_CACHE``):

* "fixed-capacity" (:class:`OrtFixedCapacityState`): one zeroed buffer per cache tensor, (batch, kv_heads,
  head_dim, capacity) (or, for the first such exports, (batch, kv_heads, capacity, head_dim): ``KVLayout``),
  allocated once per generation (capacity = prompt + new tokens) and bound once as an input of the decode
  session, together with a (batch, capacity) slot mask; on the CPU the bindings are OrtValues over the numpy
  buffers themselves, so no step copies the cache. Prefill's presents are copied into the first slots once;
  each step's graph returns only the new token's K/V (bound to small preallocated arrays), which the host
  writes into slot P. A step's cost is one read of the cache and the weights.
* "concat" (:class:`OrtConcatState`, folders exported before that contract): two flat arenas per cache tensor
  of ``batch * kv_heads * capacity * head_dim`` elements; decode step s reads its past from one arena and
  writes the grown present into the other (ping-pong), each bound by pointer with that step's shape.

Shared weights (``share_weights=True``, CPU provider, folders with the manifest's ``shared_weights``): the
prefill and decode graphs' weights are stored once in ``text.onnx.data``; the backend memory-maps that file once
and gives both sessions the same read-only buffers (``SessionOptions.add_initializer``) with ONNX Runtime's
weight prepacking off for them (a prepacked copy is per session). The text weights are then resident once
instead of twice (-2.2 GB for the real-size GLM-OCR in fp32) at the price of ONNX Runtime's slower unpacked
one-row GEMM in decode (see the README's bench table). Off by default: speed first.

The logits output is bound to one preallocated host buffer. Per step only the new token's embedding, positions
and mask travel from the host, and only the logits come back.

Providers: "cpu" (CPUExecutionProvider); "cuda" and "tensorrt" need onnxruntime-gpu
(``pip install 'glmtrt[gpu]'``) and map to CUDAExecutionProvider / TensorrtExecutionProvider (+ CUDA fallback).
With them the fixed-capacity buffers stay host arrays that ONNX Runtime copies to the device each step (a
device-side slot write needs a CUDA binding, which this backend does not take on); the concat arenas live on
the device.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GlmTrtError
from ..manifest import Manifest, ManifestError
from . import Backend, DecodeState, KVLayout

__all__ = ["OrtBackend", "OrtConcatState", "OrtFixedCapacityState", "ort_providers", "prepack_only_ops"]

# Graphs run once per image or request, with large, shape-dependent intermediates (GLM-OCR: ~0.7 GB for a
# 4096-patch image, its attention taken four heads at a time). ONNX Runtime's memory pattern (one planned block per input shape, kept from a session's second
# run on; off for every session) and its CPU arena (freed blocks kept for good; off for these) would hold that
# memory after the call: about +2 GB of process peak from the second request on (GLM-OCR fp32, `glmtrt bench
# --repeats 2`), for no measurable speed. Decode keeps its arena: small allocations every step.
ONE_CALL_ROLES = ("vision", "prefill")
# Contrib ops whose CPU kernels are fast only on their own prepacked weights (MatMulNBits: decode ~60x slower
# unpacked, measured on the cpu-int4 plan of GLM-OCR): share_weights refuses plans that use them.
PREPACK_ONLY_OPS = ("com.microsoft.MatMulNBits",)


def prepack_only_ops(manifest: Manifest) -> list[str]:
    """The ops of a folder's plan (short names) that make ``share_weights`` unsuitable; [] when it suits."""
    return [op.rsplit(".", 1)[-1] for op in sorted(set(manifest.plan.get("contrib_ops", [])) & set(PREPACK_ONLY_OPS))]

# ONNX TensorProto data types the shared-weights map can hand to ONNX Runtime as numpy arrays.
_ONNX_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64, 10: np.float16,
                11: np.float64, 9: np.bool_}

_PROVIDER_CHAINS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise GlmTrtError("onnxruntime is not installed; pip install onnxruntime (or 'glmtrt[gpu]' for GPUs)") from None
    return onnxruntime


def ort_providers(provider: str) -> list[str]:
    """The ONNX Runtime execution providers for a glmtrt provider name, checked against what is installed."""
    ort = _ort()
    chain = _PROVIDER_CHAINS[provider]
    available = set(ort.get_available_providers())
    if chain[0] not in available:
        raise GlmTrtError(f"provider {provider!r} needs ONNX Runtime's {chain[0]}, which this onnxruntime "
                          f"({ort.__version__}, providers: {', '.join(sorted(available))}) lacks; "
                          "pip install 'glmtrt[gpu]' (onnxruntime-gpu) on a machine with an NVIDIA GPU")
    return chain


class OrtBackend(Backend):
    """Sessions for the vision, prefill and decode graphs of an engines folder (share_weights: see the module
    docstring)."""

    def __init__(self, manifest: Manifest, folder: Path, provider: str = "cpu", threads: int | None = None,
                 optimization_level: str = "all", share_weights: bool = False):
        ort = _ort()
        self.manifest, self.folder, self.provider = manifest, Path(folder), provider
        self.name = f"onnxruntime-{provider}"
        if share_weights and provider != "cpu":
            raise GlmTrtError(f"share_weights works with the cpu provider only (got {provider!r}): a device session "
                              "copies its weights to the GPU anyway; drop share_weights")
        providers = ort_providers(provider)
        levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        self.sessions = {}
        self.shared_bytes = 0  # bytes of weights held once for several sessions (share_weights)
        shared = self._shared_initializers(ort) if share_weights else {}
        for role, spec in manifest.graphs.items():
            path = self.folder / spec.file
            session_options = self._session_options(ort, threads, levels[optimization_level],
                                                    one_call=role in ONE_CALL_ROLES)
            if role in shared:
                session_options.add_session_config_entry("session.disable_prepacking", "1")
                for name, value in shared[role]:
                    session_options.add_initializer(name, value)
            try:
                session = ort.InferenceSession(str(path), sess_options=session_options, providers=providers)
            except Exception as e:  # onnxruntime raises its own exception types
                raise ManifestError(f"ONNX Runtime cannot load {str(path)!r} ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''}); re-export the folder") from None
            inputs = {i.name for i in session.get_inputs()}
            outputs = {o.name for o in session.get_outputs()}
            if inputs != set(spec.input_names()) or outputs != set(spec.output_names()):
                raise ManifestError(f"{spec.file} has inputs {sorted(inputs)} / outputs {sorted(outputs)}, the manifest "
                                    f"says {spec.input_names()} / {spec.output_names()}; re-export the folder")
            self.sessions[role] = session
        self.device = "cpu" if provider == "cpu" else "cuda"
        self.input_dtypes = {role: {t.name: np.dtype(t.dtype) for t in spec.inputs}
                             for role, spec in manifest.graphs.items()}
        self.kv = KVLayout(manifest)

    @staticmethod
    def _session_options(ort, threads: int | None, level, one_call: bool = False):
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = level
        options.enable_mem_pattern = False
        if one_call:
            options.enable_cpu_mem_arena = False
        return options

    def _shared_initializers(self, ort) -> dict[str, list[tuple[str, Any]]]:
        """role -> [(initializer name, OrtValue)] over one memory map of the manifest's shared weights file."""
        record = self.manifest.shared_weights
        if not record:
            raise GlmTrtError(f"{str(self.folder)!r} stores the prefill and decode weights separately (exported by an "
                              "older glmtrt); re-export it to use share_weights")
        needs_prepacking = prepack_only_ops(self.manifest)
        if needs_prepacking:
            raise GlmTrtError(f"share_weights does not suit this {self.manifest.precision} plan: its "
                              f"{', '.join(needs_prepacking)} kernels need their own "
                              "prepacked weights (unpacked, decode runs tens of times slower); drop share_weights or "
                              "use the cpu-int8 plan")
        data = np.memmap(self.folder / record["file"], dtype=np.uint8, mode="r")
        values: dict[tuple[int, int, int], Any] = {}  # one OrtValue per stored tensor, whichever graph names it
        shared: dict[str, list[tuple[str, Any]]] = {}
        for role, tensors in record["graphs"].items():
            for name, (offset, length, onnx_dtype, shape) in tensors.items():
                dtype = _ONNX_DTYPES.get(int(onnx_dtype))
                if dtype is None:  # a type numpy cannot hold (bfloat16, int4): ONNX Runtime reads it itself
                    continue
                key = (int(offset), int(length), int(onnx_dtype))
                if key not in values:
                    array = data[offset:offset + length].view(dtype).reshape(shape)
                    values[key] = ort.OrtValue.ortvalue_from_numpy(array)
                    self.shared_bytes += length
                shared.setdefault(role, []).append((name, values[key]))
        self._shared_values = values  # the sessions use these buffers: keep them (and the map) alive
        return shared

    def cast_inputs(self, graph: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        dtypes = self.input_dtypes[graph]
        unknown = set(inputs) - set(dtypes)
        if unknown:
            raise ValueError(f"graph {graph!r} has no inputs {sorted(unknown)}")
        return {k: np.ascontiguousarray(v, dtype=dtypes[k]) for k, v in inputs.items()}

    def run(self, graph: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self.sessions[graph]
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, self.cast_inputs(graph, inputs))))

    def start_decode(self, batch: int, capacity: int) -> DecodeState:
        if self.kv.fixed_capacity:
            return OrtFixedCapacityState(self, batch, capacity)
        return OrtConcatState(self, batch, capacity)

    def close(self) -> None:
        self.sessions.clear()


class OrtFixedCapacityState(DecodeState):
    """Prefill + decode steps over fixed-capacity cache buffers bound once (see the module docstring)."""

    def __init__(self, backend: OrtBackend, batch: int, capacity: int):
        ort = _ort()
        self.backend, self.batch, self.capacity = backend, int(batch), max(int(capacity), 1)
        kv = self.kv = backend.kv
        manifest = backend.manifest
        # Zeros, not np.empty: unwritten slots are masked, but their V rows still meet a 0 weight (0 * NaN = NaN).
        self.buffers = [np.zeros(kv.buffer_shape(self.batch, self.capacity), dtype=kv.dtype) for _ in kv.past]
        self.mask = np.zeros((self.batch, self.capacity), dtype=kv.mask_dtype)
        decode_outputs = {t.name: t for t in manifest.graphs["decode"].outputs}
        self.new_slots = [np.empty(kv.shape(self.batch, 1), dtype=np.dtype(decode_outputs[n].dtype)) for n in kv.present]
        vocab = int(manifest.config["text"]["lm_head_size"])
        self.logits = np.empty((self.batch, vocab), dtype=np.dtype(decode_outputs["logits"].dtype))
        self.length = 0  # cached positions = the next write slot
        session = backend.sessions["decode"]
        self.binding = binding = session.io_binding()
        # OrtValues over the numpy buffers: on the CPU ONNX Runtime reads them in place, every step.
        self._values = [ort.OrtValue.ortvalue_from_numpy(a) for a in (*self.buffers, self.mask)]
        for name, value in zip((*kv.past, "attention_mask"), self._values):
            binding.bind_ortvalue_input(name, value)
        for name, array in zip(kv.present, self.new_slots):
            binding.bind_output(name, "cpu", 0, array.dtype.type, list(array.shape), array.ctypes.data)
        binding.bind_output("logits", "cpu", 0, self.logits.dtype.type, list(self.logits.shape), self.logits.ctypes.data)

    def prefill(self, inputs_embeds, position_ids, attention_mask):
        length = int(inputs_embeds.shape[1])
        self._check(inputs_embeds, length)
        backend = self.backend
        names = ["logits", *self.kv.present]
        outputs = backend.sessions["prefill"].run(names, backend.cast_inputs(
            "prefill", {"inputs_embeds": inputs_embeds, "position_ids": position_ids, "attention_mask": attention_mask}))
        for buf, present in zip(self.buffers, outputs[1:]):
            self.kv.store(buf, present, 0)  # once per generation
        self.length = length
        np.copyto(self.logits, outputs[0])
        return self.logits

    def load(self, past):
        past = list(past)
        if len(past) != len(self.buffers):
            raise ValueError(f"{len(past)} cache tensors given, the model has {len(self.buffers)}")
        length = int(past[0].shape[2])
        self._check(np.empty((past[0].shape[0], 0)), length + 1)
        for buf, array in zip(self.buffers, past):
            self.kv.store(buf, np.asarray(array), 0)
        self.length = length

    def step(self, inputs_embeds, position_ids, attention_mask):
        p = self.length
        if p == 0:
            raise RuntimeError("decode step before prefill")
        self._check(inputs_embeds, p + 1)
        backend, binding = self.backend, self.binding
        for name, array in backend.cast_inputs("decode", {"inputs_embeds": inputs_embeds,
                                                          "position_ids": position_ids}).items():
            binding.bind_cpu_input(name, array)
        self.mask[:, :p] = np.asarray(attention_mask)[:, :p]  # the graph's mask covers past slots only
        backend.sessions["decode"].run_with_iobinding(binding)
        for buf, new in zip(self.buffers, self.new_slots):
            self.kv.store(buf, new, p)
        self.length = p + 1
        return self.logits

    def _check(self, inputs_embeds: np.ndarray, new_length: int) -> None:
        if inputs_embeds.shape[0] != self.batch:
            raise ValueError(f"batch {inputs_embeds.shape[0]} != the state's {self.batch}")
        if new_length > self.capacity:
            raise ValueError(f"the KV cache would hold {new_length} positions, its capacity is {self.capacity}")


class OrtConcatState(DecodeState):
    """Prefill + decode steps of a "concat" folder: the cache in two preallocated arenas per cache tensor."""

    def __init__(self, backend: OrtBackend, batch: int, capacity: int):
        ort = _ort()
        self.backend, self.batch, self.capacity = backend, int(batch), int(capacity)
        kv = backend.kv
        self.kv = kv
        elements = self.batch * kv.kv_heads * self.capacity * kv.head_dim
        self.element_type = kv.dtype.type
        # Two arenas per cache tensor; on a GPU they are device memory owned by OrtValues.
        self._arenas: list[list[Any]] = []
        self._pointers: list[list[int]] = []
        for _ in kv.present:
            pair, ptrs = [], []
            for _side in range(2):
                if backend.device == "cpu":
                    buf = np.empty(max(elements, 1), dtype=kv.dtype)
                    ptrs.append(buf.ctypes.data)
                else:
                    buf = ort.OrtValue.ortvalue_from_shape_and_type([max(elements, 1)], kv.dtype.type, "cuda", 0)
                    ptrs.append(buf.data_ptr())
                pair.append(buf)
            self._arenas.append(pair)
            self._pointers.append(ptrs)
        vocab_spec = {t.name: t for t in backend.manifest.graphs["decode"].outputs}["logits"]
        vocab = int(backend.manifest.config["text"]["lm_head_size"])
        self.logits = np.empty((self.batch, vocab), dtype=np.dtype(vocab_spec.dtype))
        self.length = 0  # cached positions
        self.side = 0  # arena holding the current cache

    def _bind(self, graph: str, inputs: dict[str, np.ndarray], present_length: int, past_length: int | None):
        backend = self.backend
        session = backend.sessions[graph]
        binding = session.io_binding()
        for name, array in backend.cast_inputs(graph, inputs).items():
            binding.bind_cpu_input(name, array)
        device, write_side = backend.device, 1 - self.side if past_length is not None else 0
        if past_length is not None:
            past_shape = list(self.kv.shape(self.batch, past_length))
            for name, ptrs in zip(self.kv.past, self._pointers):
                binding.bind_input(name, device, 0, self.element_type, past_shape, ptrs[self.side])
        present_shape = list(self.kv.shape(self.batch, present_length))
        for name, ptrs in zip(self.kv.present, self._pointers):
            binding.bind_output(name, device, 0, self.element_type, present_shape, ptrs[write_side])
        binding.bind_output("logits", "cpu", 0, self.logits.dtype.type, list(self.logits.shape), self.logits.ctypes.data)
        session.run_with_iobinding(binding)
        self.side, self.length = write_side, present_length
        return self.logits

    def load(self, past):
        past = list(past)
        if self.backend.device != "cpu" or len(past) != len(self._arenas):
            raise ValueError("loading a cache needs the CPU provider and one array per cache tensor")
        length = int(past[0].shape[2])
        self._check(np.empty((past[0].shape[0], 0)), length + 1)
        for pair, array in zip(self._arenas, past):
            pair[0][:array.size].reshape(array.shape)[...] = array
        self.side, self.length = 0, length

    def prefill(self, inputs_embeds, position_ids, attention_mask):
        length = int(inputs_embeds.shape[1])
        self._check(inputs_embeds, length)
        return self._bind("prefill", {"inputs_embeds": inputs_embeds, "position_ids": position_ids,
                                      "attention_mask": attention_mask}, length, None)

    def step(self, inputs_embeds, position_ids, attention_mask):
        if self.length == 0:
            raise RuntimeError("decode step before prefill")
        self._check(inputs_embeds, self.length + 1)
        return self._bind("decode", {"inputs_embeds": inputs_embeds, "position_ids": position_ids,
                                     "attention_mask": attention_mask}, self.length + 1, self.length)

    def _check(self, inputs_embeds: np.ndarray, new_length: int) -> None:
        if inputs_embeds.shape[0] != self.batch:
            raise ValueError(f"batch {inputs_embeds.shape[0]} != the state's {self.batch}")
        if new_length > self.capacity:
            raise ValueError(f"the KV cache would hold {new_length} positions, its capacity is {self.capacity}")
