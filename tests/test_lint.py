"""The TensorRT lint: exported graphs pass; each kind of incompatibility is caught and named."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from glmtrt.export.lint import LintError, check_engines, lint_engines, lint_model


def graph_of(nodes, inputs, outputs, initializers=(), opset=18, domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=imports)


def tensor(name, dtype=TensorProto.FLOAT, shape=(2, 3)):
    return helper.make_tensor_value_info(name, dtype, list(shape))


@pytest.mark.parametrize("preset", ["tiny-glm-ocr", "tiny-glm-4.1v"])
def test_exported_fp32_graphs_pass(exported, preset):
    report = lint_engines(exported(preset))
    assert set(report) == {"vision", "prefill", "decode"}
    assert report == {"vision": [], "prefill": [], "decode": []}
    check_engines(exported(preset))


def test_clean_graph_passes():
    model = graph_of([helper.make_node("Relu", ["x"], ["y"], name="relu")], [tensor("x")], [tensor("y")])
    assert lint_model(model) == []


CASES = {
    "contrib op": (
        lambda: graph_of([helper.make_node("MatMulNBits", ["x"], ["y"], domain="com.microsoft", name="q")],
                         [tensor("x")], [tensor("y")], domains=["com.microsoft"]),
        "domain 'com.microsoft'"),
    "unsupported op": (
        lambda: graph_of([helper.make_node("Unique", ["x"], ["y"], name="u")], [tensor("x")], [tensor("y")]),
        "not supported"),
    "float64 initializer": (
        lambda: graph_of([helper.make_node("Add", ["x", "c"], ["y"], name="add")], [tensor("x", TensorProto.DOUBLE)],
                         [tensor("y", TensorProto.DOUBLE)], [numpy_helper.from_array(np.ones((2, 3)), "c")]),
        "float64"),
    "cast to double": (
        lambda: graph_of([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE, name="c")], [tensor("x")],
                         [tensor("y", TensorProto.DOUBLE)]),
        "float64"),
    "unsorted topk": (
        lambda: graph_of([helper.make_node("TopK", ["x", "k"], ["v", "i"], sorted=0, name="t")], [tensor("x")],
                         [tensor("v"), tensor("i", TensorProto.INT64)], [numpy_helper.from_array(np.array([2]), "k")]),
        "sorted must be 1"),
    "topk with a runtime K": (
        lambda: graph_of([helper.make_node("TopK", ["x", "k"], ["v", "i"], name="t")],
                         [tensor("x"), tensor("k", TensorProto.INT64, (1,))], [tensor("v"), tensor("i", TensorProto.INT64)]),
        "build-time constant"),
    "gridsample opset-20 spelling": (
        lambda: graph_of([helper.make_node("GridSample", ["x", "g"], ["y"], mode="cubic", name="gs")],
                         [tensor("x", shape=(1, 2, 4, 4)), tensor("g", shape=(1, 3, 3, 2))], [tensor("y", shape=(1, 2, 3, 3))],
                         opset=20),
        "mode 'cubic'"),
    "scatternd reduction": (
        lambda: graph_of([helper.make_node("ScatterND", ["x", "i", "u"], ["y"], reduction="add", name="s")],
                         [tensor("x"), tensor("i", TensorProto.INT64, (1, 1)), tensor("u", shape=(1, 3))], [tensor("y")]),
        "reduction"),
    "attention on 10.13": (
        lambda: graph_of([helper.make_node("Attention", ["q", "k", "v"], ["y"], name="a")],
                         [tensor(n, shape=(1, 2, 3, 4)) for n in "qkv"], [tensor("y", shape=(1, 2, 3, 4))], opset=23),
        "needs TensorRT 10.14+"),
    "asymmetric quantization": (
        lambda: graph_of([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], name="q")], [tensor("x")],
                         [tensor("y", TensorProto.INT8)],
                         [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
                          numpy_helper.from_array(np.array(3, np.int8), "z")]),
        "zero point"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_incompatibility_is_named(case):
    make, expected = CASES[case]
    findings = lint_model(make())
    assert findings, case
    assert any(expected in str(f) for f in findings), [str(f) for f in findings]


def test_attention_passes_when_targeting_newer_tensorrt():
    model, _ = CASES["attention on 10.13"]
    assert lint_model(model(), min_trt=(10, 15)) == []


def test_check_engines_refuses_a_contrib_graph(exported, tmp_path):
    import shutil

    from glmtrt.runtime.manifest import Manifest

    folder = shutil.copytree(exported("tiny-glm-ocr"), tmp_path / "contrib")
    manifest = Manifest.load(folder)
    model = onnx.load(str(folder / manifest.graphs["decode"].file))
    model.graph.node[0].domain = "com.microsoft"
    onnx.save(model, str(folder / manifest.graphs["decode"].file))
    manifest.record_files(folder)  # a consistent folder whose decode graph uses a contrib op, like a CPU plan
    manifest.save(folder)
    with pytest.raises(LintError, match="decode: .*com.microsoft"):
        check_engines(folder)
