"""Train a small GLM-OCR model (model_type "glm_ocr") that really reads rendered text lines.

    glmtrt train-ocr --out DIR [--steps 3400] [--minutes 30] [--seed 0]
    python -m glmtrt.reference.train_ocr --out DIR ...          (the same)

The model is :class:`glmtrt.reference.GlmModel` itself — the same code the exporter traces — trained through
its stages: vision tower (host-made rotary tables and segment ids, several images per call) -> token
embeddings with the image embeddings merged at the ``<|image|>`` placeholders -> language model over the
sequence with the 3-D M-RoPE positions of ``glmtrt.runtime.positions.get_rope_index`` -> ``lm_head``.
Teacher forcing on ``text + <|endoftext|>`` after the GLM-OCR prompt; the loss covers the target tokens only.

What makes a from-scratch tower learn within minutes on a CPU (each found by measurement):

* the processor's ``image_mean`` sits at the paper's brightness (0.92): with CLIP's mean every patch carries a
  large common offset, Adam's first updates turn the patch embedding into a background detector and the
  image embeddings collapse to one vector for hundreds of steps;
* a training-only auxiliary head (never saved) asks every merged image token which characters sit in its
  column (their centres are known from rendering); its weight decays to 0 by 80% of training. Without it the
  decoder learns the text prior first and the tower gets almost no gradient;
* lines are two merged-token rows high (56 px), about one character per token column.

Stops at ``--steps`` or ``--minutes``, whichever comes first; the cosine schedule follows
max(step / steps, elapsed / budget), so a step-bound run is reproducible from its seed (batches are pure
functions of (seed, step); set ``--threads 1`` for bit-identical float reductions).

The output folder is an HF checkpoint: config.json, model.safetensors (bf16), tokenizer.json,
preprocessor_config.json, generation_config.json (+ training_info.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from glmtrt.runtime.positions import get_rope_index, mm_token_type_ids
from glmtrt.runtime.preprocess import ImageProcessorConfig, preprocess_images
from glmtrt.runtime.vision_tables import vision_tables

from .config import ModelConfig
from .demo import ocr_prompt_ids
from .model import GlmModel
from .ocr_data import MAX_CHARS, TRAIN_STREAM, line_rng, make_line, make_line_with_centers
from .tokenizer import DEFAULT_CHARACTERS, TINY_GLM4V_SPECIALS, build_char_tokenizer
from .weights import save_checkpoint

# GLM special-token names at small ids: the chat tokens of the tiny presets (0-12), then the image / video tokens
# (13-18); characters follow from id 19 (96 characters -> ids 19..114).
_MULTIMODAL = ("<|image|>", "<|video|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
               "<|end_of_video|>")
OCR_SPECIALS: dict[str, int] = {name: i for name, i in TINY_GLM4V_SPECIALS.items() if name not in _MULTIMODAL} | {
    name: 13 + i for i, name in enumerate(_MULTIMODAL)}
FIRST_CHAR_ID = 19
VOCAB_SIZE = 128
PROMPT = "Text Recognition:"
MAX_NEW_TOKENS = 32
AUX_UNTIL = 0.8  # the auxiliary loss weight decays linearly to 0 at this fraction of training
VALID_STREAM = 3  # lines watched during training: neither the training nor the held-out stream


def build_tokenizer():
    """tokenizers.Tokenizer: the GLM special tokens (OCR_SPECIALS) and one token per printable ASCII character."""
    return build_char_tokenizer(OCR_SPECIALS, DEFAULT_CHARACTERS, first_char_id=FIRST_CHAR_ID)


def hf_config_dict() -> dict:
    """config.json of the small GLM-OCR: ~3.4M parameters, same architecture as zai-org/GLM-OCR."""
    s = OCR_SPECIALS
    return {
        "architectures": ["GlmOcrForConditionalGeneration"],
        "model_type": "glm_ocr",
        "dtype": "bfloat16",
        "tie_word_embeddings": False,
        "image_token_id": s["<|image|>"],
        "video_token_id": s["<|video|>"],
        "image_start_token_id": s["<|begin_of_image|>"],
        "image_end_token_id": s["<|end_of_image|>"],
        "video_start_token_id": s["<|begin_of_video|>"],
        "video_end_token_id": s["<|end_of_video|>"],
        "vision_config": {
            "model_type": "glm_ocr_vision",
            "depth": 3,
            "hidden_size": 128,
            "num_heads": 4,  # head_dim 32
            "intermediate_size": 256,
            "out_hidden_size": 192,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "image_size": 336,
            "in_channels": 3,
            "hidden_act": "silu",
            "attention_bias": True,
            "rms_norm_eps": 1e-05,
            "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0},
        },
        "text_config": {
            "model_type": "glm_ocr_text",
            "vocab_size": VOCAB_SIZE,
            "hidden_size": 192,
            "intermediate_size": 512,
            "num_hidden_layers": 3,
            "num_attention_heads": 6,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "rms_norm_eps": 1e-05,
            "max_position_embeddings": 1024,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
                                "mrope_section": [4, 6, 6]},
            "eos_token_id": [s["<|endoftext|>"], s["<|user|>"]],
            "pad_token_id": s["<|pad|>"],
            "tie_word_embeddings": False,
        },
    }


def processor_config() -> ImageProcessorConfig:
    """Pixel budget for text lines: a 28 x 28 still image is the floor (a 56 x 300 px line is never upscaled),
    and at most 28 * 28 * 2 * 64 pixels (64 merged image tokens; a 16-character line at 42 px needs ~32)."""
    # Mean at the paper's brightness: background patches are ~0, ink is strongly negative. With CLIP's mean the
    # large common offset of every patch swamps the strokes and the from-scratch tower learns much more slowly.
    return ImageProcessorConfig(min_pixels=28 * 28 * 2, max_pixels=28 * 28 * 2 * 64,
                                image_mean=(0.92, 0.92, 0.92), image_std=(0.3, 0.3, 0.3))


def generation_config_dict() -> dict:
    s = OCR_SPECIALS
    return {"eos_token_id": [s["<|endoftext|>"], s["<|user|>"]], "pad_token_id": s["<|pad|>"],
            "do_sample": False, "max_new_tokens": MAX_NEW_TOKENS}


class Encoder:
    """Prompt and target ids for the OCR task."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokenizer.encode_special_tokens = True

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def prompt(self, image_tokens: int) -> list[int]:
        return ocr_prompt_ids(OCR_SPECIALS, self.encode, image_tokens, PROMPT)


