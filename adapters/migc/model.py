"""MIGC (Multi-Instance Generation Controller, Zhou et al., CVPR 2024) as plain torch modules.

One ``MIGC`` module sits on a cross-attention layer of the SD1.x UNet. Given the layer's per-instance
cross-attention outputs it shades every instance inside its box and aggregates them:

    ca_x[0]      = CA(image, global caption)                         (the ordinary cross-attention)
    ca_x[i]      = CA(image, phrase_i) * M_i * ca_scale + EA_i * ea_scale
    EA_i         = Attn(LN(image), [pooled(phrase_i), PositionNet(box_i)]) * M_i   (enhancement attention)
    template     = LayoutAttention(image, masks M_1..M_N, M_bg)          (self-attention within masks)
    out          = sum_j softmax_j(SAC logits)_j * [ca_x[0] * M_bg, ca_x[1..N], template]_j

M_i is the instance box mask, M_bg = 1 - union(M_i). After MIGC's steps the layer may fall back to the
weight-free ``naive_fuse`` and then to plain cross-attention. Attribute names follow the released
checkpoint's key layout (``ea``, ``la``, ``norm``, ``sac``, ``pos_net`` ...), so its state dict loads
as is. ``operations`` is the layer namespace (a ComfyUI ``comfy.ops`` class), as in ComfyUI's own modules.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

import comfy.ops

MAX_SLOTS = 30            # SAC's second CBAM mixes exactly 30 channels: [background, 28 instance slots, template]
MAX_INSTANCES = MAX_SLOTS - 2
POSITION_FREQS = 8
DEFAULT_OPS = comfy.ops.disable_weight_init  # no init cost: every weight comes from the file


def fourier_embed(boxes, num_freqs=POSITION_FREQS, temperature=100):
    """[..., 4] -> [..., 8 * num_freqs]: for f_k = temperature ** (k / num_freqs), k = 0..num_freqs-1,
    the concatenation of sin(f_k * box), cos(f_k * box) (4 values each), in order of k."""
    freqs = temperature ** (torch.arange(num_freqs, dtype=torch.float32) / num_freqs)
    parts = []
    for freq in freqs.to(boxes.device):
        parts += [torch.sin(freq * boxes), torch.cos(freq * boxes)]
    return torch.cat(parts, dim=-1)


def _heads_attention(q, k, v, heads, scale, key_mask=None):
    """softmax(q k^T * scale) v per head; ``key_mask`` [B, Lq, Lk] (bool, False = blocked) fills blocked
    logits with the dtype's lowest finite value (so a fully blocked row averages, as in MIGC)."""
    b, lq, inner = q.shape
    dim_head = inner // heads

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], heads, dim_head).transpose(1, 2)

    sim = torch.matmul(split(q), split(k).transpose(-1, -2)) * scale
    if key_mask is not None:
        sim = sim.masked_fill(~key_mask[:, None], -torch.finfo(sim.dtype).max)
    out = torch.matmul(sim.softmax(dim=-1), split(v))
    return out.transpose(1, 2).reshape(b, lq, inner)


class Attention(nn.Module):
    """Multi-head attention with bias-free q/k/v projections and a biased output projection."""

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, operations=DEFAULT_OPS):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.to_q = operations.Linear(query_dim, inner, bias=False)
        self.to_k = operations.Linear(context_dim, inner, bias=False)
        self.to_v = operations.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(operations.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None, key_mask=None):
        context = x if context is None else context
        out = _heads_attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, self.scale,
                               key_mask)
        return self.to_out(out)


class LayoutAttention(Attention):
    """Self-attention in which a token attends only to tokens sharing at least one of its masks.

    masks [B, K, H, W] (instance masks + background): token pair (a, b) is allowed where
    sum_k M_k(a) * M_k(b) != 0.
    """

    def forward(self, x, masks):
        b, k, h, w = masks.shape
        flat = masks.reshape(b, k, h * w)
        allowed = torch.einsum("bka,bkc->bac", flat, flat) != 0
        return super().forward(x, key_mask=allowed)


