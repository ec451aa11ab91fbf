"""TensorRT compatibility lint that runs on a CPU.

Checks every node of an ONNX graph against what the TensorRT ONNX parser accepts in the versions we
target (10.13 on Jetson through 11.x): the operator must be supported, its restricted attributes and
build-time-constant inputs must be as the parser needs them, no tensor may be float64, index tensors must
have a static rank, and no contrib (``com.microsoft``) or custom-domain op may appear — those belong to
CPU plans for ONNX Runtime alone. Facts from the onnx-tensorrt operator matrix (10.15) and changelog.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from glmtrt.runtime.errors import GlmTrtError

DEFAULT_MIN_TRT = (10, 13)

# Operators the parser supports, with the first TensorRT version that parses them when later than 10.0.
_NEWER = {"Attention": (10, 14), "RotaryEmbedding": (10, 15), "RMSNormalization": (10, 15), "TensorScatter": (10, 15)}
_SUPPORTED = set(_NEWER) | set("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization BlackmanWindow Cast CastLike
Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu
Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow
HannWindow HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization
LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu
QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2
ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RNN RoiAlign Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid
Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
# Inputs that must be build-time constants: op -> input positions.
_CONSTANT_INPUTS = {"CumSum": (1,), "TopK": (1,), "Squeeze": (1,), "Unsqueeze": (1,), "OneHot": (1,)}
_CONSTANT_INPUTS.update({op: (1,) for op in _SUPPORTED if op.startswith("Reduce")})
_INDEX_INPUTS = {"Gather": 1, "GatherElements": 1, "GatherND": 1, "ScatterElements": 1, "ScatterND": 1}
_STANDARD_DOMAINS = ("", "ai.onnx")
MAX_OPSET = 24


class LintError(GlmTrtError):
    """A graph would not build in TensorRT (raised by ``glmtrt build`` before it builds)."""


@dataclass(frozen=True)
class Finding:
    node: str
    op: str
    message: str

    def __str__(self) -> str:
        return f"{self.op} '{self.node}': {self.message}"


def _version(v: tuple[int, int]) -> str:
    return ".".join(map(str, v))


class _Linter:
    def __init__(self, model: onnx.ModelProto, min_trt: tuple[int, int]):
        self.model = model
        self.min_trt = min_trt
        self.findings: list[Finding] = []
        graph = model.graph
        self.constants = {t.name for t in graph.initializer}
        self.constants |= {o for n in graph.node if n.op_type in ("Constant", "ConstantOfShape") and not n.input
                           for o in n.output}
        self.constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
        self.ranks = {}
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                self.ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
        for t in graph.initializer:
            self.ranks[t.name] = len(t.dims)

    def add(self, node, message: str) -> None:
        self.findings.append(Finding(node.name or "(unnamed)", node.op_type, message))

    def run(self) -> list[Finding]:
        for opset in self.model.opset_import:
            if opset.domain in _STANDARD_DOMAINS and opset.version > MAX_OPSET:
                self.findings.append(Finding("(model)", "opset", f"opset {opset.version} is newer than the parser's {MAX_OPSET}"))
        self._float64()
        for node in self._nodes(self.model.graph):
            self._node(node)
        for function in self.model.functions:
            for node in function.node:
                self._node(node)
        return self.findings

    def _nodes(self, graph):
        for node in graph.node:
            yield node
            for attr in node.attribute:  # If / Loop / Scan bodies
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from self._nodes(attr.g)
                for g in attr.graphs:
                    yield from self._nodes(g)

    def _float64(self) -> None:
        graph = self.model.graph
        for t in graph.initializer:
            if t.data_type == TensorProto.DOUBLE:
                self.findings.append(Finding(t.name, "initializer", "float64 tensor (TensorRT has no float64; use float32)"))
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type == TensorProto.DOUBLE:
                self.findings.append(Finding(vi.name, "tensor", "float64 tensor (TensorRT has no float64; use float32)"))

    def _node(self, node) -> None:
        op = node.op_type
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.domain not in _STANDARD_DOMAINS:
            self.add(node, f"operator from domain '{node.domain}' — TensorRT parses standard ONNX ops only "
                           "(contrib ops belong to ONNX Runtime CPU plans)")
            return
        if op not in _SUPPORTED:
            self.add(node, "operator not supported by the TensorRT ONNX parser")
            return
        needed = _NEWER.get(op)
        if needed and needed > self.min_trt:
            self.add(node, f"needs TensorRT {_version(needed)}+, the targets start at {_version(self.min_trt)}")
        for pos in _CONSTANT_INPUTS.get(op, ()):
            if len(node.input) > pos and node.input[pos] and node.input[pos] not in self.constants:
                self.add(node, f"input {pos} ('{node.input[pos]}') must be a build-time constant")
        if op in _INDEX_INPUTS:
            index = node.input[_INDEX_INPUTS[op]]
            if index not in self.ranks:
                self.add(node, f"index tensor '{index}' has no static rank (run shape inference / fix the export)")
        if op == "Cast" and attrs.get("to") == TensorProto.DOUBLE:
            self.add(node, "casts to float64 (TensorRT has no float64)")
        if op == "TopK":
            if attrs.get("sorted", 1) != 1:
                self.add(node, "sorted must be 1")
            k = self._constant_value(node.input[1])
            if k is not None and int(k.max()) >= 3840:
                self.add(node, f"K = {int(k.max())} must be below 3840")
        if op == "ScatterND" and attrs.get("reduction", b"none") not in (b"none", "none"):
            self.add(node, "ScatterND reduction other than 'none' is not supported")
        if op == "GridSample":
            mode = attrs.get("mode", b"bilinear")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            if mode in ("linear", "cubic"):
                self.add(node, f"mode '{mode}' (opset-20 spelling): some parser versions fall back to nearest; "
                               "use host-made interpolation taps or the opset-16 spelling")
            rank = self.ranks.get(node.input[0])
            if rank is not None and rank != 4:
                self.add(node, f"input must be 4-D, got rank {rank}")
        if op == "Resize":
            mode = attrs.get("mode", b"nearest")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            if mode == "cubic":
                self.add(node, "cubic resize is not supported (nearest and linear only)")
            if attrs.get("antialias", 0):
                self.add(node, "antialiasing is not supported")
        if op in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2]:
            zp = self._constant_value(node.input[2])
            if zp is None or zp.any():
                self.add(node, "zero point must be a constant zero (symmetric quantization)")
        if op == "Attention" and any(node.input[i] for i in range(4, len(node.input))):
            self.add(node, "past_key / past_value / nonpad_kv_seqlen inputs are unsupported")

    def _constant_value(self, name: str):
        from onnx import numpy_helper

        for t in self.model.graph.initializer:
            if t.name == name:
                return numpy_helper.to_array(t)
        for n in self.model.graph.node:
            if n.op_type == "Constant" and n.output[0] == name:
                for a in n.attribute:
                    if a.name == "value":
                        return numpy_helper.to_array(a.t)
        return None


def lint_model(model: onnx.ModelProto | str | Path, min_trt: tuple[int, int] = DEFAULT_MIN_TRT) -> list[Finding]:
    """All TensorRT incompatibilities of one graph (an empty list when it will parse).

    ``model`` is a ModelProto or a path (external weights are not loaded: the lint needs structure only).
    Shape inference runs first so index-tensor ranks are known.
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 — a graph shape inference cannot handle is still linted; ranks may be missing
        pass
    return _Linter(model, min_trt).run()


