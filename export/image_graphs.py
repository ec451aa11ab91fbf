"""GLM-Image's autoregressive prior as graphs: the image tokenizer, then the prefill and decode graphs of
:mod:`glmtrt.export.graphs` over the visual-vocabulary head.

* ``image_tokenizer.onnx`` (manifest role ``vision``): one source image per call, its patches and bilinear
  position-table taps -> one VQ code per patch. The reference's ``model.visual`` (Conv2d patch embed, learned
  position table sampled by host-made taps, LayerNorm/GELU blocks, no rotary, no merger) followed by
  ``model.vqmodel`` (1x1 ``quant_conv``, L2-normalised features and codebook, ArgMin of the squared distance in
  transformers' expression) — :meth:`GlmModel.vision` with every patch in one attention segment.
* ``prefill.onnx`` / ``decode.onnx``: :func:`glmtrt.export.graphs.prefill_graph` and
  :func:`~glmtrt.export.graphs.decode_graph` unchanged. Their logits are the ``lm_head`` rows, which for
  GLM-Image are the visual vocabulary (``text.lm_head_size`` = ``vision_vocab_size``), so the only difference
  is the width of ``logits``; the graphs' contract and the fixed-capacity KV cache are the same.

Text-to-image requests never call the tokenizer graph; image-to-image requests call it once per source image and
the runtime writes the codes over the prompt's ``<|image|>`` placeholders (``PromptPlan.merge_codes``) before the
embedding lookup.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from glmtrt.reference.model import GlmModel

from .graphs import GraphDef, Shape, decode_graph, prefill_graph

IMAGE_TOKENIZER_FILE = "image_tokenizer.onnx"
CODES_OUTPUT = "image_codes"
# Traced source image, in patches (down, across): not 0 or 1 (torch.export specializes those), distinct from the
# text graphs' example sizes.
_EXAMPLE_GRID = (1, 3, 5)


@dataclass
class ImageTokenizerGraphDef(GraphDef):
    """The tokenizer graph keeps the manifest role ``vision`` (what the runtime, the lint and the TensorRT builder
    look up) but is written to its own file name, which says what it computes."""

    file_name: str = IMAGE_TOKENIZER_FILE

    @property
    def file(self) -> str:
        return self.file_name


class ImageTokenizerGraph(nn.Module):
    """Source-image patches -> VQ codes: the reference's GLM-Image tower and VQ tokenizer on one image.

    Inputs: ``pixel_values`` float32 (num_patches, 3*16*16) in raster patch order; ``tap_index`` int64 and
    ``tap_weight`` float32 (num_patches, 4), the bilinear position-table taps
    (``glmtrt.runtime.vision_tables.vision_tables(kind="glm_image")``). Output: ``image_codes`` int64
    (num_patches,), codebook indices in [0, num_embeddings).
    """

    def __init__(self, model: GlmModel):
        super().__init__()
        if model.config.vision.kind != "glm_image" or model.config.vq is None:
            raise ValueError("the image tokenizer graph is GLM-Image's (a glm_image tower with a VQ tokenizer)")
        self.visual = model.model.visual
        self.vqmodel = model.model.vqmodel

    def forward(self, pixel_values, tap_index, tap_weight):
        features = self.visual(pixel_values, tap_index, tap_weight, None)  # None: one image, one segment
        return self.vqmodel(features)


def image_tokenizer_graph(model: GlmModel) -> ImageTokenizerGraphDef:
    from glmtrt.runtime.vision_tables import vision_tables

    v = model.config.vision
    tables = vision_tables([_EXAMPLE_GRID], kind=v.kind, head_dim=v.head_dim, rope_theta=v.rope_theta,
                           merge_size=v.spatial_merge_size, table_side=v.pos_table_side)
    n = _EXAMPLE_GRID[0] * _EXAMPLE_GRID[1] * _EXAMPLE_GRID[2]
    taps = tables["tap_index"].shape[1]
    patches = torch.export.Dim("num_patches", min=1)
    gen = torch.Generator().manual_seed(2)
    args = (torch.randn(n, v.patch_dim, generator=gen), torch.from_numpy(tables["tap_index"]),
            torch.from_numpy(tables["tap_weight"]))
    shapes: list[Shape] = [["num_patches", v.patch_dim], ["num_patches", taps], ["num_patches", taps]]
    return ImageTokenizerGraphDef(
        name="vision", module=ImageTokenizerGraph(model),
        input_names=["pixel_values", "tap_index", "tap_weight"], input_shapes=shapes,
        input_dtypes=["float32", "int64", "float32"],
        output_names=[CODES_OUTPUT], output_shapes=[["num_patches"]], output_dtypes=["int64"],
        example_args=args, dynamic_shapes=tuple({0: patches} for _ in args),
    )


def image_graph_definitions(model: GlmModel) -> list[GraphDef]:
    """GLM-Image's graphs in export order: the image tokenizer (role ``vision``), prefill, decode."""
    return [image_tokenizer_graph(model), prefill_graph(model), decode_graph(model)]


def image_manifest_record(model: GlmModel) -> dict:
    """``manifest.extra["glm_image"]``: what the runtime needs beyond the shared config to serve GLM-Image.

    codes_output: the tokenizer graph's output; num_codes: codebook size (generated grid tokens are codes, ids
    below it); vision_vocab_size: the logits width; image_start / image_end / image_token: the ids of the
    generation BOS (= a source image's start), a source image's end (= EOS) and the source placeholders;
    target_factor: pixels per generated token (the processor's 32: target sizes are floored to it); preview:
    the preview grid holds about (factor / 2)**2 tokens; token_order: the order of the generated tokens.
    """
    c = model.config
    return {
        "image_tokenizer_graph": "vision",
        "codes_output": CODES_OUTPUT,
        "num_codes": int(c.vq.num_embeddings),
        "vision_vocab_size": int(c.text.lm_head_size),
        "image_start_token_id": int(c.image_start_token_id),
        "image_end_token_id": int(c.image_end_token_id),
        "image_token_id": int(c.image_token_id),
        "target_factor": 32,
        "token_order": "text-to-image: preview grid then large grid, raster order; image-to-image: large grid",
    }
