"""The three exported graphs as thin wrappers around the reference model's stages.

Each :class:`GraphDef` fixes a graph's input and output names, their contract shapes (symbolic dims named
``batch``, ``seq``, ``capacity``, ``num_patches``, ``num_tokens``) and dtypes, plus the example inputs and
``torch.export`` dynamic shapes used to trace it. The vision and prefill wrappers add no computation of their
own: they call :meth:`GlmModel.vision`'s tower and :meth:`GlmModel.prefill` and flatten the K/V lists into
named outputs, so each graph computes exactly the reference stage it replaces.

* ``vision``  one image (or one video frame) per call: no cross-image attention mask.
* ``prefill`` ``inputs_embeds``, ``position_ids`` (3, B, S), ``attention_mask`` (B, S) -> last-position
  ``logits`` and ``present.{i}.key|value``.
* ``decode``  one token per sample over a fixed-capacity cache: ``past_key_values.{i}.key|value``
  (batch, kv_heads, head_dim, capacity) are the runtime's own preallocated buffers and ``attention_mask``
  (batch, capacity) marks their valid slots; the outputs are ``logits`` and only the new token's
  ``present.{i}.key|value`` (batch, kv_heads, 1, head_dim), which the runtime writes into slot P (the past
  length) of its buffers. See :class:`DecodeGraph` for why, and ``KV_CACHE`` for the manifest record.

The decode graph is the one wrapper with its own formulation: the reference's eager attention concatenates
the new key onto the cache and repeats K/V across query groups, which in a graph is a full copy of the cache
per step. :func:`split_softmax_attention` computes the same softmax without either (proven equal to the
reference within 1e-4 by the parity tests).

GLM-4.5V's MoE layers are the other override (:func:`with_moe`): the reference runs every expert on every token
(exact, 16x the FLOPs of the chosen ones at 128 experts / 8 per token); the graphs keep the reference router
(fp32, group limiting, correction bias: :class:`~glmtrt.reference.decoder.TopkRouter` itself) and run only the
chosen experts, with the formulation each graph's shapes favour (:data:`MOE_FORMULATION`, measured by
``python -m glmtrt.export.moe_cost``): decode gathers the chosen experts' weight slices (:class:`GatheredExperts`),
prefill gathers each expert's tokens (:class:`GroupedExperts`). Routing is computed in the graph from its inputs;
nothing of the example input's routing is baked in.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from glmtrt.reference.decoder import MoE, apply_rotary, mrope_cos_sin
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
    kv_cache: dict | None = None  # the decode graph's cache contract, recorded as the manifest's extra.kv_cache

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


# The manifest record of the decode graph's cache contract (``extra.kv_cache``); folders without it predate it
# and use the "concat" contract (past (batch, kv_heads, past, head_dim) in, the whole grown cache out).
# ``layout``: the buffers' axis order; "bhdc" (keys and values stored transposed, capacity last) is what this
# export writes; "bhcd" ((batch, kv_heads, capacity, head_dim), the first fixed-capacity exports: a record
# without "layout") is still read by the runtime.
KV_CACHE = {
    "mode": "fixed-capacity",
    "layout": "bhdc",
    "capacity_dim": "capacity",
    "past": "past_key_values.{i}.key|value (batch, kv_heads, head_dim, capacity): the runtime's buffers, keys and "
            "values both stored transposed",
    "attention_mask": "(batch, capacity): 1 for a valid past slot, 0 for padding and unwritten slots",
    "present": "present.{i}.key|value (batch, kv_heads, 1, head_dim): the new token only; the runtime writes it "
               "into slot P (the past length, shared by all rows) of its buffers, i.e. buffer[:, :, :, P]",
    "prefill": "prefill's present.{i}.* (batch, kv_heads, seq, head_dim) go to buffer[:, :, :, :seq] transposed, "
               "once per generation",
    "unwritten_slots": "must hold finite values (zeros): they are masked, but 0 * NaN would still poison the sum",
}


def split_softmax_attention(q, k_new, v_new, past_key, past_value, bias, scale: float,
                            capacity_last: bool = True) -> torch.Tensor:
    """One query per row over a cache plus the new key, without concatenating the cache or repeating K/V.

    q: (B, kv_heads, groups, D) (query head h = kv_head * groups + group, the reference's repeat_interleave
    order); k_new, v_new: (B, kv_heads, 1, D); past_key, past_value: (B, kv_heads, D, C), the cache stored
    transposed; bias: (B, 1, 1, 1, C) in q's dtype, 0 for a valid slot and finfo.min for a masked one
    (:func:`mask_bias`, computed once per step for all layers). The scores against the cache (masked like the
    reference: in fp32 any score below 1e31 in size plus finfo.min rounds to finfo.min exactly; in an fp16
    plan a masked score may round to -inf, which softmax maps to 0 all the same) and against the new key are
    concatenated (C + 1 per query head: tiny), scaled, softmax in fp32 and cast back as in the reference, then
    the weighted sum reads V once: ``probs[:C] @ V + probs[C] * v_new``. Returns (B, 1, heads * D).

    Shaped for ONNX Runtime's CPU kernels (measured with real-size GLM-OCR; see export/bench.py):
    * each query head is its own one-row product against its KV head's cache, the cache broadcast over the
      groups, not copied: one-row products take MLAS' GEMV kernels, several times faster than a (groups x D)
      block, which MLAS packs;
    * the cache is stored (D, C), so both products run along the long capacity axis: the scores are
      q (1 x D) @ K^T (D x C) and the output is probs (1 x C) against V^T's rows of length C; against a (C, D)
      cache the same kernels walk rows of 128 and a step at 4k context cost about twice as much;
    * the scale multiplies after the mask (for valid slots the scores are ``(q k) * scale``, as in the
      reference), not a MatMul's input or output, where ONNX Runtime would fold it into the product's alpha,
      which leaves the GEMV kernels;
    * the mask is an added bias rather than a ``Where`` on the broadcast boolean mask: ONNX Runtime's broadcast
      ``Where`` cost about 1 ms per step at 4k context over 16 layers, the ``Add`` a third of that.

    ``capacity_last=False`` takes (B, kv_heads, C, D) caches (the "bhcd" layout of the first exports).
    """
    b, kv_heads, groups, d = q.shape
    q = q.unsqueeze(3)  # (B, KVH, G, 1, D)
    keys_t = past_key.unsqueeze(2) if capacity_last else past_key.unsqueeze(2).transpose(-1, -2)  # (B, KVH, 1, D, C)
    values = past_value.unsqueeze(2).transpose(-1, -2) if capacity_last else past_value.unsqueeze(2)  # (.., C, D)
    scores = torch.matmul(q, keys_t) + bias  # (B, KVH, G, 1, C): reads K once
    own = torch.matmul(q, k_new.unsqueeze(2).transpose(-1, -2))  # (B, KVH, G, 1, 1)
    scores = torch.cat([scores, own], dim=-1) * scale
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs[..., :-1], values)  # (B, KVH, G, 1, D): reads V once
    out = out + probs[..., -1:] * v_new.unsqueeze(2)
    return out.reshape(b, 1, kv_heads * groups * d)


def mask_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """attention_mask (B, C) int64 (1 valid, 0 masked) -> (B, 1, 1, 1, C) ``dtype``: 0 where valid, finfo.min
    where masked, the additive form of the reference's ``masked_fill`` for :func:`split_softmax_attention`."""
    bias = torch.where(attention_mask.bool(), 0.0, torch.finfo(dtype).min).to(dtype)
    return bias[:, None, None, None, :]