class PositionNet(nn.Module):
    """Box [x0, x1, y0, y1] (normalised) -> one 768-d token: Fourier features -> 3-layer SiLU MLP."""

    def __init__(self, out_dim=768, operations=DEFAULT_OPS):
        super().__init__()
        in_dim = POSITION_FREQS * 2 * 4
        self.linears_position = nn.Sequential(
            operations.Linear(in_dim, 512), nn.SiLU(),
            operations.Linear(512, 512), nn.SiLU(),
            operations.Linear(512, out_dim),
        )

    def forward(self, boxes):
        return self.linears_position(fourier_embed(boxes))


class ChannelGate(nn.Module):
    """x * sigmoid(MLP(avgpool(x)) + MLP(maxpool(x))) per channel (CBAM)."""

    def __init__(self, channels, reduction, operations=DEFAULT_OPS):
        super().__init__()
        hidden = channels // reduction
        self.mlp = nn.Sequential(nn.Flatten(), operations.Linear(channels, hidden), nn.ReLU(),
                                 operations.Linear(hidden, channels))

    def forward(self, x):
        logits = self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3)))
        return x * torch.sigmoid(logits)[:, :, None, None]


class _SpatialConv(nn.Module):
    def __init__(self, operations=DEFAULT_OPS):
        super().__init__()
        self.conv = operations.Conv2d(2, 1, kernel_size=7, padding=3, bias=False)

    def forward(self, x):
        return self.conv(x)


class SpatialGate(nn.Module):
    """x * sigmoid(conv7x7([max over channels, mean over channels])) per pixel (CBAM)."""

    def __init__(self, operations=DEFAULT_OPS):
        super().__init__()
        self.spatial = _SpatialConv(operations)

    def forward(self, x):
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


class CBAM(nn.Module):
    def __init__(self, channels, reduction=16, operations=DEFAULT_OPS):
        super().__init__()
        self.ChannelGate = ChannelGate(channels, reduction, operations)
        self.SpatialGate = SpatialGate(operations)

    def forward(self, x):
        return self.SpatialGate(self.ChannelGate(x))


class SAC(nn.Module):
    """Shading Aggregation Controller: per-pixel softmax weights over [background, instances, template].

    x [B, P, HW, C] and masks [B, P, H, W] with P = instances + 2. A per-slot logit map comes from
    conv1 -> CBAM -> conv2 on [x, mask]; the instance logits (padded to 28 slots with the logit of an
    all-zero "null" slot) are put in the order ``slot_order`` (a permutation of 28; MIGC draws it at
    random every call), mixed across slots by the second CBAM, put back, scaled by ``sac_scale``; the
    softmax over slots weights x.
    """

    def __init__(self, channels, operations=DEFAULT_OPS):
        super().__init__()
        self.conv1 = operations.Conv2d(channels + 1, channels, 1)
        self.cbam1 = CBAM(channels, operations=operations)
        self.conv2 = operations.Conv2d(channels, 1, 1)
        self.cbam2 = CBAM(MAX_SLOTS, reduction=1, operations=operations)

    def slot_logits(self, x, masks):
        """[B, P, HW, C], [B, P, H, W] -> logits [B, P, H, W]."""
        b, p, hw, c = x.shape
        h, w = masks.shape[-2:]
        feats = torch.cat([x, masks.reshape(b, p, hw, 1)], dim=-1)
        feats = feats.reshape(b * p, h, w, c + 1).permute(0, 3, 1, 2)
        return self.conv2(self.cbam1(self.conv1(feats))).reshape(b, p, h, w)

    def forward(self, x, masks, slot_order, sac_scale=1.0):
        b, p, hw, c = x.shape
        n = p - 2
        with_null = self.slot_logits(torch.cat([x, torch.zeros_like(x[:, :1])], dim=1),
                                     torch.cat([masks, torch.zeros_like(masks[:, :1])], dim=1))
        logits, null = with_null[:, :-1], with_null[:, -1:]
        slots = torch.cat([logits[:, 1:-1], null.expand(-1, MAX_INSTANCES - n, -1, -1)], dim=1)
        mixed = self.cbam2(torch.cat([logits[:, :1], slots[:, slot_order], logits[:, -1:]], dim=1))
        instance = mixed[:, 1:-1][:, torch.argsort(slot_order)[:n]] * sac_scale
        weights = torch.cat([mixed[:, :1], instance, mixed[:, -1:]], dim=1).reshape(b, p, hw, 1)
        return (x * weights.softmax(dim=1)).sum(dim=1)


