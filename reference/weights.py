"""Checkpoint I/O: HF safetensors (single file or sharded) <-> the reference model.

Loading maps on-disk HF keys to the in-memory keys of :class:`GlmModel` (which equal transformers'):
the global legacy renames, GLM-4.5V's per-expert tensors fused into ``gate_up_proj``/``down_proj``,
and the extra next-token-prediction layer ``layers.{num_hidden_layers}`` skipped. Every missing,
unexpected or mis-shaped tensor is reported by name in one :class:`CheckpointError`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from glmtrt.runtime.errors import CheckpointError

from .config import ModelConfig, builtin_model_dir, preset, preset_hf_dict, preset_names
from .model import GlmModel

_EXPERT_KEY = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_LEGACY_RENAMES = (
    (re.compile(r"^(model\.language_model|language_model\.model)\.model\."), "model.language_model."),
    (re.compile(r"LayerNorm\.gamma$"), "LayerNorm.weight"),
    (re.compile(r"LayerNorm\.beta$"), "LayerNorm.bias"),
)


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: those named by the shard index, else all of them."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid shard index ({e}); re-save the checkpoint") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"shard files named by {index.name} are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {str(folder)!r}; glmtrt reads safetensors checkpoints only")
    return files


def read_checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, by their on-disk key."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(folder):
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {path.name}: {e}; the file is damaged or not safetensors") from None
    return tensors


def to_model_keys(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Map on-disk keys to the model's keys: renames, MTP-layer skip, per-expert fusion."""
    mtp_prefix = f"model.language_model.layers.{config.text.num_layers}."
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        for pattern, repl in _LEGACY_RENAMES:
            key = pattern.sub(repl, key)
        if key.startswith(mtp_prefix):
            continue  # the next-token-prediction layer is not part of the generation path
        m = _EXPERT_KEY.match(key)
        if m and config.text.moe is not None:
            experts.setdefault(m["prefix"], {}).setdefault(int(m["e"]), {})[m["proj"]] = tensor
            continue
        out[key] = tensor
    for prefix, by_expert in experts.items():
        out.update(_fuse_experts(prefix, by_expert, config.text.moe.num_experts))
    return out


def _fuse_experts(prefix: str, by_expert: dict, num_experts: int) -> dict[str, torch.Tensor]:
    missing = [f"{prefix}.{e}.{p}.weight" for e in range(num_experts) for p in ("gate_proj", "up_proj", "down_proj")
               if p not in by_expert.get(e, {})]
    if missing:
        raise CheckpointError(f"missing expert weights: {_listing(missing)}")
    gate_up = torch.stack([torch.cat([by_expert[e]["gate_proj"], by_expert[e]["up_proj"]], 0) for e in range(num_experts)])
    down = torch.stack([by_expert[e]["down_proj"] for e in range(num_experts)])
    return {f"{prefix}.gate_up_proj": gate_up, f"{prefix}.down_proj": down}


def _listing(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_state(model: GlmModel, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``model`` after checking names and shapes; raises CheckpointError naming the keys."""
    expected = model.state_dict()
    if "lm_head.weight" not in state and model.config.hf_config.get("tie_word_embeddings"):
        state = dict(state, **{"lm_head.weight": state.get("model.language_model.embed_tokens.weight")})
    missing = [k for k in expected if k not in state or state[k] is None]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise CheckpointError(f"checkpoint is missing weights: {_listing(missing)}")
    if unexpected:
        raise CheckpointError(f"checkpoint has unexpected weights: {_listing(unexpected)}")
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"weights of the wrong shape: {_listing(wrong)}")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(state[key].to(target.dtype))


def init_random_weights(model: GlmModel, seed: int = 0) -> GlmModel:
    """Seeded random weights (benchmarks and presets): N(0, 0.02) matrices and biases, norm gains near 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if "norm" in name and name.endswith("weight"):
                values = 1.0 + 0.1 * torch.randn(tensor.shape, generator=gen)
            elif name.endswith("e_score_correction_bias"):
                values = 0.1 * torch.randn(tensor.shape, generator=gen)
            else:
                values = 0.02 * torch.randn(tensor.shape, generator=gen)
            tensor.copy_(values.to(tensor.dtype))
    return model


def load_reference(path_or_preset: str | Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> GlmModel:
    """Load the reference model from an HF checkpoint folder (or a shipped one by name, e.g. "glm-ocr-lines"),
    or build a preset with seeded random weights.

    The folder holds config.json (+ generation_config.json) and safetensors weights, sharded or not, with
    the HF key names. ``dtype`` is the compute dtype (fp32, bf16 or fp16). Returns the model in eval mode.
    """
    path = Path(path_or_preset)
    if not path.exists() and builtin_model_dir(str(path_or_preset)) is not None:
        path = builtin_model_dir(str(path_or_preset))
    if path.is_dir():
        config = ModelConfig.from_pretrained(path)
        model = GlmModel(config)
        load_state(model, to_model_keys(read_checkpoint_tensors(path), config))
    elif str(path_or_preset) in preset_names():
        model = init_random_weights(GlmModel(preset(str(path_or_preset))), seed)
    else:
        from glmtrt.runtime.errors import ConfigError

        raise ConfigError(
            f"{str(path_or_preset)!r} is neither a checkpoint folder nor a preset; presets: {', '.join(preset_names())}"
        )
    return _cast(model, dtype).eval()


def _cast(model: GlmModel, dtype: torch.dtype) -> GlmModel:
    model.to(dtype)
    # The router's score-correction bias stays fp32 (transformers keeps it in fp32 too).
    for module in model.modules():
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.data = module.e_score_correction_bias.data.float()
    return model


def to_disk_keys(model: GlmModel) -> dict[str, torch.Tensor]:
    """The model's tensors under HF on-disk keys (GLM-4.5V experts split per expert, as save_pretrained writes)."""
    out: dict[str, torch.Tensor] = {}
    inter = model.config.text.moe.moe_intermediate_size if model.config.text.moe else 0
    for key, tensor in model.state_dict().items():
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix = key[: -len(".gate_up_proj")]
            for e, fused in enumerate(tensor):
                out[f"{prefix}.{e}.gate_proj.weight"] = fused[:inter].contiguous()
                out[f"{prefix}.{e}.up_proj.weight"] = fused[inter:].contiguous()
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key[: -len(".down_proj")]
            for e, weight in enumerate(tensor):
                out[f"{prefix}.{e}.down_proj.weight"] = weight.contiguous()
        else:
            out[key] = tensor.contiguous()
    return out


def save_checkpoint(model: GlmModel, folder: str | Path, hf_config: dict | None = None,
                    max_shard_bytes: int | None = None) -> Path:
    """Write ``model`` as an HF checkpoint folder (config.json + safetensors, sharded above ``max_shard_bytes``).

    The folder is written under a temporary name and renamed into place, so a crash leaves no half folder.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists():
        raise CheckpointError(f"{str(folder)!r} already exists; choose a new folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        tensors = to_disk_keys(model)
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for key, tensor in tensors.items():
            nbytes = tensor.numel() * tensor.element_size()
            if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][key] = tensor
            size += nbytes
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        config = hf_config if hf_config is not None else model.config.hf_config
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def save_preset_checkpoint(name: str, folder: str | Path, seed: int = 0, **kwargs) -> Path:
    """Write a preset with seeded random weights as an HF checkpoint folder."""
    return save_checkpoint(load_reference(name, seed=seed), folder, preset_hf_dict(name), **kwargs)
