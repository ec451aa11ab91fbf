"""Execution backends: one small interface over the exported graphs.

A backend runs a graph by role (``"vision"``, ``"prefill"``, ``"decode"``) on named numpy inputs
(:meth:`Backend.run`) and drives one generation's KV cache (:meth:`Backend.start_decode`), which lets a
backend keep the cache on its device between steps. :class:`HostKVState` is the portable fallback built on
``run`` alone (the cache round-trips through host arrays), for backends with nothing better.

``load_backend`` picks the implementation from a provider name; it imports onnxruntime (or, later,
tensorrt) only when called.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GlmTrtError
from ..manifest import Manifest, ManifestError

__all__ = ["Backend", "DecodeState", "HostKVState", "KVLayout", "load_backend", "PROVIDERS"]

PROVIDERS = ("cpu", "cuda", "tensorrt", "trt")


KV_MODES = ("fixed-capacity", "concat")
# Axis orders of fixed-capacity buffers: "bhdc" (batch, kv_heads, head_dim, capacity), what glmtrt exports; "bhcd"
# (batch, kv_heads, capacity, head_dim), the first fixed-capacity exports (their record has no "layout").
KV_LAYOUTS = {"bhdc": 3, "bhcd": 2}  # layout -> the capacity axis


class KVLayout:
    """Names, geometry and contract of the KV cache, read from the manifest's prefill and decode graphs.

    present names ``present.{i}.key|value`` (prefill and decode outputs) map to past names
    ``past_key_values.{i}.key|value`` (decode inputs); shapes are (batch, kv_heads, length, head_dim).
    ``mode`` is the manifest's ``extra.kv_cache.mode``: "fixed-capacity" (the decode graph reads the runtime's
    buffers of ``capacity`` slots, masked by ``attention_mask`` (batch, capacity), and returns only the new
    slot) or, for folders that predate that record, "concat" (past in, the whole grown cache out).
    ``layout`` (fixed-capacity): the buffers' axis order, see ``KV_LAYOUTS``; :meth:`buffer_shape` and
    :meth:`store` hide it from the decode states.
    """

    def __init__(self, manifest: Manifest):
        prefill, decode = manifest.graphs["prefill"], manifest.graphs["decode"]
        self.present = [n for n in prefill.output_names() if n.startswith("present.")]
        self.past = [n.replace("present.", "past_key_values.", 1) for n in self.present]
        missing = [n for n in self.past if n not in decode.input_names()]
        decode_present = [n for n in decode.output_names() if n.startswith("present.")]
        if not self.present or missing or decode_present != self.present:
            raise ManifestError("the manifest's prefill/decode graphs do not share one KV cache layout "
                                "(present.{i}.key|value -> past_key_values.{i}.key|value); re-export the folder")
        text = manifest.config["text"]
        self.kv_heads = int(text["num_kv_heads"])
        self.head_dim = int(text["head_dim"])
        spec = {t.name: t for t in prefill.outputs}[self.present[0]]
        self.dtype = np.dtype(spec.dtype)
        record = manifest.extra.get("kv_cache") or {}
        self.mode = record.get("mode", "concat") if isinstance(record, dict) else None
        if self.mode not in KV_MODES:
            raise ManifestError(f"the manifest's KV cache mode {self.mode!r} is unknown to this glmtrt (it knows "
                                f"{', '.join(KV_MODES)}); upgrade glmtrt or re-export the folder")
        fixed = self.mode == "fixed-capacity"
        self.layout = record.get("layout", "bhcd") if fixed else "bhcd"
        if self.layout not in KV_LAYOUTS:
            raise ManifestError(f"the manifest's KV cache layout {self.layout!r} is unknown to this glmtrt (it knows "
                                f"{', '.join(KV_LAYOUTS)}); upgrade glmtrt or re-export the folder")
        self.capacity_axis = KV_LAYOUTS[self.layout]
        inputs = {t.name: t for t in decode.inputs}
        past_shape = list(inputs[self.past[0]].shape)
        past_len = past_shape[self.capacity_axis]
        new_len = {t.name: t for t in decode.outputs}[self.present[0]].shape[2]
        mask_len = inputs["attention_mask"].shape[-1] if "attention_mask" in inputs else None
        other = past_shape[5 - self.capacity_axis]  # the head_dim axis
        if (new_len == 1) != fixed or (fixed and (not isinstance(past_len, str) or mask_len != past_len
                                                 or other != self.head_dim)):
            raise ManifestError(f"the decode graph's cache shapes (past {past_shape}, present length {new_len!r}, mask "
                                f"length {mask_len!r}) do not fit the manifest's KV cache mode {self.mode!r} "
                                f"(layout {self.layout!r}); re-export the folder")
        self.mask_dtype = np.dtype(inputs["attention_mask"].dtype) if mask_len is not None else np.dtype(np.int64)

    @property
    def fixed_capacity(self) -> bool:
        return self.mode == "fixed-capacity"

    def shape(self, batch: int, length: int) -> tuple[int, int, int, int]:
        """A present's shape (prefill and decode outputs, and "concat" pasts)."""
        return (batch, self.kv_heads, length, self.head_dim)

    def buffer_shape(self, batch: int, capacity: int) -> tuple[int, int, int, int]:
        """A fixed-capacity buffer's shape in the folder's layout."""
        if self.capacity_axis == 3:
            return (batch, self.kv_heads, self.head_dim, capacity)
        return self.shape(batch, capacity)

    def store(self, buffer: np.ndarray, present: np.ndarray, start: int) -> None:
        """Write presents (B, kv_heads, n, head_dim) into slots start..start+n of a fixed-capacity buffer."""
        n = present.shape[2]
        if self.capacity_axis == 3:
            buffer[:, :, :, start:start + n] = np.swapaxes(present, 2, 3)
        else:
            buffer[:, :, start:start + n] = present


