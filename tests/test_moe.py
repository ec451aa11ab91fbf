"""GLM-4.5V (MoE) exported and run: parity rungs 3-5 on the tiny preset, and the MoE formulations of the graphs.

The graphs keep the reference router (fp32 sigmoid + correction bias, group limiting, top-k, normalized and scaled
weights) and run only the chosen experts: decode gathers the chosen experts' weight slices, prefill runs each expert
on the tokens that chose it (glmtrt.export.graphs.MOE_FORMULATION). Here: each graph against the reference stage
(including a 300-token prefill), routing that comes from the inputs (all experts used, empty experts, experts whose
weights are never read), the graphs' structure, the TensorRT lint, and fp32 ONNX Runtime greedy generation equal to
the reference for 64 tokens on the cases of the GLM-OCR / GLM-4.1V tests plus a prompt of more than 256 tokens.
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
import torch

from glmtrt.export.graphs import MOE_FORMULATION, with_moe
from glmtrt.export.lint import lint_engines
from glmtrt.export.parity import format_table, run_parity
from glmtrt.reference.decoder import MoE
from glmtrt.runtime.pipeline import Pipeline, Request

from test_export import max_abs, reference, session
from test_export import test_prefill_and_decode_graphs_match_reference as graph_parity
from test_runtime import CASES, NEW_TOKENS, PROMPT, SIZES, case_images, image, reference_tokens

NAME = "tiny-glm-4.5v"
TOL = 1e-4
# A long request: the prompt alone is over 256 tokens (the tiny tokenizer is one token per character).
LONG_PROMPT = ("Read every line of the page and copy it out exactly, keeping the order of the lines, the spelling, "
               "the digits and the punctuation; then say which line is the title, which lines are the body, and "
               "whether anything at the bottom of the page looks like a signature, a date or a page number. ") * 2


@pytest.fixture(scope="module")
def folder(exported):
    return exported(NAME)


@pytest.fixture(scope="module")
def pipe(folder):
    return Pipeline.from_engines(folder)


# ------------------------------------------------------------------------------- rung 3: graphs vs reference

@pytest.mark.parametrize("batch,seq", [(1, 5), (2, 9), (2, 300)])
def test_prefill_and_decode_graphs_match_reference(exported, batch, seq):
    """The prefill graph (grouped experts) at 5, 9 and 300 tokens and two chained decode steps (gathered experts)
    over a fixed-capacity cache, against the reference's every-expert MoE (the test of tests/test_export.py)."""
    graph_parity(exported, NAME, batch, seq)


def test_sparse_formulations_equal_the_reference_in_pytorch():
    """Before export: the graph views of the model (every MoE layer replaced) give the reference's prefill."""
    model = reference(NAME)
    t = model.config.text
    gen = torch.Generator().manual_seed(5)
    embeds = torch.randn(2, 300, t.hidden_size, generator=gen)
    positions = torch.arange(300).expand(3, 2, 300).contiguous()
    mask = torch.ones(2, 300, dtype=torch.int64)
    mask[1, :7] = 0
    want = model.prefill(embeds, positions, mask)
    for formulation in ("grouped", "gathered"):
        view = with_moe(model, formulation)
        layers = view.model.language_model.layers
        assert [type(layer.mlp).__name__ for layer in layers] == ["SplitMLP"] + ["SparseMoE"] * (len(layers) - 1)
        got = view.prefill(embeds, positions, mask)
        assert float((got[0] - want[0]).abs().max()) <= 1e-5
        assert max(float((a - b).abs().max()) for a, b in zip(got[1] + got[2], want[1] + want[2])) <= 1e-5
    # the model itself is untouched
    assert all(isinstance(layer.mlp, MoE) for layer in model.model.language_model.layers[1:])


# ------------------------------------------------------------------------------- routing comes from the inputs

