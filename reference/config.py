"""Model configuration: one dataclass family for the four GLM vision-language families.

An HF ``config.json`` is normalized into :class:`ModelConfig`; the family-specific architecture facts
(norm layout, rotary pairing, biases, vision encoder kind) are small overrides in ``FAMILY_TRAITS``
rather than separate model classes. Named presets are HF ``config.json`` dicts shipped in ``presets/``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from glmtrt.runtime.errors import ConfigError

# Per-family architecture switches (see ../shared/reference/glm-family.md, section 0).
FAMILY_TRAITS: dict[str, dict[str, Any]] = {
    "glm4v": dict(
        vision_kind="glm4v", sandwich_norms=True, rope_interleaved=True, qkv_bias="always",
        head_dim_from_config=False, default_partial_rotary=1.0,
    ),
    "glm4v_moe": dict(
        vision_kind="glm4v", sandwich_norms=False, rope_interleaved=False, qkv_bias="config",
        head_dim_from_config=True, default_partial_rotary=0.5,
    ),
    "glm_ocr": dict(
        vision_kind="glm_ocr", sandwich_norms=True, rope_interleaved=True, qkv_bias="never",
        head_dim_from_config=True, default_partial_rotary=1.0,
    ),
    "glm_image": dict(
        vision_kind="glm_image", sandwich_norms=True, rope_interleaved=False, qkv_bias="config",
        head_dim_from_config=True, default_partial_rotary=1.0,
    ),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILY_TRAITS)


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower. ``kind`` is "glm4v" (GLM-4.1V/4.5V), "glm_ocr" or "glm_image"."""

    kind: str
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    in_channels: int
    image_size: int
    norm_eps: float
    attention_bias: bool
    hidden_act: str
    rope_theta: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Width of one patch row: C * Tp * P * P (GLM-Image: C * P * P)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def pos_table_side(self) -> int:
        """Side S of the learned S x S position-embedding table (0 when the tower has none)."""
        return 0 if self.kind == "glm_ocr" else self.image_size // self.patch_size

    @property
    def interpolation(self) -> str | None:
        return {"glm4v": "bicubic", "glm_image": "bilinear"}.get(self.kind)

    @property
    def uses_rope(self) -> bool:
        return self.kind != "glm_image"

    @property
    def block_mlp_width(self) -> int:
        # GLM-4V's block MLP is out_hidden_size wide; intermediate_size is the merger's context width.
        return self.out_hidden_size if self.kind == "glm4v" else self.intermediate_size

    @property
    def merger_context(self) -> int:
        return self.out_hidden_size * self.in_channels if self.kind == "glm_ocr" else self.intermediate_size


@dataclass(frozen=True)
class MoeConfig:
    """GLM-4.5V's routed experts (DeepSeek-V3 style sigmoid router with group limiting)."""

    num_experts: int
    experts_per_token: int
    moe_intermediate_size: int
    n_shared_experts: int
    first_k_dense_replace: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool


@dataclass(frozen=True)
class TextConfig:
    """The language model: GQA decoder with M-RoPE over the first ``rotary_dim`` dims of each head."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    partial_rotary_factor: float
    mrope_section: tuple[int, int, int]
    rope_interleaved: bool
    qkv_bias: bool
    sandwich_norms: bool
    lm_head_size: int
    max_position_embeddings: int
    pad_token_id: int | None
    eos_token_ids: tuple[int, ...]
    moe: MoeConfig | None = None

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, index: int) -> bool:
        return self.moe is not None and index >= self.moe.first_k_dense_replace


@dataclass(frozen=True)
class VQConfig:
    """GLM-Image's frozen VQ tokenizer: quant_conv (latent -> embed_dim) then a cosine codebook lookup."""

    embed_dim: int
    num_embeddings: int
    latent_channels: int