class DecodeState(ABC):
    """One generation's graph calls: a prefill, then decode steps, with the KV cache held by the backend."""

    @abstractmethod
    def prefill(self, inputs_embeds: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Run the prefill graph; keep its cache. Returns logits (B, V) (valid until the next call)."""

    @abstractmethod
    def step(self, inputs_embeds: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Run one decode step on the kept cache; keep the grown cache. ``attention_mask`` (B, P + 1) covers the
        P cached positions and the new token, whatever the graph's own mask contract. Returns logits (B, V)."""

    def load(self, past: Sequence[np.ndarray]) -> None:
        """Start from a given cache instead of a prefill (prefix reuse, benchmarks at a chosen context): host
        arrays (B, kv_heads, P, head_dim) in ``past_key_values`` order (layer-major, key then value)."""
        raise NotImplementedError(f"{type(self).__name__} cannot load a cache")


class Backend(ABC):
    """Runs the graphs of one engines folder."""

    name: str = "backend"

    @abstractmethod
    def run(self, graph: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run graph ``graph`` (a manifest role) on host arrays; returns every output as a host array."""

    def start_decode(self, batch: int, capacity: int) -> DecodeState:
        """A decode state for ``batch`` rows and at most ``capacity`` cached positions (prompt + new tokens)."""
        return HostKVState(self, KVLayout(self.manifest), capacity)

    def close(self) -> None:
        """Release sessions and device memory."""


class HostKVState(DecodeState):
    """The portable decode state on ``Backend.run`` alone: the cache lives in host arrays.

    "concat" folders: the presents of one call are fed to the next. "fixed-capacity" folders: one zeroed
    buffer per cache tensor (``KVLayout.buffer_shape``), prefill's presents copied into its first slots, each
    step's new slot written at the past length; without a ``capacity`` (or past it) the buffers grow.
    """

    def __init__(self, backend: Backend, layout: KVLayout, capacity: int | None = None):
        self.backend, self.layout = backend, layout
        self.capacity = capacity
        self.cache: dict[str, np.ndarray] = {}
        self.buffers = False  # fixed-capacity: whether ``cache`` holds the buffers yet
        self.length = 0

    def _keep(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        self.cache = {past: outputs[present] for present, past in zip(self.layout.present, self.layout.past)}
        return outputs["logits"]

    def prefill(self, inputs_embeds, position_ids, attention_mask):
        outputs = self.backend.run("prefill", {"inputs_embeds": inputs_embeds, "position_ids": position_ids,
                                               "attention_mask": attention_mask})
        logits = self._keep(outputs)
        self.buffers = False
        self.length = int(np.shape(inputs_embeds)[1])
        if self.layout.fixed_capacity:
            self._grow(max(self.capacity or 0, self.length + 1))
        return logits

    def load(self, past):
        self.cache = {name: np.asarray(a, dtype=self.layout.dtype) for name, a in zip(self.layout.past, past, strict=True)}
        self.buffers = False
        self.length = int(self.cache[self.layout.past[0]].shape[2])
        if self.layout.fixed_capacity:
            self._grow(max(self.capacity or 0, self.length + 1))

    def _grow(self, capacity: int) -> None:
        """Copy the cache into zeroed buffers of ``capacity`` slots (finite unwritten slots: see KV_CACHE).
        Before the first call the cache holds presents (B, kv_heads, P, head_dim); after it, buffers."""
        batch = next(iter(self.cache.values())).shape[0]
        layout, grown = self.layout, {}
        for name, old in self.cache.items():
            buf = np.zeros(layout.buffer_shape(batch, capacity), dtype=old.dtype)
            if self.buffers:
                index = [slice(None)] * 4
                index[layout.capacity_axis] = slice(0, self.length)
                buf[tuple(index)] = old[tuple(index)]
            else:
                layout.store(buf, old[:, :, :self.length], 0)
            grown[name] = buf
        self.cache, self.capacity, self.buffers = grown, capacity, True

    def step(self, inputs_embeds, position_ids, attention_mask):
        inputs = {"inputs_embeds": inputs_embeds, "position_ids": position_ids, "attention_mask": attention_mask}
        if not self.layout.fixed_capacity:
            return self._keep(self.backend.run("decode", {**inputs, **self.cache}))
        p = self.length
        if p >= self.capacity:
            self._grow(2 * self.capacity)
        mask = np.zeros((np.shape(attention_mask)[0], self.capacity), dtype=self.layout.mask_dtype)
        mask[:, :p] = np.asarray(attention_mask)[:, :p]
        outputs = self.backend.run("decode", {**inputs, "attention_mask": mask, **self.cache})
        for present, past in zip(self.layout.present, self.layout.past):
            self.layout.store(self.cache[past], outputs[present], p)
        self.length = p + 1
        return outputs["logits"]


def load_backend(manifest: Manifest, folder: str | Path, provider: str = "cpu", threads: int | None = None,
                 **options: Any) -> Backend:
    """The backend for ``provider``: "cpu" (ONNX Runtime's CPU provider), "cuda" or "tensorrt" (onnxruntime-gpu's
    CUDA / TensorRT execution providers), or "trt" (the folder's TensorRT plans from ``glmtrt build``, run by
    TensorRT itself; options: device, verify_plans)."""
    if provider not in PROVIDERS:
        raise GlmTrtError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise GlmTrtError(f"threads must be a positive integer, got {threads!r}")
    if provider == "trt":
        from .tensorrt import TrtBackend

        return TrtBackend(manifest, Path(folder), threads=threads, **options)
    from .onnxruntime import OrtBackend

    return OrtBackend(manifest, Path(folder), provider=provider, threads=threads, **options)
