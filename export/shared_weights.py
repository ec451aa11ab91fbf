"""One copy of the text weights for the prefill and decode graphs: ``text.onnx.data`` and its manifest table.

The prefill and decode graphs are two traces of the same decoder, so most of their initializers (every
projection, the norms, the LM head) hold identical bytes under different names. After a folder's graphs are
written, :func:`share_text_weights` moves every initializer of at least ``MIN_SHARED_BYTES`` of both graphs into
one external-data file, each distinct tensor (dtype, shape and bytes) stored once at a 64 KiB-aligned offset,
and rewrites both graphs to point there. Any ONNX consumer reads the graphs as usual (the external-data
``location`` is relative to the graph); the folder holds the text weights once on disk instead of twice.

The manifest's ``shared_weights`` records, per graph, ``name -> [offset, length, onnx_dtype, shape]``, so the
torch-free runtime can map the file once and hand the same buffers to both ONNX Runtime sessions
(``Pipeline.from_engines(..., share_weights=True)``, see :mod:`glmtrt.runtime.backends.onnxruntime`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx
from onnx import numpy_helper

SHARED_WEIGHTS_FILE = "text.onnx.data"
SHARED_ROLES = ("prefill", "decode")
MIN_SHARED_BYTES = 1024  # smaller initializers (scalars, shape constants) stay inside their graph
ALIGNMENT = 65536  # ONNX Runtime memory-maps external tensors at this alignment


def _raw_bytes(tensor: onnx.TensorProto) -> bytes:
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def _make_external(tensor: onnx.TensorProto, offset: int, length: int) -> None:
    """Turn an in-memory initializer into a reference to ``SHARED_WEIGHTS_FILE`` (same name, dtype, shape)."""
    dtype, dims, name = tensor.data_type, list(tensor.dims), tensor.name
    tensor.Clear()
    tensor.name, tensor.data_type = name, dtype
    tensor.dims.extend(dims)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", SHARED_WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def share_text_weights(folder: Path, graph_files: dict[str, str]) -> dict:
    """Deduplicate the initializers of the prefill and decode graphs of ``folder`` into ``text.onnx.data``.

    graph_files: role -> graph file name (the manifest's graphs); roles other than prefill/decode are left as
    they are. Each graph is read with its weights (from inside the protobuf or its own ``<graph>.data``),
    rewritten and saved; the old per-graph data files are removed. Returns the manifest record
    ``{"file", "bytes", "graphs": {role: {name: [offset, length, onnx_dtype, shape]}}}``, or {} when the folder
    has not both graphs. Called on a folder still being written (the exporter's and the planner's temporary
    folders), so a failure leaves no half-finished engines folder behind.
    """
    folder = Path(folder)
    roles = [r for r in SHARED_ROLES if r in graph_files]
    if len(roles) < 2:
        return {}
    models = {role: onnx.load(str(folder / graph_files[role])) for role in roles}  # weights come into memory
    stored: dict[tuple, tuple[int, int]] = {}
    table: dict[str, dict[str, list]] = {role: {} for role in roles}
    tmp = folder / (SHARED_WEIGHTS_FILE + ".partial")
    with open(tmp, "wb") as out:
        for role in roles:
            for tensor in models[role].graph.initializer:
                raw = _raw_bytes(tensor)
                if len(raw) < MIN_SHARED_BYTES:
                    continue
                key = (tensor.data_type, tuple(tensor.dims), hashlib.blake2b(raw, digest_size=20).digest())
                if key not in stored:
                    offset = -(-out.tell() // ALIGNMENT) * ALIGNMENT
                    out.seek(offset)
                    out.write(raw)
                    stored[key] = (offset, len(raw))
                offset, length = stored[key]
                table[role][tensor.name] = [offset, length, int(tensor.data_type), [int(d) for d in tensor.dims]]
                _make_external(tensor, offset, length)
    for role in roles:
        path = folder / graph_files[role]
        Path(str(path) + ".data").unlink(missing_ok=True)
        onnx.save(models[role], str(path))
    os.replace(tmp, folder / SHARED_WEIGHTS_FILE)
    return {"file": SHARED_WEIGHTS_FILE, "bytes": (folder / SHARED_WEIGHTS_FILE).stat().st_size, "graphs": table}

