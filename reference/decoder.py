"""The text decoder of the GLM-V family: M-RoPE GQA attention, dense SwiGLU MLP, GLM-4.5V's MoE.

Module and parameter names mirror the HF checkpoint keys, so ``state_dict()`` keys equal the
checkpoint's in-memory keys. Forward passes take explicit per-layer K/V tensors (no cache objects)
and explicit 3-D position ids, so the same code is traced into the prefill and decode graphs.
Numerics follow transformers: RMSNorm, softmax, rotary tables and the MoE router compute in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoeConfig, TextConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight multiply (as transformers does)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def mrope_cos_sin(config: TextConfig, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE tables.

    position_ids: int64 (3, B, L) — temporal, height and width positions.
    Returns cos, sin: ``dtype`` (B, L, rotary_dim), computed in fp32 then cast, laid out interleaved
    ([c0, c0, c1, c1, ...]) or half-split ([c0..c_{r/2-1}, c0..]) according to the family.
    """
    rd = config.rotary_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))
    freqs = position_ids[..., None].float() * inv_freq  # (3, B, L, rd/2)
    # Frequency index i takes its position from axis T, H or W according to mrope_section.
    sections = freqs.split(list(config.mrope_section), dim=-1)
    freqs = torch.cat([chunk[axis % 3] for axis, chunk in enumerate(sections)], dim=-1)  # (B, L, rd/2)
    cos, sin = freqs.cos(), freqs.sin()
    if config.rope_interleaved:
        cos, sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
    else:
        cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
    return cos.to(dtype), sin.to(dtype)


