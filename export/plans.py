"""Precision plans: complete engines folders derived from an fp32 export.

    glmtrt export MODEL --out DIR --precision fp16|int8|cpu-int8|cpu-int4   (fp32 to a temporary folder, then derived)
    glmtrt quantize --engines FP32_DIR --precision P --out DIR

TensorRT plans: standard ONNX ops only, ``glmtrt lint`` passes, and the precision lives in the graph (TensorRT 11
networks are strongly typed; its FP16/INT8 builder flags are gone):

* ``fp16``  every tensor fp16 except fp32 islands where the reference computes in fp32: RMSNorm, softmax,
  LayerNorm, everything computed from host inputs alone (the M-RoPE cos/sin tables, masks, the vision
  position-embedding interpolation), the MoE router and its weighted combine, and the vision tower's rotary
  application. I/O: ``pixel_values``, ``inputs_embeds``, the KV cache and ``image_embeds`` fp16; ``logits``,
  ``rotary_cos/sin`` and ``tap_weight`` fp32. The token embedding table is stored in fp16.
* ``int8``  W8A8 in the form TensorRT 10/11 builds: QuantizeLinear/DequantizeLinear pairs (int8, symmetric, zero
  point 0) on the input and the weight (per output channel) of every MatMul/Gemm with a constant weight and of
  every Conv, activation ranges calibrated by ``onnxruntime.quantization.quantize_static`` on inputs made by the
  runtime's own preprocessing and prompt path (prefill, and decode steps over real past caches). Everything
  else — attention matmuls, softmax, norms, residuals — is the fp16 plan, islands included, so TensorRT runs
  the unquantized layers in fp16, not fp32. Biases stay float (TensorRT takes no int32 bias Q/DQ).

CPU plans, for ONNX Runtime alone (their manifests say so; the TensorRT lint refuses them):

* ``cpu-int8``  dynamic int8: ``quantize_dynamic``, weights per output channel, activations quantized per call
  (DynamicQuantizeLinear + MatMulInteger, fused by ONNX Runtime).
* ``cpu-int4``  weight-only 4-bit ``MatMulNBits`` (com.microsoft; block 32, symmetric, int8 compute).
  Both quantize every MatMul of prefill and decode (lm_head included). The vision graph is quantized too
  (its Gemms rewritten as MatMul + Add first) only when its embeddings keep cosine >= ``VISION_MIN_COSINE`` to
  the fp32 graph on every calibration image; otherwise the plan keeps the fp32 vision graph and says so.

Every plan gets an accuracy report against the fp32 reference: ``glmtrt accuracy`` (:mod:`glmtrt.export.accuracy`).
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from glmtrt.runtime.errors import GlmTrtError
from glmtrt.runtime.manifest import MANIFEST_NAME, GraphSpec, Manifest, TensorSpec, sha256_file

from .shared_weights import share_text_weights

FLOAT, HALF = ir.DataType.FLOAT, ir.DataType.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)
VISION_MIN_COSINE = 0.99  # a CPU plan quantizes vision only if every calibration image keeps this embedding cosine
STANDARD_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class PlanSpec:
    precision: str
    summary: str
    tensorrt_input: bool  # standard ops, parses in TensorRT; False: ONNX Runtime only
    tool: str


PLANS: dict[str, PlanSpec] = {
    "fp16": PlanSpec("fp16", "fp16 weights and activations, fp32 islands where the reference computes in fp32", True,
                     "glmtrt.export.plans.convert_fp16 (onnx_ir)"),
    "int8": PlanSpec("int8", "W8A8 explicit Q/DQ (symmetric, per-channel weights, calibrated activations) over the "
                     "fp16 plan", True, "onnxruntime.quantization.quantize_static (QDQ) + glmtrt fp16"),
    "cpu-int8": PlanSpec("cpu-int8", "ONNX Runtime dynamic int8 MatMul (per-channel weights)", False,
                         "onnxruntime.quantization.quantize_dynamic"),
    "cpu-int4": PlanSpec("cpu-int4", "ONNX Runtime weight-only 4-bit MatMulNBits (block 32, symmetric)", False,
                         "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer"),
}


@dataclass
class PlanOptions:
    """Knobs of the plan builders (the defaults are the measured choices; see the README's accuracy table)."""

    calibration_decode_steps: int = 16  # greedy decode steps per calibration case (fp32 graphs)
    calibration_decode_samples: int = 4  # decode feeds kept per case (each holds the whole past cache)
    calibrate_method: str = "MinMax"  # onnxruntime CalibrationMethod name
    # Synthetic rendered lines (glmtrt.reference.ocr_data) added to the calibration set: on the trained OCR model they
    # cut the int8 plan's mean KL 5x and its CER gap to fp32 from 1.0 to 0.3 points (60 held-out lines, measured).
    calibration_ocr_lines: int = 32
    int8_lm_head: bool = True  # quantize lm_head in the int8 plan
    # What the int8 plan's unquantized layers compute in: "fp16" (the fp16 plan, islands included; Q/DQ scales fp16)
    # or "fp32" (the quantizer's output as is: fp32 graph, fp32 scales), for a TensorRT that refuses fp16 scales.
    int8_base: str = "fp16"
    int4_block_size: int = 32
    int4_accuracy_level: int = 4  # MatMulNBits compute: 4 = int8 activations (fastest on x86), 0 = fp32
    vision_min_cosine: float = VISION_MIN_COSINE
    threads: int | None = None  # ONNX Runtime threads for calibration and checks


@dataclass
class PlanResult:
    folder: Path
    precision: str
    seconds: float
    graphs: dict[str, dict[str, Any]] = field(default_factory=dict)


# ================================================================================================ fp16

def _class_names(node: ir.Node) -> list[str]:
    raw = node.metadata_props.get("pkg.torch.onnx.class_hierarchy")
    if not raw:
        return []
    try:
        return [str(c).rsplit(".", 1)[-1] for c in ast.literal_eval(raw)]
    except (ValueError, SyntaxError):
        return []


_ISLAND_OPS = {"Softmax": "softmax", "LayerNormalization": "layernorm", "RMSNormalization": "rmsnorm"}
_ISLAND_CLASSES = {"RMSNorm": "rmsnorm", "TopkRouter": "moe-router"}
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_SHAPE_ONLY = ("Shape", "Size")


def fp32_islands(graph: ir.Graph, role: str, half_inputs: Iterable[str]) -> dict[ir.Node, str]:
    """The nodes an fp16 plan keeps in fp32, with the reason for each.

    A value is an *activation* when it is computed from a half-precision graph input (``half_inputs``); shape
    queries do not carry that. Kept in fp32: Softmax / LayerNormalization, the nodes of every RMSNorm and MoE
    router module (from the exporter's ``pkg.torch.onnx.class_hierarchy`` metadata), the MoE experts' weighted
    combine (everything downstream of the router inside ``Experts`` and the export's ``GatheredExperts`` /
    ``GroupedExperts``), every non-activation node with a float
    output ("host tables": rotary cos/sin, masks, interpolation taps, constants), and in the vision graph the
    rotary application ``x * cos + rotate_half(x) * sin``, which the reference computes in fp32. Q/DQ nodes are
    never islands (their scales follow the fp16 graph).
    """
    half = set(half_inputs)
    act: set[ir.Value] = {v for v in graph.inputs if v.name in half}
    islands: dict[ir.Node, str] = {}
    router: set[ir.Value] = set()
    for node in graph:
        inputs = [v for v in node.inputs if v is not None]
        is_act = node.op_type not in _SHAPE_ONLY and any(v in act for v in inputs)
        if is_act:
            act.update(node.outputs)
        classes = _class_names(node)
        reason = _ISLAND_OPS.get(node.op_type) or next((r for c, r in _ISLAND_CLASSES.items() if c in classes), None)
        # Only the float routing weights make a node part of the combine: the router's integer choices also
        # index the experts' rows and weight slices (GroupedExperts / GatheredExperts), which stay half.
        if reason is None and any(c.endswith("Experts") for c in classes) and any(
                v in router and v.dtype == FLOAT for v in inputs):
            reason = "moe-combine"
        if reason is None and not is_act and any(o.dtype == FLOAT for o in node.outputs):
            reason = "host-tables"
        if node.op_type in _QDQ:
            reason = None
        if reason is not None:
            islands[node] = reason
        if reason in ("moe-router", "moe-combine"):
            router.update(node.outputs)
    if role == "vision":
        _vision_rotary_islands(graph, act, islands)
    return islands


def _vision_rotary_islands(graph: ir.Graph, act: set[ir.Value], islands: dict[ir.Node, str]) -> None:
    """Add(Mul(x, cos), Mul(rotate_half(x), sin)) with cos/sin host tables: the whole pattern into fp32."""
    def table(v: ir.Value) -> bool:
        return v.is_graph_input() or (v.producer() is not None and islands.get(v.producer()) == "host-tables")

    for node in list(graph):
        if node.op_type != "Add" or node in islands:
            continue
        muls = [v.producer() if v is not None else None for v in node.inputs]
        if len(muls) != 2 or not all(m is not None and m.op_type == "Mul" for m in muls):
            continue
        sources = []
        for m in muls:
            acts = [v for v in m.inputs if v is not None and v in act]
            tables = [v for v in m.inputs if v is not None and v not in act and table(v)]
            if len(acts) != 1 or len(tables) != 1:
                break
            sources.append(acts[0])
        else:
            chain = _chain(sources[1], sources[0]) or _chain(sources[0], sources[1])
            if chain:
                for n in [*chain, *muls, node]:
                    islands[n] = "vision-rotary"


def _chain(start: ir.Value, stop: ir.Value, limit: int = 8) -> list[ir.Node] | None:
    """The nodes between ``stop`` and ``start`` (rotate_half: Slice / Neg / Concat ...) when every path from
    ``start`` back reaches ``stop`` within ``limit`` nodes; else None."""
    nodes: list[ir.Node] = []
    todo = [start]
    while todo:
        v = todo.pop()
        if v is stop:
            continue
        p = v.producer()
        if p is None or len(nodes) >= limit:
            return None
        if p not in nodes:
            nodes.append(p)
            todo += [i for i in p.inputs if i is not None and (i.dtype in (FLOAT, HALF))]
    return nodes or None


def _to_half(array: np.ndarray) -> np.ndarray:
    """fp32 -> fp16 keeping finiteness: values beyond the fp16 range saturate to +-65504 (so a -3.4e38 mask
    constant becomes fp16's own finfo.min, as in the reference's fp16 computation)."""
    return np.clip(array, -FP16_MAX, FP16_MAX).astype(np.float16)


def _dtype_name(dtype: ir.DataType) -> str:
    return "fp16" if dtype == HALF else "fp32"


def convert_fp16(model: ir.Model, role: str, half_inputs: Iterable[str], fp32_outputs: Iterable[str] = ()) -> dict:
    """Convert ``model`` in place to a strongly typed fp16 graph with the fp32 islands of :func:`fp32_islands`.

    ``half_inputs``: float graph inputs that become fp16 (the others stay fp32); graph outputs become fp16 except
    ``fp32_outputs`` (a Cast is added). Each node gets the inputs of its own precision: a Cast is inserted once per
    value and precision where they differ; a weight used only by fp16 nodes is converted in place (an fp16 copy
    when fp32 nodes use it too). Returns a summary (islands by reason, casts, bytes of weights per dtype).
    """
    graph = model.graph
    half_inputs = set(half_inputs)
    fp32_outputs = set(fp32_outputs)
    islands = fp32_islands(graph, role, half_inputs)
    for v in graph.inputs:
        if v.name in half_inputs and v.dtype == FLOAT:
            v.dtype = HALF
    want = {node: (FLOAT if node in islands else HALF) for node in graph}

    uses: dict[ir.Value, set] = defaultdict(set)
    for node in graph:
        for v in node.inputs:
            if v is not None and v.is_initializer() and v.dtype == FLOAT:
                uses[v].add(want[node])
    half_copies: dict[ir.Value, ir.Value] = {}
    for v, wants in uses.items():
        array = v.const_value.numpy()
        if wants == {HALF}:
            v.const_value = ir.tensor(_to_half(array), name=v.name)
            v.dtype = HALF
        elif HALF in wants:
            copy = ir.Value(name=f"{v.name}_fp16", shape=v.shape, type=ir.TensorType(HALF),
                            const_value=ir.tensor(_to_half(array), name=f"{v.name}_fp16"))
            graph.register_initializer(copy)
            half_copies[v] = copy

    casts: dict[tuple[ir.Value, ir.DataType], ir.Value] = {}
    added: list[ir.Node] = []

    def cast(v: ir.Value, to: ir.DataType) -> ir.Value:
        if (v, to) not in casts:
            node = ir.node("Cast", [v], {"to": to}, name=f"{v.name}_to_{_dtype_name(to)}")
            out = node.outputs[0]
            out.name, out.dtype, out.shape = f"{v.name}_{_dtype_name(to)}", to, v.shape
            added.append(node)
            casts[(v, to)] = out
        return casts[(v, to)]

    untyped = [v.name for node in graph for v in node.inputs if v is not None and v.dtype is None]
    if untyped:
        raise RuntimeError(f"{role}: values without a type {untyped[:3]}: run ONNX shape inference first")
    for node in list(graph):
        target = want[node]
        for i, v in enumerate(node.inputs):
            if v is None or v.dtype not in (FLOAT, HALF) or v.dtype == target:
                continue
            node.replace_input_with(i, half_copies[v] if target == HALF and v in half_copies else cast(v, target))
        if target == HALF:
            _retype_half(node)

    for index, v in enumerate(list(graph.outputs)):
        target = FLOAT if v.name in fp32_outputs else (HALF if v.dtype in (FLOAT, HALF) else v.dtype)
        if v.dtype != target:
            name = v.name
            v.name = f"{name}_{_dtype_name(v.dtype)}"
            node = ir.node("Cast", [v], {"to": target}, name=f"{name}_output_cast")
            out = node.outputs[0]
            out.name, out.dtype, out.shape = name, target, v.shape
            added.append(node)
            graph.outputs[index] = out
    graph.extend(added)
    graph.sort()

    weights = Counter()
    for v in graph.initializers.values():
        if v.const_value is not None and v.dtype in (FLOAT, HALF):
            weights[_dtype_name(v.dtype)] += v.const_value.nbytes
    return {"fp32_islands": dict(sorted(Counter(islands.values()).items())), "casts": len(added),
            "weight_bytes": dict(weights)}


def _retype_half(node: ir.Node) -> None:
    """An fp16 node: its float outputs become fp16, and so do the float dtypes its attributes set."""
    if node.op_type == "Cast" and node.attributes["to"].as_int() == FLOAT:
        node.attributes["to"] = ir.AttrInt64("to", HALF)
    if node.op_type in ("ConstantOfShape", "Constant") and "value" in node.attributes:
        tensor = node.attributes["value"].as_tensor()
        if tensor.dtype == FLOAT:
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(_to_half(tensor.numpy())))
    for out in node.outputs:
        if out.dtype == FLOAT:
            out.dtype = HALF


