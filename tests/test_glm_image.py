"""GLM-Image's autoregressive prior, exported and run end to end (tiny preset, fp32, ONNX Runtime CPU).

The graphs against the reference stage they replace (image tokenizer codes, prefill / decode logits along the
generation), the two roads' tokens (greedy and seeded sampling, text-to-image and image-to-image: one loop, one
sampler), the grids' shapes against transformers' processor, the JSON file and the CLI's errors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from glmtrt.export.onnx import check_graph_file
from glmtrt.reference import load_reference
from glmtrt.reference.image_generate import ReferenceImageStages, generate_image_tokens
from glmtrt.runtime.cli import main
from glmtrt.runtime.errors import InputError
from glmtrt.runtime.image_generation import (
    IMAGE_TO_IMAGE, TEXT_TO_IMAGE, TOKENS_FORMAT, ImageGenerator, LogitsRecorder, parse_target_size,
    run_image_generation, target_grids,
)
from glmtrt.runtime.manifest import Manifest
from glmtrt.runtime.vision_tables import vision_tables

PRESET = "tiny-glm-image"
T2I = dict(prompt="a red fox in the snow", images=(), target_size="128x96")  # large 4x3 + preview 18x13
I2I = dict(prompt="a red fox", target_size="192x160")  # large 6x5, one 96x96 source (3x3 codes)
BLOCK_TORCH = textwrap.dedent("""
    import sys
    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                raise ImportError(f"{name} is blocked in this test")
            return None
    sys.meta_path.insert(0, _NoTorch())
