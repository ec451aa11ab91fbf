"""The transformers roads of ``glmtrt bench``: transformers is a test-only oracle, so its road lives here, beside
the oracle, and ``glmtrt bench`` runs this file as the worker process of those roads (source checkouts only).

    python tests/bench_transformers.py --worker SPEC.json OUT.json
"""

from __future__ import annotations

import gc
import sys
from types import SimpleNamespace

import numpy as np
import torch
import transformers
from transformers import DynamicCache

from glmtrt.export import bench
from glmtrt.reference import load_reference
from glmtrt.reference.config import preset as preset_config
from glmtrt.reference.config import preset_hf_dict
from glmtrt.reference.generate import PromptBatch, host_plan
from glmtrt.runtime.preprocess import ImageProcessorConfig, preprocess_images
from oracle import HF_CLASSES, hf_config


def hf_bench_model(preset: str, dtype: torch.dtype):
    """transformers' eager model of ``preset`` holding the reference's seeded weights (identical state-dict keys),
    in ``dtype``."""
    reference = load_reference(preset)
    config = hf_config(preset)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():  # skip the random init: every weight is replaced next
        model = getattr(transformers, HF_CLASSES[preset_hf_dict(preset)["model_type"]][1])(config)
    # assign: the model takes the reference's tensors (identical keys), so the weights are never held twice
    # (the untouched empty parameters are freed without ever becoming resident).
    model.load_state_dict(reference.state_dict(), strict=True, assign=True)
    del reference
    if hasattr(model.config, "experts_implementation"):
        model.config.experts_implementation = "eager"
    return model.to(dtype).eval()


def work_transformers(spec: dict, memory: bench.PeakMemory, log) -> dict:
    """The transformers-fp32 / -bf16 road of ``glmtrt bench`` (see export/bench.py), in its worker process."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    model = hf_bench_model(spec["preset"], dtype)
    gc.collect()
    c = model.config
    v, t = c.vision_config, c.text_config
    processor_config = ImageProcessorConfig(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                                            merge_size=v.spatial_merge_size)
    try:
        from transformers import Glm4vImageProcessorPil

        processor, note = Glm4vImageProcessorPil(**processor_config.to_dict()), None
    except ImportError:  # older transformers: glmtrt's host preprocessing stands in
        processor, note = None, "preprocessing by glmtrt's host functions (no Glm4vImageProcessorPil)"
    image = bench.bench_image(spec["image_size"])
    plan_model = SimpleNamespace(config=preset_config(spec["preset"]))  # what host_plan reads
    runs = []
    load_gib = memory.current_gib()
    image_token = c.image_token_id
    for repeat in range(spec["repeats"]):
        s = bench.Stages(memory)
        with torch.no_grad():
            s.start()
            if processor is not None:
                out = processor(images=[image], return_tensors="np")
                pixels, grid = np.asarray(out["pixel_values"], np.float32), np.asarray(out["image_grid_thw"], np.int64)
            else:
                vi = preprocess_images([image], processor_config)
                pixels, grid = vi.pixel_values, vi.grid_thw
            image_tokens = int(grid[0].prod()) // v.spatial_merge_size**2
            ids = bench.prompt_ids(plan_model.config.to_dict(), image_tokens, spec["prompt"])
            # Positions: transformers' get_rope_index equals the host plan (proven in tests/test_positions.py).
            plan = host_plan(plan_model, PromptBatch(input_ids=np.array([ids]), pixel_values=pixels, image_grid_thw=grid))
            s.stop("preprocess")
            s.start()
            features = model.model.get_image_features(torch.from_numpy(pixels), torch.from_numpy(grid))
            features = getattr(features, "pooler_output", features)
            if isinstance(features, (list, tuple)):
                features = torch.cat(list(features))
            s.stop("vision")
            s.start()
            input_ids = torch.tensor([ids])
            embeds = model.get_input_embeddings()(input_ids)
            slots = (input_ids == image_token)[..., None].expand_as(embeds)
            embeds = embeds.masked_scatter(slots, features.to(embeds.dtype))
            mask = torch.ones_like(input_ids)
            out = model(inputs_embeds=embeds, position_ids=torch.from_numpy(plan.position_ids), attention_mask=mask,
                        use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            tokens = [int(out.logits[0, -1].float().argmax())]
            del out
            s.stop("prefill")
            s.start()
            for step in range(spec["new_tokens"] - 1):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                out = model(input_ids=torch.tensor([[tokens[-1]]]), position_ids=torch.from_numpy(plan.decode_positions(step)),
                            attention_mask=mask, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                tokens.append(int(out.logits[0, -1].float().argmax()))
            s.stop("decode")
            del cache, out
        runs.append(bench.run_record(s, tokens, spec))
        log(f"repeat {repeat + 1}: {bench.brief(runs[-1])}")

    def step_fn(length):
        past = bench.random_past(t.num_hidden_layers, t.num_key_value_heads, length, t.head_dim)
        cache = DynamicCache(config=c)
        for layer in range(t.num_hidden_layers):
            cache.update(torch.from_numpy(past[2 * layer]).to(dtype), torch.from_numpy(past[2 * layer + 1]).to(dtype), layer)
        del past

        def step(i):
            mask = torch.ones(1, length + i + 1, dtype=torch.int64)
            positions = torch.full((3, 1, 1), length + i, dtype=torch.int64)
            with torch.no_grad():
                model(input_ids=torch.tensor([[7]]), position_ids=positions, attention_mask=mask, past_key_values=cache,
                      use_cache=True)
        return step

    result = {"runs": runs, "load_gib": load_gib, "prompt_tokens": len(ids), "patches": int(pixels.shape[0]),
              "context": bench.sweep(spec, step_fn, memory, log)}
    if note:
        result["note"] = note
    return result


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "--worker":
        sys.exit("usage: python tests/bench_transformers.py --worker SPEC.json OUT.json (run by glmtrt bench)")
    sys.exit(bench.worker_main(sys.argv[2], sys.argv[3], workers={"transformers": work_transformers}))
