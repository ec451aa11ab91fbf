"""The non-graph contents of an engines folder: tokenizer, chat template, special tokens, preprocessing and
generation settings, read from an HF checkpoint folder (or made up for a preset).

Everything here is validated before any graph is exported, so a bad checkpoint fails in a second, not
after minutes of tracing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmtrt.reference.config import ModelConfig
from glmtrt.runtime.errors import ConfigError
from glmtrt.runtime.preprocess import GLM_IMAGE_SOURCE_CONFIG, ImageProcessorConfig

TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# GLM chat / multimodal special tokens; each one the tokenizer knows goes into manifest.special_tokens
# (together with every token the tokenizer itself marks special).
GLM_SPECIAL_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
    "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|image|>", "<|begin_of_video|>",
    "<|end_of_video|>", "<|video|>", "<think>", "</think>", "<answer>", "</answer>", "<|begin_of_box|>",
    "<|end_of_box|>", "<|nothink|>", "<|pad|>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
    "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>",
)
GENERATION_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty")


@dataclass
class Source:
    """Where a model comes from: an HF checkpoint folder or a built-in preset."""

    name: str  # as the user gave it
    folder: Path | None  # the checkpoint folder, None for a preset
    config: ModelConfig

    @property
    def is_preset(self) -> bool:
        return self.folder is None


@dataclass
class Assets:
    tokenizer: Any | None  # tokenizers.Tokenizer, or None when the checkpoint has none
    tokenizer_file: Path | None  # copy this file verbatim when set
    chat_template: str | None
    special_tokens: dict[str, int]
    eos_token_ids: list[int]
    preprocessing: dict[str, Any]
    generation: dict[str, Any] = field(default_factory=dict)

    def write(self, folder: Path) -> tuple[str | None, str | None]:
        """Write tokenizer.json and chat_template.jinja into ``folder``; returns their names (None if absent)."""
        import shutil

        tokenizer = chat_template = None
        if self.tokenizer_file is not None:
            shutil.copyfile(self.tokenizer_file, folder / TOKENIZER_FILE)
            tokenizer = TOKENIZER_FILE
        elif self.tokenizer is not None:
            self.tokenizer.save(str(folder / TOKENIZER_FILE))
            tokenizer = TOKENIZER_FILE
        if self.chat_template is not None:
            (folder / CHAT_TEMPLATE_FILE).write_text(self.chat_template)
            chat_template = CHAT_TEMPLATE_FILE
        return tokenizer, chat_template


def resolve_source(model: str | Path) -> Source:
    """An existing folder is a checkpoint; otherwise the name must be a shipped checkpoint or a preset."""
    from glmtrt.reference.config import builtin_model_dir, builtin_model_names, preset, preset_names

    path = Path(model)
    if not path.exists() and builtin_model_dir(str(model)) is not None:
        path = builtin_model_dir(str(model))
        return Source(str(model), path, ModelConfig.from_pretrained(path))
    if path.is_dir():
        if not (path / "config.json").is_file() and str(model) in preset_names():
            raise ConfigError(f"{str(model)!r} is a folder without config.json here, which hides the preset of that name; "
                              "run from another directory or pass a checkpoint folder")
        return Source(str(model), path, ModelConfig.from_pretrained(path))
    if str(model) in preset_names():
        return Source(str(model), None, preset(str(model)))
    if path.exists():
        raise ConfigError(f"{str(model)!r} is a file, not a checkpoint folder; pass an HF checkpoint folder or a preset name")
    raise ConfigError(f"{str(model)!r} is neither a checkpoint folder nor a preset; presets: {', '.join(preset_names())}"
                      + "".join(f", {n} (trained, shipped)" for n in builtin_model_names()))


def collect_assets(source: Source) -> Assets:
    config = source.config
    tokenizer, tokenizer_file, chat_template = _tokenizer(source)
    return Assets(
        tokenizer=tokenizer, tokenizer_file=tokenizer_file, chat_template=chat_template,
        special_tokens=special_tokens(tokenizer, config),
        eos_token_ids=[int(e) for e in config.text.eos_token_ids],
        preprocessing=_preprocessing(source),
        generation=_generation(source),
    )


def _tokenizer(source: Source):
    from tokenizers import Tokenizer

    if source.is_preset:
        if source.name.startswith("tiny-"):
            from glmtrt.reference.tokenizer import TINY_GLM4V_SPECIALS, TINY_GLM_IMAGE_SPECIALS, build_char_tokenizer

            specials = TINY_GLM_IMAGE_SPECIALS if source.config.model_type == "glm_image" else TINY_GLM4V_SPECIALS
            return build_char_tokenizer(specials), None, None
        return None, None, None  # a real-size preset has random weights and no tokenizer
    folder = source.folder
    tokenizer = tokenizer_file = None
    if (folder / TOKENIZER_FILE).is_file():
        tokenizer_file = folder / TOKENIZER_FILE
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises its own Exception type
            raise ConfigError(f"{tokenizer_file} cannot be read by the tokenizers library ({e}); re-save the checkpoint's "
                              "tokenizer") from None
    return tokenizer, tokenizer_file, _chat_template(folder)


def _chat_template(folder: Path) -> str | None:
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        return (folder / CHAT_TEMPLATE_FILE).read_text()
    config_path = folder / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    template = _json(config_path).get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if template is not None and not isinstance(template, str):
        raise ConfigError(f"{config_path} has a chat_template that is not a string; fix the checkpoint's tokenizer_config.json")
    return template


def special_tokens(tokenizer, config: ModelConfig) -> dict[str, int]:
    """{token: id} of the GLM special tokens the tokenizer has, plus every token it marks special.

    Without a tokenizer, the multimodal tokens the config names. The image/video ids of the tokenizer must
    equal the config's, or the vision embeddings would land in the wrong places.
    """
    from_config = {"<|image|>": config.image_token_id, "<|begin_of_image|>": config.image_start_token_id,
                   "<|end_of_image|>": config.image_end_token_id, "<|video|>": config.video_token_id,
                   "<|begin_of_video|>": config.video_start_token_id, "<|end_of_video|>": config.video_end_token_id}
    from_config = {k: int(v) for k, v in from_config.items() if v is not None}
    if config.model_type == "glm_image":
        # GLM-Image's image start / end ids are visual-vocabulary tokens (<|dit_token_16384|>, 16385), not the GLM-4
        # tokenizer's <|begin_of_image|> / <|end_of_image|>: only the placeholder's id is the tokenizer's own.
        from_config = {k: v for k, v in from_config.items() if k == "<|image|>"}
    if tokenizer is None:
        return from_config
    found: dict[str, int] = {}
    for token_id, added in sorted(tokenizer.get_added_tokens_decoder().items()):
        if added.special:
            found[added.content] = int(token_id)
    for token in GLM_SPECIAL_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            found[token] = int(token_id)
    wrong = [f"{tok} is {found[tok]} in tokenizer.json but {i} in config.json" for tok, i in from_config.items()
             if tok in found and found[tok] != i]
    if wrong:
        raise ConfigError(f"the tokenizer does not match the config: {'; '.join(wrong)}; use the checkpoint's own tokenizer")
    return dict(sorted(found.items(), key=lambda kv: kv[1]))


def _preprocessing(source: Source) -> dict[str, Any]:
    v = source.config.vision
    path = source.folder / "preprocessor_config.json" if source.folder else None
    if path is None or not path.is_file():  # defaults, with the tower's own patch geometry
        if v.kind == "glm_image":  # GlmImageImageProcessor's defaults (16 px patches, no temporal axis or merge)
            return GLM_IMAGE_SOURCE_CONFIG.to_dict()
        return ImageProcessorConfig(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                                    merge_size=v.spatial_merge_size).to_dict()
    try:
        proc = ImageProcessorConfig.from_dict(_json(path))
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    geometry = {"patch_size": (proc.patch_size, v.patch_size),
                "temporal_patch_size": (proc.temporal_patch_size, v.temporal_patch_size),
                "merge_size": (proc.merge_size, v.spatial_merge_size)}
    wrong = [f"{k} {a} (vision_config says {b})" for k, (a, b) in geometry.items() if a != b]
    if wrong:
        raise ConfigError(f"{path} does not match config.json: {', '.join(wrong)}; fix the checkpoint")
    return proc.to_dict()


def _generation(source: Source) -> dict[str, Any]:
    path = source.folder / "generation_config.json" if source.folder else None
    if path is None or not path.is_file():
        return {}
    gen = _json(path)
    return {k: gen[k] for k in GENERATION_KEYS if gen.get(k) is not None}


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); fix the checkpoint") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object; fix the checkpoint")
    return data