@dataclass(frozen=True)
class ModelConfig:
    """A whole checkpoint: family, vision tower, text decoder, optional VQ, special token ids."""

    model_type: str
    vision: VisionConfig
    text: TextConfig
    vq: VQConfig | None
    image_token_id: int
    image_start_token_id: int
    image_end_token_id: int
    video_token_id: int | None = None
    video_start_token_id: int | None = None
    video_end_token_id: int | None = None
    hf_config: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def family(self) -> str:
        return self.model_type

    def to_dict(self) -> dict:
        """A JSON-ready dict of the normalized config (for manifests)."""
        out = dataclasses.asdict(self)
        out.pop("hf_config")
        return out

    @classmethod
    def from_hf_dict(cls, hf: dict, generation_config: dict | None = None) -> "ModelConfig":
        """Normalize an HF ``config.json`` dict (and optional ``generation_config.json``)."""
        model_type = hf.get("model_type")
        if model_type not in FAMILY_TRAITS:
            raise ConfigError(
                f"unsupported model_type {model_type!r} in config.json; glmtrt supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        traits = FAMILY_TRAITS[model_type]
        try:
            vision = _vision_config(hf["vision_config"], traits)
            text = _text_config(hf["text_config"], model_type, traits, generation_config or {})
            vq = _vq_config(hf["vq_config"]) if model_type == "glm_image" else None
            config = cls(
                model_type=model_type, vision=vision, text=text, vq=vq,
                image_token_id=int(hf["image_token_id"]),
                image_start_token_id=int(hf["image_start_token_id"]),
                image_end_token_id=int(hf["image_end_token_id"]),
                video_token_id=hf.get("video_token_id"),
                video_start_token_id=hf.get("video_start_token_id"),
                video_end_token_id=hf.get("video_end_token_id"),
                hf_config=hf,
            )
        except KeyError as e:
            raise ConfigError(f"config.json of model_type {model_type!r} lacks the field {e.args[0]!r}") from None
        _check_consistency(config)
        return config

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        """Read ``config.json`` (and ``generation_config.json`` when present) from a checkpoint folder."""
        folder = Path(path)
        if not folder.is_dir():
            raise ConfigError(f"checkpoint folder {str(folder)!r} does not exist; pass an HF checkpoint folder or a preset name")
        hf = _read_json(folder / "config.json", what="checkpoint folder")
        gen_path = folder / "generation_config.json"
        gen = _read_json(gen_path, what="checkpoint folder") if gen_path.exists() else None
        return cls.from_hf_dict(hf, gen)


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"{what} {str(path.parent)!r} has no {path.name}; is it an HF checkpoint folder?")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); re-save the checkpoint") from None


def _vision_config(v: dict, traits: dict) -> VisionConfig:
    kind = traits["vision_kind"]
    rope = v.get("rope_parameters") or {}
    return VisionConfig(
        kind=kind,
        depth=int(v["depth"]),
        hidden_size=int(v["hidden_size"]),
        num_heads=int(v["num_heads"]),
        intermediate_size=int(v["intermediate_size"]),
        out_hidden_size=int(v.get("out_hidden_size", 0)) if kind != "glm_image" else 0,
        patch_size=int(v["patch_size"]),
        temporal_patch_size=int(v.get("temporal_patch_size", 2)) if kind != "glm_image" else 1,
        spatial_merge_size=int(v.get("spatial_merge_size", 2 if kind != "glm_image" else 1)),
        in_channels=int(v.get("in_channels", 3)),
        image_size=int(v.get("image_size", 336)),
        norm_eps=float(v["layer_norm_eps"] if kind == "glm_image" else v.get("rms_norm_eps", 1e-5)),
        attention_bias=bool(v.get("attention_bias", kind == "glm_ocr")) if kind != "glm_image" else True,
        hidden_act=str(v.get("hidden_act", "silu")),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
    )


