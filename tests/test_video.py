"""Video input for GLM-4.1V and GLM-4.5V through the public runtime API and the CLI, against the reference.

A video is a list of frames, a glob of frame files or a video file (decoded with PyAV); frames are sampled as
transformers' Glm4vVideoProcessor does (2 a second, an even count), the prompt carries each temporal patch's
timestamp as Glm4vProcessor writes it, every temporal patch is one vision call, and the 3-D positions are
``get_rope_index``'s. fp32 ONNX Runtime greedy tokens equal the PyTorch reference road (reference/generate.py).
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch

from glmtrt.reference import load_reference
from glmtrt.reference.generate import PromptBatch, greedy_generate
from glmtrt.reference.tokenizer import TINY_GLM4V_SPECIALS, build_char_tokenizer
from glmtrt.runtime.errors import InputError
from glmtrt.runtime.pipeline import Pipeline, Request
from glmtrt.runtime.preprocess import read_video_file, sample_video_frame_indices
from glmtrt.runtime.prompt import VIDEO, plan_prompt

from test_runtime import image, run_cli

PRESETS = ("tiny-glm-4.1v", "tiny-glm-4.5v")
NEW_TOKENS = 64
PROMPT = "What happens in the clip?"
SP = TINY_GLM4V_SPECIALS


@pytest.fixture(scope="module")
def pipes(exported):
    return {name: Pipeline.from_engines(exported(name)) for name in PRESETS}


@pytest.fixture(scope="module")
def references():
    return {name: load_reference(name) for name in PRESETS}


def frames(n: int = 4, height: int = 60, width: int = 90, seed: int = 10) -> list[np.ndarray]:
    return [np.asarray(image(height, width, seed=seed + i)) for i in range(n)]


def transformers_video_ids(grid_thw, timestamps_per_frame: list[float], fps: float) -> list[int]:
    """The video part of the prompt as transformers writes it: Glm4vProcessor.replace_video_token expands the chat
    template's <|video|> (inside <|begin_of_video|>…<|end_of_video|>), tokenized with the tiny tokenizer."""
    from transformers import Glm4vProcessor
    from transformers.video_utils import VideoMetadata

    fake = SimpleNamespace(video_processor=SimpleNamespace(merge_size=2), image_token="<|image|>")
    fake.replace_frame_token_id = lambda ts, num_image_tokens=1: Glm4vProcessor.replace_frame_token_id(
        fake, ts, num_image_tokens)
    metadata = VideoMetadata(total_num_frames=len(timestamps_per_frame), fps=fps,
                             frames_indices=[round(t * fps) for t in timestamps_per_frame])
    text = Glm4vProcessor.replace_video_token(fake, {"video_grid_thw": torch.tensor(np.asarray(grid_thw)),
                                                     "video_metadata": [metadata]}, 0)
    return build_char_tokenizer(SP).encode(f"<|begin_of_video|>{text}<|end_of_video|>", add_special_tokens=False).ids


def reference_tokens(model, ids, video, n: int = NEW_TOKENS) -> list[int]:
    batch = PromptBatch(input_ids=np.array([ids]), pixel_values_videos=video.pixel_values,
                        video_grid_thw=video.grid_thw)
    return greedy_generate(model, batch, n)[0].tolist()


# ------------------------------------------------------------------------------- a 4-frame video, both families