def lint_engines(folder: str | Path, min_trt: tuple[int, int] = DEFAULT_MIN_TRT) -> dict[str, list[Finding]]:
    """Lint every graph named by an engines folder's manifest: {role: findings}."""
    from glmtrt.runtime.manifest import Manifest

    manifest = Manifest.load(folder, verify_hashes=False)
    return {role: lint_model(Path(folder) / spec.file, min_trt) for role, spec in manifest.graphs.items()}


def check_engines(folder: str | Path, min_trt: tuple[int, int] = DEFAULT_MIN_TRT) -> None:
    """Raise LintError naming the first problems when any graph of the folder would not build in TensorRT."""
    report = lint_engines(folder, min_trt)
    problems = [f"{role}: {finding}" for role, findings in report.items() for finding in findings]
    if problems:
        more = f" (and {len(problems) - 3} more; run `glmtrt lint`)" if len(problems) > 3 else ""
        raise LintError(f"{len(problems)} TensorRT incompatibilities in {folder}: " + "; ".join(problems[:3]) + more)


def lint_command(args) -> int:
    try:
        min_trt = tuple(int(x) for x in args.min_trt.split("."))[:2]
    except ValueError:
        raise GlmTrtError(f"--min-trt takes a version like 10.13, got {args.min_trt!r}") from None
    total = 0
    for path in map(Path, args.paths):
        if path.is_dir():
            report = {f"{path}/{role}": findings for role, findings in lint_engines(path, min_trt).items()}
        elif path.is_file():
            report = {str(path): lint_model(path, min_trt)}
        else:
            raise GlmTrtError(f"{str(path)!r} does not exist; pass engines folders or .onnx files")
        for name, findings in report.items():
            print(f"{name}: {'ok' if not findings else f'{len(findings)} problem(s)'}")
            for finding in findings:
                print(f"  {finding}")
            total += len(findings)
    print(f"TensorRT {_version(min_trt)}+: {'no problems' if not total else f'{total} problem(s)'}")
    return 1 if total else 0
