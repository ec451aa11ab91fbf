"""``export_model``: an HF checkpoint (or preset) -> a complete engines folder, written atomically.

The folder is built under a hidden temporary name beside the target (``.NAME.partial-XXXX``) and renamed
into place only when every file and, last, ``manifest.json`` are written; a crash or a kill never leaves
a folder at ``out`` that could be mistaken for a finished export. With ``force`` an existing export is
replaced the same way: the old folder is removed only after the new one is complete.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from glmtrt.runtime import __version__
from glmtrt.runtime.errors import ConfigError, GlmTrtError
from glmtrt.runtime.manifest import MANIFEST_NAME, GraphSpec, Manifest, TensorSpec

# fp32 is exported from the reference; the others are plans derived from an fp32 export (glmtrt.export.plans).
PRECISIONS = ("fp32", "fp16", "int8", "cpu-int8", "cpu-int4")
EXPORTABLE_FAMILIES = ("glm_ocr", "glm4v", "glm4v_moe", "glm_image")
FP32_ONLY_FAMILIES = ("glm_image",)  # no precision plans yet (glmtrt.export.plans knows the GLM-4V graphs only)
EMBEDDINGS_FILE = "embed_tokens.npy"
_PID_FILE = ".glmtrt-export.pid"  # inside a partial folder while its export runs; removed before the rename


@dataclass
class ExportResult:
    folder: Path
    family: str
    graphs: list = field(default_factory=list)  # onnx.GraphResult per graph
    seconds: float = 0.0


def export_model(model: str | Path, out: str | Path, *, precision: str = "fp32", force: bool = False,
                 opset: int | None = None, progress: bool = True) -> Path:
    """Export ``model`` (an HF checkpoint folder or a preset name) to the engines folder ``out``.

    Writes vision.onnx (GLM-Image: image_tokenizer.onnx), prefill.onnx, decode.onnx, embed_tokens.npy,
    tokenizer.json / chat_template.jinja when available, and manifest.json. ``precision``: "fp32" (the parity
    baseline) or a plan derived from it (:data:`glmtrt.export.plans.PLANS`: "fp16", "int8" for TensorRT;
    "cpu-int8", "cpu-int4" for ONNX Runtime; GLM-Image: fp32 only): fp32 is exported to a temporary folder
    beside ``out`` first. ``opset``: the ONNX opset (default 20). ``force``: replace an existing export at
    ``out``. ``progress``: a progress bar and a summary line per graph.
    Raises GlmTrtError (one line) for a user's mistake. Returns the folder.
    """
    log = print if progress else None
    return export_folder(model, out, precision=precision, force=force, opset=opset, progress=progress, log=log).folder


def export_folder(model: str | Path, out: str | Path, *, precision: str = "fp32", force: bool = False,
                  opset: int | None = None, progress: bool = True,
                  log: Callable[[str], None] | None = None) -> ExportResult:
    """:func:`export_model` returning per-graph timings; ``log`` receives one summary line per graph."""
    from .assets import collect_assets, resolve_source
    from .onnx import DEFAULT_OPSET

    start = time.perf_counter()
    if precision not in PRECISIONS:
        raise GlmTrtError(f"precision {precision!r} is not available; choose one of: {', '.join(PRECISIONS)}")
    opset = _check_opset(DEFAULT_OPSET if opset is None else opset)
    out = Path(out)
    _check_target(out, force)
    source = resolve_source(model)  # reads config.json: cheap, and fails early on a bad name or folder
    family = source.config.model_type
    if family not in EXPORTABLE_FAMILIES:
        raise ConfigError(f"exporting {family} ({source.name}) is not yet supported; glmtrt export supports "
                          f"{', '.join(EXPORTABLE_FAMILIES)}")
    if precision != "fp32" and family in FP32_ONLY_FAMILIES:
        raise GlmTrtError(f"{family} ({source.name}) exports at fp32 only for now; drop --precision {precision} "
                          "(precision plans cover the GLM-4V family graphs)")
    assets = collect_assets(source)

    if precision != "fp32":  # a plan: the fp32 export in a hidden folder beside ``out``, then derived from it
        from .plans import derive_plan

        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(out)
        base = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-fp32-", dir=out.parent))  # stale ones are removed
        try:
            (base / _PID_FILE).write_text(str(os.getpid()))
            with atomic_folder(base / "fp32", force=False) as tmp:
                result = _write_folder(source, assets, tmp, precision="fp32", opset=opset, progress=progress, log=log)
            derive_plan(base / "fp32", out, precision, force=force, log=log)
        finally:
            shutil.rmtree(base, ignore_errors=True)
    else:
        with atomic_folder(out, force) as tmp:
            result = _write_folder(source, assets, tmp, precision=precision, opset=opset, progress=progress, log=log)
    result.folder = out
    result.seconds = time.perf_counter() - start
    return result


def _write_folder(source, assets, folder: Path, *, precision: str, opset: int, progress: bool,
                  log: Callable[[str], None] | None) -> ExportResult:
    import numpy as np

    from glmtrt.reference.weights import load_reference

    from .graphs import graph_definitions
    from .image_graphs import image_graph_definitions, image_manifest_record
    from .onnx import export_graph
    from .shared_weights import share_text_weights

    start = time.perf_counter()
    model = load_reference(source.folder if source.folder is not None else source.name)
    if log:
        log(f"{'weights':8s} {time.perf_counter() - start:6.1f} s  "
            f"{'random (preset)' if source.is_preset else 'loaded'}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    result = ExportResult(folder=folder, family=source.config.model_type)
    graphs: dict[str, GraphSpec] = {}
    kv_cache = None
    with _quiet_exporter_logs():
        is_image = source.config.model_type == "glm_image"
        for graph in (image_graph_definitions if is_image else graph_definitions)(model):
            kv_cache = graph.kv_cache or kv_cache
            r = export_graph(graph, folder, opset=opset, progress=progress)
            result.graphs.append(r)
            spec = graph.interface()
            graphs[graph.name] = GraphSpec(file=graph.file, inputs=[TensorSpec(**t) for t in spec["inputs"]],
                                           outputs=[TensorSpec(**t) for t in spec["outputs"]])
            if log:
                data = " + external data" if r.external_data else ""
                log(f"{graph.name:8s} {r.seconds:6.1f} s  {_size(r.bytes):>9s}  {graph.file}{data}")

    t = time.perf_counter()
    shared = share_text_weights(folder, {role: g.file for role, g in graphs.items()})
    if log and shared:
        log(f"{'weights':8s} {time.perf_counter() - t:6.1f} s  {_size(shared['bytes']):>9s}  {shared['file']} "
            "(prefill and decode weights, stored once)")
    table = model.model.language_model.embed_tokens.weight.detach().float().numpy()
    np.save(folder / EMBEDDINGS_FILE, table)
    tokenizer, chat_template = assets.write(folder)
    config = source.config
    v = config.vision
    manifest = Manifest(
        family=config.model_type,
        config=config.to_dict(),
        precision=precision,
        opset=opset,
        graphs=graphs,
        embeddings={"file": EMBEDDINGS_FILE, "dtype": str(table.dtype), "shape": list(table.shape)},
        special_tokens=assets.special_tokens,
        eos_token_ids=assets.eos_token_ids,
        chat_format="glm",
        tokenizer=tokenizer,
        chat_template=chat_template,
        preprocessing=assets.preprocessing,
        generation=assets.generation,
        extra={
            "source": source.name if source.is_preset else str(source.folder.resolve()),
            "random_weights": source.is_preset,
            # How the runtime calls the vision graph: glmtrt.runtime.vision_tables.vision_tables(grid, **these)
            # for a single grid row (one image or one video frame per call).
            "vision": {"one_image_per_call": True, "kind": v.kind, "head_dim": v.head_dim, "rope_theta": v.rope_theta,
                       "merge_size": v.spatial_merge_size, "table_side": v.pos_table_side},
            # The decode graph's cache contract (glmtrt.export.graphs.KV_CACHE); absent: the earlier "concat" one.
            **({"kv_cache": kv_cache} if kv_cache else {}),
            # GLM-Image: the tokenizer graph's output, codebook size, generation ids (glmtrt.runtime.image_generation).
            **({"glm_image": image_manifest_record(model)} if is_image else {}),
            "exporter": _exporter_versions(),
            "export_seconds": {r.name: round(r.seconds, 2) for r in result.graphs},
        },
        glmtrt_version=__version__,
        shared_weights=shared,
    )
    manifest.record_files(folder)
    manifest.save(folder)  # last: a folder with a manifest is a finished folder
    return result


def _check_opset(opset: int) -> int:
    import onnx

    from .onnx import MIN_OPSET

    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise GlmTrtError(f"opset {opset!r} is not supported; choose an ONNX opset from {MIN_OPSET} to {newest}")
    return opset


def _check_target(out: Path, force: bool) -> None:
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise GlmTrtError(f"output folder {str(out)!r} already exists; pass --force (force=True) to replace it, "
                          "or choose another --out")
    if out.is_symlink() or not out.is_dir():
        raise GlmTrtError(f"{str(out)!r} exists and is not a folder; remove it or choose another --out")
    if any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise GlmTrtError(f"{str(out)!r} is not empty and has no {MANIFEST_NAME}, so it is not a glmtrt export; "
                          "refusing to replace it even with --force; choose another --out")


@contextlib.contextmanager
def atomic_folder(out: Path, force: bool):
    """Yield a hidden partial folder beside ``out`` (``.NAME.partial-XXXX``, holding this process's pid while it is
    written); when the block finishes, move it into place at ``out`` (an existing glmtrt folder there is replaced
    only with ``force``, and only then). On any error or interrupt the partial folder is removed; a full disk
    (ENOSPC, EDQUOT) becomes one GlmTrtError line."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the finished folder gets the usual mode
        (tmp / _PID_FILE).write_text(str(os.getpid()))
        yield tmp
        (tmp / _PID_FILE).unlink()
        _move_into_place(tmp, out, force)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            raise GlmTrtError(f"the disk is full ({os.strerror(e.errno)}) while writing {str(out)!r}; the partial "
                              "export was removed and nothing was replaced: free some space or choose another --out") \
                from e
        raise


_DISK_FULL = tuple(code for code in (getattr(errno, "ENOSPC", None), getattr(errno, "EDQUOT", None)) if code)


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        _check_target(out, force)  # it may have appeared while we were exporting
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _remove_stale_partials(out: Path) -> None:
    """Delete partial folders of earlier exports to the same target whose process is gone (killed, crashed)."""
    for partial in out.parent.glob(f".{out.name}.partial-*"):
        try:
            pid = int((partial / _PID_FILE).read_text())
        except (OSError, ValueError):
            continue  # not ours, or not started yet: leave it
        if not _alive(pid):
            shutil.rmtree(partial, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


class _quiet_exporter_logs:
    """Silence the exporter's logger warnings (e.g. "torchvision is not installed") during an export."""

    NAMES = ("torch.onnx", "torch.export", "torch._export", "onnxscript")

    def __enter__(self):
        self.levels = {}
        for name in self.NAMES:
            logger = logging.getLogger(name)
            self.levels[name] = logger.level
            logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)


def _exporter_versions() -> dict[str, str]:
    import onnx
    import onnxscript
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "exporter": "torch.onnx.export(dynamo=True)"}


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