def _text_config(t: dict, model_type: str, traits: dict, gen: dict) -> TextConfig:
    hidden, heads = int(t["hidden_size"]), int(t["num_attention_heads"])
    head_dim = int(t.get("head_dim") or hidden // heads) if traits["head_dim_from_config"] else hidden // heads
    rope = t.get("rope_parameters") or {}
    partial = float(rope.get("partial_rotary_factor", t.get("partial_rotary_factor", traits["default_partial_rotary"])))
    bias = {"always": True, "never": False, "config": bool(t.get("attention_bias", True))}[traits["qkv_bias"]]
    eos = gen.get("eos_token_id", t.get("eos_token_id"))
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [] if eos is None else [eos]))
    pad = gen.get("pad_token_id", t.get("pad_token_id"))
    moe = None
    if model_type == "glm4v_moe":
        moe = MoeConfig(
            num_experts=int(t.get("n_routed_experts", 128)),
            experts_per_token=int(t.get("num_experts_per_tok", 8)),
            moe_intermediate_size=int(t.get("moe_intermediate_size", 1408)),
            n_shared_experts=int(t.get("n_shared_experts", 1)),
            first_k_dense_replace=int(t.get("first_k_dense_replace", 1)),
            n_group=int(t.get("n_group", 1)),
            topk_group=int(t.get("topk_group", 1)),
            routed_scaling_factor=float(t.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(t.get("norm_topk_prob", True)),
        )
    vocab = int(t["vocab_size"])
    return TextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(t["intermediate_size"]),
        num_layers=int(t["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(t.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(t.get("rms_norm_eps", 1e-5)),
        rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 10000.0))),
        partial_rotary_factor=partial,
        mrope_section=tuple(int(s) for s in rope.get("mrope_section", [8, 12, 12])),
        rope_interleaved=traits["rope_interleaved"],
        qkv_bias=bias,
        sandwich_norms=traits["sandwich_norms"],
        lm_head_size=int(t["vision_vocab_size"]) if model_type == "glm_image" else vocab,
        max_position_embeddings=int(t.get("max_position_embeddings", 32768)),
        pad_token_id=None if pad is None else int(pad),
        eos_token_ids=eos_ids,
        moe=moe,
    )


def _vq_config(q: dict) -> VQConfig:
    return VQConfig(embed_dim=int(q["embed_dim"]), num_embeddings=int(q["num_embeddings"]),
                    latent_channels=int(q["latent_channels"]))


def _check_consistency(c: ModelConfig) -> None:
    t, v = c.text, c.vision
    if sum(t.mrope_section) * 2 != t.rotary_dim:
        raise ConfigError(
            f"mrope_section {list(t.mrope_section)} sums to {sum(t.mrope_section)} but the rotary dim "
            f"{t.rotary_dim} (head_dim {t.head_dim} x partial_rotary_factor {t.partial_rotary_factor}) needs {t.rotary_dim // 2}"
        )
    if t.num_heads % t.num_kv_heads:
        raise ConfigError(f"num_attention_heads {t.num_heads} is not a multiple of num_key_value_heads {t.num_kv_heads}")
    if v.kind != "glm_image" and v.out_hidden_size != t.hidden_size:
        raise ConfigError(f"vision out_hidden_size {v.out_hidden_size} differs from text hidden_size {t.hidden_size}")
    if c.vq is not None and c.vq.latent_channels != v.hidden_size:
        raise ConfigError(f"vq latent_channels {c.vq.latent_channels} differs from vision hidden_size {v.hidden_size}")
    if t.moe is not None and t.moe.num_experts % t.moe.n_group:
        raise ConfigError(f"n_routed_experts {t.moe.num_experts} is not divisible by n_group {t.moe.n_group}")


# ----------------------------------------------------------------------------------------------- presets

def preset_names() -> list[str]:
    """Names of the built-in presets (tiny-* for tests, the rest are published real-size configs)."""
    folder = resources.files("glmtrt.reference") / "presets"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


# Trained checkpoints shipped inside the package (HF layout, under reference/models/NAME): real weights, unlike
# the presets. ``glm-ocr-lines`` is the small GLM-OCR trained on rendered text lines (reference/train_ocr.py).
BUILTIN_MODELS_FOLDER = "models"


def builtin_model_names() -> list[str]:
    """Names of the checkpoints shipped with glmtrt (folders holding a config.json)."""
    folder = resources.files("glmtrt.reference") / BUILTIN_MODELS_FOLDER
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / "config.json").is_file())


def builtin_model_dir(name: str) -> Path | None:
    """The folder of the shipped checkpoint ``name``, or None when there is none of that name."""
    if name not in builtin_model_names():
        return None
    return Path(str(resources.files("glmtrt.reference") / BUILTIN_MODELS_FOLDER / name))


def preset_hf_dict(name: str) -> dict:
    """The HF ``config.json`` dict of a named preset."""
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(preset_names())}")
    return json.loads((resources.files("glmtrt.reference") / "presets" / f"{name}.json").read_text())


def preset(name: str) -> ModelConfig:
    """The normalized config of a named preset."""
    return ModelConfig.from_hf_dict(preset_hf_dict(name))