def make_batch(lines, encoder: Encoder, proc: ImageProcessorConfig, merge: int = 2) -> dict:
    """Right-padded teacher-forcing batch.

    Returns input_ids / attention_mask int64 (B, L), labels int64 (B, L) (-100 except where the next token is
    a target), pixel_values float32 (N, patch_dim), image_grid_thw int64 (B, 3), position_ids int64 (3, B, L).
    """
    vis = preprocess_images([image for image, _ in lines], proc)
    rows, label_rows = [], []
    for (_, text), grid in zip(lines, vis.grid_thw):
        prompt = encoder.prompt(int(grid.prod()) // merge**2)
        target = encoder.encode(text) + [OCR_SPECIALS["<|endoftext|>"]]
        ids = prompt + target
        labels = [-100] * (len(prompt) - 1) + target + [-100]  # position i predicts token i + 1
        rows.append(ids)
        label_rows.append(labels)
    length = max(map(len, rows))
    batch = len(rows)
    input_ids = np.full((batch, length), OCR_SPECIALS["<|pad|>"], dtype=np.int64)
    labels = np.full((batch, length), -100, dtype=np.int64)
    mask = np.zeros((batch, length), dtype=np.int64)
    for b, (ids, lab) in enumerate(zip(rows, label_rows)):
        input_ids[b, : len(ids)] = ids
        labels[b, : len(lab)] = lab
        mask[b, : len(ids)] = 1
    s = OCR_SPECIALS
    mm = mm_token_type_ids(input_ids, s["<|image|>"], s["<|begin_of_video|>"], s["<|end_of_video|>"])
    position_ids, _ = get_rope_index(input_ids, mm, vis.grid_thw, None, mask, merge)
    return dict(input_ids=input_ids, attention_mask=mask, labels=labels, pixel_values=vis.pixel_values,
                image_grid_thw=vis.grid_thw, position_ids=position_ids, mm_token_type_ids=mm)


def vision_forward(model: GlmModel, pixel_values: np.ndarray, grids: np.ndarray, images_per_call: int = 8):
    """The vision tower with gradients, a few images per call (attention kept inside each image by segment ids)."""
    v = model.config.vision
    visual = model.model.visual
    starts = np.concatenate([[0], np.cumsum(grids.prod(1))])
    out = []
    for i in range(0, len(grids), images_per_call):
        j = min(i + images_per_call, len(grids))
        tables = vision_tables(grids[i:j], kind=v.kind, head_dim=v.head_dim, rope_theta=v.rope_theta,
                               merge_size=v.spatial_merge_size, table_side=v.pos_table_side)
        pixels = torch.from_numpy(pixel_values[starts[i]:starts[j]])
        n = pixels.shape[0]
        out.append(visual(pixels, torch.from_numpy(tables["rotary_cos"]), torch.from_numpy(tables["rotary_sin"]),
                          torch.zeros(n, 0, dtype=torch.int64), torch.zeros(n, 0),
                          torch.from_numpy(tables["segment_ids"])))
    return torch.cat(out)


def training_batch(seed: int, step: int, batch_size: int) -> dict:
    """The batch of training step ``step``: a pure function of (seed, step, batch_size)."""
    lines = [make_line_with_centers(line_rng(TRAIN_STREAM, seed, step * batch_size + i)) for i in range(batch_size)]
    batch = make_batch([line[:2] for line in lines], Encoder(_tokenizer()), processor_config())
    batch["aux_targets"] = aux_targets(lines, batch["image_grid_thw"], Encoder(_tokenizer()))
    return batch


def aux_targets(lines, grids: np.ndarray, encoder: "Encoder", merge: int = 2) -> np.ndarray:
    """Training-only hint for the vision tower: for every merged image token, a multi-hot row over the vocabulary
    of the (non-space) characters whose centre falls in the token's column. float32 (n_tokens, VOCAB_SIZE)."""
    rows = []
    for (_, text, centers), (_, h, w) in zip(lines, grids):
        gh, gw = int(h) // merge, int(w) // merge
        target = np.zeros((gh, gw, VOCAB_SIZE), dtype=np.float32)
        for ch, c in zip(text, centers):
            if ch != " ":
                target[:, min(max(int(c * gw), 0), gw - 1), encoder.encode(ch)[0]] = 1.0
        rows.append(target.reshape(gh * gw, VOCAB_SIZE))
    return np.concatenate(rows)


_TOKENIZER = None


def _tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = build_tokenizer()
    return _TOKENIZER


class BatchStream:
    """Training batches in order, rendered ahead by worker processes (bounded prefetch), or inline (workers=0)."""

    def __init__(self, seed: int, batch_size: int, workers: int = 1, prefetch: int = 4, start: int = 0):
        self.seed, self.batch_size, self.step = seed, batch_size, start
        self.pool = None
        self.pending: list = []
        if workers > 0:
            import multiprocessing

            self.pool = multiprocessing.get_context("spawn").Pool(workers)
            for _ in range(prefetch):
                self._submit()

    def _submit(self):
        index = self.step + len(self.pending)
        self.pending.append(self.pool.apply_async(training_batch, (self.seed, index, self.batch_size)))

    def next(self) -> dict:
        if self.pool is None:
            batch = training_batch(self.seed, self.step, self.batch_size)
        else:
            batch = self.pending.pop(0).get()
            self.step += 1
            self._submit()
            return batch
        self.step += 1
        return batch

    def close(self):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


def forward_loss(model: GlmModel, batch: dict, aux_head=None, aux_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy over target tokens (plus ``aux_weight`` x the per-token character loss of the
    training-only ``aux_head`` on the image embeddings), and stats: ce, aux, correct top-1 and count of targets."""
    lm = model.model.language_model
    ids = torch.from_numpy(batch["input_ids"])
    features = vision_forward(model, batch["pixel_values"], batch["image_grid_thw"])
    embeds = lm.embed_tokens(ids)
    b_idx, s_idx = np.nonzero(batch["mm_token_type_ids"] == 1)
    embeds = embeds.index_put((torch.from_numpy(b_idx), torch.from_numpy(s_idx)), features.to(embeds.dtype))
    hidden, _, _ = lm(embeds, torch.from_numpy(batch["position_ids"]), torch.from_numpy(batch["attention_mask"]))
    labels = torch.from_numpy(batch["labels"])
    where = labels != -100
    logits = model.lm_head(hidden[where]).float()
    target = labels[where]
    ce = F.cross_entropy(logits, target)
    stats = {"ce": float(ce.detach()), "correct": int((logits.argmax(-1) == target).sum()), "count": int(target.numel()),
             "aux": 0.0}
    loss = ce
    if aux_head is not None and aux_weight > 0 and "aux_targets" in batch:
        aux = F.binary_cross_entropy_with_logits(aux_head(features.float()), torch.from_numpy(batch["aux_targets"]),
                                                 reduction="sum") / features.shape[0]
        loss = ce + aux_weight * aux
        stats["aux"] = float(aux.detach())
    return loss, stats


class ThreadTuner:
    """Picks 1 or 2 torch threads as the machine's load changes (``--threads 0``).

    On a 2-core machine shared with other jobs, 2 OpenMP threads can run 5x slower than 1 (each parallel region
    waits for a descheduled thread); alone, 2 threads are ~1.6x faster. Every ``period`` steps it times
    ``probe`` steps with each count and keeps the faster until the next probe."""

    def __init__(self, period: int = 100, probe: int = 4):
        self.period, self.probe, self.choice = period, probe, 1
        self.times: dict[int, list[float]] = {1: [], 2: []}

    def threads_for(self, step: int) -> int:
        phase = step % self.period
        if phase < 2 * self.probe:
            n = 1 if phase < self.probe else 2
        else:
            if phase == 2 * self.probe:
                # skip each probe's first step (thread-pool warm-up); keep the faster mean
                t1, t2 = self.times[1][1:], self.times[2][1:]
                self.choice = 2 if t2 and t1 and sum(t2) / len(t2) < sum(t1) / len(t1) else 1
                self.times = {1: [], 2: []}
            n = self.choice
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        return n

    def record(self, step: int, seconds: float) -> None:
        if step % self.period < 2 * self.probe:
            self.times[torch.get_num_threads()].append(seconds)


def _lr_factor(progress: float, warmup: float, floor: float = 0.05) -> float:
    if progress < warmup:
        return max(progress / warmup, 1e-3)
    t = min((progress - warmup) / max(1 - warmup, 1e-9), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def _quick_cer(model: GlmModel, encoder: Encoder, proc: ImageProcessorConfig, seed: int, n: int = 48) -> tuple[float, float]:
    """Greedy CER / exact match on n lines of the validation stream, one left-padded batch."""
    from .eval_ocr import score, truncate_at_eos
    from .generate import PromptBatch, greedy_generate

    lines = [make_line(line_rng(VALID_STREAM, seed, i)) for i in range(n)]
    vis = preprocess_images([im for im, _ in lines], proc)
    prompts = [encoder.prompt(int(g.prod()) // 4) for g in vis.grid_thw]
    length = max(map(len, prompts))
    ids = np.zeros((n, length), dtype=np.int64)
    mask = np.zeros((n, length), dtype=np.int64)
    for b, p in enumerate(prompts):
        ids[b, length - len(p):] = p
        mask[b, length - len(p):] = 1
    model.eval()
    tokens = greedy_generate(model, PromptBatch(ids, mask, vis.pixel_values, vis.grid_thw), MAX_CHARS + 2)
    model.train()
    eos = (OCR_SPECIALS["<|endoftext|>"], OCR_SPECIALS["<|user|>"])
    preds = [encoder.tokenizer.decode(truncate_at_eos(row.tolist(), eos), skip_special_tokens=True) for row in tokens]
    result = score(preds, [t for _, t in lines])
    return result["cer"], result["exact_match"]


def train(out: str | Path, minutes: float = 30.0, steps: int = 3400, seed: int = 0, batch_size: int = 32,
          lr: float = 1.5e-3, warmup: float = 0.05, weight_decay: float = 0.01, log_every: int = 100,
          eval_every: int = 500, threads: int = 2, data_workers: int = 0, aux_weight: float = 1.0,
          overwrite: bool = False, resume: bool = False, save_every: int = 100) -> Path:
    """Train from scratch and write the checkpoint folder ``out``. Stops at ``steps`` or after ``minutes``
    (whichever first); the cosine schedule runs on max(step / steps, elapsed / budget). Every ``save_every``
    steps the training state goes to ``.{out.name}.train-state.pt`` beside ``out``; ``resume`` continues from it
    (the batches are pure functions of the step, so a resumed run sees the same data)."""
    out = Path(out)
    if out.exists() and not overwrite:
        from glmtrt.runtime.errors import InputError

        raise InputError(f"{out} exists; pass --overwrite to replace it or choose a new folder")
    adaptive = threads == 0
    tuner = ThreadTuner() if adaptive else None
    torch.set_num_threads(max(threads, 1))
    torch.manual_seed(seed)
    hf = hf_config_dict()
    config = ModelConfig.from_hf_dict(hf, generation_config_dict())
    model = GlmModel(config).train()
    n_params = sum(p.numel() for p in model.parameters())
    tokenizer = build_tokenizer()
    encoder = Encoder(tokenizer)
    proc = processor_config()
    # Training-only head (never saved): per image token, which characters sit in its column.
    aux_head = torch.nn.Linear(config.text.hidden_size, VOCAB_SIZE) if aux_weight else None
    if aux_head is not None:
        with torch.no_grad():
            aux_head.bias.fill_(-4.0)  # start at the prior (few characters per token), not at 0.5 each
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed_tokens" not in n]
    if aux_head is not None:
        decay += list(aux_head.parameters())
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed_tokens" not in n)]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=lr, betas=(0.9, 0.98), eps=1e-8)
    budget = minutes * 60.0
    print(f"train_ocr: {n_params / 1e6:.2f}M parameters, batch {batch_size}, up to {steps} steps / {minutes:g} min, "
          f"lr {lr:g}, seed {seed}, {threads or 'adaptive 1-2'} torch threads + {data_workers} data workers", flush=True)
    state_path = out.parent / f".{out.name}.train-state.pt"
    step, done_s = 0, 0.0
    if resume and state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        if aux_head is not None:
            aux_head.load_state_dict(state["aux_head"])
        step, done_s = state["step"], state["seconds"]
        print(f"resumed from {state_path} at step {step} ({done_s / 60:.1f} min done)", flush=True)
    batches = BatchStream(seed, batch_size, workers=data_workers, start=step)
    t0 = time.perf_counter() - done_s
    progress = 0.0
    run_loss = run_correct = run_count = run_aux = 0.0
    while step < steps:
        elapsed = time.perf_counter() - t0
        progress = max(step / steps, elapsed / budget)
        if progress >= 1.0:
            break
        factor = _lr_factor(progress, warmup)
        for group in optim.param_groups:
            group["lr"] = lr * factor
        batch = batches.next()
        weight = aux_weight * max(0.0, 1.0 - progress / AUX_UNTIL) if aux_weight else 0.0
        if adaptive:
            threads = tuner.threads_for(step)
        t_step = time.perf_counter()
        loss, stats = forward_loss(model, batch, aux_head, weight)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        if adaptive:
            tuner.record(step, time.perf_counter() - t_step)
        step += 1
        run_loss += stats["ce"] * stats["count"]
        run_correct += stats["correct"]
        run_count += stats["count"]
        run_aux += stats["aux"]
        if step % log_every == 0:
            el = time.perf_counter() - t0
            print(f"step {step:5d} | {el / 60:5.1f} min | {step / el:4.2f} it/s | lr {lr * factor:.2e} | "
                  f"loss {run_loss / run_count:.4f} | token acc {run_correct / run_count:.3f}"
                  + (f" | aux {run_aux / log_every:.3f} x {weight:.2f}" if aux_head is not None else "")
                  + (f" | {threads} thr" if adaptive else ""), flush=True)
            run_loss = run_correct = run_count = run_aux = 0.0
        if save_every and step % save_every == 0 and step < steps:
            _save_state(state_path, model, optim, aux_head, step, time.perf_counter() - t0)
        if eval_every and step % eval_every == 0:
            cer, em = _quick_cer(model, encoder, proc, seed)
            print(f"step {step:5d} | validation greedy CER {cer:.4f} | exact {em:.3f}", flush=True)
    train_s = time.perf_counter() - t0
    state_path.unlink(missing_ok=True)
    batches.close()
    stopped = "step budget" if step >= steps else "time budget"
    print(f"trained {step} steps in {train_s / 60:.1f} min ({stopped})", flush=True)
    model.eval()
    write_checkpoint(model, out, tokenizer, proc, overwrite=overwrite,
                     train_info=dict(steps=step, seconds=round(train_s, 1), seed=seed, batch_size=batch_size, lr=lr,
                                     parameters=n_params, stopped_by=stopped))
    return out


def _save_state(path: Path, model, optim, aux_head, step: int, seconds: float) -> None:
    """Training state for ``--resume`` (written atomically next to the output folder, removed at the end)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optim": optim.state_dict(), "step": step, "seconds": seconds,
                "aux_head": aux_head.state_dict() if aux_head is not None else None}, tmp)
    os.replace(tmp, path)