@pytest.mark.parametrize("name", PRESETS)
def test_four_frame_video_equals_reference(pipes, references, name):
    pipe = pipes[name]
    clip = frames(4)
    result = pipe.generate(PROMPT, video=clip, max_new_tokens=NEW_TOKENS, eos_token_ids=())
    video, stamps = pipe.preprocess_video(clip)
    t, h, w = video.grid_thw[0].tolist()
    assert (t, stamps) == (2, [0.0, 1.0])  # 4 frames at 2 fps: temporal patches at 0 s and 1 s

    # The prompt: the chat turn around the video part exactly as transformers' processor writes it.
    chat = pipe.chat
    want = [SP["[gMASK]"], SP["<sop>"], SP["<|user|>"], *chat.encode_text("\n"),
            *transformers_video_ids(video.grid_thw, [0.0, 0.5, 1.0, 1.5], fps=2.0),
            *chat.encode_text(PROMPT), SP["<|assistant|>"], *chat.encode_text("\n")]
    assert result.prompt_token_ids == want
    assert want.count(SP["<|image|>"]) == t * h * w // 4

    # One vision call per temporal patch; positions as transformers' get_rope_index gives them.
    plan = plan_prompt(pipe.host, want, pixel_values_videos=video.pixel_values, video_grid_thw=video.grid_thw)
    assert [(c.kind, c.grid.tolist()) for c in plan.vision_calls] == [(VIDEO, [[1, h, w]])] * t
    from oracle import hf_model
    from transformers import Glm4vProcessor

    hf = hf_model(name)
    ids = torch.tensor([want])
    types = Glm4vProcessor.create_mm_token_type_ids(
        SimpleNamespace(image_token_id=SP["<|image|>"], video_start_id=SP["<|begin_of_video|>"],
                        video_end_id=SP["<|end_of_video|>"]), [want])
    hf_pos, hf_delta = hf.model.get_rope_index(ids, torch.tensor(np.asarray(types)), video_grid_thw=torch.from_numpy(video.grid_thw))
    np.testing.assert_array_equal(plan.position_ids, hf_pos.numpy())
    np.testing.assert_array_equal(plan.decode_positions(0)[:, 0, 0], [len(want) + int(hf_delta[0, 0])] * 3)

    expected = reference_tokens(references[name], want, video)
    assert result.token_ids == expected
    assert result.stop_reason == "length" and len(set(result.token_ids)) > 1


def test_frame_array_and_frame_list_agree(pipes):
    pipe = pipes["tiny-glm-4.5v"]
    clip = frames(4, seed=30)
    as_list = pipe.generate(PROMPT, video=clip, max_new_tokens=16, eos_token_ids=())
    as_array = pipe.generate(PROMPT, video=np.stack(clip), max_new_tokens=16, eos_token_ids=())
    as_pil = pipe.generate(PROMPT, video=[PIL.Image.fromarray(f) for f in clip], max_new_tokens=16, eos_token_ids=())
    assert as_list.token_ids == as_array.token_ids == as_pil.token_ids
    assert as_list.prompt_token_ids == as_array.prompt_token_ids


def test_video_and_image_batch_equals_reference(pipes, references):
    """A batch of a video request and an image request (left-padded): each row equals the reference."""
    name = "tiny-glm-4.5v"
    pipe = pipes[name]
    clip, picture = frames(4, seed=40), image(70, 180, seed=2)
    results = pipe.generate_batch([Request("Describe.", video=clip), Request(PROMPT, [picture])],
                                  max_new_tokens=NEW_TOKENS, eos_token_ids=())
    rows = [r.prompt_token_ids for r in results]
    width = max(map(len, rows))
    ids = np.array([[0] * (width - len(r)) + r for r in rows])
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    video, _ = pipe.preprocess_video(clip)
    still = pipe.preprocess([picture])
    batch = PromptBatch(input_ids=ids, attention_mask=mask, pixel_values=still.pixel_values,
                        image_grid_thw=still.grid_thw, pixel_values_videos=video.pixel_values,
                        video_grid_thw=video.grid_thw)
    expected = greedy_generate(references[name], batch, NEW_TOKENS)
    assert [r.token_ids for r in results] == expected.tolist()


# ------------------------------------------------------------------------------- a video file (PyAV)