def resize_masks(masks, hw, height, width):
    """Bilinearly resize masks [B, K, h, w] to the layer's grid, found as MIGC does: the integer
    down-scale int(sqrt(height * width // hw)) of the image size (pixels)."""
    down = int(math.sqrt(height * width // hw))
    size = (height // down, width // down)
    if size[0] * size[1] != hw:
        raise ValueError(
            f"MIGC: a {height}x{width} image does not give this layer's {hw} tokens; set width/height of "
            f"MIGC Apply to the size of the latent being sampled (x8)")
    return F.interpolate(masks, size=size, mode="bilinear")


class MIGC(nn.Module):
    def __init__(self, channels, context_dim=768, heads=8, operations=DEFAULT_OPS):
        super().__init__()
        dim_head = channels // heads
        self.ea = Attention(channels, context_dim, heads, dim_head, operations)
        self.la = LayoutAttention(channels, None, heads, dim_head, operations)
        self.norm = operations.LayerNorm(channels)
        self.sac = SAC(channels, operations)
        self.pos_net = PositionNet(context_dim, operations)

    def forward(self, ca_x, image_tokens, instance_masks, background_mask, boxes, pooled, height, width,
                slot_order, ca_scale=1.0, ea_scale=1.0, sac_scale=1.0):
        """Fuse one layer's cross-attention outputs.

        ca_x [B, 1+N, HW, C]: outputs (after to_out) of the layer's cross-attention with the global
        caption, then with each instance phrase. image_tokens [B, HW, C]: the layer's input.
        instance_masks [B, N, h, w], background_mask [B, 1, h, w] (latent grid); boxes [N, 4] as
        normalised (x0, x1, y0, y1); pooled [N, 768] pooled phrase embeddings. Returns [B, HW, C].
        """
        b, _, hw, c = ca_x.shape
        n = instance_masks.shape[1]
        masks = resize_masks(instance_masks, hw, height, width)
        background = resize_masks(background_mask, hw, height, width)
        flat_masks = masks.reshape(b, n, hw, 1)

        box_tokens = self.pos_net(boxes.to(ca_x)).expand(b, n, -1)
        ea_context = torch.stack([pooled.to(ca_x).expand(b, n, -1), box_tokens], dim=2).reshape(b * n, 2, -1)
        normed = self.norm(image_tokens)[:, None].expand(b, n, hw, c).reshape(b * n, hw, c)
        ea_x = self.ea(normed, ea_context).reshape(b, n, hw, c) * flat_masks

        instances = ca_x[:, 1:] * flat_masks * ca_scale + ea_x * ea_scale
        template = self.la(image_tokens, torch.cat([masks, background], dim=1))
        slots = torch.cat([ca_x[:, :1] * background.reshape(b, 1, hw, 1), instances, template[:, None]], dim=1)
        slot_masks = torch.cat([background, masks, torch.ones_like(background)], dim=1)
        return self.sac(slots, slot_masks, slot_order, sac_scale)


def naive_fuse(ca_x, instance_masks, height, width):
    """MIGC's weight-free NaiveFuser: per pixel, (ca_x[0] + sum_i 10 M_i ca_x[i]) / (1 + sum_i 10 M_i)
    (+1e-6 in the denominator). ca_x [B, 1+N, HW, C], instance_masks [B, N, h, w] -> [B, HW, C]."""
    b, p, hw, c = ca_x.shape
    masks = resize_masks(instance_masks, hw, height, width).reshape(b, p - 1, hw, 1)
    weights = torch.cat([torch.ones_like(masks[:, :1]), masks * 10], dim=1)
    return (ca_x * weights).sum(dim=1) / (weights.sum(dim=1) + 1e-6)
