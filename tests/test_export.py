"""Parity ladder, rung 3 (fp32): each exported graph in ONNX Runtime against the reference stage it replaces;
the files themselves (standard ONNX, manifest agrees with the graphs); refusals; crash safety of the folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from glmtrt.export.graphs import kv_names
from glmtrt.export.onnx import interface
from glmtrt.reference import load_reference
from glmtrt.runtime.errors import GlmTrtError
from glmtrt.runtime.manifest import MANIFEST_NAME, Manifest
from glmtrt.runtime.vision_tables import vision_tables

PRESETS = ("tiny-glm-ocr", "tiny-glm-4.1v")
TOL = 1e-4
_models: dict = {}
_sessions: dict = {}


def reference(name: str):
    if name not in _models:
        _models[name] = load_reference(name)
    return _models[name]


def session(folder: Path, graph: str) -> ort.InferenceSession:
    key = (str(folder), graph)
    if key not in _sessions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        _sessions[key] = ort.InferenceSession(str(folder / f"{graph}.onnx"), options, providers=["CPUExecutionProvider"])
    return _sessions[key]


def max_abs(got, want) -> float:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    return float(np.abs(got - want).max()) if got.size else 0.0


# ------------------------------------------------------------------------------------------ graph parity

@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("grid", [(1, 8, 4), (1, 6, 10)], ids=["8x4", "6x10"])
def test_vision_graph_matches_reference(exported, name, grid):
    model, folder = reference(name), exported(name)
    v = model.config.vision
    tables = vision_tables([grid], kind=v.kind, head_dim=v.head_dim, rope_theta=v.rope_theta,
                           merge_size=v.spatial_merge_size, table_side=v.pos_table_side)
    n = int(np.prod(grid))
    pixels = np.random.default_rng(n).standard_normal((n, v.patch_dim)).astype(np.float32)
    want = model.vision(torch.from_numpy(pixels), **{k: torch.from_numpy(a) for k, a in tables.items()}).numpy()
    sess = session(folder, "vision")
    expected_inputs = ["pixel_values", "rotary_cos", "rotary_sin"] + (["tap_index", "tap_weight"] if v.kind == "glm4v" else [])
    assert [i.name for i in sess.get_inputs()] == expected_inputs
    feeds = {"pixel_values": pixels, **{k: tables[k] for k in expected_inputs[1:]}}
    (got,) = sess.run(["image_embeds"], feeds)
    assert got.shape == (n // v.spatial_merge_size**2, v.out_hidden_size)
    assert max_abs(got, want) <= TOL


def _text_inputs(model, batch: int, length: int, past: int, seed: int):
    """Embeddings, left-padded mask over past + length keys, and M-RoPE positions that differ per axis."""
    t = model.config.text
    rng = np.random.default_rng(seed)
    embeds = rng.standard_normal((batch, length, t.hidden_size)).astype(np.float32)
    mask = np.ones((batch, past + length), np.int64)
    if batch > 1:
        mask[1, :3] = 0  # the second sample is left-padded
    positions = (past + np.arange(length))[None, None, :] + rng.integers(0, 4, (3, batch, 1))
    return embeds, np.ascontiguousarray(positions.astype(np.int64)), mask


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("batch,seq", [(1, 5), (2, 9)])
def test_prefill_and_decode_graphs_match_reference(exported, name, batch, seq):
    model, folder = reference(name), exported(name)
    layers = model.config.text.num_layers
    embeds, positions, mask = _text_inputs(model, batch, seq, 0, seed=seq)
    logits, keys, values = model.prefill(torch.from_numpy(embeds), torch.from_numpy(positions), torch.from_numpy(mask))
    want = [logits.numpy()] + [t.numpy() for pair in zip(keys, values) for t in pair]
    got = session(folder, "prefill").run(None, {"inputs_embeds": embeds, "position_ids": positions, "attention_mask": mask})
    assert len(got) == 1 + 2 * layers
    assert max(max_abs(g, w) for g, w in zip(got, want)) <= TOL

    # Decode over a fixed-capacity cache: buffers (batch, kv_heads, head_dim, capacity) of seq + 4 slots; unwritten
    # slots hold finite noise (the mask, not their contents, must keep them out). Step 0 reads the reference
    # prefill's cache, step 1 the graph's own prefill cache plus the slot the graph returned at step 0; each
    # against the reference's decode_step.
    capacity = seq + 4
    rng = np.random.default_rng(seq)
    t = model.config.text
    buffers = {"ref": [], "ort": []}
    for road, cache in (("ref", want[1:]), ("ort", got[1:])):
        for tensor in cache:
            buf = rng.standard_normal((batch, t.num_kv_heads, t.head_dim, capacity)).astype(np.float32)
            buf[:, :, :, :seq] = tensor.transpose(0, 1, 3, 2)
            buffers[road].append(buf)
    past = [torch.from_numpy(w) for w in want[1:]]
    for step in range(2):
        embeds, positions, _ = _text_inputs(model, batch, 1, seq + step, seed=100 + step)
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)  # past + new, the reference's
        logits, keys, values = model.decode_step(torch.from_numpy(embeds), torch.from_numpy(positions),
                                                 torch.from_numpy(mask), past[0::2], past[1::2])
        want = [logits.numpy()] + [x[:, :, -1:].numpy() for pair in zip(keys, values) for x in pair]
        slots = np.zeros((batch, capacity), np.int64)
        slots[:, :seq + step] = mask[:, :-1]  # the graph's mask covers valid past slots only
        feeds = {"inputs_embeds": embeds, "position_ids": positions, "attention_mask": slots}
        feeds.update(zip(kv_names("past_key_values", layers), buffers["ref" if step == 0 else "ort"]))
        got = session(folder, "decode").run(None, feeds)
        assert len(got) == 1 + 2 * layers and got[1].shape == (batch, t.num_kv_heads, 1, t.head_dim)
        assert max(max_abs(g, w) for g, w in zip(got, want)) <= TOL
        for road, new in (("ref", want[1:]), ("ort", got[1:])):
            for buf, slot in zip(buffers[road], new):
                buf[:, :, :, seq + step] = slot[:, :, 0]
        past = [torch.cat([p, torch.from_numpy(w)], dim=2) for p, w in zip(past, want[1:])]


# ------------------------------------------------------------------------------------------ the files

@pytest.mark.parametrize("name", PRESETS)
def test_folder_is_standard_onnx_with_a_matching_manifest(exported, name):
    folder = exported(name)
    manifest = Manifest.load(folder)
    model = reference(name)
    assert manifest.family == model.config.model_type and manifest.precision == "fp32"
    assert manifest.config == json.loads(json.dumps(model.config.to_dict()))
    assert set(manifest.graphs) == {"vision", "prefill", "decode"}
    for role, spec in manifest.graphs.items():
        path = folder / spec.file
        onnx.checker.check_model(str(path), full_check=True)
        proto = onnx.load(str(path))
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
        assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"} and not proto.functions
        assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
        assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [manifest.opset]
        real = interface(proto)
        assert [vars(t) for t in spec.inputs] == real["inputs"], role
        assert [vars(t) for t in spec.outputs] == real["outputs"], role
    dims = {d for spec in manifest.graphs.values() for t in spec.inputs + spec.outputs for d in t.shape if isinstance(d, str)}
    assert dims == {"batch", "seq", "capacity", "num_patches", "num_tokens"}
    kv_cache = manifest.extra["kv_cache"]
    assert kv_cache["mode"] == "fixed-capacity" and kv_cache["layout"] == "bhdc" and kv_cache["capacity_dim"] == "capacity"
    t = model.config.text
    assert manifest.graphs["decode"].inputs[3].shape == ["batch", t.num_kv_heads, t.head_dim, "capacity"]
    table = np.load(folder / manifest.embeddings["file"], mmap_mode="r")
    assert list(table.shape) == manifest.embeddings["shape"] and str(table.dtype) == manifest.embeddings["dtype"]
    assert np.array_equal(table, model.model.language_model.embed_tokens.weight.detach().numpy())
    assert manifest.tokenizer == "tokenizer.json" and (folder / "tokenizer.json").is_file()
    c = model.config
    assert manifest.special_tokens["<|image|>"] == c.image_token_id
    assert manifest.special_tokens["[gMASK]"] == 3 and manifest.special_tokens["<|assistant|>"] == 6
    assert manifest.eos_token_ids == list(c.text.eos_token_ids) and manifest.chat_format == "glm"
    assert manifest.preprocessing["patch_size"] == c.vision.patch_size
    assert not [p for p in folder.parent.iterdir() if ".partial-" in p.name]


def test_prefill_and_decode_weights_are_stored_once(exported, tmp_path, capsys):
    """Both text graphs point into one text.onnx.data in which each distinct tensor is stored once; the manifest's
    table matches the graphs; the runtime's shared-weights mode maps it once and generates the same tokens."""
    from onnx import numpy_helper

    from glmtrt.runtime.pipeline import Pipeline

    folder = exported("tiny-glm-ocr")
    manifest = Manifest.load(folder)
    record = manifest.shared_weights
    assert record["file"] == "text.onnx.data" and record["file"] in manifest.files
    assert not (folder / "prefill.onnx.data").exists() and not (folder / "decode.onnx.data").exists()
    data = np.memmap(folder / record["file"], dtype=np.uint8, mode="r")
    offsets = {}
    for role in ("prefill", "decode"):
        table = record["graphs"][role]
        proto = onnx.load(str(folder / f"{role}.onnx"), load_external_data=False)
        external = {t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
        assert external == set(table) and len(table) >= 10, role
        values = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(folder / f"{role}.onnx")).graph.initializer}
        for name, (offset, length, _dtype, shape) in table.items():
            want = values[name]
            assert list(want.shape) == shape and want.nbytes == length and offset % 65536 == 0
            assert bytes(data[offset:offset + length]) == want.tobytes(), (role, name)
        offsets[role] = {offset for offset, *_ in table.values()}
    # The decoder's projections and the LM head are identical in both traces: decode adds nothing new.
    assert offsets["decode"] <= offsets["prefill"]
    stored = {(offset, length) for r in record["graphs"].values() for offset, length, *_ in r.values()}
    unique = sum(length for _, length in stored)
    assert unique <= 0.55 * sum(e[1] for r in record["graphs"].values() for e in r.values())

    tokens = {}
    for share in (False, True):
        with Pipeline.from_engines(folder, share_weights=share) as pipe:
            tokens[share] = pipe.generate("Describe the image.", max_new_tokens=16, eos_token_ids=[]).token_ids
            assert pipe.backend.shared_bytes == (unique if share else 0)
    assert tokens[True] == tokens[False] and len(tokens[True]) == 16

    older = tmp_path / "older"
    older.mkdir()
    for path in folder.iterdir():
        (older / path.name).symlink_to(path)
    raw = json.loads((folder / MANIFEST_NAME).read_text())
    del raw["shared_weights"]
    (older / MANIFEST_NAME).unlink()
    (older / MANIFEST_NAME).write_text(json.dumps(raw))
    with Pipeline.from_engines(older) as pipe:  # a folder from before: read as it is
        assert pipe.generate("Describe the image.", max_new_tokens=16, eos_token_ids=[]).token_ids == tokens[False]
    with pytest.raises(GlmTrtError, match="re-export it to use share_weights"):
        Pipeline.from_engines(older, share_weights=True)
    with pytest.raises(GlmTrtError, match="cpu provider only"):
        Pipeline.from_engines(folder, provider="cuda", share_weights=True)
    from glmtrt.runtime.cli import main

    assert main(["run", "--engines", str(older), "--prompt", "x", "--share-weights"]) == 2
    err = capsys.readouterr().err.strip()
    assert "re-export it to use share_weights" in err and "\n" not in err
    assert main(["run", "--engines", str(folder), "--prompt", "x", "--max-new-tokens", "3", "--share-weights"]) == 0


