"""Checkpoint loading: configs, shards, key mapping, and one clear error per kind of broken checkpoint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from glmtrt.reference import GlmModel, load_reference, preset, preset_names, save_checkpoint
from glmtrt.reference.config import ModelConfig
from glmtrt.runtime.errors import CheckpointError, ConfigError


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def rewrite_single_file(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_presets_are_complete():
    names = preset_names()
    for family in ("glm-ocr", "glm-4.1v", "glm-4.5v", "glm-image"):
        assert family in names and f"tiny-{family}" in names
    tiny_ocr, tiny_41, tiny_45 = preset("tiny-glm-ocr"), preset("tiny-glm-4.1v"), preset("tiny-glm-4.5v")
    assert tiny_ocr.text.rope_interleaved and not tiny_45.text.rope_interleaved  # both rotary pairings
    assert tiny_41.text.partial_rotary_factor == 0.5  # partial rotary
    assert tiny_ocr.text.head_dim * tiny_ocr.text.num_heads != tiny_ocr.text.hidden_size  # explicit head_dim
    moe = tiny_45.text.moe
    assert moe.num_experts >= 4 and moe.n_group > 1 and moe.topk_group < moe.n_group  # group masking exercised


def test_real_size_glm_ocr_has_published_parameter_count():
    """The published GLM-OCR config is 1.107B parameters (vision 434M); built on the meta device, no memory used."""
    with torch.device("meta"):
        model = GlmModel(preset("glm-ocr"))
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.model.visual.parameters())
    assert round(total / 1e9, 3) == 1.107
    assert round(vision / 1e6) == 434


def test_sharded_checkpoint_loads(hf_checkpoints):
    _, folder = hf_checkpoints["tiny-glm-4.1v"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert load_reference(folder).config.model_type == "glm4v"


def test_own_save_round_trips_moe_per_expert_layout(tmp_path):
    model = load_reference("tiny-glm-4.5v", seed=3)
    folder = save_checkpoint(model, tmp_path / "ckpt", max_shard_bytes=200_000)
    keys = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.language_model.layers.1.mlp.experts.7.up_proj.weight" in keys  # on disk: per expert
    again = load_reference(folder)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_next_token_prediction_layer_is_skipped(hf_checkpoints, tmp_path):
    _, src = hf_checkpoints["tiny-glm-ocr"]
    folder = copy_checkpoint(src, tmp_path / "mtp")
    n = preset("tiny-glm-ocr").text.num_layers
    rewrite_single_file(folder, lambda t: t.update({f"model.language_model.layers.{n}.eh_proj.weight": torch.zeros(4, 4)}))
    load_reference(folder)


def test_bf16_checkpoint_loads_in_fp32(hf_checkpoints, tmp_path):
    _, src = hf_checkpoints["tiny-glm-ocr"]
    folder = copy_checkpoint(src, tmp_path / "bf16")
    rewrite_single_file(folder, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    model = load_reference(folder)
    assert model.lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize("edit,error,message", [
    (lambda t: t.pop("model.language_model.norm.weight"), CheckpointError, "missing weights: model.language_model.norm.weight"),
    (lambda t: t.update({"model.visual.extra.weight": torch.zeros(2)}), CheckpointError,
     "unexpected weights: model.visual.extra.weight"),
    (lambda t: t.update({"lm_head.weight": torch.zeros(3, 3)}), CheckpointError,
     "wrong shape: lm_head.weight (3, 3) (expected (256, 48))"),
])
def test_broken_weights_are_named(hf_checkpoints, tmp_path, edit, error, message):
    _, src = hf_checkpoints["tiny-glm-ocr"]
    folder = copy_checkpoint(src, tmp_path / "broken")
    rewrite_single_file(folder, edit)
    with pytest.raises(error) as info:
        load_reference(folder)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_expert_is_named(tmp_path):
    folder = save_checkpoint(load_reference("tiny-glm-4.5v"), tmp_path / "moe")
    rewrite_single_file(folder, lambda t: t.pop("model.language_model.layers.2.mlp.experts.5.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing expert weights: .*layers\.2\.mlp\.experts\.5\.down_proj\.weight"):
        load_reference(folder)


def test_unknown_model_type(hf_checkpoints, tmp_path):
    _, src = hf_checkpoints["tiny-glm-ocr"]
    folder = copy_checkpoint(src, tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="unsupported model_type 'llama'.*glm_ocr"):
        load_reference(folder)


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        load_reference(tmp_path / "empty")


def test_inconsistent_rope_config_is_explained():
    hf = json.loads(json.dumps(preset("tiny-glm-ocr").hf_config))
    hf["text_config"]["rope_parameters"]["mrope_section"] = [8, 12, 12]
    with pytest.raises(ConfigError, match="mrope_section"):
        ModelConfig.from_hf_dict(hf)


def test_cli_prints_one_line_for_a_bad_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-m", "glmtrt.runtime.cli", "demo", "--model", str(tmp_path / "empty")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "has no config.json" in proc.stderr
    assert "Traceback" not in proc.stderr
