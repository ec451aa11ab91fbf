"""Generation options and next-token selection (numpy only).

Greedy when ``temperature == 0`` (the default unless the manifest's generation defaults ask for sampling);
otherwise transformers' order: repetition penalty, temperature, top-k, top-p, then a draw from a seeded
``numpy.random.Generator`` (the same seed and inputs give the same tokens). The repetition penalty, as
transformers applies it, counts every id already in the sequence, prompt included, and also applies to greedy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from .errors import InputError

__all__ = ["GenerationOptions", "resolve_options", "Sampler", "DEFAULT_MAX_NEW_TOKENS"]

DEFAULT_MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class GenerationOptions:
    """How to pick tokens and when to stop.

    max_new_tokens >= 1; temperature >= 0 (0 = greedy); top_k >= 0 (0 = off); 0 < top_p <= 1 (1 = off);
    repetition_penalty > 0 (1 = off); seed: int or None (fresh entropy); eos_token_ids: ids that stop a request
    (None = the manifest's EOS set; an empty tuple never stops before ``max_new_tokens``).
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    eos_token_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> None:
        def number(name, value, kind=float):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise InputError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(float(value)):
                raise InputError(f"{name} must be finite, got {value!r}")
            if kind is int:
                if int(value) != value:
                    raise InputError(f"{name} must be an integer, got {value!r}")
                value = int(value)  # 3.0 or np.int64(3) -> 3: counts and seeds are Python ints from here on
                object.__setattr__(self, name, value)
            return value

        if number("max_new_tokens", self.max_new_tokens, int) < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if number("temperature", self.temperature) < 0:
            raise InputError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if number("top_k", self.top_k, int) < 0:
            raise InputError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < number("top_p", self.top_p) <= 1:
            raise InputError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if number("repetition_penalty", self.repetition_penalty) <= 0:
            raise InputError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.seed is not None:
            number("seed", self.seed, int)
            if self.seed < 0:
                raise InputError(f"seed must be >= 0, got {self.seed}")
        if self.eos_token_ids is not None:
            try:
                object.__setattr__(self, "eos_token_ids", tuple(int(e) for e in self.eos_token_ids))
            except (TypeError, ValueError):
                raise InputError(f"eos_token_ids must be a list of token ids, got {self.eos_token_ids!r}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_OPTION_NAMES = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "eos_token_ids")


def resolve_options(defaults: Mapping[str, Any] | None = None, **overrides: Any) -> GenerationOptions:
    """Options from the manifest's generation defaults (HF ``generation_config`` keys) and the caller's overrides
    (None = not given). Without ``do_sample: true`` in the defaults, the default is greedy (temperature 0)."""
    unknown = set(overrides) - set(_OPTION_NAMES)
    if unknown:
        raise InputError(f"unknown generation options {sorted(unknown)}; known: {', '.join(_OPTION_NAMES)}")
    d = dict(defaults or {})
    base: dict[str, Any] = {}
    if d.get("max_new_tokens") is not None:
        base["max_new_tokens"] = int(d["max_new_tokens"])
    if d.get("do_sample"):
        base["temperature"] = float(d["temperature"]) if d.get("temperature") is not None else 1.0
        if d.get("top_k") is not None:
            base["top_k"] = int(d["top_k"])
        if d.get("top_p") is not None:
            base["top_p"] = float(d["top_p"])
    if d.get("repetition_penalty") is not None:
        base["repetition_penalty"] = float(d["repetition_penalty"])
    options = GenerationOptions(**base)
    given = {k: v for k, v in overrides.items() if v is not None}
    return replace(options, **given) if given else options


class Sampler:
    """Picks the next token of every row of a batch.

    prompt_ids: per-row prompt ids (pad excluded), for the repetition penalty; vocab: logits width.
    """

    def __init__(self, options: GenerationOptions, prompt_ids: Sequence[Sequence[int]], vocab: int):
        self.options = options
        self.rng = np.random.default_rng(options.seed)
        self.seen = None
        if options.repetition_penalty != 1.0:
            self.seen = np.zeros((len(prompt_ids), vocab), dtype=bool)
            for row, ids in enumerate(prompt_ids):
                ids = np.asarray(ids, dtype=np.int64)
                self.seen[row, ids[(ids >= 0) & (ids < vocab)]] = True

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """logits (B, V) float -> next ids int64 (B,); records them for the repetition penalty."""
        scores = np.array(logits, dtype=np.float32)  # a copy: the backend may reuse its buffer
        o = self.options
        if self.seen is not None:
            penalized = np.where(scores < 0, scores * np.float32(o.repetition_penalty),
                                 scores / np.float32(o.repetition_penalty))
            scores = np.where(self.seen, penalized, scores).astype(np.float32)
        if o.greedy:
            tokens = scores.argmax(-1).astype(np.int64)
        else:
            tokens = np.array([self._sample_row(row) for row in scores], dtype=np.int64)
        if self.seen is not None:
            self.seen[np.arange(len(tokens)), tokens] = True
        return tokens

    def warp(self, scores: np.ndarray) -> np.ndarray:
        """One row's (already penalized) logits -> float64 scores after temperature, top-k and top-p, with the
        filtered tokens at -inf (transformers' TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)."""
        o = self.options
        scores = np.asarray(scores, dtype=np.float64) / o.temperature
        if 0 < o.top_k < scores.size:
            kth = np.partition(scores, -o.top_k)[-o.top_k]
            scores = np.where(scores < kth, -np.inf, scores)
        if o.top_p < 1.0:
            order = np.argsort(scores, kind="stable")  # ascending, as transformers' TopPLogitsWarper
            sorted_scores = scores[order]
            probs = np.exp(sorted_scores - sorted_scores[-1])
            cumulative = np.cumsum(probs / probs.sum())
            remove = cumulative <= 1 - o.top_p
            remove[-1] = False  # always keep the most likely token
            scores = scores.copy()
            scores[order[remove]] = -np.inf
        return scores

    def _sample_row(self, scores: np.ndarray) -> int:
        scores = self.warp(scores)
        probs = np.exp(scores - scores.max())
        cumulative = np.cumsum(probs)
        draw = self.rng.random() * cumulative[-1]
        return int(min(np.searchsorted(cumulative, draw, side="right"), scores.size - 1))
