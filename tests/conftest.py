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


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """A cached exporter: exported(name_or_folder, precision="fp32") -> engines folder, exported once per session."""
    from glmtrt.export import export_model

    root = tmp_path_factory.mktemp("engines")
    cache: dict[tuple[str, str], object] = {}

    def get(model, precision: str = "fp32"):
        key = (str(model), precision)
        if key not in cache:
            out = root / f"{len(cache)}-{precision}"
            cache[key] = export_model(model, out, precision=precision, progress=False)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def sample_image():
    from glmtrt.runtime.cli import sample_image_path

    return sample_image_path()