def write_video(path, clip: list[np.ndarray], rate: int) -> None:
    """A lossless (PNG-coded) video, so the decoded frames equal ``clip``."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("png", rate=rate)
        stream.height, stream.width = clip[0].shape[:2]
        stream.pix_fmt = "rgb24"
        for frame in clip:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_video_file_sampled_as_transformers_and_equals_reference(pipes, references, tmp_path):
    """20 frames at 8 fps (2.5 s): 2 frames a second -> indices 0, 4, 8, 12, 16 padded to an even 6; the temporal
    patches are stamped 0, 1, 2 s; the generation equals the same frames given as a list and the reference."""
    name = "tiny-glm-4.5v"
    pipe = pipes[name]
    clip = frames(20, seed=50)
    path = tmp_path / "clip.mov"
    write_video(path, clip, rate=8)

    decoded, stamps = read_video_file(str(path))
    indices = sample_video_frame_indices(20, 8.0, duration=20 / 8)
    assert indices.tolist() == [0, 4, 8, 12, 16, 16]
    assert stamps == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    assert all(np.array_equal(got, clip[i]) for got, i in zip(decoded, indices))

    from_file = pipe.generate(PROMPT, video=str(path), max_new_tokens=NEW_TOKENS, eos_token_ids=())
    video, video_stamps = pipe.preprocess_video(path)
    assert video.grid_thw[0, 0] == 3 and video_stamps == [0.0, 1.0, 2.0]
    assert transformers_video_ids(video.grid_thw, stamps, fps=8.0) == from_file.prompt_token_ids[4:-(len(PROMPT) + 2)]
    from_frames = pipe.generate(PROMPT, video=[clip[i] for i in indices], max_new_tokens=NEW_TOKENS, eos_token_ids=())
    assert from_file.prompt_token_ids == from_frames.prompt_token_ids
    assert from_file.token_ids == from_frames.token_ids == reference_tokens(references[name],
                                                                            from_file.prompt_token_ids, video)


def test_cli_video_glob_and_file(pipes, exported, tmp_path):
    pipe = pipes["tiny-glm-4.1v"]
    clip = frames(4, seed=60)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(clip):
        PIL.Image.fromarray(frame).save(folder / f"frame_{i:03d}.png")
    expected = pipe.generate(PROMPT, video=clip, max_new_tokens=16, eos_token_ids=())
    engines = str(exported("tiny-glm-4.1v"))
    proc = run_cli("run", "--engines", engines, "--video", str(folder / "frame_*.png"), "--prompt", PROMPT,
                   "--max-new-tokens", "16", "--ignore-eos", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["token_ids"] == expected.token_ids and out["prompt_token_ids"] == expected.prompt_token_ids

    path = tmp_path / "clip.mov"
    write_video(path, clip, rate=2)  # 4 frames at 2 fps: the sampler keeps all four
    proc = run_cli("run", "--engines", engines, "--video", str(path), "--prompt", PROMPT, "--max-new-tokens", "16",
                   "--ignore-eos", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["token_ids"] == expected.token_ids


# ------------------------------------------------------------------------------- mistakes: one clear line

@pytest.mark.parametrize("make,words", [
    (lambda d: d / "missing.mp4", "does not exist"),
    (lambda d: d / "none_*.png", "no frame files match"),
    (lambda d: d, "is a folder"),
    (lambda d: (d / "notes.mp4").write_text("not a video") and d / "notes.mp4", "cannot read"),
    (lambda d: [np.zeros((56, 56, 3), np.uint8)], "at least 2 frames"),
    (lambda d: 42, "a video must be"),
], ids=["missing", "no-match", "folder", "not-a-video", "one-frame", "wrong-type"])
def test_video_mistakes_are_input_errors(pipes, tmp_path, make, words):
    with pytest.raises(InputError, match=words) as info:
        pipes["tiny-glm-4.1v"].generate(PROMPT, video=make(tmp_path), max_new_tokens=2)
    assert "\n" not in str(info.value)


def test_video_file_without_pyav_says_how_to_get_it(pipes, tmp_path, monkeypatch):
    path = tmp_path / "clip.mov"
    write_video(path, frames(4), rate=2)
    monkeypatch.setitem(sys.modules, "av", None)  # import av -> ImportError
    with pytest.raises(InputError, match=r"needs PyAV.*pip install av") as info:
        pipes["tiny-glm-4.1v"].generate(PROMPT, video=str(path), max_new_tokens=2)
    assert "\n" not in str(info.value)
    # frames and frame globs need no PyAV
    assert len(pipes["tiny-glm-4.1v"].generate(PROMPT, video=frames(4), max_new_tokens=2).token_ids) >= 1


def test_cli_missing_video_exits_2(exported, tmp_path):
    proc = run_cli("run", "--engines", str(exported("tiny-glm-4.1v")), "--video", str(tmp_path / "nope.mp4"),
                   "--prompt", "x")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "does not exist" in proc.stderr
