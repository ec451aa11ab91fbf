"""Shared fixtures: tiny HF checkpoints written by transformers' save_pretrained, built once per session."""

from __future__ import annotations

import pytest

from oracle import TINY_PRESETS, hf_model

SHARDED = "tiny-glm-4.1v"  # one family is saved sharded to exercise the shard index


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """preset name -> (transformers model, checkpoint folder written by save_pretrained)."""
    out = {}
    root = tmp_path_factory.mktemp("hf")
    for name in TINY_PRESETS:
        model = hf_model(name)
        folder = root / name
        model.save_pretrained(folder, max_shard_size="100KB" if name == SHARDED else "10GB")
        out[name] = (model, folder)
    return out
