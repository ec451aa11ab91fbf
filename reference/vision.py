"""Vision towers: the GLM-4V / GLM-OCR encoder and GLM-Image's encoder, plus GLM-Image's VQ tokenizer.

Everything data-dependent arrives as host-made tables (see ``glmtrt.runtime.vision_tables``):
rotary cos/sin per patch, position-embedding interpolation taps, and per-patch segment ids that keep
attention inside each image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig, VQConfig
from .decoder import RMSNorm, SplitMLP


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_vision_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (N, heads, hd); cos/sin: fp32 (N, hd). Half-split rotation in fp32, cast back (as transformers)."""
    x32 = x.float()
    out = x32 * cos[:, None] + _rotate_half(x32) * sin[:, None]
    return out.to(x.dtype)


# Heads per attention product. One 4096-patch page has (16, N, N) fp32 scores of 1 GiB (and as much again for
# the probabilities); four heads at a time hold a quarter of that. Each head's arithmetic is unchanged.
HEADS_PER_PRODUCT = 4


def segment_attention(q, k, v, segment_ids: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Non-causal attention restricted to patches of the same image/frame.

    q, k, v: (N, heads, hd); segment_ids: int64 (N,), or None when all patches are one image (no mask: what
    the one-image-per-call vision graph computes). Softmax in fp32, over ``HEADS_PER_PRODUCT`` heads at a time
    (the exported graph inherits the chunks, so ONNX Runtime holds a quarter of the score memory).
    Returns (N, heads*hd).
    """
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # (heads, N, hd)
    same = None if segment_ids is None else segment_ids[:, None] == segment_ids[None, :]
    outputs = []
    for h in range(0, q.shape[0], HEADS_PER_PRODUCT):
        heads = slice(h, h + HEADS_PER_PRODUCT)
        scores = torch.matmul(q[heads], k[heads].transpose(-1, -2)) * scale
        if same is not None:
            scores = torch.where(same, scores, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        outputs.append(torch.matmul(probs, v[heads]))
    return torch.cat(outputs).transpose(0, 1).flatten(1)


class PatchEmbed(nn.Module):
    """Conv3d (GLM-4V/OCR) or Conv2d (GLM-Image) with kernel == stride over each patch row.

    Kept as the real convolution: in fp16 a CPU matmul over the same weights rounds differently from
    transformers' conv, and the reference must compute what transformers computes.
    """

    def __init__(self, c: VisionConfig):
        super().__init__()
        if c.kind == "glm_image":
            self.patch_shape = (c.in_channels, c.patch_size, c.patch_size)
            self.proj = nn.Conv2d(c.in_channels, c.hidden_size, c.patch_size, c.patch_size)
        else:
            self.patch_shape = (c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)
            kernel = self.patch_shape[1:]
            self.proj = nn.Conv3d(c.in_channels, c.hidden_size, kernel, kernel)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches: (N, patch_dim) -> (N, hidden) in the weight dtype."""
        w = self.proj.weight
        return self.proj(patches.to(w.dtype).view(-1, *self.patch_shape)).view(-1, w.shape[0])


class PositionEmbedding(nn.Module):
    """Learned S x S table sampled at each patch's position by host-made interpolation taps."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.position_embedding = nn.Embedding(c.pos_table_side**2, c.hidden_size)

    def forward(self, x: torch.Tensor, tap_index: torch.Tensor, tap_weight: torch.Tensor) -> torch.Tensor:
        """tap_index: int64 (N, K); tap_weight: fp32 (N, K). Interpolates in fp32 like grid_sample on an fp32 table."""
        table = self.position_embedding.weight
        sampled = (table.float()[tap_index] * tap_weight[..., None]).sum(1)
        return x + sampled.to(table.dtype)


class Glm4vVisionAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.num_heads = c.num_heads
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size, bias=c.attention_bias)
        self.proj = nn.Linear(c.hidden_size, c.hidden_size, bias=c.attention_bias)
        self.qk_norm = c.kind == "glm_ocr"
        if self.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.norm_eps)

    def forward(self, x, cos, sin, segment_ids):
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_vision_rotary(q, cos, sin), apply_vision_rotary(k, cos, sin)
        return self.proj(segment_attention(q, k, v, segment_ids, q.shape[-1] ** -0.5))


class Glm4vVisionBlock(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(c.hidden_size, c.norm_eps)
        self.norm2 = RMSNorm(c.hidden_size, c.norm_eps)
        self.attn = Glm4vVisionAttention(c)
        self.mlp = SplitMLP(c.hidden_size, c.block_mlp_width, bias=c.attention_bias)

    def forward(self, x, cos, sin, segment_ids):
        x = x + self.attn(self.norm1(x), cos, sin, segment_ids)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, dim: int, context: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)
        self.post_projection_norm = nn.LayerNorm(dim)
        self.gate_proj = nn.Linear(dim, context, bias=False)
        self.up_proj = nn.Linear(dim, context, bias=False)
        self.down_proj = nn.Linear(context, dim, bias=False)

    def forward(self, x):
        x = F.gelu(self.post_projection_norm(self.proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Glm4vVisionModel(nn.Module):
    """``model.visual`` of GLM-4.1V, GLM-4.5V and GLM-OCR: patches -> merged image embeddings."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.config = c
        self.patch_embed = PatchEmbed(c)
        if c.kind == "glm4v":
            self.post_conv_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
            self.embeddings = PositionEmbedding(c)
        self.blocks = nn.ModuleList(Glm4vVisionBlock(c) for _ in range(c.depth))
        self.post_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        m = c.spatial_merge_size
        self.downsample = nn.Conv2d(c.hidden_size, c.out_hidden_size, m, m)
        self.merger = PatchMerger(c.out_hidden_size, c.merger_context)

    def forward(self, pixel_values, rotary_cos, rotary_sin, tap_index, tap_weight, segment_ids):
        """pixel_values: (N, C*T*P*P); rotary_cos/sin: fp32 (N, hd); tap_index: int64 (N, 16) and tap_weight:
        fp32 (N, 16) (ignored by GLM-OCR); segment_ids: int64 (N,), or None for one image. Returns embeddings
        (N / merge^2, out_hidden)."""
        c = self.config
        x = self.patch_embed(pixel_values)
        if c.kind == "glm4v":
            x = self.embeddings(self.post_conv_layernorm(x), tap_index, tap_weight)
        for block in self.blocks:
            x = block(x, rotary_cos, rotary_sin, segment_ids)
        x = self.post_layernorm(x)
        # Four consecutive patches form one merge block (block-major patch order).
        m = c.spatial_merge_size
        x = x.view(-1, m, m, c.hidden_size).permute(0, 3, 1, 2)
        x = self.downsample(x).view(-1, c.out_hidden_size)
        return self.merger(x)


class GlmImageVisionAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.num_heads = c.num_heads
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size, bias=True)
        self.proj = nn.Linear(c.hidden_size, c.hidden_size, bias=True)

    def forward(self, x, segment_ids):
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)
        return self.proj(segment_attention(q, k, v, segment_ids, q.shape[-1] ** -0.5))


class GlmImageVisionMLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class GlmImageVisionBlock(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.norm2 = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.attn = GlmImageVisionAttention(c)
        self.mlp = GlmImageVisionMLP(c)

    def forward(self, x, segment_ids):
        x = x + self.attn(self.norm1(x), segment_ids)
        return x + self.mlp(self.norm2(x))


class GlmImageVisionModel(nn.Module):
    """``model.visual`` of GLM-Image: patches -> per-patch features (N, D) for the VQ tokenizer."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.config = c
        self.embeddings = PositionEmbedding(c)
        self.patch_embed = PatchEmbed(c)
        self.blocks = nn.ModuleList(GlmImageVisionBlock(c) for _ in range(c.depth))

    def forward(self, pixel_values, tap_index, tap_weight, segment_ids):
        """pixel_values: (N, C*P*P); tap_index: int64 (N, 4); tap_weight: fp32 (N, 4); segment_ids: int64 (N,)."""
        x = self.embeddings(self.patch_embed(pixel_values), tap_index, tap_weight)
        for block in self.blocks:
            x = block(x, segment_ids)
        return x


class VectorQuantizer(nn.Module):
    def __init__(self, q: VQConfig):
        super().__init__()
        self.embedding = nn.Embedding(q.num_embeddings, q.embed_dim)


class VQTokenizer(nn.Module):
    """``model.vqmodel``: quant_conv (1x1) then the nearest L2-normalized codebook entry per patch."""

    def __init__(self, q: VQConfig):
        super().__init__()
        self.quantize = VectorQuantizer(q)
        self.quant_conv = nn.Conv2d(q.latent_channels, q.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(q.embed_dim, q.latent_channels, 1)  # unused here; kept for the checkpoint

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: (N, latent) in raster patch order. Returns int64 codes (N,)."""
        # The 1x1 conv over a (1, latent, 1, N) view: exactly transformers' per-image conv, any patch count.
        z = self.quant_conv(features.T[None, :, None, :])[0, :, 0].T
        z = F.normalize(z, dim=-1)
        codebook = F.normalize(self.quantize.embedding.weight, dim=-1)
        # The same distance expression as transformers, so near-ties resolve identically.
        distances = (z**2).sum(1, keepdim=True) + (codebook**2).sum(1) - 2 * z @ codebook.T
        return distances.argmin(dim=1)
