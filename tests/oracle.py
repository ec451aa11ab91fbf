"""transformers as the oracle (tests only): tiny HF models built from our presets' config.json dicts."""

from __future__ import annotations

import torch
import transformers

from glmtrt.reference.config import preset_hf_dict

HF_CLASSES = {
    "glm_ocr": ("GlmOcrConfig", "GlmOcrForConditionalGeneration"),
    "glm4v": ("Glm4vConfig", "Glm4vForConditionalGeneration"),
    "glm4v_moe": ("Glm4vMoeConfig", "Glm4vMoeForConditionalGeneration"),
    "glm_image": ("GlmImageConfig", "GlmImageForConditionalGeneration"),
}
TINY_PRESETS = ("tiny-glm-ocr", "tiny-glm-4.1v", "tiny-glm-4.5v", "tiny-glm-image")


def hf_config(preset: str):
    d = dict(preset_hf_dict(preset))
    config_cls = getattr(transformers, HF_CLASSES[d.pop("model_type")][0])
    config = config_cls(**d)
    config._attn_implementation = "eager"
    for sub in ("text_config", "vision_config"):
        getattr(config, sub)._attn_implementation = "eager"
    return config


def hf_model(preset: str, seed: int = 0):
    """A transformers model of a tiny preset with seeded weights that exercise every parameter (no zero biases,
    norm gains away from 1, a non-zero router correction bias)."""
    config = hf_config(preset)
    model_cls = getattr(transformers, HF_CLASSES[preset_hf_dict(preset)["model_type"]][1])
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if "norm" in name and name.endswith("weight"):
                tensor.copy_(1.0 + 0.1 * torch.randn(tensor.shape, generator=gen))
            elif name.endswith("e_score_correction_bias"):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=gen))
            else:
                tensor.copy_(0.05 * torch.randn(tensor.shape, generator=gen))
    if hasattr(model.config, "experts_implementation"):
        model.config.experts_implementation = "eager"
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.generation_config.do_sample = False
    return model
