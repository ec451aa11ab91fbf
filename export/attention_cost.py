"""The cost of one decode step's attention against the cache length, for the formulations ONNX Runtime CPU offers.

    python -m glmtrt.export.attention_cost [--preset glm-ocr] [--context 64,1024,4096] [--threads 2] [--repeats 15]

For the preset's text config (layers, query and KV heads, head dim), one graph per formulation holds the attention of
every layer for one new token over its own cache (seeded random queries and caches, fp32, all slots valid):

* ``split-softmax``: what the decode graph exports (:func:`~glmtrt.export.graphs.split_softmax_attention` with the
  additive mask of :func:`~glmtrt.export.graphs.mask_bias`, traced by ``torch.onnx.export``), cache (D, C);
* ``onnx-attention``: the opset-23 ``Attention`` op over the cache (C + 1, D) that already holds the new key (in a
  decode graph it would have to be concatenated or scattered in first: not counted);
* ``gqa-contrib``: ``com.microsoft.GroupQueryAttention`` over a (C + 1, D) past buffer that it writes the new key
  into (past and present sharing one buffer).

All three attend over the same keys and values (the cache plus the new token's) and must give the same outputs
(checked: ``max_abs_vs_split_softmax``). Each runs in its own ONNX Runtime CPU session (``--threads`` intra-op
threads, spinning off so that idle sessions do not steal the cores); the formulations take turns run by run, and
the median milliseconds per step are printed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_CONTEXTS = (64, 1024, 4096)
FORMULATIONS = ("split-softmax", "onnx-attention", "gqa-contrib")


def _split_softmax_model(layers: int, kv_heads: int, groups: int, head_dim: int, path: Path) -> None:
    """Export the decode graph's attention for ``layers`` layers: inputs q, k_new, v_new, attention_mask, caches."""
    import torch

    from .graphs import mask_bias, split_softmax_attention

    class Attention(torch.nn.Module):
        def forward(self, q, k_new, v_new, attention_mask, *caches):
            bias = mask_bias(attention_mask, q.dtype)
            return torch.stack([split_softmax_attention(q, k_new, v_new, caches[2 * i], caches[2 * i + 1], bias,
                                                        head_dim**-0.5) for i in range(layers)])

    cap = 64
    example = (torch.zeros(1, kv_heads, groups, head_dim), torch.zeros(1, kv_heads, 1, head_dim),
               torch.zeros(1, kv_heads, 1, head_dim), torch.ones(1, cap, dtype=torch.int64),
               *[torch.zeros(1, kv_heads, head_dim, cap) for _ in range(2 * layers)])
    dim = torch.export.Dim("capacity", min=2, max=1 << 20)
    shapes = {"q": None, "k_new": None, "v_new": None, "attention_mask": {1: dim},
              "caches": tuple({3: dim} for _ in range(2 * layers))}
    torch.onnx.export(Attention().eval(), example, str(path), dynamo=True, dynamic_shapes=shapes, opset_version=20,
                      verbose=False)


