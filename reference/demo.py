"""``glmtrt presets`` and the GLM OCR prompt layout used by the demo, the trainer and the tests."""

from __future__ import annotations

import json

from .config import ModelConfig, builtin_model_dir, builtin_model_names, preset, preset_names


def ocr_prompt_ids(specials: dict[str, int], encode, image_tokens: int, text: str) -> list[int]:
    """GLM chat layout for one image and a user instruction:
    ``[gMASK]<sop><|user|>\\n<|begin_of_image|><|image|>*n<|end_of_image|>{text}<|assistant|>\\n``."""
    return ([specials["[gMASK]"], specials["<sop>"], specials["<|user|>"]] + encode("\n")
            + [specials["<|begin_of_image|>"]] + [specials["<|image|>"]] * image_tokens + [specials["<|end_of_image|>"]]
            + encode(text) + [specials["<|assistant|>"]] + encode("\n"))


def presets_command(args) -> int:
    named = [(name, preset(name), "random weights") for name in preset_names()]
    named += [(name, ModelConfig.from_pretrained(builtin_model_dir(name)), "trained, shipped with glmtrt")
              for name in builtin_model_names()]
    for name, config, weights in named:
        if args.json:
            print(json.dumps({name: config.to_dict()}))
            continue
        t, v = config.text, config.vision
        moe = f", MoE {t.moe.num_experts}x top-{t.moe.experts_per_token}" if t.moe else ""
        print(f"{name:16s} {config.model_type:10s} text {t.num_layers}L/{t.hidden_size}h/{t.num_heads}q{t.num_kv_heads}kv"
              f"{moe}; vision {v.depth}L/{v.hidden_size}h ({weights})")
    return 0