def _decode_attention(attn, x, cos, sin, bias, past_key, past_value, capacity_last: bool = True):
    """``TextAttention.forward`` for one token over a fixed-capacity cache: same projections and rotary."""
    c = attn.config
    b = x.shape[0]
    groups = c.num_heads // c.num_kv_heads
    # With one token, (B, 1, heads * D) views directly as (B, kv_heads, groups, D); cos/sin (B, 1, r) broadcast
    # as (B, 1, 1, r) exactly as over the reference's (B, heads, 1, D).
    q = apply_rotary(attn.q_proj(x).view(b, c.num_kv_heads, groups, c.head_dim), cos, sin, c.rope_interleaved)
    k = apply_rotary(attn.k_proj(x).view(b, c.num_kv_heads, 1, c.head_dim), cos, sin, c.rope_interleaved)
    v = attn.v_proj(x).view(b, c.num_kv_heads, 1, c.head_dim)
    out = split_softmax_attention(q, k, v, past_key, past_value, bias, c.head_dim**-0.5, capacity_last)
    return attn.o_proj(out), k, v


class DecodeGraph(nn.Module):
    """One decode step over a fixed-capacity cache (see ``KV_CACHE``): the reference's ``decode_step`` with
    :func:`split_softmax_attention` in place of concat + eager attention; every other module is the reference's.

    Why: with a concat contract each step copies the whole cache (the concat, the GQA repeat, the output
    present), which at 1k+ context costs more than streaming the weights; here the cache is only read, once
    for K and once for V, and the host writes one slot per step. The step's cost follows the capacity the
    runtime allocates (prompt + new tokens), not a global maximum.
    """

    def __init__(self, model: GlmModel, layout: str = "bhdc"):
        super().__init__()
        self.model = model
        self.capacity_last = layout == "bhdc"

    def forward(self, inputs_embeds, position_ids, attention_mask, past_key_values: list[torch.Tensor]):
        text = self.model.model.language_model
        cos, sin = mrope_cos_sin(text.config, position_ids, inputs_embeds.dtype)
        bias = mask_bias(attention_mask, inputs_embeds.dtype)
        x = inputs_embeds
        keys, values = [], []
        for i, layer in enumerate(text.layers):  # DecoderLayer.forward with the attention above
            attn, key, value = _decode_attention(layer.self_attn, layer.input_layernorm(x), cos, sin, bias,
                                                 past_key_values[2 * i], past_key_values[2 * i + 1], self.capacity_last)
            if layer.sandwich:
                attn = layer.post_self_attn_layernorm(attn)
            x = x + attn
            mlp = layer.mlp(layer.post_attention_layernorm(x))
            if layer.sandwich:
                mlp = layer.post_mlp_layernorm(mlp)
            x = x + mlp
            keys.append(key)
            values.append(value)
        return _flatten(self.model.lm_head(text.norm(x)[:, -1]), keys, values)


