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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GlmTrtError
from ..manifest import Manifest, ManifestError

__all__ = ["Backend", "DecodeState", "HostKVState", "KVLayout", "load_backend", "PROVIDERS"]

PROVIDERS = ("cpu", "cuda", "tensorrt")


class KVLayout:
    """Names and geometry of the KV cache, read from the manifest's prefill and decode graphs.

    present names ``present.{i}.key|value`` (prefill and decode outputs) map to past names
    ``past_key_values.{i}.key|value`` (decode inputs); shapes are (batch, kv_heads, length, head_dim).
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

    def shape(self, batch: int, length: int) -> tuple[int, int, int, int]:
        return (batch, self.kv_heads, length, self.head_dim)


class DecodeState(ABC):
    """One generation's graph calls: a prefill, then decode steps, with the KV cache held by the backend."""

    @abstractmethod
    def prefill(self, inputs_embeds: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Run the prefill graph; keep its cache. Returns logits (B, V) (valid until the next call)."""

    @abstractmethod
    def step(self, inputs_embeds: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Run one decode step on the kept cache; keep the grown cache. Returns logits (B, V)."""


class Backend(ABC):
    """Runs the graphs of one engines folder."""

    name: str = "backend"

    @abstractmethod
    def run(self, graph: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run graph ``graph`` (a manifest role) on host arrays; returns every output as a host array."""

    def start_decode(self, batch: int, capacity: int) -> DecodeState:
        """A decode state for ``batch`` rows and at most ``capacity`` cached positions (prompt + new tokens)."""
        return HostKVState(self, KVLayout(self.manifest))

    def close(self) -> None:
        """Release sessions and device memory."""


class HostKVState(DecodeState):
    """The portable decode state: the cache returned by one call is fed to the next as host arrays."""

    def __init__(self, backend: Backend, layout: KVLayout):
        self.backend, self.layout = backend, layout
        self.cache: dict[str, np.ndarray] = {}

    def _keep(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        self.cache = {past: outputs[present] for present, past in zip(self.layout.present, self.layout.past)}
        return outputs["logits"]

    def prefill(self, inputs_embeds, position_ids, attention_mask):
        return self._keep(self.backend.run("prefill", {"inputs_embeds": inputs_embeds, "position_ids": position_ids,
                                                       "attention_mask": attention_mask}))

    def step(self, inputs_embeds, position_ids, attention_mask):
        inputs = {"inputs_embeds": inputs_embeds, "position_ids": position_ids, "attention_mask": attention_mask}
        return self._keep(self.backend.run("decode", {**inputs, **self.cache}))


def load_backend(manifest: Manifest, folder: str | Path, provider: str = "cpu", threads: int | None = None,
                 **options: Any) -> Backend:
    """The backend for ``provider``: "cpu" (ONNX Runtime's CPU provider), "cuda" or "tensorrt" (onnxruntime-gpu's
    CUDA / TensorRT execution providers)."""
    if provider not in PROVIDERS:
        raise GlmTrtError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise GlmTrtError(f"threads must be a positive integer, got {threads!r}")
    from .onnxruntime import OrtBackend

    return OrtBackend(manifest, Path(folder), provider=provider, threads=threads, **options)
