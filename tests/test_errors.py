"""Bad input, faults and misuse (issue 8): every case gives a documented GlmTrtError subclass from the Python API, one
line and exit 2 from the CLI, and leaves no broken file behind. docs/errors.md lists the cases with their tests."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from glmtrt.reference.tokenizer import TINY_GLM4V_SPECIALS as SP
from glmtrt.runtime import preprocess as pp
from glmtrt.runtime.cli import main
from glmtrt.runtime.errors import CheckpointError, ConfigError, EngineError, GlmTrtError, InputError
from glmtrt.runtime.manifest import MANIFEST_NAME, Manifest, ManifestError
from glmtrt.runtime.pipeline import Pipeline

MODEL = "tiny-glm-ocr"


# ------------------------------------------------------------------------------------------------ helpers

def picture(height: int, width: int, seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], axis=-1)
    return PIL.Image.fromarray(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8))


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (RGB) and whose data is empty: opening reads only the header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def cli(capsys, *args: str) -> tuple[int, str]:
    """Run the CLI in this process; returns (exit code, stderr) and checks the one-line error shape."""
    code = main(list(args))
    err = capsys.readouterr().err
    if code != 0:
        assert code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"glmtrt {args[0]}: error: "), err
        assert "Traceback" not in err
    return code, err


def one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and text
    return text


@pytest.fixture(scope="module")
def engines(exported):
    return exported(MODEL)


@pytest.fixture(scope="module")
def pipe(engines):
    return Pipeline.from_engines(engines)


@pytest.fixture
def copy(engines, tmp_path):
    return Path(shutil.copytree(engines, tmp_path / "engines"))


@pytest.fixture
def no_graphs(pipe, monkeypatch):
    """Fail the test if any graph runs."""
    def refuse(*args, **kwargs):
        raise AssertionError("a graph ran")

    monkeypatch.setattr(pipe.backend, "run", refuse)
    monkeypatch.setattr(pipe.backend, "start_decode", refuse)
    return pipe


# ------------------------------------------------------------------------------------------------ images

def _bad_file(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.img"
    if kind == "missing":
        return tmp_path / "missing.png"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not an image\n")
    else:  # truncated jpeg / png: the first half of a valid file
        fmt = kind.split("-")[1]
        full = tmp_path / f"full.{fmt}"
        picture(120, 160).save(full, format="JPEG" if fmt == "jpeg" else "PNG")
        data = full.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    return path


@pytest.mark.parametrize("kind,message", [
    ("missing", "image file not found"),
    ("empty", "cannot read .* as an image"),
    ("text", "cannot read .* as an image"),
    ("truncated-jpeg", "truncated or damaged"),
    ("truncated-png", "truncated or damaged"),
])
def test_bad_image_files(pipe, tmp_path, kind, message):
    path = _bad_file(kind, tmp_path)
    with pytest.raises(InputError, match=message) as info:
        pipe.generate("x", [str(path)], max_new_tokens=2)
    one_line(info.value)
    with pytest.raises(InputError, match=message):
        pp.preprocess_images([path], pipe.image_config)  # the host function too, not only the pipeline


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated-png"])
def test_bad_image_files_cli(engines, tmp_path, capsys, kind):
    path = _bad_file(kind, tmp_path)
    code, err = cli(capsys, "run", "--engines", str(engines), "--prompt", "x", "--image", str(path))
    assert code == 2 and str(path) in err


def test_one_pixel_image_is_upscaled_to_the_smallest_grid(pipe, tmp_path):
    path = tmp_path / "one.png"
    PIL.Image.new("RGB", (1, 1), (200, 10, 30)).save(path)
    vision = pipe.preprocess([str(path)])
    assert vision.grid_thw.tolist() == [[1, 6, 6]]  # up to 28 px, then to the min-pixel budget: 84 x 84 px
    result = pipe.generate("x", [str(path)], max_new_tokens=3, eos_token_ids=())
    assert len(result.token_ids) == 3


def test_aspect_ratio_beyond_the_limit(pipe, tmp_path):
    path = tmp_path / "strip.png"
    PIL.Image.new("RGB", (2900, 14)).save(path)  # 207:1, the GLM-4V processor's limit is 200
    with pytest.raises(InputError, match="aspect ratio 207.1 is above 200"):
        pipe.generate("x", [str(path)], max_new_tokens=2)


@pytest.mark.parametrize("side", [10_000, 20_000], ids=["above-MAX_IMAGE_PIXELS", "above-twice-MAX_IMAGE_PIXELS"])
def test_decompression_bomb_is_refused_before_decoding(pipe, tmp_path, side):
    """PIL warns above MAX_IMAGE_PIXELS (89.5 M) and refuses above twice that; both are our InputError, raised from
    the header alone (the file holds no pixel data, so a decode would fail differently)."""
    assert side * side > PIL.Image.MAX_IMAGE_PIXELS
    path = png_header_only(tmp_path / "bomb.png", side, side)
    with pytest.raises(InputError, match="too large to decode safely.*MAX_IMAGE_PIXELS") as info:
        pipe.generate("x", [str(path)], max_new_tokens=2)
    one_line(info.value)


def test_decompression_bomb_cli(engines, tmp_path, capsys):
    path = png_header_only(tmp_path / "bomb.png", 20_000, 20_000)
    code, err = cli(capsys, "run", "--engines", str(engines), "--prompt", "x", "--image", str(path))
    assert code == 2 and "too large to decode safely" in err


MEMORY_PROBE = textwrap.dedent("""
    import json, resource, sys
    from glmtrt.runtime import preprocess as pp
    config = pp.ImageProcessorConfig(min_pixels=28 * 28, max_pixels=2 * 28 * 28 * 256)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = pp.preprocess_images([sys.argv[1]], config)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"grid": out.grid_thw[0].tolist(), "peak_kib": after - before, "out": out.pixel_values.nbytes}))