class ConcatDecodeGraph(nn.Module):
    """The earlier decode contract (past in, the whole grown cache out): kept to export folders of that kind
    for the runtime's compatibility tests and for comparison; new exports use :class:`DecodeGraph`."""

    def __init__(self, model: GlmModel):
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds, position_ids, attention_mask, past_key_values: list[torch.Tensor]):
        keys, values = list(past_key_values[0::2]), list(past_key_values[1::2])
        return _flatten(*self.model.decode_step(inputs_embeds, position_ids, attention_mask, keys, values))


# ------------------------------------------------------------------------------------------ GLM-4.5V MoE

class GatheredExperts(nn.Module):
    """The routed experts of one MoE layer, touching only the chosen experts' weights: each (token, slot) pair
    gathers its expert's slices of the stacked weights and multiplies them with its token (a batched GEMV).

    Weights are the reference :class:`~glmtrt.reference.decoder.Experts`' own stacked parameters, in their
    stored (E, 2I, H) / (E, H, I) layout (the products run weight @ token column, so no weight is transposed).
    Cost: T * k weight slices copied and read; right for decode (T = batch), ruinous for a long prefill
    (T * k * 23 MB of bf16 weights at GLM-4.5V's size).
    """

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.gate_up_proj = experts.gate_up_proj  # (E, 2I, H)
        self.down_proj = experts.down_proj  # (E, H, I)

    def forward(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: (T, H); chosen: int64 (T, k) expert ids; weights: fp32 (T, k). Returns (T, H) in x's dtype:
        ``sum_k weights[t, k] * expert_{chosen[t, k]}(x[t])``, summed in fp32 as the reference does."""
        gate_up = torch.matmul(self.gate_up_proj[chosen], x[:, None, :, None]).squeeze(-1)  # (T, k, 2I)
        gate, up = gate_up.chunk(2, dim=-1)
        y = torch.matmul(self.down_proj[chosen], (F.silu(gate) * up)[..., None]).squeeze(-1)  # (T, k, H)
        return (y * weights[..., None]).sum(1).to(x.dtype)


class GroupedExperts(nn.Module):
    """The routed experts of one MoE layer, each expert run once on the tokens that chose it.

    Per expert e (a static loop over the E experts): NonZero of its column of the choice mask gives its tokens,
    a Gather picks their rows, two MatMuls with expert e's own weights (per-expert views of the stacked
    parameters, exported as separate initializers: nothing is copied at run time) and SwiGLU give its outputs.
    The outputs of all experts are concatenated, ordered by (expert, token); each (token, slot) pair finds its
    row there at ``start[e] + rank of t among e's tokens`` (CumSum over the mask) and the pairs are combined
    with their weights in fp32. Standard ops only (NonZero, Gather, GatherElements, CumSum, MatMul): no
    ScatterND reduction, no TopK over the tokens (TensorRT caps K below 3840). Cost: the chosen experts'
    FLOPs plus one read of every expert that has a token; right for a prefill of any length.
    """

    def __init__(self, experts: nn.Module):
        super().__init__()
        n = experts.gate_up_proj.shape[0]
        # Views of the stacked parameters (shared storage), one initializer per expert in the exported graph.
        self.gate_up = nn.ParameterList(nn.Parameter(experts.gate_up_proj.detach()[e], requires_grad=False)
                                        for e in range(n))  # (2I, H) each
        self.down = nn.ParameterList(nn.Parameter(experts.down_proj.detach()[e], requires_grad=False)
                                     for e in range(n))  # (H, I) each

    def forward(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: (T, H); chosen: int64 (T, k) expert ids (distinct per token); weights: fp32 (T, k).
        Returns (T, H) in x's dtype, as :meth:`GatheredExperts.forward`."""
        n = len(self.gate_up)
        mask = (chosen[:, :, None] == torch.arange(n, device=x.device)).any(1)  # (T, E) bool
        outputs = []
        for e in range(n):
            tokens = mask[:, e].nonzero().squeeze(1)  # (n_e,), increasing
            xt = x.index_select(0, tokens).transpose(0, 1)  # (H, n_e): weights stay in their stored layout
            gate, up = torch.matmul(self.gate_up[e], xt).chunk(2, dim=0)  # (I, n_e) each
            outputs.append(torch.matmul(self.down[e], F.silu(gate) * up).transpose(0, 1))  # (n_e, H)
        rows = torch.cat(outputs)  # (T * k, H), ordered by (expert, token)
        taken = mask.long()
        rank = taken.cumsum(0) - 1  # (T, E): how many earlier tokens chose e
        counts = taken.sum(0)
        start = counts.cumsum(0) - counts  # (E,): first row of expert e
        where = (start + rank).gather(1, chosen)  # (T, k)
        y = rows[where]  # (T, k, H)
        return (y * weights[..., None]).sum(1).to(x.dtype)