def _rotate(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:  # pairs (2i, 2i+1)
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2  # pairs (i, i + r/2)
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of x (B, heads, L, head_dim); the rest pass through."""
    rd = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    return torch.cat([x_rot * cos + _rotate(x_rot, interleaved) * sin, x_pass], dim=-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Eager softmax attention with GQA.

    q: (B, H, S, D); k, v: (B, KVH, T, D); allowed: bool broadcastable to (B, 1, S, T) or None.
    Softmax runs in fp32 and is cast back, as transformers' eager path does. Returns (B, S, H*D).
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if allowed is not None:
        # where() rather than adding finfo.min: a fully masked (padding) row stays finite.
        scores = torch.where(allowed, scores, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v)
    return out.transpose(1, 2).flatten(2)


def causal_allowed(attention_mask: torch.Tensor, query_len: int) -> torch.Tensor:
    """Which keys each query may see.

    attention_mask: int64/bool (B, T) over all keys (past + new), 1 for real tokens.
    The last ``query_len`` keys are the queries themselves. Returns bool (B, 1, query_len, T).
    """
    total = attention_mask.shape[-1]
    key_pos = torch.arange(total, device=attention_mask.device)
    query_pos = key_pos[total - query_len:] if query_len else key_pos[:0]
    causal = key_pos[None, :] <= query_pos[:, None]  # (S, T)
    return causal[None, None] & attention_mask.bool()[:, None, None, :]


class TextAttention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        h, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, config.num_heads * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, config.num_kv_heads * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, config.num_kv_heads * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.num_heads * d, h, bias=False)

    def forward(self, x, cos, sin, allowed, past_key, past_value):
        """x: (B, S, H); past_key/value: (B, KVH, P, D). Returns (out (B, S, H), key, value (B, KVH, P+S, D))."""
        c = self.config
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, c.num_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, c.num_kv_heads, c.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin, c.rope_interleaved)
        k = apply_rotary(k, cos, sin, c.rope_interleaved)
        if past_key is not None:
            k = torch.cat([past_key, k], dim=2)
            v = torch.cat([past_value, v], dim=2)
        out = attention(q, k, v, allowed, c.head_dim**-0.5)
        return self.o_proj(out), k, v


class FusedMLP(nn.Module):
    """SwiGLU with a fused ``gate_up_proj`` (GLM-4.1V, GLM-OCR, GLM-Image)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class SplitMLP(nn.Module):
    """SwiGLU with separate gate/up/down projections (GLM-4.5V dense layers and shared expert, vision blocks)."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TopkRouter(nn.Module):
    """Sigmoid router with score-correction bias and group limiting, fully in fp32."""

    def __init__(self, hidden: int, moe: MoeConfig):
        super().__init__()
        self.moe = moe
        self.weight = nn.Parameter(torch.zeros(moe.num_experts, hidden))
        self.register_buffer("e_score_correction_bias", torch.zeros(moe.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, dense: bool = True):
        """x: (T, H). Returns the dense routing matrix: fp32 (T, E), the scaled weight of each chosen expert, else 0;
        with ``dense=False`` the choice itself: expert ids int64 (T, k) and their weights fp32 (T, k) (what the
        exported graphs' sparse expert formulations take, ``glmtrt.export.graphs``)."""
        m = self.moe
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        grouped = choice.view(-1, m.n_group, m.num_experts // m.n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # (T, G)
        best_groups = group_scores.topk(m.topk_group, dim=-1).indices
        group_keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, best_groups, True)
        keep = group_keep[..., None].expand_as(grouped).reshape(-1, m.num_experts)
        choice = choice.masked_fill(~keep, float("-inf"))
        chosen = choice.topk(m.experts_per_token, dim=-1).indices  # (T, k)
        weights = scores.gather(1, chosen)  # weights come from the scores without the bias
        if m.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * m.routed_scaling_factor
        if not dense:
            return chosen, weights
        return torch.zeros_like(scores).scatter(1, chosen, weights)


class Experts(nn.Module):
    """Routed experts stored fused: gate_up_proj (E, 2I, H), down_proj (E, H, I)."""

    def __init__(self, hidden: int, moe: MoeConfig):
        super().__init__()
        i = moe.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(moe.num_experts, 2 * i, hidden))
        self.down_proj = nn.Parameter(torch.empty(moe.num_experts, hidden, i))

    def forward(self, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        """x: (T, H); routing: fp32 (T, E). Every expert runs on every token and is weighted by ``routing``
        (zero for unchosen experts): static structure, exact, and the reference's cost is no concern."""
        gate, up = torch.einsum("th,eih->tei", x, self.gate_up_proj).chunk(2, dim=-1)
        y = torch.einsum("tei,ehi->teh", F.silu(gate) * up, self.down_proj)  # (T, E, H)
        return (y * routing[..., None]).sum(1).to(x.dtype)


class MoE(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        moe = config.moe
        self.gate = TopkRouter(config.hidden_size, moe)
        self.experts = Experts(config.hidden_size, moe)
        self.shared_experts = SplitMLP(config.hidden_size, moe.moe_intermediate_size * moe.n_shared_experts)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        routed = self.experts(flat, self.gate(flat)).view_as(x)
        return routed + self.shared_experts(x)


class DecoderLayer(nn.Module):
    """Sandwich-norm layer (GLM-4.1V, GLM-OCR, GLM-Image) or plain pre-norm layer (GLM-4.5V)."""

    def __init__(self, config: TextConfig, index: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.sandwich = config.sandwich_norms
        self.self_attn = TextAttention(config)
        if config.is_moe_layer(index):
            self.mlp = MoE(config)
        elif config.moe is not None:
            self.mlp = SplitMLP(h, config.intermediate_size)
        else:
            self.mlp = FusedMLP(h, config.intermediate_size)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)  # the pre-MLP norm, despite its name
        if self.sandwich:
            self.post_self_attn_layernorm = RMSNorm(h, eps)
            self.post_mlp_layernorm = RMSNorm(h, eps)

    def forward(self, x, cos, sin, allowed, past_key, past_value):
        attn, key, value = self.self_attn(self.input_layernorm(x), cos, sin, allowed, past_key, past_value)
        if self.sandwich:
            attn = self.post_self_attn_layernorm(attn)
        x = x + attn
        mlp = self.mlp(self.post_attention_layernorm(x))
        if self.sandwich:
            mlp = self.post_mlp_layernorm(mlp)
        return x + mlp, key, value


class TextModel(nn.Module):
    """``model.language_model``: embeddings, decoder layers, final norm."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, inputs_embeds, position_ids, attention_mask, past_keys=None, past_values=None):
        """Run the decoder over S new tokens.

        inputs_embeds: (B, S, H); position_ids: int64 (3, B, S); attention_mask: (B, P+S) with 1 for real tokens;
        past_keys/past_values: lists of (B, KVH, P, D) per layer, or None for a prefill.
        Returns the final-normed hidden states (B, S, H) and lists of present keys/values (B, KVH, P+S, D).
        """
        cos, sin = mrope_cos_sin(self.config, position_ids, inputs_embeds.dtype)
        allowed = causal_allowed(attention_mask, inputs_embeds.shape[1])
        x = inputs_embeds
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            pk = past_keys[i] if past_keys is not None else None
            pv = past_values[i] if past_values is not None else None
            x, k, v = layer(x, cos, sin, allowed, pk, pv)
            keys.append(k)
            values.append(v)
        return self.norm(x), keys, values