def _half_io(spec: GraphSpec) -> tuple[set[str], set[str]]:
    """The fp16 plan's I/O choice for one graph: (float inputs that become fp16, outputs that stay fp32)."""
    half = {t.name for t in spec.inputs if t.dtype == "float32"
            and (t.name in ("pixel_values", "inputs_embeds") or t.name.startswith("past_key_values."))}
    return half, {"logits"}


# ================================================================================================ calibration

@dataclass
class CalibrationCase:
    name: str
    prompt: str
    images: list[Any] = field(default_factory=list)


def render_text_line(text: str, height: int = 56, size: int = 34, dark_on_light: bool = True, seed: int = 0):
    """A rendered text line (Pillow's built-in scalable font) with light noise: a real-looking OCR input."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=size)
    width = int(font.getlength(text)) + 24
    fg, bg = ((20, 20, 28), (245, 243, 238)) if dark_on_light else ((240, 240, 235), (25, 30, 40))
    image = Image.new("RGB", (width, height), bg)
    ImageDraw.Draw(image).text((12, (height - size) // 2), text, fill=fg, font=font)
    rng = np.random.default_rng(seed)
    pixels = np.asarray(image, np.float32) + rng.normal(0, 6, (height, width, 1))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def render_page(lines: Sequence[str], width: int = 336, size: int = 22):
    """A small document-like page: several text lines on paper."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=size)
    image = Image.new("RGB", (width, 24 + len(lines) * (size + 10)), (250, 250, 246))
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((14, 12 + i * (size + 10)), line, fill=(15, 15, 20), font=font)
    return image