def test_external_data_graph(exported, tmp_path, monkeypatch):
    """Graphs too big for one protobuf keep their weights in <graph>.onnx.data; they check and run the same."""
    from glmtrt.export import onnx as onnx_module
    from glmtrt.export.graphs import vision_graph

    monkeypatch.setattr(onnx_module, "EXTERNAL_DATA_THRESHOLD", 0)
    result = onnx_module.export_graph(vision_graph(reference("tiny-glm-ocr")), tmp_path)
    assert result.external_data and (tmp_path / "vision.onnx.data").is_file()
    v = reference("tiny-glm-ocr").config.vision
    tables = vision_tables([(1, 4, 4)], kind=v.kind, head_dim=v.head_dim, rope_theta=v.rope_theta,
                           merge_size=v.spatial_merge_size, table_side=v.pos_table_side)
    feeds = {"pixel_values": np.random.default_rng(0).standard_normal((16, v.patch_dim)).astype(np.float32),
             "rotary_cos": tables["rotary_cos"], "rotary_sin": tables["rotary_sin"]}
    (got,) = session(tmp_path, "vision").run(None, feeds)
    (want,) = session(exported("tiny-glm-ocr"), "vision").run(None, feeds)
    assert np.array_equal(got, want)


def test_checkpoint_folder_assets(tmp_path, monkeypatch):
    """A checkpoint's tokenizer, chat template (from tokenizer_config.json), generation_config and preprocessor
    config reach the manifest; the graphs are stubbed (their parity is tested on the presets)."""
    from glmtrt.export import folder as folder_module
    from glmtrt.reference import save_preset_checkpoint
    from glmtrt.reference.tokenizer import TINY_GLM4V_SPECIALS, build_char_tokenizer

    ckpt = save_preset_checkpoint("tiny-glm-ocr", tmp_path / "ckpt")
    build_char_tokenizer(TINY_GLM4V_SPECIALS).save(str(ckpt / "tokenizer.json"))
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"chat_template": "[gMASK]<sop>{{ messages }}"}))
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7], "do_sample": False, "top_k": 1}))
    (ckpt / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 3136, "longest_edge": 100352}}))
    monkeypatch.setattr("glmtrt.export.graphs.graph_definitions", lambda model: [])
    out = folder_module.export_model(ckpt, tmp_path / "out", progress=False)
    raw = json.loads((out / MANIFEST_NAME).read_text())
    assert raw["chat_template"] == "chat_template.jinja"
    assert (out / "chat_template.jinja").read_text() == "[gMASK]<sop>{{ messages }}"
    assert (out / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    assert raw["eos_token_ids"] == [1, 7] and raw["generation"] == {"do_sample": False, "top_k": 1}
    assert raw["preprocessing"]["size"] == {"shortest_edge": 3136, "longest_edge": 100352}


# ------------------------------------------------------------------------------------------ refusals

def test_refuses_existing_output_without_force(tmp_path):
    from glmtrt.export import export_model

    out = tmp_path / "engines"
    out.mkdir()
    with pytest.raises(GlmTrtError, match="already exists.*--force"):
        export_model("tiny-glm-ocr", out, progress=False)


def test_force_refuses_a_folder_that_is_not_an_export(tmp_path):
    from glmtrt.export import export_model

    out = tmp_path / "photos"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(GlmTrtError, match="not a glmtrt export"):
        export_model("tiny-glm-ocr", out, force=True, progress=False)
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("kwargs,message", [
    (dict(model="tiny-glm-nope"), "neither a checkpoint folder nor a preset"),
    (dict(precision="bf16"), "precision 'bf16' is not available; choose one of: fp32, fp16, int8, cpu-int8, cpu-int4"),
    (dict(opset=11), "opset 11 is not supported"),
    (dict(model="tiny-glm-image", precision="fp16"), "exports at fp32 only for now"),
])
def test_refusals(tmp_path, kwargs, message):
    from glmtrt.export import export_model

    kwargs = {"model": "tiny-glm-ocr", **kwargs}
    with pytest.raises(GlmTrtError, match=message):
        export_model(kwargs.pop("model"), tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_cli_error_is_one_line_and_exit_2(tmp_path, capsys):
    from glmtrt.runtime.cli import main

    assert main(["export", "tiny-glm-nope", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("glmtrt export: error:") and "\n" not in err


def test_forced_replacement_is_atomic(tmp_path, monkeypatch):
    """With force, the old export survives a failed export and is replaced only by a complete one."""
    from glmtrt.export import folder as folder_module

    out = tmp_path / "engines"
    out.mkdir()
    (out / MANIFEST_NAME).write_text("old")

    def failing(source, assets, folder, **kwargs):
        (folder / "vision.onnx").write_text("half")
        raise RuntimeError("boom")

    monkeypatch.setattr(folder_module, "_write_folder", failing)
    with pytest.raises(RuntimeError, match="boom"):
        folder_module.export_model("tiny-glm-ocr", out, force=True, progress=False)
    assert (out / MANIFEST_NAME).read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["engines"]

    def complete(source, assets, folder, **kwargs):
        (folder / MANIFEST_NAME).write_text("new")
        return folder_module.ExportResult(folder=folder, family="glm_ocr")

    monkeypatch.setattr(folder_module, "_write_folder", complete)
    assert folder_module.export_model("tiny-glm-ocr", out, force=True, progress=False) == out
    assert (out / MANIFEST_NAME).read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["engines"]


# ------------------------------------------------------------------------------------------ crash safety

def _manifests_under(folder: Path) -> list[str]:
    return [os.path.join(root, f) for root, _, files in os.walk(folder) for f in files if f == MANIFEST_NAME]


def test_killed_export_leaves_no_folder_and_a_rerun_succeeds(tmp_path, monkeypatch, capsys):
    out = tmp_path / "engines"
    cmd = [sys.executable, "-m", "glmtrt.runtime.cli", "export", "tiny-glm-ocr", "--out", str(out)]
    proc = subprocess.Popen(cmd + ["--quiet"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not list(tmp_path.glob(".engines.partial-*/*.onnx")):
            assert proc.poll() is None, f"export ended before it could be killed: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no graph written within 120 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    assert _manifests_under(tmp_path) == []
    assert list(tmp_path.glob(".engines.partial-*"))  # the half-written folder is hidden, not at --out

    # the rerun goes through the same CLI, in this process (saves a second torch import)
    from glmtrt.runtime.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["export", "tiny-glm-ocr", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for graph in ("vision", "prefill", "decode"):
        assert f"  {graph} " in printed
    assert f"to {out} in " in printed
    assert Manifest.load(out).family == "glm_ocr"
    assert not list(tmp_path.glob(".engines.*"))  # the killed run's partial folder was cleaned up


def test_attention_cost_command_runs(capsys):
    """The README's decode-attention comparison, on the tiny preset: the three formulations attend over the same
    keys and values and give the same outputs, and the table is printed."""
    from glmtrt.export.attention_cost import FORMULATIONS, main, measure

    results = measure("tiny-glm-ocr", contexts=(8, 40), repeats=1)
    assert set(results) == set(FORMULATIONS)
    for name, rows in results.items():
        for row in rows.values():
            assert row["ms"] > 0 and row["max_abs_vs_split_softmax"] <= 1e-5, (name, row)
    assert main(["--preset", "tiny-glm-ocr", "--context", "8", "--repeats", "1", "--formulations", "split-softmax"]) == 0
    assert "| split-softmax | " in capsys.readouterr().out