class SparseMoE(nn.Module):
    """A reference :class:`~glmtrt.reference.decoder.MoE` layer with its routed experts run by a sparse
    formulation: the same router (called as a module, so fp16 plans keep it an fp32 island) and shared expert.
    x: (B, S, H) -> (B, S, H)."""

    def __init__(self, moe: MoE, experts: nn.Module):
        super().__init__()
        self.gate = moe.gate
        self.experts = experts
        self.shared_experts = moe.shared_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        chosen, weights = self.gate(flat, dense=False)
        return self.experts(flat, chosen, weights).view_as(x) + self.shared_experts(x)


# How each graph runs the routed experts (measured at GLM-4.5V's size: README, `python -m glmtrt.export.moe_cost`).
# "dense" is the reference's every-expert formulation, kept for that comparison.
MOE_EXPERTS = {"gathered": GatheredExperts, "grouped": GroupedExperts}
MOE_FORMULATION = {"prefill": "grouped", "decode": "gathered"}


def _shallow(module: nn.Module, **children: nn.Module) -> nn.Module:
    """A copy of ``module`` sharing its parameters, buffers and submodules, except ``children`` replaced."""
    clone = copy.copy(module)
    clone._modules = {**module._modules, **children}
    return clone


def with_moe(model: GlmModel, formulation: str) -> GlmModel:
    """A view of ``model`` whose MoE layers run their routed experts by ``formulation`` ("gathered", "grouped"
    or "dense", the reference's own). Every parameter is shared; ``model`` itself is not changed. A model
    without MoE layers is returned as is."""
    if formulation != "dense" and formulation not in MOE_EXPERTS:
        raise ValueError(f"unknown MoE formulation {formulation!r}; choose dense, {', '.join(MOE_EXPERTS)}")
    text = model.model.language_model
    if formulation == "dense" or not any(isinstance(layer.mlp, MoE) for layer in text.layers):
        return model
    layers = nn.ModuleList(
        _shallow(layer, mlp=SparseMoE(layer.mlp, MOE_EXPERTS[formulation](layer.mlp.experts)))
        if isinstance(layer.mlp, MoE) else layer for layer in text.layers)
    backbone = _shallow(model.model, language_model=_shallow(text, layers=layers))
    return _shallow(model, model=backbone)