def synthetic_photo(height: int, width: int, seed: int):
    """Smooth colour fields, a few shapes and noise: a stand-in for a natural image."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([np.sin(3 * x + rng.uniform(0, 6)), np.cos(2 * y + rng.uniform(0, 6)),
                     np.sin(2 * (x + y) + rng.uniform(0, 6))], -1)
    image = Image.fromarray(((base * 0.5 + 0.5) * 200 + 25).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(5):
        x0, y0 = rng.integers(0, width - 8), rng.integers(0, height - 8)
        x1, y1 = x0 + rng.integers(8, max(9, width // 2)), y0 + rng.integers(8, max(9, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    pixels = np.asarray(image, np.float32) + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def calibration_cases(seed: int = 0, ocr_lines: int = 0) -> list[CalibrationCase]:
    """The int8 calibration set (and the CPU plans' vision check): the bundled sample image, rendered text
    lines in both polarities, a document-like page, synthetic photos of other aspect ratios, and text only;
    plus ``ocr_lines`` synthetic lines of :mod:`glmtrt.reference.ocr_data` (fonts, colours, noise, rotation as
    the trained OCR model saw in training) from their own seed stream, apart from the training and held-out lines."""
    from glmtrt.reference.ocr_data import CALIBRATION_STREAM, line_rng, make_line
    from glmtrt.runtime.cli import sample_image_path

    rng = np.random.default_rng(seed)
    words = ["invoice", "Total", "2024-03-17", "No. 58213", "glmtrt", "TensorRT", "Hello, world!", "x = 3.14",
             "Quarterly report", "ACME Corp.", "page 7 of 12", "#A-91F"]
    lines = [str(rng.choice(words)) + " " + str(rng.choice(words)) for _ in range(4)]
    ocr = "Text Recognition:"
    return [
        CalibrationCase("sample image", ocr, [sample_image_path()]),
        *[CalibrationCase(f"line {i}", ocr, [render_text_line(t, size=30 + 3 * i, dark_on_light=i % 2 == 0, seed=i)])
          for i, t in enumerate(lines)],
        CalibrationCase("page", ocr, [render_page(lines[:3])]),
        CalibrationCase("photo", "Describe the image.", [synthetic_photo(112, 168, seed + 1)]),
        CalibrationCase("two photos", "What differs between these images?",
                        [synthetic_photo(140, 84, seed + 2), synthetic_photo(70, 196, seed + 3)]),
        CalibrationCase("text", "Summarize: the committee met on Tuesday and approved the budget."),
        *[CalibrationCase(f"ocr line {i}", ocr, [make_line(line_rng(CALIBRATION_STREAM, seed, i))[0]])
          for i in range(ocr_lines)],
    ]


class _Recorder:
    """A backend proxy that keeps the inputs of the last call per graph (the decode state drives it)."""

    def __init__(self, backend):
        self.backend, self.manifest, self.last, self.record = backend, backend.manifest, {}, False

    def run(self, graph: str, inputs):
        if self.record:  # copied now: a decode state may write into its cache buffers after the call
            self.last[graph] = {k: np.array(v) for k, v in inputs.items()}
        return self.backend.run(graph, inputs)


def collect_calibration(engines: str | Path, cases: Sequence[CalibrationCase] | None = None,
                        options: PlanOptions | None = None, text: bool = True) -> dict[str, list[dict[str, np.ndarray]]]:
    """Inputs of every graph of an fp32 folder on ``cases`` (default :func:`calibration_cases`), made by the
    runtime's own preprocessing, prompt and host plan: one vision feed per image, one prefill feed per case, and
    ``calibration_decode_samples`` decode feeds per case spread over ``calibration_decode_steps`` greedy steps,
    each with the real past cache the fp32 graphs produced. ``text=False``: vision feeds only."""
    from glmtrt.runtime.backends import HostKVState, KVLayout
    from glmtrt.runtime.pipeline import Pipeline
    from glmtrt.runtime.prompt import plan_prompt

    from .parity import case_prompt_ids

    options = options or PlanOptions()
    cases = calibration_cases(ocr_lines=options.calibration_ocr_lines) if cases is None else cases
    feeds: dict[str, list[dict[str, np.ndarray]]] = {"vision": [], "prefill": [], "decode": []}
    steps = max(options.calibration_decode_steps, 1)
    keep = set(np.linspace(0, steps - 1, max(1, min(options.calibration_decode_samples, steps))).round().astype(int))
    with Pipeline.from_engines(engines, verify_hashes=False, threads=options.threads) as pipe:
        manifest, backend = pipe.manifest, pipe.backend
        vision_spec = manifest.graphs["vision"]
        for case in cases:
            vision = pipe.preprocess(case.images)
            ids = case_prompt_ids(pipe, case, vision)
            plan = plan_prompt(pipe.host, np.array([ids], np.int64), None,
                               None if vision is None else vision.pixel_values, None if vision is None else vision.grid_thw)
            outputs = []
            for call in plan.vision_calls:
                inputs = plan.vision_inputs(call)
                feed = {n: inputs[n] for n in vision_spec.input_names()}
                feeds["vision"].append(feed)
                outputs.append(backend.run("vision", feed)[vision_spec.output_names()[0]])
            if not text:
                continue
            embeds = np.asarray(pipe.embed_table[plan.input_ids], np.float32)
            plan.merge_embeddings(embeds, outputs)
            mask = plan.attention_mask
            feeds["prefill"].append({"inputs_embeds": embeds, "position_ids": plan.position_ids, "attention_mask": mask})
            # The portable host-cache decode state over the fp32 graphs (either cache contract of the manifest),
            # recording the exact decode inputs: real past caches, masks and positions.
            recorder = _Recorder(backend)
            state = HostKVState(recorder, KVLayout(manifest), embeds.shape[1] + steps)
            token = state.prefill(embeds, plan.position_ids, mask).argmax(-1)
            for step in range(steps):
                mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
                recorder.record = step in keep
                logits = state.step(np.asarray(pipe.embed_table[token[:, None]], np.float32),
                                    plan.decode_positions(step), mask)
                if recorder.record:
                    feeds["decode"].append(recorder.last.pop("decode"))
                token = logits.argmax(-1)
    return feeds


# ================================================================================================ the builders

def _ort_session(path: Path, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _save(model: ir.Model, path: Path) -> None:
    from .onnx import EXTERNAL_DATA_THRESHOLD, weight_bytes

    external = weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if not external:  # weights still referencing the source folder's .data file come into the protobuf
        ir.external_data.load_to_model(model)
    ir.save(model, str(path), external_data=path.name + ".data" if external else None, alignment=65536)


def _large(path: Path) -> bool:
    """Whether a graph's weights need external data when rewritten (a protobuf cannot exceed 2 GiB)."""
    from .onnx import EXTERNAL_DATA_THRESHOLD, weight_bytes

    return weight_bytes(ir.load(str(path))) > EXTERNAL_DATA_THRESHOLD  # external weights are not read


def _op_counts(path: Path) -> dict[str, int]:
    proto = onnx.load(str(path), load_external_data=False)
    return dict(sorted(Counter(n.op_type if n.domain in STANDARD_DOMAINS else f"{n.domain}.{n.op_type}"
                               for n in proto.graph.node).items()))


def _weight_nodes(path: Path, ops: Sequence[str], lm_head: bool = True) -> list[str]:
    """Names of the ``ops`` nodes whose second input (the weight) is an initializer."""
    proto = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in proto.graph.initializer}
    names = []
    for n in proto.graph.node:
        if n.op_type in ops and len(n.input) > 1 and n.input[1] in weights:
            scopes = next((p.value for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
            if not lm_head and "lm_head" in scopes:
                continue
            names.append(n.name)
    return names


class _Reader:
    """onnxruntime CalibrationDataReader over a list of feeds (float inputs as fp32, as the fp32 graph takes)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = feeds
        self.index = 0

    def get_next(self):
        if self.index >= len(self.feeds):
            return None
        self.index += 1
        return {k: np.ascontiguousarray(v) for k, v in self.feeds[self.index - 1].items()}

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:  # used by CalibStridedMinMax
        self.feeds = self.feeds[start_index:end_index]
        self.index = 0


@contextlib.contextmanager
def _quiet_quantizer():
    # onnxruntime.quantization logs its advice on the root logger and per-node progress on its own loggers
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
                                      if n.startswith("onnxruntime.quantization"))]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _build_fp16(src: Path, manifest: Manifest, out: Path, options: PlanOptions, log) -> dict[str, dict]:
    info = {}
    for role, spec in manifest.graphs.items():
        model = ir.load(str(src / spec.file))
        half, fp32 = _half_io(spec)
        summary = convert_fp16(model, role, half, fp32)
        _save(model, out / spec.file)
        info[role] = {"precision": "fp16", **summary}
    return info


def _build_int8(src: Path, manifest: Manifest, out: Path, options: PlanOptions, log) -> dict[str, dict]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    t0 = time.perf_counter()
    feeds = collect_calibration(src, options=options)
    if log:
        log(f"{'calibrate':9s} {time.perf_counter() - t0:6.1f} s  " + ", ".join(f"{len(v)} {k}" for k, v in feeds.items())
            + " inputs (fp32 graphs, the runtime's preprocessing and prompts)")
    method = getattr(CalibrationMethod, options.calibrate_method)
    if options.int8_base not in ("fp16", "fp32"):
        raise GlmTrtError(f"int8 base {options.int8_base!r} is not fp16 or fp32")
    info = {}
    with tempfile.TemporaryDirectory(prefix="glmtrt-int8-") as work:
        for role, spec in manifest.graphs.items():
            t0 = time.perf_counter()
            path = src / spec.file
            quantized = Path(work) / spec.file
            nodes = _weight_nodes(path, ("MatMul", "Gemm", "Conv"), lm_head=options.int8_lm_head)
            with _quiet_quantizer():
                quantize_static(
                    str(path), str(quantized), _Reader(feeds[role]), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul", "Gemm", "Conv"], nodes_to_quantize=nodes, per_channel=True,
                    reduce_range=False, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=method, use_external_data_format=_large(path),
                    # Q/DQ on the inputs and weights of the quantized ops only: their outputs stay fp16 (quantizing
                    # them too cost 0.05 of vision-embedding cosine on the tiny presets), biases stay float.
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                                   "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm", "Conv"],
                                   "CalibMaxIntermediateOutputs": 8},
                )
            # The quantizer's file lacks some intermediate types; infer them (by path: external data stays put).
            onnx.shape_inference.infer_shapes_path(str(quantized), str(quantized))
            model = ir.load(str(quantized))
            summary = {"base": options.int8_base}
            if options.int8_base == "fp16":
                half, fp32 = _half_io(spec)
                summary.update(convert_fp16(model, role, half, fp32))
            _save(model, out / spec.file)
            scales = [float(np.abs(v.const_value.numpy()).min()) for n in model.graph for i, v in enumerate(n.inputs)
                      if n.op_type in _QDQ and i == 1 and v is not None and v.const_value is not None]
            info[role] = {"precision": "int8", "quantized_nodes": len(nodes), "calibration_inputs": len(feeds[role]),
                          "min_scale": min(scales) if scales else None, **summary}
            if log:
                log(f"{role:9s} {time.perf_counter() - t0:6.1f} s  {len(nodes)} MatMul/Gemm/Conv quantized")
    return info


def _gemm_to_matmul(model: ir.Model) -> int:
    """Rewrite Gemm(A, W, C) with a constant W (alpha = beta = 1, no transA) as MatMul(A, W') + C, so MatMul-only
    quantizers see the vision tower's linear layers. Returns the number rewritten."""
    graph, count = model.graph, 0
    for node in list(graph):
        if node.op_type != "Gemm":
            continue
        a = {k: v.value for k, v in node.attributes.items()}
        weight = node.inputs[1]
        if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or not weight.is_initializer():
            continue
        w = weight.const_value.numpy()
        w = w.T.copy() if a.get("transB", 0) else w
        new_weight = ir.Value(name=f"{weight.name}_kn", shape=ir.Shape(w.shape), type=ir.TensorType(weight.dtype),
                              const_value=ir.tensor(w, name=f"{weight.name}_kn"))
        graph.register_initializer(new_weight)
        out = node.outputs[0]
        matmul = ir.node("MatMul", [node.inputs[0], new_weight], name=f"{node.name}_matmul",
                         metadata_props=dict(node.metadata_props))
        result = matmul.outputs[0]
        result.dtype, result.name = out.dtype, f"{out.name}_matmul"
        new = [matmul]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            add = ir.node("Add", [result, node.inputs[2]], name=f"{node.name}_bias")
            add.outputs[0].dtype = out.dtype
            result = add.outputs[0]
            new.append(add)
        graph.insert_before(node, new)
        name = out.name
        out.replace_all_uses_with(result, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        result.name, result.shape = name, out.shape
        count += 1
    for name in [n for n, v in graph.initializers.items() if not v.uses()]:
        del graph.initializers[name]
    return count


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def _run(session, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a session with ``feed`` cast to the session's input types."""
    types = {i.name: _ORT_TYPES[i.type] for i in session.get_inputs()}
    return session.run(None, {k: np.asarray(v, dtype=types[k]) for k, v in feed.items()})


def _cosines(reference: Path, candidate: Path, feeds: list[dict], threads: int | None) -> list[float]:
    """Cosine between the first outputs of two graph files on each feed."""
    a, b = _ort_session(reference, threads), _ort_session(candidate, threads)
    out = []
    for feed in feeds:
        x = np.asarray(_run(a, feed)[0], np.float64).ravel()
        y = np.asarray(_run(b, feed)[0], np.float64).ravel()
        denom = np.linalg.norm(x) * np.linalg.norm(y)
        out.append(float(x @ y / denom) if denom else 1.0)
    return out


def _build_cpu(precision: str):
    def build(src: Path, manifest: Manifest, out: Path, options: PlanOptions, log) -> dict[str, dict]:
        vision_feeds = None
        info = {}
        with tempfile.TemporaryDirectory(prefix=f"glmtrt-{precision}-") as work:
            for role, spec in manifest.graphs.items():
                t0 = time.perf_counter()
                path = src / spec.file
                staged = Path(work) / f"staged-{spec.file}"
                model = ir.load(str(path))
                rewritten = _gemm_to_matmul(model)
                _save(model, staged)
                del model
                target = out / spec.file
                _quantize_cpu(precision, staged, target, options)
                entry = {"precision": precision, "gemm_rewritten": rewritten}
                if role == "vision":
                    if vision_feeds is None:
                        vision_feeds = collect_calibration(src, options=options, text=False)["vision"]
                    cosines = _cosines(path, target, vision_feeds, options.threads)
                    entry["embedding_cosine_min"] = round(min(cosines), 6) if cosines else None
                    if cosines and min(cosines) < options.vision_min_cosine:
                        for suffix in ("", ".data"):
                            (out / (spec.file + suffix)).unlink(missing_ok=True)
                        shutil.copyfile(path, target)
                        if Path(str(path) + ".data").exists():
                            shutil.copyfile(str(path) + ".data", str(target) + ".data")
                        entry = {"precision": "fp32", "kept_fp32": f"{precision} vision embeddings reached cosine "
                                 f"{min(cosines):.4f} < {options.vision_min_cosine} on the calibration images",
                                 "quantized_cosine_min": round(min(cosines), 6)}
                info[role] = entry
                if log:
                    log(f"{role:9s} {time.perf_counter() - t0:6.1f} s  {entry['precision']}"
                        + (f" (cosine {entry.get('embedding_cosine_min', entry.get('quantized_cosine_min'))})"
                           if role == "vision" else ""))
        return info

    return build


def _quantize_cpu(precision: str, src: Path, dst: Path, options: PlanOptions) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    with _quiet_quantizer():
        if precision == "cpu-int8":
            quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=False,
                             weight_type=QuantType.QInt8, use_external_data_format=_large(src),
                             extra_options={"MatMulConstBOnly": True})
            return
        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=options.int4_block_size,
                                         is_symmetric=True, accuracy_level=options.int4_accuracy_level,
                                         op_types_to_quantize=("MatMul",))
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=_large(src))


_BUILDERS: dict[str, Callable] = {"fp16": _build_fp16, "int8": _build_int8,
                                  "cpu-int8": _build_cpu("cpu-int8"), "cpu-int4": _build_cpu("cpu-int4")}


# ================================================================================================ the folder

def _tool_versions() -> dict[str, str]:
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "onnx_ir": ir.__version__}


def _graph_spec(path: Path, base: GraphSpec) -> GraphSpec:
    """The written graph's interface: the fp32 contract's names and symbolic shapes with the file's dtypes."""
    from .onnx import interface

    saved = interface(onnx.load(str(path), load_external_data=False))
    dtypes = {t["name"]: t["dtype"] for t in saved["inputs"] + saved["outputs"]}
    names = [t["name"] for t in saved["inputs"]], [t["name"] for t in saved["outputs"]]
    if names != (base.input_names(), base.output_names()):
        raise RuntimeError(f"{path.name}: the plan changed the graph interface {names} (fp32: "
                           f"{base.input_names()} / {base.output_names()}); this is a glmtrt bug")
    return GraphSpec(file=base.file, inputs=[TensorSpec(t.name, dtypes[t.name], list(t.shape)) for t in base.inputs],
                     outputs=[TensorSpec(t.name, dtypes[t.name], list(t.shape)) for t in base.outputs])


def _check_plan(folder: Path, manifest: Manifest, spec: PlanSpec, threads: int | None) -> dict[str, list[str]]:
    """Every graph loads in ONNX Runtime CPU; TensorRT plans pass the ONNX checker and the TensorRT lint.
    Returns the non-standard (contrib) op types per graph."""
    from .lint import lint_model
    from .onnx import check_graph_file

    contrib = {}
    for role, graph in manifest.graphs.items():
        path = folder / graph.file
        if spec.tensorrt_input:
            check_graph_file(path)
            findings = lint_model(path)
            if findings:
                raise RuntimeError(f"the {spec.precision} {role} graph fails the TensorRT lint ({findings[0]}; "
                                   f"{len(findings)} in all); this is a glmtrt bug")
        _ort_session(path, threads)
        proto = onnx.load(str(path), load_external_data=False)
        contrib[role] = sorted({f"{n.domain}.{n.op_type}" for n in proto.graph.node if n.domain not in STANDARD_DOMAINS})
    return contrib


def derive_plan(engines: str | Path, out: str | Path, precision: str, *, force: bool = False,
                options: PlanOptions | None = None, log: Callable[[str], None] | None = None) -> PlanResult:
    """Write the ``precision`` plan (see :data:`PLANS`) of the fp32 engines folder ``engines`` to ``out``.

    The folder is complete on its own (graphs, embedding table, tokenizer, manifest with ``precision``, the graphs'
    I/O dtypes and ``extra.plan``: tool and versions, whether it is TensorRT input or ONNX Runtime only, contrib ops,
    per-graph details) and is written atomically like an export (``force`` replaces an existing folder).
    """
    from .folder import _check_target, _umask, atomic_folder

    start = time.perf_counter()
    options = options or PlanOptions()
    if precision not in PLANS:
        raise GlmTrtError(f"precision {precision!r} is not a plan; choose one of: {', '.join(PLANS)} "
                          "(fp32 is what `glmtrt export` writes)")
    src, out = Path(engines), Path(out)
    manifest = Manifest.load(src)
    if manifest.precision != "fp32":
        raise GlmTrtError(f"{str(src)!r} holds a {manifest.precision} plan; plans are derived from an fp32 export")
    if out.resolve() == src.resolve():
        raise GlmTrtError("--out must differ from --engines: a plan is written next to its fp32 export, not over it")
    _check_target(out, force)
    spec = PLANS[precision]
    with atomic_folder(out, force) as tmp:
        graphs_info = _BUILDERS[precision](src, manifest, tmp, options, log)
        graphs = {role: _graph_spec(tmp / g.file, g) for role, g in manifest.graphs.items()}
        contrib = _check_plan(tmp, replace(manifest, graphs=graphs), spec, options.threads)
        for name in (manifest.tokenizer, manifest.chat_template):
            if name:
                shutil.copyfile(src / name, tmp / name)
        embeddings = dict(manifest.embeddings)
        table = np.load(src / manifest.embeddings["file"], mmap_mode="r")
        embeds_dtype = {t.name: t.dtype for t in graphs["prefill"].inputs}["inputs_embeds"]
        if embeds_dtype != str(table.dtype):  # the runtime gathers rows in the graphs' inputs_embeds dtype: store that
            table = table.astype(embeds_dtype)
        np.save(tmp / embeddings["file"], np.asarray(table))
        embeddings["dtype"] = str(table.dtype)
        contrib_ops = sorted({op for ops in contrib.values() for op in ops})
        extra = json.loads(json.dumps(manifest.extra))
        extra["plan"] = {
            "precision": precision,
            "summary": spec.summary,
            "tool": spec.tool,
            "tool_versions": _tool_versions(),
            "tensorrt_input": spec.tensorrt_input,
            "onnxruntime_only": not spec.tensorrt_input,
            "uses_contrib_ops": bool(contrib_ops),
            "contrib_ops": contrib_ops,
            "derived_from": {"precision": "fp32", "folder": str(src.resolve()),
                             "manifest_sha256": sha256_file(src / MANIFEST_NAME)},
            "graphs": graphs_info,
            "options": {k: v for k, v in vars(options).items() if k != "threads"},
            "seconds": round(time.perf_counter() - start, 2),
        }
        if not spec.tensorrt_input:
            extra["plan"]["note"] = ("ONNX Runtime CPU plan: not TensorRT input (glmtrt lint and glmtrt build refuse "
                                     "it); derive fp16 or int8 for TensorRT")
        from glmtrt.runtime import __version__

        shared = share_text_weights(tmp, {role: g.file for role, g in graphs.items()})
        plan_manifest = replace(manifest, precision=precision, graphs=graphs, embeddings=embeddings, extra=extra,
                                files={}, glmtrt_version=__version__, shared_weights=shared)
        plan_manifest.record_files(tmp)
        plan_manifest.save(tmp)
        mode = 0o666 & ~_umask()
        for path in tmp.iterdir():  # some writers (onnx external data) create owner-only files
            if path.is_file():
                path.chmod(mode)
    return PlanResult(folder=out, precision=precision, seconds=time.perf_counter() - start, graphs=graphs_info)


def quantize_command(args) -> int:
    """``glmtrt quantize --engines FP32_DIR --precision P --out DIR``."""
    def log(line: str) -> None:
        print(f"  {line}", flush=True)

    if not args.quiet:
        print(f"deriving the {args.precision} plan of {args.engines} -> {args.out}", flush=True)
    options = PlanOptions(threads=args.threads)
    if args.calibration_steps is not None:
        options.calibration_decode_steps = args.calibration_steps
    if getattr(args, "int8_base", None):
        options.int8_base = args.int8_base
    result = derive_plan(args.engines, args.out, args.precision, force=args.force, options=options,
                         log=None if args.quiet else log)
    per_graph = ", ".join(f"{role} {g['precision']}" for role, g in result.graphs.items())
    print(f"wrote the {result.precision} plan to {result.folder} in {result.seconds:.1f} s ({per_graph})")
    return 0
