"""``glmtrt demo`` and ``glmtrt presets``: the reference road on a built-in default."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from glmtrt.runtime.cli import sample_image_path
from glmtrt.runtime.errors import InputError
from glmtrt.runtime.preprocess import ImageProcessorConfig, preprocess_images

from .config import preset, preset_names
from .tokenizer import TINY_GLM4V_SPECIALS, build_char_tokenizer


def ocr_prompt_ids(specials: dict[str, int], encode, image_tokens: int, text: str) -> list[int]:
    """GLM chat layout for one image and a user instruction:
    ``[gMASK]<sop><|user|>\\n<|begin_of_image|><|image|>*n<|end_of_image|>{text}<|assistant|>\\n``."""
    return ([specials["[gMASK]"], specials["<sop>"], specials["<|user|>"]] + encode("\n")
            + [specials["<|begin_of_image|>"]] + [specials["<|image|>"]] * image_tokens + [specials["<|end_of_image|>"]]
            + encode(text) + [specials["<|assistant|>"]] + encode("\n"))


def demo_command(args) -> int:
    import torch

    from .generate import PromptBatch, greedy_generate
    from .weights import load_reference

    if args.max_new_tokens <= 0:
        raise InputError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    image = args.image or sample_image_path()
    if not Path(image).is_file():
        raise InputError(f"image {image!r} does not exist; pass an existing image file")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = load_reference(args.model)
    if model.config.model_type == "glm_image":
        raise InputError("the demo reads text from an image; choose a GLM-4V-family model (e.g. tiny-glm-ocr)")
    folder = Path(args.model)
    proc_cfg = ImageProcessorConfig()
    if (folder / "preprocessor_config.json").is_file():
        proc_cfg = ImageProcessorConfig.from_dict(json.loads((folder / "preprocessor_config.json").read_text()))
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    else:
        tokenizer = build_char_tokenizer(TINY_GLM4V_SPECIALS)
    specials = {tok: tokenizer.token_to_id(tok) for tok in TINY_GLM4V_SPECIALS}
    tokenizer.encode_special_tokens = True  # user text is never parsed as special tokens
    load_s = time.perf_counter() - t0

    vision_inputs = preprocess_images([image], proc_cfg)
    merge = model.config.vision.spatial_merge_size
    n_image_tokens = int(vision_inputs.grid_thw[0].prod()) // merge**2
    ids = ocr_prompt_ids(specials, lambda s: tokenizer.encode(s, add_special_tokens=False).ids,
                         n_image_tokens, "Text Recognition:")
    batch = PromptBatch(input_ids=np.array([ids]), pixel_values=vision_inputs.pixel_values,
                        image_grid_thw=vision_inputs.grid_thw)
    t1 = time.perf_counter()
    tokens = greedy_generate(model, batch, args.max_new_tokens)[0]
    gen_s = time.perf_counter() - t1

    print(f"model      : {args.model} ({model.config.model_type}, random weights)" if args.model in preset_names()
          else f"model      : {args.model} ({model.config.model_type})")
    print(f"image      : {image} -> grid {vision_inputs.grid_thw[0].tolist()} ({n_image_tokens} image tokens)")
    print(f"prompt     : {len(ids)} tokens")
    print(f"tokens     : {tokens.tolist()}")
    print(f"text       : {tokenizer.decode(tokens.tolist(), skip_special_tokens=False)!r}")
    print(f"timings    : load {load_s:.2f} s, generate {gen_s:.2f} s ({len(tokens) / gen_s:.1f} tok/s, reference fp32)")
    return 0


def presets_command(args) -> int:
    for name in preset_names():
        config = preset(name)
        if args.json:
            print(json.dumps({name: config.to_dict()}))
            continue
        t, v = config.text, config.vision
        moe = f", MoE {t.moe.num_experts}x top-{t.moe.experts_per_token}" if t.moe else ""
        print(f"{name:16s} {config.model_type:10s} text {t.num_layers}L/{t.hidden_size}h/{t.num_heads}q{t.num_kv_heads}kv"
              f"{moe}; vision {v.depth}L/{v.hidden_size}h")
    return 0