# Example sizes for tracing: none is 0 or 1 (torch.export specializes those), all distinct so no two dims
# are mistaken for one another.
_EXAMPLE_BATCH, _EXAMPLE_SEQ, _EXAMPLE_PAST, _EXAMPLE_CAPACITY = 2, 7, 5, 11
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


def prefill_graph(model: GlmModel, moe: str = MOE_FORMULATION["prefill"]) -> GraphDef:
    """The prefill graph; ``moe``: the routed experts' formulation of an MoE model (see ``MOE_FORMULATION``)."""
    names, shapes, outputs, output_shapes = _text_io(model, "seq", "seq")
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=1)
    return GraphDef(
        name="prefill", module=PrefillGraph(with_moe(model, moe)),
        input_names=names, input_shapes=shapes, input_dtypes=["float32", "int64", "int64"],
        output_names=outputs, output_shapes=output_shapes, output_dtypes=["float32"] * len(outputs),
        example_args=_example_text_args(model, _EXAMPLE_SEQ, 0),
        dynamic_shapes=({0: batch, 1: seq}, {1: batch, 2: seq}, {0: batch, 1: seq}),
    )


def decode_graph(model: GlmModel, kv_cache: str = "fixed-capacity", layout: str = "bhdc",
                 moe: str = MOE_FORMULATION["decode"]) -> GraphDef:
    """The decode graph: ``kv_cache`` "fixed-capacity" (the contract of ``KV_CACHE``) or "concat" (the earlier
    one); ``layout`` "bhdc" (what glmtrt exports) or "bhcd" (the first fixed-capacity exports, for tests);
    ``moe``: the routed experts' formulation of an MoE model (see ``MOE_FORMULATION``)."""
    model = with_moe(model, moe)
    if kv_cache == "concat":
        return _concat_decode_graph(model)
    if kv_cache != KV_CACHE["mode"] or layout not in ("bhdc", "bhcd"):
        raise ValueError(f"unknown kv_cache {kv_cache!r} / layout {layout!r}")
    cap_axis = 3 if layout == "bhdc" else 2
    t = model.config.text
    names = ["inputs_embeds", "position_ids", "attention_mask"]
    shapes: list[Shape] = [["batch", 1, t.hidden_size], [3, "batch", 1], ["batch", "capacity"]]
    past_names = kv_names("past_key_values", t.num_layers)
    outputs = ["logits"] + kv_names("present", t.num_layers)
    batch, capacity = torch.export.Dim("batch", min=1), torch.export.Dim("capacity", min=1)
    embeds, positions, _ = _example_text_args(model, 1, _EXAMPLE_PAST)
    mask = torch.zeros(_EXAMPLE_BATCH, _EXAMPLE_CAPACITY, dtype=torch.int64)
    mask[:, :_EXAMPLE_PAST] = 1
    mask[0, :2] = 0  # left padding in the first sample; slots from _EXAMPLE_PAST on are unwritten
    gen = torch.Generator().manual_seed(1)
    past_shape: list = ["batch", t.num_kv_heads, t.head_dim, "capacity"]
    if cap_axis == 2:
        past_shape[2:] = ["capacity", t.head_dim]
    past_args = [torch.randn(*[_EXAMPLE_BATCH if d == "batch" else _EXAMPLE_CAPACITY if d == "capacity" else d
                               for d in past_shape], generator=gen) for _ in past_names]
    return GraphDef(
        name="decode", module=DecodeGraph(model, layout),
        input_names=names + past_names,
        input_shapes=shapes + [past_shape] * len(past_names),
        input_dtypes=["float32", "int64", "int64"] + ["float32"] * len(past_names),
        output_names=outputs,
        output_shapes=[["batch", t.lm_head_size]] + [["batch", t.num_kv_heads, 1, t.head_dim]] * len(past_names),
        output_dtypes=["float32"] * len(outputs),
        example_args=(embeds, positions, mask, past_args),
        dynamic_shapes=({0: batch}, {1: batch}, {0: batch, 1: capacity}, [{0: batch, cap_axis: capacity}] * len(past_names)),
        kv_cache={**KV_CACHE, "layout": layout},
    )


