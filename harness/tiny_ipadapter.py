"""Tiny, seeded IP-Adapter files for tests, workflows and the demo (never committed).

``write_tiny_ipadapter`` writes the public ``ip-adapter_sd15`` / ``ip-adapter-plus_sd15`` safetensors key
layout (spelled out below, independently of the pack's loader) with random weights, sized for the tiny
UNet (its to_k_ip / to_v_ip widths follow ``model_channels``) and for the tiny CLIP vision model; the plus
Resampler has the real files' 768 width, depth 4 and 16 queries. With ``model_channels=320,
clip_embed_dim=1024, clip_hidden_dim=1280`` it gives the real files' shapes (22,319,616 / 49,087,488 parameters = the 44.6 / 98.2 MB fp16 downloads).

The tiny CLIP vision encoder it pairs with is in harness/tiny_clip_vision.py.
"""
import os

import torch

from .tiny_clip_vision import TINY_CLIP_VISION_CONFIG
from .tiny_models import TINY_MODEL_CHANNELS

RESAMPLER_DIM = 768  # the real plus Resampler's width (12 heads of 64), also what ComfyUI_IPAdapter_plus builds
SD15_CROSS_ATTENTION_DIM = 768


def sd15_ip_layer_widths(model_channels):
    """{n: width} of the 16 ``ip_adapter.<n>`` layers: diffusers' order is down blocks (2 per level at
    1x, 2x, 4x channels), up blocks (3 per level at 4x, 2x, 1x), then the mid block (4x)."""
    levels = [1, 1, 2, 2, 4, 4] + [4, 4, 4, 2, 2, 2, 1, 1, 1] + [4]
    return {2 * i + 1: model_channels * mult for i, mult in enumerate(levels)}


def ipadapter_state_dict(seed=0, model_channels=TINY_MODEL_CHANNELS, plus=False,
                         clip_embed_dim=TINY_CLIP_VISION_CONFIG["projection_dim"],
                         clip_hidden_dim=TINY_CLIP_VISION_CONFIG["hidden_size"],
                         resampler_dim=RESAMPLER_DIM, tokens=None):
    """The flat ``image_proj.* / ip_adapter.*`` dict (float16). Matrices ~ N(0, 1/fan_in); biases,
    norm offsets and Resampler latents are random and non-zero too, so that the projection of a zero
    image embedding (the negative side) is not trivially zero."""
    gen = torch.Generator().manual_seed(seed)
    d = SD15_CROSS_ATTENTION_DIM

    def matrix(rows, cols):
        return torch.randn(rows, cols, generator=gen) / cols ** 0.5

    def vector(size, center=0.0):
        return center + 0.1 * torch.randn(size, generator=gen)

    def layer_norm(prefix, size):
        return {f"{prefix}.weight": vector(size, 1.0), f"{prefix}.bias": vector(size)}

    sd = {}
    if plus:
        dim, ff = resampler_dim, 4 * resampler_dim
        tokens = tokens or 16
        sd["image_proj.latents"] = torch.randn(1, tokens, dim, generator=gen) / dim ** 0.5
        sd.update({"image_proj.proj_in.weight": matrix(dim, clip_hidden_dim), "image_proj.proj_in.bias": vector(dim),
                   "image_proj.proj_out.weight": matrix(d, dim), "image_proj.proj_out.bias": vector(d)})
        sd.update(layer_norm("image_proj.norm_out", d))
        for i in range(4):
            attn, ffn = f"image_proj.layers.{i}.0", f"image_proj.layers.{i}.1"
            sd.update(layer_norm(f"{attn}.norm1", dim))
            sd.update(layer_norm(f"{attn}.norm2", dim))
            sd.update({f"{attn}.to_q.weight": matrix(dim, dim), f"{attn}.to_kv.weight": matrix(2 * dim, dim),
                       f"{attn}.to_out.weight": matrix(dim, dim)})
            sd.update(layer_norm(f"{ffn}.0", dim))
            sd.update({f"{ffn}.1.weight": matrix(ff, dim), f"{ffn}.3.weight": matrix(dim, ff)})
    else:
        tokens = tokens or 4
        sd.update({"image_proj.proj.weight": matrix(tokens * d, clip_embed_dim),
                   "image_proj.proj.bias": vector(tokens * d)})
        sd.update(layer_norm("image_proj.norm", d))
    for n, width in sd15_ip_layer_widths(model_channels).items():
        sd[f"ip_adapter.{n}.to_k_ip.weight"] = matrix(width, d)
        sd[f"ip_adapter.{n}.to_v_ip.weight"] = matrix(width, d)
    return {k: v.half().contiguous() for k, v in sd.items()}


def write_tiny_ipadapter(path, seed=0, model_channels=TINY_MODEL_CHANNELS, plus=False, **layout):
    """Save ``ipadapter_state_dict(...)`` as .safetensors at ``path`` (overwritten); returns ``path``."""
    import safetensors.torch

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    safetensors.torch.save_file(ipadapter_state_dict(seed, model_channels, plus, **layout), path)
    return path
