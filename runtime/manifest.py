"""The manifest schema: ``glmtrt export`` writes ``manifest.json``, the runtime reads and validates it.

The runtime learns everything it needs to drive an engines folder from this file: the family and
normalized config, each graph's file and its input/output names, symbolic shapes and dtypes, the
precision, special token ids, the EOS set, preprocessing settings, generation defaults, and the
size and SHA-256 of every file (so a damaged or swapped file is refused before anything runs).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import GlmTrtError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
GRAPH_ROLES = ("vision", "prefill", "decode")


class ManifestError(GlmTrtError):
    """An engines folder is incomplete, damaged, or from an incompatible glmtrt."""


@dataclass
class TensorSpec:
    """One graph input or output: name, numpy dtype name, shape with symbolic dims as strings."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass
class GraphSpec:
    """One exported graph file and its interface."""

    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass
class FileRecord:
    size: int
    sha256: str


@dataclass
class Manifest:
    """Everything the runtime knows about an engines folder."""

    family: str
    config: dict[str, Any]
    precision: str
    opset: int
    graphs: dict[str, GraphSpec]
    embeddings: dict[str, Any]  # {"file", "dtype", "shape"}: the token embedding table, a .npy file
    special_tokens: dict[str, int]
    eos_token_ids: list[int]
    chat_format: str = "glm"
    tokenizer: str | None = None
    chat_template: str | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    generation: dict[str, Any] = field(default_factory=dict)
    files: dict[str, FileRecord] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # One external-data file holding the prefill and decode graphs' weights once (glmtrt.export.shared_weights):
    # {"file", "bytes", "graphs": {role: {initializer: [offset, length, onnx_dtype, shape]}}}; {} in older folders.
    shared_weights: dict[str, Any] = field(default_factory=dict)
    glmtrt_version: str = ""
    schema_version: int = SCHEMA_VERSION

    # ------------------------------------------------------------------ plans
    @property
    def plan(self) -> dict[str, Any]:
        """The precision-plan record (``extra.plan``) of a folder derived by ``glmtrt quantize`` / ``glmtrt export
        --precision``: tool and versions, per-graph precision, ``tensorrt_input``; {} for an fp32 export."""
        plan = self.extra.get("plan")
        return dict(plan) if isinstance(plan, dict) else {}

    @property
    def tensorrt_input(self) -> bool:
        """False for the ONNX Runtime-only CPU plans (cpu-int8, cpu-int4), which TensorRT cannot parse."""
        return bool(self.plan.get("tensorrt_input", True))

    # ------------------------------------------------------------------ writing
    def record_files(self, folder: Path) -> None:
        """Record size and SHA-256 of every file the manifest names (call after all files are written)."""
        names = [g.file for g in self.graphs.values()] + [self.embeddings["file"]]
        names += [n for n in (self.tokenizer, self.chat_template) if n]
        for graph in self.graphs.values():  # ONNX external-data files sit beside their graph
            data = Path(folder) / (graph.file + ".data")
            if data.exists():
                names.append(data.name)
        if self.shared_weights:
            names.append(self.shared_weights["file"])
        self.files = {n: FileRecord(size=(Path(folder) / n).stat().st_size, sha256=sha256_file(Path(folder) / n))
                      for n in names}

    def save(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    # ------------------------------------------------------------------ reading
    @classmethod
    def load(cls, folder: str | Path, verify_hashes: bool = True) -> "Manifest":
        """Read and validate ``folder/manifest.json``; check every named file exists with its recorded size
        (and hash, unless ``verify_hashes`` is False). Raises ManifestError with one line saying what to do."""
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not folder.is_dir():
            raise ManifestError(f"engines folder {str(folder)!r} does not exist; run `glmtrt export` first")
        if not path.is_file():
            raise ManifestError(f"{str(folder)!r} has no {MANIFEST_NAME}: it is not a finished export; run `glmtrt export` again")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{path} is not valid JSON ({e}); re-export the folder") from None
        if not isinstance(raw, dict):
            raise ManifestError(f"{path} is not a glmtrt manifest (top level is not an object); re-export the folder")
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"{path} has schema version {version!r}, this glmtrt reads version {SCHEMA_VERSION}; re-export with this glmtrt"
            )
        try:
            manifest = cls._from_raw(raw)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ManifestError(f"{path} does not follow the manifest schema ({type(e).__name__}: {e}); re-export the folder") from None
        manifest.verify_files(folder, verify_hashes)
        return manifest

    @classmethod
    def _from_raw(cls, raw: dict) -> "Manifest":
        graphs = {}
        for role, g in raw["graphs"].items():
            graphs[role] = GraphSpec(file=str(g["file"]),
                                     inputs=[TensorSpec(**t) for t in g["inputs"]],
                                     outputs=[TensorSpec(**t) for t in g["outputs"]])
        missing = [r for r in GRAPH_ROLES if r not in graphs]
        if missing:
            raise ValueError(f"graphs {missing} are missing")
        data = dict(raw)
        data["graphs"] = graphs
        data["files"] = {n: FileRecord(**r) for n, r in raw.get("files", {}).items()}
        data["special_tokens"] = {k: int(v) for k, v in raw["special_tokens"].items()}
        data["eos_token_ids"] = [int(e) for e in raw["eos_token_ids"]]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def verify_files(self, folder: Path, verify_hashes: bool = True) -> None:
        for name, record in self.files.items():
            path = Path(folder) / name
            if not path.is_file():
                raise ManifestError(f"{str(path)!r} named by the manifest is missing; re-export the folder")
            if path.stat().st_size != record.size:
                raise ManifestError(f"{str(path)!r} has {path.stat().st_size} bytes, the manifest recorded {record.size}; "
                                    "the file is damaged or replaced: re-export the folder")
            if verify_hashes and sha256_file(path) != record.sha256:
                raise ManifestError(f"{str(path)!r} does not match its SHA-256 in the manifest; the file is damaged or "
                                    "replaced: re-export the folder")
        unrecorded = [g.file for g in self.graphs.values() if g.file not in self.files]
        if unrecorded:
            raise ManifestError(f"graph files {unrecorded} have no hash in the manifest; re-export the folder")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
