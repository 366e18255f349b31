"""SD1.5 IP-Adapter architecture (plain torch modules built from ``operations``, a comfy.ops class).

Two public layouts are read (tencent-ailab/IP-Adapter, h94/IP-Adapter ``models/``):

- ``ip-adapter_sd15`` (also ``_light``): ``image_proj.proj`` (Linear E -> T*768) + ``image_proj.norm``
  (LayerNorm 768) turn the CLIP vision image embedding (E = 1024 for ViT-H) into T = 4 tokens.
- ``ip-adapter-plus_sd15`` (also ``plus-face``): ``image_proj`` is a Resampler (16 learned queries,
  4 perceiver layers) over the CLIP vision penultimate hidden states (width 1280 for ViT-H).

Both carry ``ip_adapter.<n>.to_k_ip.weight`` / ``to_v_ip.weight`` ([C, 768], no bias) for the 16
cross-attention layers. ``n`` is the layer's position in diffusers' attention-processor list (down blocks,
up blocks, then the mid block; self-attention takes the even positions and has no weights), so only the
odd n = 1..31 appear. ``SD15_BLOCK_OF_INDEX`` maps them to ComfyUI's attn2 patch keys.
"""
import torch
from torch import nn

import comfy.ops

CROSS_ATTENTION_DIM = 768  # SD1.x text-context width: the image tokens live in the same space
RESAMPLER_HEAD_DIM = 64  # the reference Resampler always uses 64-wide heads
DEFAULT_OPS = comfy.ops.disable_weight_init  # no init cost: every weight comes from the file

# ComfyUI keys of the SD1.5 transformer blocks, in diffusers' processor order (down, up, mid).
_SD15_BLOCKS_IN_DIFFUSERS_ORDER = (
    [("input", i) for i in (1, 2, 4, 5, 7, 8)] + [("output", i) for i in range(3, 12)] + [("middle", 0)]
)
SD15_BLOCK_OF_INDEX = {2 * position + 1: block for position, block in enumerate(_SD15_BLOCKS_IN_DIFFUSERS_ORDER)}

SUPPORTED_LAYOUTS = "ip-adapter_sd15 / ip-adapter_sd15_light (4 tokens) and ip-adapter-plus_sd15 / " \
                    "ip-adapter-plus-face_sd15 (Resampler, 16 tokens)"


class ImageProjection(nn.Module):
    """tokens = LayerNorm(reshape(W e + b, [T, D])): one CLIP image embedding -> T context tokens."""

    def __init__(self, embed_dim, tokens, dim=CROSS_ATTENTION_DIM, operations=DEFAULT_OPS):
        super().__init__()
        self.tokens = tokens
        self.dim = dim
        self.proj = operations.Linear(embed_dim, tokens * dim)
        self.norm = operations.LayerNorm(dim)

    def forward(self, image_embeds):
        return self.norm(self.proj(image_embeds).reshape(-1, self.tokens, self.dim))


class PerceiverAttention(nn.Module):
    """Latents attend to [features; latents]: softmax(q k^T / sqrt(d)) v over both, per head.

    q = W_q LN2(latents); (k, v) = W_kv [LN1(features); LN2(latents)]; out = W_o(concat heads)."""

    def __init__(self, dim, heads, head_dim=RESAMPLER_HEAD_DIM, operations=DEFAULT_OPS):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.norm1 = operations.LayerNorm(dim)
        self.norm2 = operations.LayerNorm(dim)
        self.to_q = operations.Linear(dim, inner, bias=False)
        self.to_kv = operations.Linear(dim, 2 * inner, bias=False)
        self.to_out = operations.Linear(inner, dim, bias=False)

    def forward(self, features, latents):
        features = self.norm1(features)
        latents = self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1)
        b = latents.shape[0]
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(b, latents.shape[1], -1)
        return self.to_out(out)


def feed_forward(dim, mult, operations=DEFAULT_OPS):
    """LN -> Linear(dim, mult*dim, no bias) -> GELU -> Linear(mult*dim, dim, no bias); indices 0/1/3
    are the file's ``layers.<i>.1.<j>`` keys."""
    return nn.Sequential(operations.LayerNorm(dim), operations.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         operations.Linear(dim * mult, dim, bias=False))


class Resampler(nn.Module):
    """Perceiver resampler: Q learned latents, ``depth`` x (latents += attn(x, latents); latents +=
    ff(latents)) with x = W_in features, then tokens = LayerNorm(W_out latents)."""

    def __init__(self, embed_dim, dim, queries, depth, heads, ff_mult, output_dim=CROSS_ATTENTION_DIM,
                 operations=DEFAULT_OPS):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, queries, dim))
        self.proj_in = operations.Linear(embed_dim, dim)
        self.proj_out = operations.Linear(dim, output_dim)
        self.norm_out = operations.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads, operations=operations), feed_forward(dim, ff_mult, operations)])
            for _ in range(depth))

    def forward(self, hidden_states):
        latents = self.latents.expand(hidden_states.shape[0], -1, -1)
        features = self.proj_in(hidden_states)
        for attention, ff in self.layers:
            latents = attention(features, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class IPAdapter:
    """A loaded SD1.5 IP-Adapter: the image projection and, per ComfyUI block key, the [C, 768]
    to_k_ip / to_v_ip matrices. ``plus`` adapters read CLIP penultimate hidden states, the others the
    projected image embedding (``input_width`` is that feature width)."""

    def __init__(self, source, image_proj, plus, input_width, to_k, to_v, index_of_block):
        self.source = source
        self.image_proj = image_proj
        self.plus = plus
        self.input_width = input_width
        self.to_k = to_k
        self.to_v = to_v
        self.index_of_block = index_of_block

    @property
    def kind(self):
        return "ip-adapter-plus_sd15 (Resampler)" if self.plus else "ip-adapter_sd15 (image projection)"

    @torch.no_grad()
    def image_tokens(self, clip_features):
        """[N, E] embeddings (or [N, L, H] hidden states for plus) -> [N, T, 768] context tokens."""
        device = next(self.image_proj.parameters()).device  # features may come from the GPU (--gpu-only)
        return self.image_proj(clip_features.to(device, torch.float32))

    @torch.no_grad()
    def block_keys_values(self, block, tokens):
        """K_ip = tokens W_k^T, V_ip = tokens W_v^T for one block (tokens [.., T, 768] -> [.., T, C])."""
        return tokens @ self.to_k[block].t(), tokens @ self.to_v[block].t()