""")


def source_image(size=(96, 96), seed: int = 3) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def folder(exported) -> Path:
    return Path(exported(PRESET))


@pytest.fixture(scope="module")
def gen(folder):
    with ImageGenerator.from_engines(folder, threads=1) as g:
        yield g


@pytest.fixture(scope="module")
def model():
    return load_reference(PRESET)


def request(gen, mode: str):
    if mode == "t2i":
        return gen.prepare(T2I["prompt"], (), T2I["target_size"])
    return gen.prepare(I2I["prompt"], [source_image()], I2I["target_size"])


# ----------------------------------------------------------------------------------------------- the folder

def test_export_writes_the_image_prior_graphs_and_a_manifest_the_runtime_needs(folder, model):
    from glmtrt.export.lint import lint_engines

    manifest = Manifest.load(folder)
    assert manifest.family == "glm_image"
    tokenizer = manifest.graphs["vision"]
    assert tokenizer.file == "image_tokenizer.onnx"
    assert [(t.name, t.dtype, t.shape) for t in tokenizer.inputs] == [
        ("pixel_values", "float32", ["num_patches", 768]), ("tap_index", "int64", ["num_patches", 4]),
        ("tap_weight", "float32", ["num_patches", 4])]
    assert [(t.name, t.dtype, t.shape) for t in tokenizer.outputs] == [("image_codes", "int64", ["num_patches"])]
    for role in ("prefill", "decode"):  # logits over the visual vocabulary, not the text vocabulary
        logits = {t.name: t for t in manifest.graphs[role].outputs}["logits"]
        assert logits.shape == ["batch", 272]
        check_graph_file(folder / manifest.graphs[role].file)
    check_graph_file(folder / tokenizer.file)
    record = manifest.extra["glm_image"]
    assert record["num_codes"] == model.config.vq.num_embeddings == 256
    assert (record["image_start_token_id"], record["image_end_token_id"], record["image_token_id"]) == (256, 257, 310)
    assert record["codes_output"] == "image_codes"
    assert manifest.extra["kv_cache"]["mode"] == "fixed-capacity"
    assert (manifest.preprocessing["patch_size"], manifest.preprocessing["temporal_patch_size"],
            manifest.preprocessing["merge_size"]) == (16, 1, 1)
    for token in ("<sop>", "<eop>", "<|image|>"):
        assert token in manifest.special_tokens
    assert lint_engines(folder) == {"vision": [], "prefill": [], "decode": []}  # TensorRT parser: clean


# ----------------------------------------------------------------------------------------------- graph parity

@pytest.mark.parametrize("grid", [(1, 3, 4), (1, 5, 3), (1, 8, 6), (1, 7, 9)], ids=lambda g: f"{g[1]}x{g[2]}")
def test_image_tokenizer_graph_codes_equal_the_reference(gen, model, grid):
    """Codes of the exported tower + VQ equal the reference's on every patch (grids beyond the 4x4 position table
    exercise the bilinear taps); the smallest gap between a patch's best and second-best codebook distance says
    how far from a tie the comparison is."""
    v = model.config.vision
    n = int(np.prod(grid))
    pixels = np.random.default_rng(n).standard_normal((n, v.patch_dim)).astype(np.float32)
    tables = vision_tables([grid], kind=v.kind, head_dim=v.head_dim, rope_theta=v.rope_theta,
                           merge_size=v.spatial_merge_size, table_side=v.pos_table_side)
    want = model.vision(torch.from_numpy(pixels), **{k: torch.from_numpy(a) for k, a in tables.items()}).numpy()
    got = gen.stages.image_codes({"pixel_values": pixels, **tables})
    assert got.dtype == np.int64 and got.shape == (n,)
    np.testing.assert_array_equal(got, want)
    assert len(set(want.tolist())) > 1
    with torch.no_grad():  # the margin, recomputed from the reference's own modules
        features = model.model.visual(torch.from_numpy(pixels), torch.from_numpy(tables["tap_index"]),
                                      torch.from_numpy(tables["tap_weight"]), None)
        vq = model.model.vqmodel
        z = torch.nn.functional.normalize(vq.quant_conv(features.T[None, :, None, :])[0, :, 0].T, dim=-1)
        book = torch.nn.functional.normalize(vq.quantize.embedding.weight, dim=-1)
        two = torch.topk((2 - 2 * z @ book.T), 2, dim=1, largest=False).values
    print(f"image tokenizer {grid[1]}x{grid[2]}: {n}/{n} codes identical, smallest best-vs-second distance gap "
          f"{(two[:, 1] - two[:, 0]).min().item():.2e}")


# ----------------------------------------------------------------------------------------------- two roads

@pytest.mark.parametrize("mode", ["t2i", "i2i"])
def test_greedy_tokens_identical_between_reference_and_runtime(gen, model, mode):
    prompt = request(gen, mode)
    options = gen.options(temperature=0)
    assert options.greedy
    runtime_road, reference_road = LogitsRecorder(gen.stages), LogitsRecorder(ReferenceImageStages(model))
    ours = run_image_generation(runtime_road, gen.host, prompt, options, num_codes=gen.num_codes)
    ref = run_image_generation(reference_road, gen.host, prompt, options, num_codes=gen.num_codes)
    assert ours.token_ids == ref.token_ids
    assert len(ours.token_ids) == prompt.targets.num_tokens
    assert len(set(ours.token_ids)) > 1  # not one token repeated: the comparison can tell roads apart
    for a, b in zip(ours.sources, ref.sources):
        np.testing.assert_array_equal(a, b)
    # The same tokens in, so each step's logits compare the graphs with the reference (teacher-forced).
    assert len(runtime_road.logits) == len(reference_road.logits) == prompt.targets.num_tokens
    errors = [float(np.abs(a - b).max()) for a, b in zip(runtime_road.logits, reference_road.logits)]
    top2 = np.sort(np.concatenate(reference_road.logits)[:, :gen.num_codes], axis=1)[:, -2:]
    print(f"{mode}: {len(ours.token_ids)} greedy tokens identical; prefill logits max abs {errors[0]:.1e}, decode "
          f"max abs {max(errors[1:]):.1e}; smallest top-1 margin {(top2[:, 1] - top2[:, 0]).min():.1e}")
    assert max(errors) <= 1e-4


@pytest.mark.parametrize("mode", ["t2i", "i2i"])
def test_seeded_sampling_identical_between_reference_and_runtime(gen, model, mode):
    """The default is sampling; one seed gives the same draws on both roads (the shared numpy sampler)."""
    prompt = request(gen, mode)
    options = gen.options(seed=1234, top_k=0)  # top-k off: every code can be drawn
    assert not options.greedy and options.seed == 1234
    ours = gen.generate_prompt(prompt, options=options)
    ref = generate_image_tokens(model, prompt, options)
    assert ours.token_ids == ref.token_ids
    np.testing.assert_array_equal(ours.large, ref.large)
    assert ours.sampling == ref.sampling and ours.sampling["seed"] == 1234
    again = gen.generate_prompt(prompt, seed=1234, top_k=0)
    assert again.token_ids == ours.token_ids  # reproducible
    other = gen.generate_prompt(prompt, seed=1235, top_k=0)
    assert other.token_ids != ours.token_ids  # the seed matters
    greedy = gen.generate_prompt(prompt, temperature=0)
    assert greedy.token_ids != ours.token_ids  # and sampling is not greedy
    print(f"{mode}: {len(ours.token_ids)} sampled tokens (seed 1234, {len(set(ours.token_ids))} distinct) identical")


def test_sampling_is_the_default_and_its_seed_is_recorded(gen):
    prompt = request(gen, "t2i")
    first = gen.generate_prompt(prompt)
    assert not first.sampling["greedy"] and isinstance(first.sampling["seed"], int)
    assert (first.sampling["temperature"], first.sampling["top_k"], first.sampling["top_p"]) == (1.0, 50, 1.0)
    replay = gen.generate_prompt(prompt, seed=first.sampling["seed"])
    assert replay.token_ids == first.token_ids


# ----------------------------------------------------------------------------------------------- grids

@pytest.mark.parametrize("size", [(1152, 768), (768, 1152), (1024, 1024), (500, 1300), (33, 40)])
def test_target_grids_match_transformers_processor(size):
    from transformers import GlmImageProcessor

    h, w = size
    token_h, token_w, prev_h, prev_w = GlmImageProcessor._get_target_shape(None, height=h, width=w)
    t2i = target_grids(f"{h}x{w}", TEXT_TO_IMAGE)
    assert t2i.large == (token_h, token_w) and t2i.preview == (prev_h, prev_w)
    assert t2i.num_tokens == token_h * token_w + prev_h * prev_w
    assert t2i.grid_rows.tolist() == GlmImageProcessor._build_target_image_grid_thw(
        token_h, token_w, prev_h, prev_w, is_text_to_image=True).tolist()
    i2i = target_grids(size, IMAGE_TO_IMAGE)
    assert i2i.preview is None and i2i.grid_rows.tolist() == [[1, token_h, token_w]]


def test_generated_grids_have_the_processor_shapes(gen):
    """The default target, 1152x768: a 19x13 preview then a 36x24 large grid (1111 tokens), all codebook ids."""
    t2i = gen.generate("a lighthouse at dusk", seed=0)
    assert t2i.mode == TEXT_TO_IMAGE and t2i.target_size == (1152, 768)
    assert t2i.preview.shape == (19, 13) and t2i.large.shape == (36, 24)
    assert t2i.preview.dtype == t2i.large.dtype == np.int64
    assert len(t2i.token_ids) == 19 * 13 + 36 * 24
    assert t2i.preview.ravel().tolist() + t2i.large.ravel().tolist() == t2i.token_ids
    assert 0 <= min(t2i.token_ids) and max(t2i.token_ids) < gen.num_codes
    i2i = gen.generate("the same, at night", [source_image((150, 100))], target_size="96x128", seed=0)
    assert i2i.mode == IMAGE_TO_IMAGE and i2i.preview is None and i2i.large.shape == (3, 4)
    assert [s.shape for s in i2i.sources] == [(5, 3)]  # 150x100 halved to 80x48 px -> 5x3 codes
    assert i2i.prompt_token_ids[:17] == [256] + [310] * 15 + [257]


def test_prompt_layout_follows_the_processor(gen):
    chat = gen.pipeline.chat
    s = chat.special_tokens
    t2i = gen.prepare("<sop>hi", (), "128x96").input_ids.tolist()
    grid_suffix = ([s["<sop>"]] + chat.encode_text("4 3") + [s["<eop>"]] + [s["<sop>"]] + chat.encode_text("18 13")
                   + [s["<eop>"], 256])
    assert t2i == chat.encode_text("<sop>hi") + grid_suffix  # user text never becomes a special token
    assert t2i.count(s["<sop>"]) == 2
    i2i = gen.prepare("hi", [source_image()], "128x96").input_ids.tolist()
    assert i2i == [256] + [310] * 9 + [257] + chat.encode_text("hi") + grid_suffix[:len(chat.encode_text("4 3")) + 2] \
        + [256]


# ----------------------------------------------------------------------------------------------- the JSON and CLI

def test_cli_writes_tokens_json_atomically_and_torch_free(folder, gen, tmp_path):
    out = tmp_path / "tokens.json"
    out.write_text("old")  # replaced whole
    src = tmp_path / "src.png"
    source_image().save(src)
    script = BLOCK_TORCH + textwrap.dedent("""
        from glmtrt.runtime.cli import main
        code = main(sys.argv[1:])
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
        sys.exit(code)
    """)
    for extra in ([], ["--image", str(src)]):
        proc = subprocess.run([sys.executable, "-c", script, "run", "--engines", str(folder), "--prompt", "a red fox",
                               "--target-size", "128x96", "--seed", "7", "--out", str(out), *extra],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "" and "-> " + str(out) in proc.stderr
        data = json.loads(out.read_text())
        expected = gen.generate("a red fox", [src] if extra else [], target_size="128x96", seed=7)
        assert data["format"] == TOKENS_FORMAT and data["version"] == 1
        assert data["mode"] == expected.mode and data["target_size"] == {"height": 128, "width": 96}
        assert data["token_ids"] == expected.token_ids
        assert data["large"]["tokens"] == expected.large.tolist()
        assert (data["large"]["height"], data["large"]["width"]) == (4, 3)
        if extra:
            assert data["preview"] is None and (data["sources"][0]["height"], data["sources"][0]["width"]) == (3, 3)
        else:
            assert data["preview"]["tokens"] == expected.preview.tolist() and data["sources"] == []
        assert data["sampling"]["seed"] == 7 and not data["sampling"]["greedy"]
        assert data["prompt_token_ids"] == expected.prompt_token_ids
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.png", "tokens.json"]  # no partial file left


def test_tokens_json_write_is_atomic_when_interrupted(gen, tmp_path, monkeypatch):
    tokens = gen.generate_prompt(request(gen, "t2i"), temperature=0)
    path = tokens.save(tmp_path / "tokens.json")
    before = path.read_text()
    assert json.loads(before) == json.loads(json.dumps(tokens.to_dict()))

    def fail(*args):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="simulated"):
        gen.generate_prompt(request(gen, "t2i"), seed=9).save(path)
    assert path.read_text() == before  # the old file whole
    assert [p.name for p in tmp_path.iterdir()] == ["tokens.json"]  # and no temporary file


def cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err
    if code != 0:
        assert code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("glmtrt run: error: ") and "Traceback" not in err, err
    return code, err


@pytest.mark.parametrize("size,message", [
    ("1152", "target size must be HEIGHTxWIDTH in pixels, e.g. 1152x768; got '1152'"),
    ("wide", "target size must be HEIGHTxWIDTH in pixels"),
    ("1152x-768", "target size must be HEIGHTxWIDTH in pixels"),
    ("16x768", "target size 16x768 is too small"),
    ("32x9000", "aspect ratio beyond what GLM-Image's preview grid can hold"),
])
def test_bad_target_size_is_one_clear_line(folder, tmp_path, capsys, size, message):
    out = tmp_path / "tokens.json"
    code, err = cli(capsys, "run", "--engines", str(folder), "--prompt", "a fox", "--target-size", size,
                    "--out", str(out))
    assert code == 2 and message in err
    assert not out.exists()
    with pytest.raises(InputError, match="target size|aspect ratio"):
        target_grids(size)


def test_other_cli_mistakes_are_one_clear_line(folder, tmp_path, capsys):
    tiny = tmp_path / "tiny.png"
    source_image((10, 40)).save(tiny)
    cases = [
        (["--out", str(tmp_path / "missing" / "t.json")], "the folder of output"),
        (["--image", str(tiny)], "GLM-Image source images need both sides >= 16 px"),
        (["--out", str(tmp_path)], "is a folder"),
        (["--max-new-tokens", "5"], "--max-new-tokens does not apply to GLM-Image"),
        (["--video", str(tiny)], "--video does not apply to GLM-Image"),
        (["--image", str(tmp_path / "nope.png")], "does not exist"),
        (["--temperature", "-1"], "temperature must be >= 0"),
    ]
    for extra, message in cases:
        code, err = cli(capsys, "run", "--engines", str(folder), "--prompt", "a fox", *extra)
        assert code == 2 and message in err, (extra, err)
    other = tmp_path / "ocr"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"family": "glm_ocr"}))
    code, err = cli(capsys, "run", "--engines", str(other), "--prompt", "x", "--target-size", "1152x768")
    assert code == 2 and "--target-size is for GLM-Image engines folders" in err


def test_parity_command_on_a_glm_image_folder(folder, tmp_path, capsys):
    """`glmtrt parity` on a GLM-Image folder: both requests greedy on both roads, logits compared while the
    tokens agree; the fp32 bounds hold."""
    out = tmp_path / "parity.json"
    code, _ = cli(capsys, "parity", "--engines", str(folder), "--json", str(out))
    report = json.loads(out.read_text())
    assert code == 0 and report["passed"] and report["family"] == "glm_image"
    cases = {c["name"]: c for c in report["cases"]}
    assert cases["text-to-image"]["source_codes_identical"] is None
    assert cases["image-to-image"]["source_codes_identical"] is True
    for c in cases.values():
        assert c["greedy_identical"] and c["greedy_match_prefix"] == c["greedy_tokens"] > 0
        assert max(c["prefill_logits_max_abs"], c["decode_max_logit_error"]) <= 1e-4 and c["top1_agreement"] == 1.0
    assert main(["parity", "--engines", str(folder), "--backend", "trt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("glmtrt parity: error: ") and "drop --backend trt" in err and "\n" not in err


def test_parse_target_size_and_options():
    assert parse_target_size("1152x768") == (1152, 768) == parse_target_size(" 1152 X 768 ")
    assert parse_target_size((64, 96)) == (64, 96)
    for bad in ("", "1152x", (1.5, 64), (True, 64), None):
        with pytest.raises(InputError):
            parse_target_size(bad)
    from glmtrt.runtime.image_generation import image_options

    with pytest.raises(InputError, match="the target grids fix the length"):
        image_options(max_new_tokens=10)
    greedy = image_options({"do_sample": False, "temperature": 0.9, "top_p": 0.75}, temperature=0, seed=3)
    assert greedy.greedy and greedy.seed is None
    sampled = image_options({"do_sample": False, "temperature": 0.9, "top_p": 0.75})  # a checkpoint's defaults
    assert (sampled.temperature, sampled.top_k, sampled.top_p) == (0.9, 50, 0.75) and sampled.seed is not None
