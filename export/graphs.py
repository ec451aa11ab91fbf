"""The three exported graphs as thin wrappers around the reference model's stages.

Each :class:`GraphDef` fixes a graph's input and output names, their contract shapes (symbolic dims named
``batch``, ``seq``, ``past``, ``total``, ``num_patches``, ``num_tokens``) and dtypes, plus the example inputs
and ``torch.export`` dynamic shapes used to trace it. The wrappers add no computation of their own: they
call :meth:`GlmModel.vision`'s tower, :meth:`GlmModel.prefill` and :meth:`GlmModel.decode_step` and flatten
the K/V lists into named outputs, so each graph computes exactly the reference stage it replaces.

* ``vision``  one image (or one video frame) per call: no cross-image attention mask.
* ``prefill`` ``inputs_embeds``, ``position_ids`` (3, B, S), ``attention_mask`` (B, S) -> last-position
  ``logits`` and ``present.{i}.key|value``.
* ``decode``  one token per sample with ``past_key_values.{i}.key|value`` -> ``logits`` and the whole
  present cache (total = past + 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from glmtrt.reference.model import GlmModel

Shape = list  # list[int | str]: ints are static dims, strings are symbolic dim names


@dataclass
class GraphDef:
    """One graph to export: the wrapper module, its interface contract and how to trace it."""

    name: str
    module: nn.Module
    input_names: list[str]
    input_shapes: list[Shape]
    input_dtypes: list[str]
    output_names: list[str]
    output_shapes: list[Shape]
    output_dtypes: list[str]
    example_args: tuple
    dynamic_shapes: tuple

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    def interface(self) -> dict[str, Any]:
        """The manifest's view: {"inputs": [{name, dtype, shape}], "outputs": [...]}."""
        def specs(names, shapes, dtypes):
            return [{"name": n, "dtype": d, "shape": list(s)} for n, s, d in zip(names, shapes, dtypes)]

        return {"inputs": specs(self.input_names, self.input_shapes, self.input_dtypes),
                "outputs": specs(self.output_names, self.output_shapes, self.output_dtypes)}


def kv_names(prefix: str, num_layers: int) -> list[str]:
    """``{prefix}.{i}.key``, ``{prefix}.{i}.value`` for every layer, layer-major (the graphs' I/O order)."""
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def _flatten(logits: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    out = [logits.float()]
    for key, value in zip(keys, values):
        out += [key, value]
    return tuple(out)


class VisionGraph(nn.Module):
    """The vision tower on one image: patches + host-made tables -> merged image embeddings.

    All patches are one attention segment (the reference tower with ``segment_ids=None``, which equals
    segment ids of zeros without the all-true N x N mask). GLM-OCR takes no position-table taps.
    """

    def __init__(self, model: GlmModel):
        super().__init__()
        self.visual = model.model.visual

    def forward(self, pixel_values, rotary_cos, rotary_sin, tap_index=None, tap_weight=None):
        n = pixel_values.shape[0]
        if tap_index is None:  # GLM-OCR: the tower has no learned position table and ignores the taps
            tap_index = torch.zeros(n, 0, dtype=torch.int64)
            tap_weight = torch.zeros(n, 0, dtype=torch.float32)
        return self.visual(pixel_values, rotary_cos, rotary_sin, tap_index, tap_weight, None).float()


class PrefillGraph(nn.Module):
    def __init__(self, model: GlmModel):
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds, position_ids, attention_mask):
        return _flatten(*self.model.prefill(inputs_embeds, position_ids, attention_mask))


class DecodeGraph(nn.Module):
    def __init__(self, model: GlmModel):
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds, position_ids, attention_mask, past_key_values: list[torch.Tensor]):
        keys, values = list(past_key_values[0::2]), list(past_key_values[1::2])
        return _flatten(*self.model.decode_step(inputs_embeds, position_ids, attention_mask, keys, values))


# Example sizes for tracing: none is 0 or 1 (torch.export specializes those), all distinct so no two dims
# are mistaken for one another.
_EXAMPLE_BATCH, _EXAMPLE_SEQ, _EXAMPLE_PAST = 2, 7, 5
_EXAMPLE_BLOCKS = (2, 3)  # merge blocks down x across of the traced image (6 image tokens)