def _concat_decode_graph(model: GlmModel) -> GraphDef:
    t = model.config.text
    names, shapes, outputs, output_shapes = _text_io(model, 1, "total")
    past_names = kv_names("past_key_values", t.num_layers)
    past_shape = ["batch", t.num_kv_heads, "past", t.head_dim]
    batch, past = torch.export.Dim("batch", min=1), torch.export.Dim("past", min=1)
    gen = torch.Generator().manual_seed(1)
    past_args = [torch.randn(_EXAMPLE_BATCH, t.num_kv_heads, _EXAMPLE_PAST, t.head_dim, generator=gen)
                 for _ in past_names]
    return GraphDef(
        name="decode", module=ConcatDecodeGraph(model),
        input_names=names + past_names, input_shapes=shapes + [past_shape] * len(past_names),
        input_dtypes=["float32", "int64", "int64"] + ["float32"] * len(past_names),
        output_names=outputs, output_shapes=output_shapes, output_dtypes=["float32"] * len(outputs),
        example_args=(*_example_text_args(model, 1, _EXAMPLE_PAST), past_args),
        dynamic_shapes=({0: batch}, {1: batch}, {0: batch, 1: past + 1}, [{0: batch, 2: past}] * len(past_names)),
    )


def graph_definitions(model: GlmModel, kv_cache: str = "fixed-capacity", layout: str = "bhdc") -> list[GraphDef]:
    """The graphs of a GLM-4V-family model, in export order: vision, prefill, decode."""
    return [vision_graph(model), prefill_graph(model), decode_graph(model, kv_cache, layout)]
