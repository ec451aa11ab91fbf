"""The torch-free runtime (runtime/pipeline.py and friends) against the PyTorch reference and transformers.

Parity ladder rung 5 on ONNX Runtime fp32: free-running greedy generation is token-exact against
``reference.generate.greedy_generate`` (same seeded weights, same prompt ids and pixels), and a checkpoint
written by transformers' ``save_pretrained`` gives transformers' own ``generate`` tokens through ``glmtrt run``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch

from glmtrt.reference import load_reference
from glmtrt.reference.demo import ocr_prompt_ids
from glmtrt.reference.generate import PromptBatch, greedy_generate
from glmtrt.reference.tokenizer import TINY_GLM4V_SPECIALS, build_char_tokenizer
from glmtrt.runtime.chat import IncrementalDecoder, split_thinking
from glmtrt.runtime.errors import GlmTrtError, InputError
from glmtrt.runtime.manifest import Manifest
from glmtrt.runtime.pipeline import GenerationResult, Pipeline, Request
from glmtrt.runtime.preprocess import ImageProcessorConfig, preprocess_images
from glmtrt.runtime.sampling import GenerationOptions, Sampler, resolve_options

PRESETS = ("tiny-glm-ocr", "tiny-glm-4.1v")
NEW_TOKENS = 64
PROMPT = "Text Recognition:"
SP = TINY_GLM4V_SPECIALS
# (height, width): square (6x6 patches after the min-pixel upscale), tall 14x8, wide 4x12.
SIZES = {"square": (56, 56), "tall": (200, 100), "wide": (70, 180)}


def image(height: int, width: int, seed: int = 0) -> PIL.Image.Image:
    """A smooth random picture (gradients + noise), so resizing and patches are not trivial."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], axis=-1)
    noisy = base + rng.normal(0, 25, base.shape)
    return PIL.Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def engines(exported):
    return {name: exported(name) for name in PRESETS}


@pytest.fixture(scope="module")
def pipes(engines):
    return {name: Pipeline.from_engines(folder) for name, folder in engines.items()}


@pytest.fixture(scope="module")
def references():
    return {name: load_reference(name) for name in PRESETS}


def reference_tokens(model, ids, pixel_values=None, grid=None, attention_mask=None, n=NEW_TOKENS) -> np.ndarray:
    batch = PromptBatch(input_ids=np.atleast_2d(ids), attention_mask=attention_mask, pixel_values=pixel_values,
                        image_grid_thw=grid)
    return greedy_generate(model, batch, n)


# ------------------------------------------------------------------------------- fp32 ORT vs the reference

CASES = ["square", "tall", "wide", "two_images", "text_only"]