""")


def test_image_over_the_pixel_budget_is_resized_in_bounded_memory(tmp_path):
    """A 4000 x 3000 photo (12 M pixels, within PIL's guard) is brought within a 256-token budget; the extra peak memory
    is at most about one decoded copy (RGBX, 4 bytes a pixel) — not one per conversion step, and no float64 image."""
    height, width = 3000, 4000
    path = tmp_path / "big.png"
    picture(height // 8, width // 8).resize((width, height)).save(path, compress_level=1)
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    _, h, w = report["grid"]
    assert 2 * h * w * 14 * 14 <= 2 * 28 * 28 * 256  # within the budget
    decoded = height * width * 4
    assert report["peak_kib"] * 1024 <= 1.3 * decoded + 4 * report["out"] + (16 << 20), report


def _mode_files(tmp_path: Path) -> dict[str, Path]:
    base = picture(90, 61, seed=3)
    rng = np.random.default_rng(4)
    files = {}

    def save(name, image, **kwargs):
        files[name] = tmp_path / name
        image.save(files[name], **kwargs)

    save("gray.png", base.convert("L"))
    save("rgba.png", base.convert("RGBA"))
    save("cmyk.jpg", base.convert("CMYK"))
    save("16bit.png", PIL.Image.fromarray(rng.integers(0, 65535, (90, 61)).astype(np.uint16)))  # mode I;16
    save("palette.png", base.quantize(64))
    save("palette-transparent.png", base.quantize(16), transparency=3)
    save("rgb-trns.png", base, transparency=tuple(int(v) for v in np.asarray(base)[0, 0]))
    frames = [picture(40, 50, seed=s).convert("P") for s in range(3)]
    save("animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=100, loop=0, transparency=0)
    save("one-pixel.png", PIL.Image.new("RGB", (1, 1), (9, 99, 199)))
    return files


def test_image_modes_are_converted_as_transformers_does(tmp_path):
    """Gray, RGBA, CMYK, 16-bit (I;16: PIL clips to 0..255, as in transformers), palette (with and without a
    transparent colour), RGB with a tRNS colour, an animated GIF (its first frame) and a 1x1 image: a path through
    our preprocessing gives transformers' pixel values (its load_image, then Glm4vImageProcessorPil), exactly."""
    transformers = pytest.importorskip("transformers")
    from transformers.image_utils import load_image as hf_load_image

    config = pp.ImageProcessorConfig()
    processor = transformers.Glm4vImageProcessorPil(**config.to_dict())
    files = _mode_files(tmp_path)
    assert PIL.Image.open(files["16bit.png"]).mode == "I;16" and PIL.Image.open(files["animated.gif"]).n_frames == 3
    for name, path in files.items():
        ours = pp.preprocess_images([path], config)
        theirs = processor(images=[hf_load_image(str(path))], return_tensors="np")
        np.testing.assert_array_equal(ours.grid_thw, np.asarray(theirs["image_grid_thw"]), err_msg=name)
        np.testing.assert_array_equal(ours.pixel_values, np.asarray(theirs["pixel_values"]), err_msg=name)
    # The GIF is its first frame.
    first = pp.load_image(files["animated.gif"])
    with PIL.Image.open(files["animated.gif"]) as gif:
        np.testing.assert_array_equal(np.asarray(first), np.asarray(gif.convert("RGB")))


def test_pil_image_that_cannot_become_rgb(pipe):
    with pytest.raises(InputError, match="cannot convert a PIL image of mode 'La'"):
        pipe.generate("x", [PIL.Image.new("La", (40, 40))], max_new_tokens=2)


# ------------------------------------------------------------------------------------------------ prompts

def test_empty_prompt(no_graphs, tmp_path):
    for prompt in ("", "  \n"):
        with pytest.raises(InputError, match="prompt is empty and there is no image"):
            no_graphs.generate(prompt, max_new_tokens=2)


def test_empty_prompt_with_an_image_is_a_request(pipe):
    result = pipe.generate("", [picture(56, 56)], max_new_tokens=2, eos_token_ids=())
    assert len(result.token_ids) == 2 and SP["<|image|>"] in result.prompt_token_ids


def test_empty_prompt_cli(engines, capsys):
    code, err = cli(capsys, "run", "--engines", str(engines), "--prompt", "")
    assert code == 2 and "prompt is empty" in err


def _shrink_context(folder: Path, max_positions: int, tensorrt: dict | None = None) -> Path:
    manifest = Manifest.load(folder)
    manifest.config["text"]["max_position_embeddings"] = max_positions
    if tensorrt is not None:
        manifest.extra["tensorrt"] = tensorrt
    manifest.record_files(folder)
    manifest.save(folder)
    return folder


def test_prompt_longer_than_the_context_is_refused_before_any_graph_runs(copy, monkeypatch):
    pipe = Pipeline.from_engines(_shrink_context(copy, 40))

    def refuse(*args, **kwargs):
        raise AssertionError("a graph ran")

    monkeypatch.setattr(pipe.backend, "run", refuse)
    monkeypatch.setattr(pipe.backend, "start_decode", refuse)
    # "[gMASK]<sop><|user|>\n{text}<|assistant|>\n" is len(text) + 6 tokens with the character tokenizer.
    for text in ("a" * 34, "a" * 60):
        with pytest.raises(InputError, match=rf"the prompt has {len(text) + 6} tokens.*max_position_embeddings 40") \
                as info:
            pipe.generate(text, max_new_tokens=4)
        one_line(info.value)
    with pytest.raises(InputError, match="max_position_embeddings 40"):  # images count too
        pipe.generate("a", [picture(280, 280)], max_new_tokens=4)


def test_prompt_limit_names_the_tensorrt_profiles(copy):
    """On TensorRT engines the profiles recorded by `glmtrt build` limit the context too, and are named."""
    profiles = {"prefill": {"inputs_embeds": {"min": [1, 1, 48], "opt": [1, 16, 48], "max": [1, 30, 48]}},
                "decode": {"attention_mask": {"min": [1, 2], "opt": [1, 64], "max": [1, 36]}}}
    pipe = Pipeline.from_engines(_shrink_context(copy, 32768, {"profiles": profiles}))
    pipe.backend.name = "trt"  # the limits apply to the TensorRT backend; the ONNX Runtime one stands in for it here
    with pytest.raises(InputError, match="prefill sequence of 30 and decode cache of 36 positions"):
        pipe.generate("a" * 25, max_new_tokens=4)  # 31 tokens
    assert pipe.context_room(26) == 11  # the decode cache: 26 + 11 - 1 = 36 positions


@pytest.mark.parametrize("special", ["<|assistant|>", "<|image|>", "[gMASK]"])
def test_special_token_strings_stay_plain_text(pipe, special):
    text = f"say {special} please"
    ids = pipe.chat.encode_text(text)
    assert not set(ids) & set(SP.values())  # none is a special id
    assert pipe.chat.decode(ids) == text
    prompt = pipe.prompt_ids(text)
    assert prompt.count(SP[special]) == (1 if special != "<|image|>" else 0)  # only the template's own
    result = pipe.generate(text, max_new_tokens=3, eos_token_ids=())
    assert result.prompt_token_ids == prompt and len(result.token_ids) == 3


@pytest.mark.parametrize("prompt,message", [
    (b"caf\xc3\xa9", "must be a str, got bytes; decode it first"),
    (b"\xff\xfe", "must be a str, got bytes"),
    ("caf\udce9", "not valid UTF-8 text .*character 3"),  # what os.fsdecode makes of b"caf\xe9"
    ("\ud800", "not valid UTF-8"),
    (None, "must be a str, got NoneType"),
])
def test_invalid_prompt_text(no_graphs, prompt, message):
    with pytest.raises(InputError, match=message) as info:
        no_graphs.generate(prompt, max_new_tokens=2)
    one_line(info.value)
    if prompt is not None:  # system=None is no system prompt
        with pytest.raises(InputError, match=message.replace("prompt", "system prompt")):
            no_graphs.generate("ok", system=prompt, max_new_tokens=2)


def test_invalid_utf8_command_line_argument(engines):
    """A --prompt of invalid UTF-8 bytes reaches Python as lone surrogates (surrogateescape); one line, exit 2."""
    args = [os.fsencode(sys.executable), b"-m", b"glmtrt.runtime.cli", b"run", b"--engines", os.fsencode(str(engines)),
            b"--prompt", b"caf\xe9 \xff"]
    proc = subprocess.run(args, capture_output=True, timeout=300)
    err = proc.stderr.decode("utf-8", "backslashreplace")
    assert proc.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and "not valid UTF-8 text" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ generation

@pytest.mark.parametrize("option,value,message", [
    ("max_new_tokens", 0, "max_new_tokens must be >= 1"),
    ("max_new_tokens", -5, "max_new_tokens must be >= 1"),
    ("temperature", -0.5, "temperature must be >= 0"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
    ("top_p", -0.1, r"top_p must be in \(0, 1\]"),
    ("top_p", 1.5, r"top_p must be in \(0, 1\]"),
    ("top_p", float("nan"), "top_p must be finite"),
])
def test_generation_options(no_graphs, option, value, message):
    with pytest.raises(InputError, match=message):
        no_graphs.generate("x", **{"max_new_tokens": 2, option: value})


@pytest.mark.parametrize("args,message", [
    (["--max-new-tokens", "0"], "max_new_tokens"), (["--max-new-tokens", "-1"], "max_new_tokens"),
    (["--temperature", "-1"], "temperature"), (["--top-p", "0"], "top_p"), (["--top-p", "1.5"], "top_p"),
])
def test_generation_options_cli(engines, capsys, args, message):
    code, err = cli(capsys, "run", "--engines", str(engines), "--prompt", "x", *args)
    assert code == 2 and message in err


def test_integral_float_max_new_tokens(pipe):
    assert len(pipe.generate("x", max_new_tokens=3.0, eos_token_ids=()).token_ids) == 3


def test_full_cache_mid_generation_stops_with_length(pipe, copy):
    """A prompt near max_position_embeddings: generation runs until prompt + generated tokens fill the context, then
    stops with reason "length" — the same tokens as an unlimited context, cut."""
    small = Pipeline.from_engines(_shrink_context(copy, 40))
    text = "a" * 20  # 26 prompt tokens: room for 14 new ones
    result = small.generate(text, max_new_tokens=50, eos_token_ids=())
    assert result.stop_reason == "length" and len(result.token_ids) == 14
    assert result.token_ids == pipe.generate(text, max_new_tokens=14, eos_token_ids=()).token_ids
    streamed = small.stream(text, max_new_tokens=50, eos_token_ids=())
    assert "".join(streamed) == result.text and streamed.result.stop_reason == "length"


def _poison(pipe, monkeypatch, graph: str, value: float, at_step: int = 0):
    real = pipe.backend.start_decode

    class Poisoned:
        def __init__(self, state):
            self.state, self.steps = state, 0

        def prefill(self, *args):
            logits = np.array(self.state.prefill(*args))
            if graph == "prefill":
                logits[0, 7] = value
            return logits

        def step(self, *args):
            logits = np.array(self.state.step(*args))
            if graph == "decode" and self.steps == at_step:
                logits[-1, 3] = value
            self.steps += 1
            return logits

    monkeypatch.setattr(pipe.backend, "start_decode", lambda batch, capacity: Poisoned(real(batch, capacity)))


@pytest.mark.parametrize("graph,value,where", [
    ("prefill", float("nan"), r"the prefill graph \(prefill.onnx\) returned NaN or inf logits \(batch rows \[0\]\)"),
    ("decode", float("inf"), "the decode graph \\(decode.onnx\\) returned NaN or inf logits at decode step 2"),
    ("decode", float("-inf"), "the decode graph"),
])
def test_nan_or_inf_logits_name_the_graph(pipe, monkeypatch, graph, value, where):
    _poison(pipe, monkeypatch, graph, value, at_step=2)
    with pytest.raises(EngineError, match=where) as info:
        pipe.generate("x", max_new_tokens=8, eos_token_ids=())
    assert "glmtrt parity" in one_line(info.value)


# ------------------------------------------------------------------------------------------------ engines folder

def _graph(folder: Path, role: str = "decode") -> Path:
    return folder / json.loads((folder / MANIFEST_NAME).read_text())["graphs"][role]["file"]


def _damage(kind: str, folder: Path) -> None:
    manifest = folder / MANIFEST_NAME
    if kind == "no-folder":
        shutil.rmtree(folder)
    elif kind == "missing-graph":
        _graph(folder).unlink()
    elif kind == "corrupt-onnx-same-size":
        path = _graph(folder)
        path.write_bytes(b"\x00not onnx" * (path.stat().st_size // 9) + b"\x00" * (path.stat().st_size % 9))
    elif kind == "truncated-onnx":
        path = _graph(folder, "prefill")
        path.write_bytes(path.read_bytes()[:1000])
    elif kind == "manifest-missing":
        manifest.unlink()
    elif kind == "manifest-not-json":
        manifest.write_text('{"schema_version": 1, "graphs": ')
    elif kind == "manifest-not-an-object":
        manifest.write_text("[1, 2]")
    elif kind == "manifest-binary":
        manifest.write_bytes(b"\xff\xfe\x00garbage")
    elif kind == "schema-version":
        raw = json.loads(manifest.read_text())
        raw["schema_version"] = 99
        manifest.write_text(json.dumps(raw))
    elif kind == "schema-shape":
        raw = json.loads(manifest.read_text())
        raw["graphs"] = ["vision.onnx"]
        manifest.write_text(json.dumps(raw))
    elif kind == "hash-mismatch":
        path = folder / "embed_tokens.npy"
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        raise AssertionError(kind)


ENGINE_CASES = [
    ("no-folder", "does not exist; run `glmtrt export` first"),
    ("missing-graph", "decode.onnx' named by the manifest is missing; re-export"),
    ("corrupt-onnx-same-size", "decode.onnx' does not match its SHA-256"),
    ("truncated-onnx", "prefill.onnx' has 1000 bytes, the manifest recorded"),
    ("manifest-missing", "has no manifest.json: it is not a finished export"),
    ("manifest-not-json", "is not valid JSON"),
    ("manifest-not-an-object", "top level is not an object"),
    ("manifest-binary", "is not valid JSON"),
    ("schema-version", "has schema version 99, this glmtrt reads version 1; re-export"),
    ("schema-shape", "does not follow the manifest schema"),
    ("hash-mismatch", "embed_tokens.npy' does not match its SHA-256"),
]


@pytest.mark.parametrize("kind,message", ENGINE_CASES, ids=[c[0] for c in ENGINE_CASES])
def test_damaged_engines_folder(copy, kind, message):
    _damage(kind, copy)
    with pytest.raises(ManifestError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        Pipeline.from_engines(copy)
    one_line(info.value)


@pytest.mark.parametrize("kind", ["missing-graph", "manifest-not-json", "schema-version", "hash-mismatch"])
def test_damaged_engines_folder_cli(copy, capsys, kind):
    _damage(kind, copy)
    code, err = cli(capsys, "run", "--engines", str(copy), "--prompt", "x")
    assert code == 2 and ("re-export" in err or "glmtrt export" in err)


def test_corrupt_onnx_without_hash_check_is_refused_by_onnxruntime(copy, capsys):
    _damage("corrupt-onnx-same-size", copy)
    with pytest.raises(ManifestError, match="ONNX Runtime cannot load .*decode.onnx.*re-export the folder"):
        Pipeline.from_engines(copy, verify_hashes=False)
    code, err = cli(capsys, "run", "--engines", str(copy), "--prompt", "x", "--no-verify")
    assert code == 2 and "ONNX Runtime cannot load" in err


def test_engine_from_another_tensorrt_or_gpu():
    """The pure check the TensorRT backend runs before deserializing (tests/test_tensorrt.py covers the backend's
    refusal with a fake TensorRT and, on a GPU, with real engines)."""
    from glmtrt.runtime.backends.tensorrt import compatibility_problem

    built = {"version": "10.13.0.35", "compute_capability": "9.0"}
    assert compatibility_problem(built, "10.13.0.35", "9.0") is None
    for version, cc in (("10.14.1.48", "9.0"), ("10.13.0.35", "8.9"), ("11.0.0", "10.0")):
        problem = compatibility_problem(built, version, cc)
        assert problem.startswith("engine built with TensorRT 10.13.0.35 for sm_90") and "glmtrt build" in problem


# ------------------------------------------------------------------------------------------------ export

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from glmtrt.reference import save_preset_checkpoint

    return save_preset_checkpoint(MODEL, tmp_path_factory.mktemp("ckpt") / MODEL)


def _edit_weights(src: Path, dst: Path, edit) -> Path:
    import torch  # noqa: F401  (safetensors.torch)
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*")), list(out.parent.iterdir())


def test_export_of_a_missing_folder(tmp_path, capsys):
    from glmtrt.export import export_model

    with pytest.raises(ConfigError, match="is neither a checkpoint folder nor a preset"):
        export_model(tmp_path / "no" / "such" / "checkpoint", tmp_path / "out" / "engines", progress=False)
    _assert_nothing_written(tmp_path / "out" / "engines")
    code, err = cli(capsys, "export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out" / "e"))
    assert code == 2 and "neither a checkpoint folder nor a preset; presets:" in err


def _drop_two(t):
    t.pop("model.language_model.norm.weight")
    t.pop("model.visual.merger.up_proj.weight")


@pytest.mark.parametrize("edit,message", [
    (_drop_two, r"missing weights: model\.language_model\.norm\.weight, model\.visual\.merger\.up_proj\.weight"),
    (lambda t: t.update({"model.visual.extra.weight": torch_zeros(2), "lm_head.extra": torch_zeros(1)}),
     r"unexpected weights: lm_head\.extra, model\.visual\.extra\.weight"),
    (lambda t: t.update({"lm_head.weight": torch_zeros(3, 3), "model.language_model.norm.weight": torch_zeros(5)}),
     r"wrong shape: lm_head\.weight \(3, 3\) \(expected \(256, 48\)\), model\.language_model\.norm\.weight \(5,\)"),
], ids=["missing", "unexpected", "mis-shaped"])
def test_export_of_broken_weights_lists_them(checkpoint, tmp_path, capsys, edit, message):
    from glmtrt.export import export_model

    broken = _edit_weights(checkpoint, tmp_path / "broken", edit)
    out = tmp_path / "out" / "engines"
    with pytest.raises(CheckpointError, match=message) as info:
        export_model(broken, out, progress=False)
    one_line(info.value)
    _assert_nothing_written(out)
    code, err = cli(capsys, "export", str(broken), "--out", str(out), "--quiet")
    assert code == 2 and "weights" in err
    _assert_nothing_written(out)


def torch_zeros(*shape):
    import torch

    return torch.zeros(*shape)


@pytest.mark.parametrize("model_type,message", [("llama", "unsupported model_type 'llama'")])
def test_export_of_an_unsupported_model_type(checkpoint, tmp_path, capsys, model_type, message):
    from glmtrt.export import export_model

    folder = Path(shutil.copytree(checkpoint, tmp_path / model_type))
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out" / "engines"
    with pytest.raises(ConfigError, match=message):
        export_model(folder, out, progress=False)
    _assert_nothing_written(out)
    code, err = cli(capsys, "export", str(folder), "--out", str(out))
    assert code == 2


def test_export_over_an_existing_folder_needs_force(tmp_path, capsys):
    out = tmp_path / "engines"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = cli(capsys, "export", MODEL, "--out", str(out))
    assert code == 2 and "already exists; pass --force" in err
    code, err = cli(capsys, "export", MODEL, "--out", str(out), "--force")  # not an export: refused even so
    assert code == 2 and "not a glmtrt export" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_full_disk_leaves_no_partial_folder(tmp_path, capsys, monkeypatch):
    """The disk fills up while the first graph is saved (the real writer path, its save call made to fail half-way):
    one line, exit 2, and neither the target nor a partial folder is left; an existing export is kept."""
    import onnx_ir

    def full_disk(model, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"\x08" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(onnx_ir, "save", full_disk)
    out = tmp_path / "engines"
    code, err = cli(capsys, "export", MODEL, "--out", str(out), "--quiet")
    assert code == 2 and "the disk is full" in err and "free some space" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # With --force over an earlier export, that export survives untouched.
    out.mkdir()
    (out / MANIFEST_NAME).write_text("earlier")
    with pytest.raises(GlmTrtError, match="the disk is full"):
        from glmtrt.export import export_model

        export_model(MODEL, out, force=True, progress=False)
    assert (out / MANIFEST_NAME).read_text() == "earlier" and sorted(p.name for p in tmp_path.iterdir()) == ["engines"]


# ------------------------------------------------------------------------------------------------ concurrency

def test_four_threads_share_one_pipeline(pipe, tmp_path):
    path = tmp_path / "page.png"
    picture(90, 150, seed=8).save(path)
    requests = [("Text Recognition:", [str(path)]), ("hello there", []), ("abc", [picture(56, 56, seed=2)]),
                ("what is this?", [picture(200, 100, seed=3), picture(70, 180, seed=4)])] * 2

    def run(request):
        prompt, images = request
        r = pipe.generate(prompt, images, max_new_tokens=12, eos_token_ids=())
        return r.prompt_token_ids, r.token_ids, r.text

    sequential = [run(r) for r in requests]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(run, requests))
    assert concurrent == sequential
    # Streams too: each thread's deltas make its own text.
    with ThreadPoolExecutor(max_workers=4) as pool:
        texts = list(pool.map(lambda r: "".join(pipe.stream(r[0], r[1], max_new_tokens=12, eos_token_ids=())),
                              requests[:4]))
    assert texts == [s[2] for s in sequential[:4]]


class _Exclusive:
    """A backend that must never run two graph calls at once (as TensorRT's shared contexts and staging buffers):
    it wraps the ONNX Runtime one and fails on overlapping calls."""

    name = "exclusive"

    def __init__(self, inner):
        self.inner, self.manifest, self.guard, self.calls = inner, inner.manifest, threading.Lock(), 0

    def _alone(self, fn, *args):
        if not self.guard.acquire(blocking=False):
            raise AssertionError("two graph calls at once")
        try:
            self.calls += 1
            time.sleep(0.002)  # widen the window an overlap would need
            return fn(*args)
        finally:
            self.guard.release()

    def run(self, graph, inputs):
        return self._alone(self.inner.run, graph, inputs)

    def start_decode(self, batch, capacity):
        state = self.inner.start_decode(batch, capacity)
        outer = self

        class State:
            def prefill(self, *args):
                return outer._alone(state.prefill, *args)

            def step(self, *args):
                return outer._alone(state.step, *args)

        return State()

    def close(self):
        pass


def test_a_backend_that_is_not_thread_safe_runs_one_graph_call_at_a_time(pipe):
    shared = Pipeline(pipe.manifest, pipe.folder, _Exclusive(pipe.backend), pipe.chat)
    requests = [("hello", []), ("abc", [picture(56, 56, seed=2)]), ("Text Recognition:", [picture(70, 180)]), ("q", [])]

    def run(request):
        return shared.generate(*request, max_new_tokens=10, eos_token_ids=()).token_ids

    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(run, requests))
    assert concurrent == [pipe.generate(*r, max_new_tokens=10, eos_token_ids=()).token_ids for r in requests]
    assert shared.backend.calls >= 4 * 10