def _op_model(kind: str, layers: int, kv_heads: int, heads: int, head_dim: int):
    """The opset-23 ``Attention`` or contrib ``GroupQueryAttention`` graph over ``layers`` caches (dynamic length)."""
    from onnx import TensorProto, helper

    f32 = TensorProto.FLOAT
    cache = [1, kv_heads, "capacity", head_dim]
    nodes, outputs = [], []
    if kind == "onnx-attention":
        inputs = [helper.make_tensor_value_info("q", f32, [1, heads, 1, head_dim]),
                  helper.make_tensor_value_info("mask", TensorProto.BOOL, [1, 1, 1, "capacity"])]
        opsets = [helper.make_opsetid("", 23)]
    else:
        inputs = [helper.make_tensor_value_info("q", f32, [1, 1, heads * head_dim]),
                  helper.make_tensor_value_info("k_new", f32, [1, 1, kv_heads * head_dim]),
                  helper.make_tensor_value_info("v_new", f32, [1, 1, kv_heads * head_dim]),
                  helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
                  helper.make_tensor_value_info("total_length", TensorProto.INT32, [])]
        opsets = [helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    for i in range(layers):
        inputs += [helper.make_tensor_value_info(f"key_{i}", f32, cache), helper.make_tensor_value_info(f"value_{i}", f32, cache)]
        if kind == "onnx-attention":
            nodes.append(helper.make_node("Attention", ["q", f"key_{i}", f"value_{i}", "mask"], [f"out_{i}"],
                                          q_num_heads=heads, kv_num_heads=kv_heads))
            outputs.append(helper.make_tensor_value_info(f"out_{i}", f32, None))
        else:
            names = [f"out_{i}", f"present_key_{i}", f"present_value_{i}"]
            nodes.append(helper.make_node("GroupQueryAttention", ["q", "k_new", "v_new", f"key_{i}", f"value_{i}",
                                                                  "seqlens_k", "total_length"], names,
                                          domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads))
            outputs += [helper.make_tensor_value_info(n, f32, None) for n in names]
    return helper.make_model(helper.make_graph(nodes, kind, inputs, outputs), opset_imports=opsets)


def _feeds(name: str, session, draw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One formulation's inputs for the same attention: ``draw`` holds q (H, D), k_new / v_new (KVH, D) and the
    caches keys / values (L, KVH, C, D); the ops' caches hold the new token in slot C (C + 1 slots)."""
    q, k_new, v_new, keys, values = (draw[k] for k in ("q", "k_new", "v_new", "keys", "values"))
    layers, kv_heads, capacity, head_dim = keys.shape
    names = [i.name for i in session.get_inputs()]
    if name == "split-softmax":  # q (1, KVH, G, D); caches stored (D, C)
        feeds = [q.reshape(1, kv_heads, -1, head_dim), k_new[None, :, None], v_new[None, :, None],
                 np.ones((1, capacity), np.int64)]
        for i in range(layers):
            feeds += [np.ascontiguousarray(keys[i].swapaxes(-1, -2))[None], np.ascontiguousarray(values[i].swapaxes(-1, -2))[None]]
        return dict(zip(names, feeds))
    full_keys = np.concatenate([keys, np.broadcast_to(k_new[None, :, None], (layers, kv_heads, 1, head_dim))], axis=2)
    full_values = np.concatenate([values, np.broadcast_to(v_new[None, :, None], (layers, kv_heads, 1, head_dim))], axis=2)
    if name == "onnx-attention":
        feeds = {"q": q[None, :, None], "mask": np.ones((1, 1, 1, capacity + 1), bool)}
    else:  # past length C: the op writes the new key into slot C of the shared buffer and attends over C + 1
        feeds = {"q": q.reshape(1, 1, -1), "k_new": k_new.reshape(1, 1, -1), "v_new": v_new.reshape(1, 1, -1),
                 "seqlens_k": np.array([capacity], np.int32), "total_length": np.array(capacity + 1, np.int32)}
    for i in range(layers):
        feeds[f"key_{i}"], feeds[f"value_{i}"] = full_keys[i][None].copy(), full_values[i][None].copy()
    return feeds


def _runner(name: str, session, feeds: dict[str, np.ndarray]):
    """A call that runs one step. GroupQueryAttention's presents are bound to its past buffers (IO binding), the
    in-place update it is made for; the others return fresh outputs."""
    if name != "gqa-contrib":
        return lambda: session.run(None, feeds)
    binding = session.io_binding()
    for key, value in feeds.items():
        binding.bind_cpu_input(key, value)
    results = []  # in the session's output order: out_i, then the past buffers themselves
    for spec in session.get_outputs():
        if spec.name.startswith("present_"):
            array = feeds[spec.name[len("present_"):]]
        else:
            array = np.empty((1, 1, feeds["q"].shape[-1]), np.float32)
        binding.bind_output(spec.name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)
        results.append(array)

    def run():
        session.run_with_iobinding(binding)
        return results
    return run


def _outputs(name: str, result: list[np.ndarray], layers: int) -> np.ndarray:
    """(L, H * D) attention outputs of one run, whatever the formulation's output layout."""
    if name == "split-softmax":
        return result[0].reshape(layers, -1)
    step = 1 if name == "onnx-attention" else 3
    return np.stack([result[i * step].reshape(-1) for i in range(layers)])


def measure(preset: str = "glm-ocr", contexts=DEFAULT_CONTEXTS, threads: int = 2, repeats: int = 15,
            formulations=FORMULATIONS) -> dict[str, dict[int, dict[str, float]]]:
    """formulation -> {context: {"ms": median ms per step, "max_abs_vs_split_softmax": largest output difference}}."""
    import onnxruntime as ort

    from glmtrt.reference.config import preset as preset_config

    text = preset_config(preset).text
    layers, heads, kv_heads, head_dim = text.num_layers, text.num_heads, text.num_kv_heads, text.head_dim
    formulations = ["split-softmax", *[f for f in formulations if f != "split-softmax"]]  # the baseline first
    sessions = {}
    with tempfile.TemporaryDirectory(prefix="glmtrt-attention-") as work:
        for name in formulations:
            if name == "split-softmax":
                path = Path(work) / "split.onnx"
                _split_softmax_model(layers, kv_heads, heads // kv_heads, head_dim, path)
                model = str(path)
            else:
                model = _op_model(name, layers, kv_heads, heads, head_dim).SerializeToString()
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sessions[name] = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    results: dict[str, dict[int, dict[str, float]]] = {name: {} for name in sessions}
    for capacity in contexts:
        rng = np.random.default_rng(capacity)
        draw = {"q": rng.standard_normal((heads, head_dim), dtype=np.float32),
                "k_new": rng.standard_normal((kv_heads, head_dim), dtype=np.float32),
                "v_new": rng.standard_normal((kv_heads, head_dim), dtype=np.float32),
                "keys": rng.standard_normal((layers, kv_heads, capacity, head_dim), dtype=np.float32),
                "values": rng.standard_normal((layers, kv_heads, capacity, head_dim), dtype=np.float32)}
        runs = {name: _runner(name, s, _feeds(name, s, draw)) for name, s in sessions.items()}
        outputs = {name: _outputs(name, run(), layers) for name, run in runs.items()}  # also the warm-up
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        for name, ts in times.items():
            results[name][capacity] = {"ms": statistics.median(ts) * 1e3, "max_abs_vs_split_softmax":
                                       float(np.abs(outputs[name] - outputs["split-softmax"]).max())}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glmtrt.export.attention_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="glm-ocr")
    parser.add_argument("--context", default=",".join(map(str, DEFAULT_CONTEXTS)), help="cache lengths, e.g. 64,4096")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--formulations", default=",".join(FORMULATIONS))
    args = parser.parse_args(argv)
    try:
        contexts = [int(c) for c in args.context.split(",")]
    except ValueError:
        parser.error(f"--context takes comma-separated cache lengths, e.g. 64,1024,4096; got {args.context!r}")
    if min(contexts) < 2:
        parser.error("--context lengths must be at least 2 (the past and the new token's slot)")
    unknown = set(args.formulations.split(",")) - set(FORMULATIONS)
    if unknown:
        parser.error(f"unknown formulations {sorted(unknown)}; choose from {', '.join(FORMULATIONS)}")
    results = measure(args.preset, contexts, args.threads, args.repeats, args.formulations.split(","))
    print("| formulation | " + " | ".join(f"cache {c}" for c in contexts) + " |")
    print("|---|" + "---|" * len(contexts))
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(f"{row[c]['ms']:.2f} ms" for c in contexts) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