def case_images(case: str) -> list:
    if case in SIZES:
        return [image(*SIZES[case])]
    if case == "two_images":
        return [image(*SIZES["tall"], seed=1), image(*SIZES["wide"], seed=2)]
    return []


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", PRESETS)
def test_greedy_equals_reference(pipes, references, name, case):
    pipe = pipes[name]
    images = case_images(case)
    result = pipe.generate(PROMPT, images, max_new_tokens=NEW_TOKENS, eos_token_ids=())
    vision = pipe.preprocess(images)
    ids = pipe.prompt_ids(PROMPT, vision_inputs=vision)
    assert result.prompt_token_ids == ids
    assert ids.count(SP["<|image|>"]) == (0 if vision is None else int(vision.grid_thw.prod(1).sum()) // 4)
    expected = reference_tokens(references[name], ids, None if vision is None else vision.pixel_values,
                                None if vision is None else vision.grid_thw)[0]
    assert result.token_ids == expected.tolist()
    assert result.stop_reason == "length" and len(result.token_ids) == NEW_TOKENS
    assert len(set(result.token_ids)) > 1  # not a single repeated token


@pytest.mark.parametrize("name", PRESETS)
def test_batch_of_two_equals_reference(pipes, references, name):
    """Two requests with different image sizes and prompt lengths: left padding; each row equals the reference."""
    pipe = pipes[name]
    requests = [Request("Read this.", [image(*SIZES["tall"], seed=3)]),
                Request("What is written on the small picture?", [image(*SIZES["square"], seed=4)])]
    results = pipe.generate_batch(requests, max_new_tokens=NEW_TOKENS, eos_token_ids=())
    rows = [r.prompt_token_ids for r in results]
    assert len(rows[0]) != len(rows[1])
    width = max(map(len, rows))
    ids = np.array([[0] * (width - len(r)) + r for r in rows])
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    vision = [pipe.preprocess(r.images) for r in requests]
    expected = reference_tokens(references[name], ids, np.concatenate([v.pixel_values for v in vision]),
                                np.concatenate([v.grid_thw for v in vision]), attention_mask=mask)
    for result, row in zip(results, expected):
        assert result.token_ids == row.tolist()
    # The low-level entry with the same ids and pixels gives the same rows.
    again = pipe.generate_ids(ids, np.concatenate([v.pixel_values for v in vision]),
                              np.concatenate([v.grid_thw for v in vision]), attention_mask=mask,
                              max_new_tokens=NEW_TOKENS, eos_token_ids=())
    assert [r.token_ids for r in again] == [r.token_ids for r in results]


def test_batch_rows_stop_independently(pipes):
    pipe = pipes["tiny-glm-4.1v"]
    requests = [Request("Read this.", [image(*SIZES["tall"], seed=3)]), Request("Hi", [])]
    free = pipe.generate_batch(requests, max_new_tokens=24, eos_token_ids=())
    stop_token = free[0].token_ids[5]
    stopped = pipe.generate_batch(requests, max_new_tokens=24, eos_token_ids=[stop_token])
    for free_row, row in zip(free, stopped):
        if stop_token in free_row.token_ids:
            k = free_row.token_ids.index(stop_token)
            assert row.token_ids == free_row.token_ids[:k + 1] and row.stop_reason == "eos"
        else:
            assert row.token_ids == free_row.token_ids and row.stop_reason == "length"


def test_device_cache_state_equals_host_round_trip(pipes, monkeypatch):
    """The IO-binding decode state (cache in preallocated ping-pong arenas) equals the portable state that feeds
    the presents back as host arrays."""
    from glmtrt.runtime.backends import HostKVState, KVLayout

    pipe = pipes["tiny-glm-ocr"]
    images = [image(*SIZES["wide"])]
    bound = pipe.generate(PROMPT, images, max_new_tokens=20, eos_token_ids=())
    backend = pipe.backend
    monkeypatch.setattr(backend, "start_decode", lambda batch, capacity: HostKVState(backend, KVLayout(pipe.manifest)))
    host = pipe.generate(PROMPT, images, max_new_tokens=20, eos_token_ids=())
    assert bound.token_ids == host.token_ids


# ------------------------------------------------------------------------------- transformers through the CLI

@pytest.fixture(scope="module")
def hf_engines(hf_checkpoints, exported, tmp_path_factory):
    """tiny-glm-4.1v (saved sharded by save_pretrained) + a tokenizer.json, exported."""
    hf, folder = hf_checkpoints["tiny-glm-4.1v"]
    copy = tmp_path_factory.mktemp("hf-with-tokenizer") / "tiny-glm-4.1v"
    shutil.copytree(folder, copy)
    build_char_tokenizer(TINY_GLM4V_SPECIALS).save(str(copy / "tokenizer.json"))
    return hf, exported(copy)


def run_cli(*args: str, prelude: str = "") -> subprocess.CompletedProcess:
    code = prelude + "\nimport sys\nfrom glmtrt.runtime.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def test_cli_run_json_equals_transformers_generate(hf_engines, tmp_path):
    hf, folder = hf_engines
    path = tmp_path / "page.png"
    image(90, 150, seed=5).save(path)
    proc = run_cli("run", "--engines", str(folder), "--image", str(path), "--prompt", PROMPT, "--max-new-tokens", "40",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert set(out) >= {"text", "token_ids", "prompt_token_ids", "stop_reason", "timings", "thinking", "answer"}
    manifest = Manifest.load(folder)
    vision = preprocess_images([str(path)], ImageProcessorConfig.from_dict(manifest.preprocessing))
    ids = torch.tensor([out["prompt_token_ids"]])
    assert hf.generation_config.eos_token_id is None
    hf.model.rope_deltas = None
    with torch.no_grad():
        generated = hf.generate(input_ids=ids, pixel_values=torch.from_numpy(vision.pixel_values),
                                image_grid_thw=torch.from_numpy(vision.grid_thw),
                                mm_token_type_ids=ids.eq(SP["<|image|>"]).long(), max_new_tokens=40,
                                do_sample=False)
    expected = generated[0, ids.shape[1]:].tolist()
    eos = set(manifest.eos_token_ids)
    first_eos = next((i for i, t in enumerate(expected) if t in eos), None)
    if first_eos is None:
        assert out["token_ids"] == expected and out["stop_reason"] == "length"
    else:
        assert out["token_ids"] == expected[:first_eos + 1] and out["stop_reason"] == "eos"
    assert len(out["token_ids"]) >= 8, "the comparison should cover a few tokens"
    assert out["timings"]["ttft_s"] > 0


def test_cli_user_errors_exit_2(engines, tmp_path):
    folder = str(engines["tiny-glm-ocr"])
    for args, words in [(["--max-new-tokens", "0"], "max_new_tokens"), (["--top-p", "0"], "top_p"),
                        (["--image", str(tmp_path / "missing.png")], "does not exist"),
                        (["--provider", "cuda"], "glmtrt[gpu]")]:
        proc = run_cli("run", "--engines", folder, "--prompt", "x", *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and words in proc.stderr, proc.stderr
    proc = run_cli("run", "--engines", str(tmp_path / "nowhere"), "--prompt", "x")
    assert proc.returncode == 2 and "glmtrt export" in proc.stderr


def test_cli_stream_prints_text(engines, tmp_path):
    path = tmp_path / "a.png"
    image(*SIZES["square"]).save(path)
    proc = run_cli("run", "--engines", str(engines["tiny-glm-4.1v"]), "--image", str(path), "--prompt", PROMPT,
                   "--max-new-tokens", "12", "--stream", "--ignore-eos")
    assert proc.returncode == 0, proc.stderr
    pipe = Pipeline.from_engines(engines["tiny-glm-4.1v"])
    expected = pipe.generate(PROMPT, [str(path)], max_new_tokens=12, eos_token_ids=())
    assert proc.stdout == expected.text + "\n"


# ------------------------------------------------------------------------------- no torch

BLOCK_TORCH = textwrap.dedent("""
    import sys
    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                raise ImportError(f"{name} is blocked in this test")
            return None
    sys.meta_path.insert(0, _NoTorch())
""")


def test_runtime_runs_without_torch(engines, pipes, tmp_path):
    path = tmp_path / "img.png"
    image(*SIZES["tall"]).save(path)
    script = BLOCK_TORCH + textwrap.dedent(f"""
        import json
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("torch was importable")
        from glmtrt.runtime.pipeline import Pipeline
        pipe = Pipeline.from_engines({str(engines["tiny-glm-4.1v"])!r})
        r = pipe.generate({PROMPT!r}, [{str(path)!r}], max_new_tokens=24, eos_token_ids=())
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
        print(json.dumps(r.token_ids))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    expected = pipes["tiny-glm-4.1v"].generate(PROMPT, [str(path)], max_new_tokens=24, eos_token_ids=())
    assert json.loads(proc.stdout) == expected.token_ids
    # The CLI too.
    cli = run_cli("run", "--engines", str(engines["tiny-glm-4.1v"]), "--image", str(path), "--prompt", PROMPT,
                  "--max-new-tokens", "24", "--ignore-eos", "--json", prelude=BLOCK_TORCH)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["token_ids"] == expected.token_ids


# ------------------------------------------------------------------------------- streaming, EOS, sampling

def test_stream_deltas_concatenate_to_text(pipes):
    pipe = pipes["tiny-glm-ocr"]
    images = [image(*SIZES["wide"])]
    stream = pipe.stream(PROMPT, images, max_new_tokens=40, eos_token_ids=())
    deltas = list(stream)
    assert stream.result is not None and isinstance(stream.result, GenerationResult)
    assert "".join(deltas) == stream.result.text
    assert all(d and "\ufffd" not in d for d in deltas)
    for d in deltas:
        d.encode("utf-8")  # whole characters only
    assert stream.result.token_ids == pipe.generate(PROMPT, images, max_new_tokens=40, eos_token_ids=()).token_ids


def test_incremental_decoder_holds_back_partial_utf8():
    """A byte-level decoder: ids are bytes; multi-byte characters arrive split over several tokens."""
    data = "héllo → 世界 ok".encode()
    decoder = IncrementalDecoder(lambda ids: bytes(ids).decode("utf-8", errors="replace"))
    deltas = [decoder.push(b) for b in data]
    deltas.append(decoder.flush())
    assert "".join(deltas) == data.decode()
    assert all("\ufffd" not in d for d in deltas)
    assert deltas.count("") > 0  # some tokens completed no character


def test_eos_stops(pipes):
    pipe = pipes["tiny-glm-4.1v"]
    images = [image(*SIZES["tall"])]
    free = pipe.generate(PROMPT, images, max_new_tokens=32, eos_token_ids=())
    eos = free.token_ids[6]
    k = free.token_ids.index(eos)
    stopped = pipe.generate(PROMPT, images, max_new_tokens=32, eos_token_ids=[eos])
    assert stopped.stop_reason == "eos"
    assert stopped.token_ids == free.token_ids[:k + 1]
    assert stopped.text == pipe.chat.decode(free.token_ids[:k])  # the EOS token is not text
    assert stopped.timings["decode_s"] >= 0
    # The manifest's EOS set is the default.
    default = pipe.generate(PROMPT, images, max_new_tokens=32)
    manifest_eos = set(pipe.eos_token_ids)
    hits = [i for i, t in enumerate(free.token_ids) if t in manifest_eos]
    assert default.token_ids == (free.token_ids[:hits[0] + 1] if hits else free.token_ids)


def test_sampling_reproducible_with_seed(pipes):
    pipe = pipes["tiny-glm-ocr"]
    images = [image(*SIZES["square"])]
    kwargs = dict(max_new_tokens=32, eos_token_ids=(), temperature=1.5, top_k=50, top_p=0.95)
    a = pipe.generate(PROMPT, images, seed=7, **kwargs)
    b = pipe.generate(PROMPT, images, seed=7, **kwargs)
    c = pipe.generate(PROMPT, images, seed=8, **kwargs)
    greedy = pipe.generate(PROMPT, images, max_new_tokens=32, eos_token_ids=())
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    assert a.token_ids != greedy.token_ids
    # top_k=1 (and a tiny top_p) leave only the argmax: sampling becomes greedy.
    assert pipe.generate(PROMPT, images, seed=1, temperature=1.0, top_k=1, max_new_tokens=32,
                         eos_token_ids=()).token_ids == greedy.token_ids
    assert pipe.generate(PROMPT, images, seed=1, temperature=1.0, top_p=1e-6, max_new_tokens=32,
                         eos_token_ids=()).token_ids == greedy.token_ids


def test_warpers_and_repetition_penalty_match_transformers():
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    rng = np.random.default_rng(0)
    for trial in range(20):
        logits = (rng.standard_normal((1, 200)) * 3).astype(np.float32)
        temperature, top_k, top_p, penalty = 0.7 + 0.1 * trial, int(rng.integers(0, 60)), float(rng.uniform(0.3, 1)), 1.3
        prompt = rng.integers(0, 200, 15)
        sampler = Sampler(GenerationOptions(temperature=temperature, top_k=top_k, top_p=top_p,
                                            repetition_penalty=penalty), [prompt], 200)
        ours_penalized = np.where(sampler.seen[0], np.where(logits[0] < 0, logits[0] * np.float32(penalty),
                                                            logits[0] / np.float32(penalty)), logits[0])
        ours = sampler.warp(ours_penalized)
        scores = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(prompt[None]), torch.from_numpy(logits))
        np.testing.assert_array_equal(scores[0].numpy(), ours_penalized.astype(np.float32))
        scores = TemperatureLogitsWarper(temperature)(None, scores)
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        scores = TopPLogitsWarper(top_p)(None, scores)
        assert np.array_equal(np.isfinite(scores[0].numpy()), np.isfinite(ours)), trial


def test_greedy_repetition_penalty_changes_tokens(pipes):
    pipe = pipes["tiny-glm-4.1v"]
    images = [image(*SIZES["wide"])]
    plain = pipe.generate(PROMPT, images, max_new_tokens=32, eos_token_ids=())
    penalized = pipe.generate(PROMPT, images, max_new_tokens=32, eos_token_ids=(), repetition_penalty=3.0)
    assert plain.token_ids != penalized.token_ids


# ------------------------------------------------------------------------------- chat format, thinking, options

def test_chat_format_layout(pipes):
    pipe = pipes["tiny-glm-ocr"]
    tok = build_char_tokenizer(SP)
    encode = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    assert pipe.chat.prompt_ids(PROMPT, [6]) == ocr_prompt_ids(SP, encode, 6, PROMPT)
    assert pipe.chat.prompt_ids("hi") == [SP["[gMASK]"], SP["<sop>"], SP["<|user|>"], *encode("\nhi"),
                                          SP["<|assistant|>"], *encode("\n")]
    two = pipe.chat.prompt_ids("x", [2, 3])
    img, boi, eoi = SP["<|image|>"], SP["<|begin_of_image|>"], SP["<|end_of_image|>"]
    assert two[3 + len(encode("\n")):][:9] == [boi, img, img, eoi, boi, img, img, img, eoi]
    assert pipe.chat.prompt_ids("q", system="be brief")[:3] == [SP["[gMASK]"], SP["<sop>"], SP["<|system|>"]]


def test_special_token_strings_in_user_text_are_plain_text(pipes):
    pipe = pipes["tiny-glm-ocr"]
    text = "<|image|><think>[gMASK]<|user|>"
    ids = pipe.chat.encode_text(text)
    assert not set(ids) & set(SP.values())
    assert pipe.chat.decode(ids) == text
    prompt = pipe.prompt_ids(text)
    assert prompt.count(SP["<|user|>"]) == 1 and SP["<|image|>"] not in prompt and SP["<think>"] not in prompt
    # A text-only request whose text looks like image tokens generates like any text (no vision call expected).
    result = pipe.generate(text, max_new_tokens=4, eos_token_ids=())
    assert len(result.token_ids) == 4
    # The caller's tokenizer object keeps parsing specials (the chat works on a private copy).
    assert pipe.chat.tokenizer.encode("<|image|>", add_special_tokens=False).ids == [SP["<|image|>"]]


@pytest.mark.parametrize("text,thinking,answer", [
    ("<think>Let me look.\nIt is a cat.</think><answer>A cat.</answer>", "Let me look.\nIt is a cat.", "A cat."),
    ("<think></think>\n<answer>42</answer>", "", "42"),
    ("plain reply", None, "plain reply"),
    ("<think>still thinking", "still thinking", ""),
    ("<answer>only</answer>", None, "only"),
])
def test_split_thinking(text, thinking, answer):
    assert split_thinking(text) == (thinking, answer)


def test_thinking_fields_on_results(pipes, monkeypatch):
    pipe = pipes["tiny-glm-ocr"]
    monkeypatch.setattr(pipe.chat, "decode", lambda ids: "<think>hmm</think><answer>yes</answer>")
    result = pipe.generate("q", max_new_tokens=2, eos_token_ids=())
    assert (result.thinking, result.answer) == ("hmm", "yes")


@pytest.mark.parametrize("option,value", [("max_new_tokens", 0), ("max_new_tokens", 1.5), ("temperature", -0.1),
                                          ("top_p", 0.0), ("top_p", 1.01), ("top_k", -1),
                                          ("repetition_penalty", 0.0), ("seed", -3), ("temperature", float("nan"))])
def test_option_validation(pipes, option, value):
    with pytest.raises(InputError, match=option):
        pipes["tiny-glm-ocr"].generate("x", **{"max_new_tokens": 2, option: value})


def test_options_from_manifest_defaults():
    assert resolve_options({}).greedy
    assert resolve_options({"do_sample": False, "temperature": 0.8}).greedy
    sampled = resolve_options({"do_sample": True, "temperature": 0.8, "top_p": 0.9, "max_new_tokens": 99})
    assert (sampled.temperature, sampled.top_p, sampled.max_new_tokens) == (0.8, 0.9, 99)
    assert resolve_options({"do_sample": True}, temperature=0).greedy
    with pytest.raises(InputError, match="unknown"):
        resolve_options({}, beams=4)


def test_input_errors(pipes):
    pipe = pipes["tiny-glm-ocr"]
    with pytest.raises(InputError, match="placeholder"):
        pipe.generate_ids([3, 4, 252, 250, 250, 253, 6], max_new_tokens=2)
    with pytest.raises(InputError, match="outside the vocabulary"):
        pipe.generate_ids([3, 4, 999], max_new_tokens=2)
    with pytest.raises(InputError):
        pipe.generate("x", ["/nonexistent/image.png"], max_new_tokens=2)
    with pytest.raises(GlmTrtError, match="glmtrt\\[gpu\\]"):
        Pipeline.from_engines(pipe.folder, provider="cuda")
    with pytest.raises(GlmTrtError, match="unknown provider"):
        Pipeline.from_engines(pipe.folder, provider="rocm")


def test_timings_and_threads(engines):
    pipe = Pipeline.from_engines(engines["tiny-glm-4.1v"], threads=1, verify_hashes=False)
    result = pipe.generate(PROMPT, [image(*SIZES["square"])], max_new_tokens=16, eos_token_ids=())
    t = result.timings
    assert set(t) == {"preprocess_s", "vision_s", "prefill_s", "decode_s", "ttft_s", "decode_tokens_per_s"}
    assert t["ttft_s"] >= t["prefill_s"] > 0 and t["decode_tokens_per_s"] > 0
    assert json.loads(json.dumps(result.to_dict()))["token_ids"] == result.token_ids


def test_runtime_modules_do_not_import_torch():
    import pathlib

    import glmtrt.runtime as runtime

    for path in pathlib.Path(runtime.__file__).parent.rglob("*.py"):
        source = path.read_text()
        for banned in ("import torch", "from torch", "import transformers", "from transformers"):
            assert banned not in source, f"{path.name} has {banned!r}"


# ------------------------------------------------------------------------------- videos and the host plan

def test_video_frames_through_generate_ids_equal_reference(pipes, references):
    """A 4-frame clip: one vision call per temporal patch (2 frames of grid (1, h, w)), timestamps between."""
    from glmtrt.runtime.preprocess import preprocess_video
    from glmtrt.runtime.prompt import VIDEO, plan_prompt

    name = "tiny-glm-4.1v"
    pipe = pipes[name]
    frames = [np.asarray(image(60, 90, seed=10 + i)) for i in range(4)]
    video, stamps = preprocess_video(frames, pipe.image_config)
    t, h, w = video.grid_thw[0].tolist()
    chat = pipe.chat
    ids = [SP["[gMASK]"], SP["<sop>"], SP["<|user|>"], *chat.encode_text("\n"), SP["<|begin_of_video|>"]]
    for stamp in stamps:
        ids += [SP["<|begin_of_image|>"]] + [SP["<|image|>"]] * (h * w // 4) + [SP["<|end_of_image|>"]]
        ids += chat.encode_text(str(int(stamp)))
    ids += [SP["<|end_of_video|>"], *chat.encode_text("What happens?"), SP["<|assistant|>"], *chat.encode_text("\n")]
    plan = plan_prompt(pipe.host, ids, pixel_values_videos=video.pixel_values, video_grid_thw=video.grid_thw)
    assert [c.kind for c in plan.vision_calls] == [VIDEO] * t
    assert [c.grid.tolist() for c in plan.vision_calls] == [[[1, h, w]]] * t
    assert plan.vision_calls[-1].rows.stop == video.pixel_values.shape[0]
    result = pipe.generate_ids(ids, pixel_values_videos=video.pixel_values, video_grid_thw=video.grid_thw,
                               max_new_tokens=32, eos_token_ids=())
    batch = PromptBatch(input_ids=np.array([ids]), pixel_values_videos=video.pixel_values,
                        video_grid_thw=video.grid_thw)
    assert result.token_ids == greedy_generate(references[name], batch, 32)[0].tolist()


def test_plan_rejects_mismatched_inputs(pipes):
    from glmtrt.runtime.prompt import plan_prompt

    host = pipes["tiny-glm-ocr"].host
    ids = [3, 4, 252, 250, 250, 253, 6]
    assert len(plan_prompt(host, ids, pixel_values=np.zeros((8, 1176), np.float32),
                           image_grid_thw=[[1, 2, 4]]).vision_calls) == 1
    with pytest.raises(InputError, match="pixel_values has 7"):
        plan_prompt(host, ids, pixel_values=np.zeros((7, 1176), np.float32), image_grid_thw=[[1, 2, 4]])
    with pytest.raises(InputError, match="2 image placeholder tokens"):
        plan_prompt(host, ids, pixel_values=np.zeros((16, 1176), np.float32), image_grid_thw=[[1, 4, 4]])
    with pytest.raises(InputError, match="merge size"):
        plan_prompt(host, ids, pixel_values=np.zeros((9, 1176), np.float32), image_grid_thw=[[1, 3, 3]])
    with pytest.raises(InputError, match="no tokens"):
        plan_prompt(host, [[1, 2]], attention_mask=[[0, 0]])
