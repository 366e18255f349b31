"""A random-weight InteractDiffusion add-on file in the real ``ext_interactdiff_v1.2.pth`` format.

Same format as the published file: a pickled flat dict of tensors, one gated self-attention fuser per
transformer block of an SD1.x UNet (``<block>.1.transformer_blocks.0.fuser.*``, 17 tensors) and the HOI
position net (``position_net.*``), sized for a UNet of width ``model_channels`` (32 = the tiny test UNet,
320 = real SD1.5). The layout is derived here from ComfyUI's own UNet and GLIGEN fuser classes, not from
the pack's layout table, so the pack's validation is checked against an independent source.
"""
import os

import torch

from .tiny_models import TINY_MODEL_CHANNELS, tiny_unet_config

CLIP_WIDTH = 768
FOURIER_WIDTH = 8 * 2 * 4  # 8 frequencies, sin and cos, 4 box coordinates


def _fuser_shapes_by_block(model_channels):
    """``<block path>.fuser.<param>`` -> shape, walking an SD1.x UNet of that width on the meta device."""
    import comfy.gligen
    import comfy.ops
    from comfy.ldm.modules.attention import BasicTransformerBlock
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    shapes = {}
    with torch.device("meta"):
        unet = UNetModel(**tiny_unet_config(model_channels), dtype=torch.float32,
                         operations=comfy.ops.disable_weight_init)
        for path, module in unet.named_modules():
            if isinstance(module, BasicTransformerBlock):
                width = module.attn1.to_q.in_features
                fuser = comfy.gligen.GatedSelfAttentionDense(width, CLIP_WIDTH, 8, width // 8)
                for name, param in fuser.state_dict().items():
                    shapes[f"{path}.fuser.{name}"] = tuple(param.shape)
    return shapes


def _position_net_shapes():
    shapes = {
        "position_net.interaction_embedding.emb.weight": (30, CLIP_WIDTH),
        "position_net.position_embedding.emb.weight": (3, CLIP_WIDTH),
        "position_net.null_positive_feature": (CLIP_WIDTH,),
        "position_net.null_action_feature": (CLIP_WIDTH,),
        "position_net.null_position_feature": (FOURIER_WIDTH,),
    }
    for mlp in ("linears", "linear_action"):
        dims = [CLIP_WIDTH + FOURIER_WIDTH, 512, 512, CLIP_WIDTH]
        for layer, (n_in, n_out) in zip((0, 2, 4), zip(dims, dims[1:])):
            shapes[f"position_net.{mlp}.{layer}.weight"] = (n_out, n_in)
            shapes[f"position_net.{mlp}.{layer}.bias"] = (n_out,)
    return shapes


def tiny_interactdiffusion_state_dict(seed=0, model_channels=TINY_MODEL_CHANNELS):
    """Seeded random tensors in the real key layout. Gates (alpha_*) are non-zero so the fusers act."""
    gen = torch.Generator().manual_seed(seed)
    shapes = dict(_fuser_shapes_by_block(model_channels), **_position_net_shapes())
    sd = {}
    for key, shape in shapes.items():
        if key.endswith(("alpha_attn", "alpha_dense")):
            value = 0.5 + 0.2 * torch.randn((), generator=gen)
        elif ".norm" in key:
            value = torch.ones(shape) if key.endswith("weight") else torch.zeros(shape)
        elif "embedding" in key or "null_" in key:
            value = torch.randn(shape, generator=gen) * (0.02 if "embedding" in key else 0.5)
        elif len(shape) == 2:
            value = torch.randn(shape, generator=gen) / shape[1] ** 0.5
        else:
            value = torch.randn(shape, generator=gen) * 0.02
        sd[key] = value.float().contiguous()
    return sd


def write_tiny_interactdiffusion(path, seed=0, model_channels=TINY_MODEL_CHANNELS):
    """Save the file (torch.save of the flat dict, like the published .pth) at ``path``; reused if present."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = path + ".partial"
        torch.save(tiny_interactdiffusion_state_dict(seed, model_channels), tmp)
        os.replace(tmp, path)
    return path