def vision_graph(model: GlmModel) -> GraphDef:
    from glmtrt.runtime.vision_tables import vision_tables

    v = model.config.vision
    if v.kind not in ("glm4v", "glm_ocr"):
        raise ValueError(f"no vision graph for the {v.kind!r} tower")
    merge2 = v.spatial_merge_size**2
    grid = (1, _EXAMPLE_BLOCKS[0] * v.spatial_merge_size, _EXAMPLE_BLOCKS[1] * v.spatial_merge_size)
    tables = vision_tables([grid], kind=v.kind, head_dim=v.head_dim, rope_theta=v.rope_theta,
                           merge_size=v.spatial_merge_size, table_side=v.pos_table_side)
    n = grid[0] * grid[1] * grid[2]
    tokens = torch.export.Dim("num_tokens", min=1)
    patches = merge2 * tokens if merge2 > 1 else tokens
    names = ["pixel_values", "rotary_cos", "rotary_sin"]
    shapes: list[Shape] = [["num_patches", v.patch_dim], ["num_patches", v.head_dim], ["num_patches", v.head_dim]]
    dtypes = ["float32", "float32", "float32"]
    args = [torch.randn(n, v.patch_dim), torch.from_numpy(tables["rotary_cos"]), torch.from_numpy(tables["rotary_sin"])]
    if v.kind == "glm4v":
        k = tables["tap_index"].shape[1]
        names += ["tap_index", "tap_weight"]
        shapes += [["num_patches", k], ["num_patches", k]]
        dtypes += ["int64", "float32"]
        args += [torch.from_numpy(tables["tap_index"]), torch.from_numpy(tables["tap_weight"])]
    return GraphDef(
        name="vision", module=VisionGraph(model),
        input_names=names, input_shapes=shapes, input_dtypes=dtypes,
        output_names=["image_embeds"], output_shapes=[["num_tokens", v.out_hidden_size]], output_dtypes=["float32"],
        example_args=tuple(args), dynamic_shapes=tuple({0: patches} for _ in args),
    )


def _text_io(model: GlmModel, query: str | int, keys: str):
    """Shapes shared by prefill and decode: query length ``query`` (seq or 1), key length ``keys``."""
    t = model.config.text
    kv_shape = ["batch", t.num_kv_heads, keys, t.head_dim]
    names = ["inputs_embeds", "position_ids", "attention_mask"]
    shapes = [["batch", query, t.hidden_size], [3, "batch", query], ["batch", keys]]
    outputs = ["logits"] + kv_names("present", t.num_layers)
    output_shapes = [["batch", t.lm_head_size]] + [kv_shape] * (2 * t.num_layers)
    return names, shapes, outputs, output_shapes


def _example_text_args(model: GlmModel, seq: int, past: int):
    t = model.config.text
    b = _EXAMPLE_BATCH
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(b, seq, t.hidden_size, generator=gen)
    positions = torch.arange(past, past + seq).expand(3, b, seq).contiguous()
    mask = torch.ones(b, past + seq, dtype=torch.int64)
    mask[0, :2] = 0  # left padding in the first sample
    return embeds, positions, mask


def prefill_graph(model: GlmModel) -> GraphDef:
    names, shapes, outputs, output_shapes = _text_io(model, "seq", "seq")
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=1)
    return GraphDef(
        name="prefill", module=PrefillGraph(model),
        input_names=names, input_shapes=shapes, input_dtypes=["float32", "int64", "int64"],
        output_names=outputs, output_shapes=output_shapes, output_dtypes=["float32"] * len(outputs),
        example_args=_example_text_args(model, _EXAMPLE_SEQ, 0),
        dynamic_shapes=({0: batch, 1: seq}, {1: batch, 2: seq}, {0: batch, 1: seq}),
    )


def decode_graph(model: GlmModel) -> GraphDef:
    t = model.config.text
    names, shapes, outputs, output_shapes = _text_io(model, 1, "total")
    past_names = kv_names("past_key_values", t.num_layers)
    past_shape = ["batch", t.num_kv_heads, "past", t.head_dim]
    batch, past = torch.export.Dim("batch", min=1), torch.export.Dim("past", min=1)
    gen = torch.Generator().manual_seed(1)
    past_args = [torch.randn(_EXAMPLE_BATCH, t.num_kv_heads, _EXAMPLE_PAST, t.head_dim, generator=gen)
                 for _ in past_names]
    return GraphDef(
        name="decode", module=DecodeGraph(model),
        input_names=names + past_names, input_shapes=shapes + [past_shape] * len(past_names),
        input_dtypes=["float32", "int64", "int64"] + ["float32"] * len(past_names),
        output_names=outputs, output_shapes=output_shapes, output_dtypes=["float32"] * len(outputs),
        example_args=(*_example_text_args(model, 1, _EXAMPLE_PAST), past_args),
        dynamic_shapes=({0: batch}, {1: batch}, {0: batch, 1: past + 1}, [{0: batch, 2: past}] * len(past_names)),
    )


def graph_definitions(model: GlmModel) -> list[GraphDef]:
    """The graphs of a GLM-4V-family model, in export order: vision, prefill, decode."""
    return [vision_graph(model), prefill_graph(model), decode_graph(model)]
