"""One graph to one ONNX file: ``torch.onnx.export(dynamo=True)``, contract dim names, save, and checks.

After export the symbolic dims the exporter derived (``past + 1``, ``4*num_tokens`` ...) are renamed to the
contract's names everywhere in the graph, every node is checked to be in the default ONNX domain, the
file is saved (weights as ``<graph>.onnx.data`` external data when they would not fit a 2 GB protobuf),
and the saved file must pass ``onnx.checker.check_model(full_check=True)``, strict shape inference and an
interface check against the contract. A failure here is a glmtrt bug, not a user error: RuntimeError.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir
import torch

from .graphs import GraphDef

DEFAULT_OPSET = 20
MIN_OPSET = 18  # the dynamo exporter's own opset; lower ones would need a version conversion
# Weights above this go to external data: a protobuf cannot exceed 2 GiB, and the graph itself needs some room.
EXTERNAL_DATA_THRESHOLD = (2 << 30) - (128 << 20)
STANDARD_DOMAINS = ("", "ai.onnx")
_NP_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64", onnx.TensorProto.FLOAT16: "float16",
              onnx.TensorProto.INT32: "int32", onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.BOOL: "bool"}
STEPS = ("trace", "save", "check")


@dataclass
class GraphResult:
    name: str
    file: str
    seconds: float
    bytes: int
    external_data: bool


def export_graph(graph: GraphDef, folder: Path, opset: int = DEFAULT_OPSET, progress: bool = False) -> GraphResult:
    """Export ``graph`` to ``folder/<name>.onnx`` and check it. Returns its timing and size."""
    path = Path(folder) / graph.file
    start = time.perf_counter()
    with _progress(graph.name, progress) as step:
        step("trace")
        program = _torch_export(graph, opset)
        model = program.model
        rename_dims(model, graph)
        check_domains(model, graph.name)
        step("save")
        external = weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
        # 64 KiB-aligned external tensors can be memory-mapped by ONNX Runtime.
        ir.save(model, str(path), external_data=path.name + ".data" if external else None, alignment=65536)
        del program, model
        step("check")
        check_graph_file(path, graph)
    data = path.with_name(path.name + ".data")
    size = path.stat().st_size + (data.stat().st_size if data.exists() else 0)
    return GraphResult(graph.name, graph.file, time.perf_counter() - start, size, data.exists())


def _torch_export(graph: GraphDef, opset: int):
    with warnings.catch_warnings():
        # The exporter's internal deprecation chatter and its note that derived dims share a name say
        # nothing a user can act on; the dims are renamed to the contract's right after.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*axis name.*")
        with torch.no_grad():
            return torch.onnx.export(
                graph.module.eval(), graph.example_args, None, dynamo=True, verbose=False, optimize=True,
                input_names=graph.input_names, output_names=graph.output_names,
                dynamic_shapes=graph.dynamic_shapes, opset_version=opset,
            )


@contextlib.contextmanager
def _progress(name: str, enabled: bool):
    if not enabled:
        yield lambda _stage: None
        return
    from tqdm import tqdm

    bar = tqdm(total=len(STEPS), desc=f"{name:8s}", unit="step", leave=False,
               bar_format="{desc} {bar} {n_fmt}/{total_fmt} {postfix} [{elapsed}]")
    started = [False]

    def step(stage: str) -> None:
        if started[0]:
            bar.update(1)
        started[0] = True
        bar.set_postfix_str(stage)

    try:
        yield step
        bar.update(1)
    finally:
        bar.close()


# ----------------------------------------------------------------------------------------------- renaming

def _values(model: ir.Model):
    graph = model.graph
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in ir.traversal.RecursiveGraphIterator(graph):
        yield from node.outputs


def rename_dims(model: ir.Model, graph: GraphDef) -> None:
    """Give the contract's names to the symbolic dims the exporter chose, in the whole graph.

    Also checks each input/output has the contract's rank and static dims, and that no dynamic dim was
    specialized to a constant during tracing.
    """
    mapping: dict[str, str] = {}
    pairs = list(zip(model.graph.inputs, graph.input_shapes)) + list(zip(model.graph.outputs, graph.output_shapes))
    if len(model.graph.inputs) != len(graph.input_shapes) or len(model.graph.outputs) != len(graph.output_shapes):
        raise RuntimeError(f"{graph.name}: exported {len(model.graph.inputs)} inputs / {len(model.graph.outputs)} outputs, "
                           f"the contract has {len(graph.input_shapes)} / {len(graph.output_shapes)}")
    for value, want in pairs:
        have = value.shape
        if have is None or len(have) != len(want):
            raise RuntimeError(f"{graph.name}: {value.name} exported with shape {have}, the contract says {want}")
        for dim, target in zip(have, want):
            if isinstance(target, str):
                if not isinstance(dim, ir.SymbolicDim) or dim.value is None:
                    raise RuntimeError(f"{graph.name}: {value.name} dim {target!r} was exported as {dim!r}, not symbolic")
                if mapping.setdefault(str(dim.value), target) != target:
                    raise RuntimeError(f"{graph.name}: exported dim {dim.value!r} maps to both {mapping[str(dim.value)]!r} "
                                       f"and {target!r}")
            elif dim != target:
                raise RuntimeError(f"{graph.name}: {value.name} exported with shape {have}, the contract says {want}")
    for value in _values(model):
        shape = value.shape
        if shape is None or not any(isinstance(d, ir.SymbolicDim) and str(d.value) in mapping for d in shape):
            continue
        value.shape = ir.Shape([ir.SymbolicDim(mapping[str(d.value)])
                                if isinstance(d, ir.SymbolicDim) and str(d.value) in mapping else d for d in shape])


def check_domains(model: ir.Model, name: str) -> None:
    """Standard ONNX ops only: no functions, no custom or contrib domains."""
    if model.functions:
        raise RuntimeError(f"{name}: the exported graph still has local functions {list(model.functions)}")
    domains = {node.domain for node in ir.traversal.RecursiveGraphIterator(model.graph)}
    foreign = sorted(domains - set(STANDARD_DOMAINS))
    if foreign:
        raise RuntimeError(f"{name}: the exported graph uses non-standard op domains {foreign}")
    for domain in [d for d in model.opset_imports if d not in STANDARD_DOMAINS]:
        del model.opset_imports[domain]  # declared but unused
    if model.graph.opset_imports is not model.opset_imports:
        for domain in [d for d in model.graph.opset_imports if d not in STANDARD_DOMAINS]:
            del model.graph.opset_imports[domain]


def weight_bytes(model: ir.Model) -> int:
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    return total


# ----------------------------------------------------------------------------------------------- checks

def interface(proto: onnx.ModelProto) -> dict[str, list[dict]]:
    """A saved graph's real inputs/outputs as manifest-style specs (name, numpy dtype name, shape)."""
    def spec(v):
        t = v.type.tensor_type
        return {"name": v.name, "dtype": _NP_DTYPES.get(t.elem_type, onnx.TensorProto.DataType.Name(t.elem_type).lower()),
                "shape": [d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim]}

    return {"inputs": [spec(v) for v in proto.graph.input], "outputs": [spec(v) for v in proto.graph.output]}


def check_graph_file(path: Path, graph: GraphDef | None = None) -> None:
    """Full ONNX check and strict shape inference of a saved graph (by path, so external data works),
    default-domain ops only, and (given ``graph``) the interface equal to the contract."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        proto = onnx.load(str(path), load_external_data=False)  # shape inference needs no weight values
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise RuntimeError(f"{path.name} fails the ONNX checks: {e}") from e
    foreign = sorted({n.domain for n in proto.graph.node} - set(STANDARD_DOMAINS))
    if foreign or proto.functions:
        raise RuntimeError(f"{path.name} uses non-standard domains {foreign} or functions")
    if graph is not None and interface(proto) != graph.interface():
        raise RuntimeError(f"{path.name}: saved interface {interface(proto)} differs from the contract {graph.interface()}")