def write_checkpoint(model: GlmModel, out: Path, tokenizer, proc: ImageProcessorConfig, overwrite: bool = False,
                     train_info: dict | None = None) -> Path:
    """The HF folder: bf16 weights (config.json says dtype bfloat16; load in fp32), tokenizer, processor, generation."""
    out = Path(out)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    try:
        folder = tmp_root / "ckpt"
        bf16 = GlmModel(model.config)
        bf16.load_state_dict(model.state_dict())
        save_checkpoint(bf16.to(torch.bfloat16), folder, hf_config_dict())
        tokenizer.save(str(folder / "tokenizer.json"))
        (folder / "preprocessor_config.json").write_text(json.dumps(proc.to_dict(), indent=2) + "\n")
        (folder / "generation_config.json").write_text(json.dumps(generation_config_dict(), indent=2) + "\n")
        if train_info:
            (folder / "training_info.json").write_text(json.dumps(train_info, indent=2) + "\n")
        folder.chmod(0o755)  # mkdtemp makes 0700 folders
        for path in folder.iterdir():
            path.chmod(0o644)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists() and overwrite:
            shutil.rmtree(out)
        os.replace(folder, out)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return out


def train_command(args) -> int:
    """``glmtrt train-ocr``: train, write the checkpoint, then score it on the 200 held-out lines."""
    from glmtrt.runtime.errors import InputError

    if Path(args.out).exists() and not (args.overwrite or args.resume):
        raise InputError(f"{args.out} exists; pass --overwrite to replace it or choose a new folder")
    out = train(args.out, minutes=args.minutes, steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                lr=args.lr, eval_every=args.eval_every, log_every=args.log_every, threads=args.threads,
                data_workers=args.data_workers, aux_weight=args.aux_weight, overwrite=args.overwrite or args.resume,
                resume=args.resume, save_every=args.save_every)
    if not args.no_eval:
        from .eval_ocr import evaluate_reference

        result = evaluate_reference(out, n=200)
        print(json.dumps({k: v for k, v in result.items() if k != "errors"}, indent=2))
    return 0


def main(argv=None) -> int:
    from glmtrt.runtime.cli import add_train_ocr_arguments

    p = argparse.ArgumentParser(prog="python -m glmtrt.reference.train_ocr", description=__doc__.split("\n\n")[0])
    add_train_ocr_arguments(p)
    return train_command(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