def _layer(formulation: str, tmp_path, favour: tuple[int, ...] = (), poison_others: bool = False):
    """One tiny MoE layer exported with ``formulation``; ``favour``: experts every token is routed to (a large
    correction bias); ``poison_others``: the other experts' weights are NaN, so reading them poisons the output.
    Returns (onnx session, the reference MoE with clean weights, text config)."""
    from glmtrt.export.moe_cost import layer_graph, random_moe
    from glmtrt.export.onnx import export_graph

    moe, text = random_moe(NAME, seed=3)
    clean, _ = random_moe(NAME, seed=3)
    with torch.no_grad():
        for m in (moe, clean):
            m.gate.e_score_correction_bias[list(favour)] += 10.0
        if poison_others:
            others = [e for e in range(text.moe.num_experts) if e not in favour]
            moe.experts.gate_up_proj[others] = float("nan")
            moe.experts.down_proj[others] = float("nan")
    graph = layer_graph(moe, text, formulation)
    export_graph(graph, tmp_path)
    return session(tmp_path, graph.name), clean, text


def _routing(moe, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        chosen, _ = moe.gate(torch.from_numpy(x).reshape(-1, x.shape[-1]), dense=False)
    return chosen.numpy()


@pytest.mark.parametrize("formulation", ["grouped", "gathered"])
def test_routing_follows_the_inputs(formulation, tmp_path):
    """One exported layer, inputs of 1, 7 (the traced size), 64 and 300 tokens with their own routing: every expert
    and many expert pairs are used, and the output equals the reference MoE."""
    sess, moe, text = _layer(formulation, tmp_path)
    pairs = set()
    for tokens in (1, 7, 64, 300):
        # scaled so that the router's logits (std ~1.1) outweigh its random correction bias (std 0.1)
        x = 8 * np.random.default_rng(tokens).standard_normal((1, tokens, text.hidden_size)).astype(np.float32)
        (got,) = sess.run(None, {"hidden_states": x})
        with torch.no_grad():
            want = moe(torch.from_numpy(x)).numpy()
        assert max_abs(got, want) <= 1e-5
        pairs |= {tuple(sorted(row)) for row in _routing(moe, x).tolist()}
    assert {e for pair in pairs for e in pair} == set(range(text.moe.num_experts))
    assert len(pairs) >= 10


@pytest.mark.parametrize("formulation", ["grouped", "gathered"])
def test_unchosen_experts_are_never_read(formulation, tmp_path):
    """Every token routed to experts 0 and 1 (group limiting keeps their group); the six other experts have NaN
    weights and no tokens. The graphs' outputs stay finite and equal the reference's with clean weights; the
    reference's own every-expert formulation is poisoned (the check can fail)."""
    sess, clean, text = _layer(formulation, tmp_path, favour=(0, 1), poison_others=True)
    for tokens in (1, 300):
        x = np.random.default_rng(tokens).standard_normal((1, tokens, text.hidden_size)).astype(np.float32)
        assert {tuple(sorted(r)) for r in _routing(clean, x).tolist()} == {(0, 1)}
        (got,) = sess.run(None, {"hidden_states": x})
        with torch.no_grad():
            want = clean(torch.from_numpy(x)).numpy()
        assert np.isfinite(got).all() and max_abs(got, want) <= 1e-5
    from glmtrt.export.moe_cost import random_moe

    dense, _ = random_moe(NAME, seed=3)
    with torch.no_grad():
        dense.gate.e_score_correction_bias[[0, 1]] += 10.0
        dense.experts.down_proj[2:] = float("nan")
        assert torch.isnan(dense(torch.from_numpy(x))).all()


# ------------------------------------------------------------------------------- the files

def _initializer_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    return {t.name: list(t.dims) for t in model.graph.initializer}


def test_graph_structure_and_lint(folder):
    """prefill: one NonZero per expert per MoE layer and per-expert weight initializers; decode: the stacked expert
    weights are read only through Gathers indexed by the router's choice (no dense expert product); both: standard
    ops the TensorRT lint accepts."""
    model = reference(NAME)
    t = model.config.text
    e, i, h = t.moe.num_experts, t.moe.moe_intermediate_size, t.hidden_size
    moe_layers = t.num_layers - t.moe.first_k_dense_replace
    assert MOE_FORMULATION == {"prefill": "grouped", "decode": "gathered"}

    prefill = onnx.load(str(folder / "prefill.onnx"))
    ops = [n.op_type for n in prefill.graph.node]
    assert ops.count("NonZero") == e * moe_layers and "Einsum" not in ops
    shapes = _initializer_shapes(prefill)
    per_expert = {name: s for name, s in shapes.items() if re.search(r"experts\.(gate_up|down)\.\d+$", name)}
    assert len(per_expert) == 2 * e * moe_layers
    assert sorted(map(tuple, per_expert.values())) == sorted([(2 * i, h), (h, i)] * e * moe_layers)
    assert not any(s in ([e, 2 * i, h], [e, h, i]) for s in shapes.values())

    decode = onnx.load(str(folder / "decode.onnx"))
    ops = [n.op_type for n in decode.graph.node]
    assert "NonZero" not in ops and "Einsum" not in ops
    stacked = {name for name, s in _initializer_shapes(decode).items() if s in ([e, 2 * i, h], [e, h, i])}
    assert len(stacked) == 2 * moe_layers
    readers = [n for n in decode.graph.node if set(n.input) & stacked]
    assert readers and all(n.op_type in ("Gather", "GatherND") for n in readers)

    assert lint_engines(folder) == {"vision": [], "prefill": [], "decode": []}


# ------------------------------------------------------------------------------- rung 4-5: parity and generation

def test_fp32_export_passes_parity(folder):
    report = run_parity(folder, steps=8)
    assert report["passed"], format_table(report)
    for case in report["cases"]:
        assert case["prefill_logits_max_abs"] <= TOL and case["teacher_forced_max_logit_error"] <= TOL
        assert case["teacher_forced_top1"] == 1.0 and case["greedy_identical"]


@pytest.mark.parametrize("case", CASES + ["long_prompt"])
def test_greedy_equals_reference(pipe, case):
    prompt = LONG_PROMPT if case == "long_prompt" else PROMPT
    images = [image(*SIZES["tall"], seed=6)] if case == "long_prompt" else case_images(case)
    result = pipe.generate(prompt, images, max_new_tokens=NEW_TOKENS, eos_token_ids=())
    vision = pipe.preprocess(images)
    ids = pipe.prompt_ids(prompt, vision_inputs=vision)
    assert result.prompt_token_ids == ids
    if case == "long_prompt":
        assert len(ids) >= 256
    expected = reference_tokens(reference(NAME), ids, None if vision is None else vision.pixel_values,
                                None if vision is None else vision.grid_thw)[0]
    assert result.token_ids == expected.tolist()
    assert result.stop_reason == "length" and len(set(result.token_ids)) > 1


def test_batch_of_two_equals_reference(pipe):
    """A short and a long (> 256 tokens) request in one batch, left-padded: each row equals the reference."""
    requests = [Request("Read this.", [image(*SIZES["wide"], seed=3)]), Request(LONG_PROMPT, [])]
    results = pipe.generate_batch(requests, max_new_tokens=NEW_TOKENS, eos_token_ids=())
    rows = [r.prompt_token_ids for r in results]
    width = max(map(len, rows))
    assert width >= 256
    ids = np.array([[0] * (width - len(r)) + r for r in rows])
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    vision = pipe.preprocess(requests[0].images)
    expected = reference_tokens(reference(NAME), ids, vision.pixel_values, vision.grid_thw, attention_mask=mask)
    assert [r.token_ids for r in results] == expected.tolist()


# ------------------------------------------------------------------------------- the cost measurement

def test_moe_cost_command_runs(tmp_path, capsys):
    """The README's cost table command, on the tiny preset: every formulation runs and matches the reference."""
    from glmtrt.export.moe_cost import main

    out = tmp_path / "cost.json"
    assert main(["--preset", NAME, "--tokens", "1,300", "--repeats", "1", "--json", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    assert {(r["formulation"], r["tokens"]) for r in records} == {(f, n) for f in ("dense", "grouped", "gathered")
                                                                   for n in (1, 300)}
    for r in records:
        assert r["seconds"] > 0 and r["max_abs_vs_reference"] <= 1e-5
    assert [r["chunk"] for r in records if r["formulation"] == "dense"] == [None, 256]
    printed = capsys.readouterr().out
    assert "| formulation | 1 tokens | 300 tokens |" in printed and "| grouped |" in printed
