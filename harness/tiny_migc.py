"""A random-weight MIGC checkpoint in the real MIGC_SD14.ckpt format, sized for the tiny UNet.

Format: ``torch.save({"state_dict": {key: float32 tensor}})`` with ldm-style keys
``model.diffusion_model.<block>.<i>.transformer_blocks.0.attn2.migc.<sub key>``; the released file
carries MIGC on the middle block and output blocks 3, 4, 5 (1280 channels in SD1.5, 4 x model_channels
in general). The sub-key table below is written out by hand from the MIGC architecture (enhancement
attention ``ea``, layout attention ``la``, ``norm``, shading aggregation controller ``sac`` with two
CBAMs, box ``pos_net``), independently of the pack's module code.
"""
import os

import torch

MIGC_BLOCKS = (("middle", 0), ("output", 3), ("output", 4), ("output", 5))
_CHANNEL_MULT_OF_BLOCK = {("input", 1): 1, ("input", 2): 1, ("input", 4): 2, ("input", 5): 2, ("input", 7): 4,
                          ("input", 8): 4, ("middle", 0): 4, ("output", 3): 4, ("output", 4): 4, ("output", 5): 4,
                          ("output", 6): 2, ("output", 7): 2, ("output", 8): 2, ("output", 9): 1,
                          ("output", 10): 1, ("output", 11): 1}


def migc_sub_key_shapes(c, context_dim=768, slots=30):
    """{sub key under 'migc.': shape} of one MIGC module with c channels."""
    shapes = {}
    for name, kv_dim in (("ea", context_dim), ("la", c)):
        shapes.update({f"{name}.to_q.weight": (c, c), f"{name}.to_k.weight": (c, kv_dim),
                       f"{name}.to_v.weight": (c, kv_dim), f"{name}.to_out.0.weight": (c, c),
                       f"{name}.to_out.0.bias": (c,)})
    shapes.update({"norm.weight": (c,), "norm.bias": (c,),
                   "sac.conv1.weight": (c, c + 1, 1, 1), "sac.conv1.bias": (c,),
                   "sac.conv2.weight": (1, c, 1, 1), "sac.conv2.bias": (1,)})
    for name, channels, hidden in (("cbam1", c, c // 16), ("cbam2", slots, slots)):
        shapes.update({f"sac.{name}.ChannelGate.mlp.1.weight": (hidden, channels),
                       f"sac.{name}.ChannelGate.mlp.1.bias": (hidden,),
                       f"sac.{name}.ChannelGate.mlp.3.weight": (channels, hidden),
                       f"sac.{name}.ChannelGate.mlp.3.bias": (channels,),
                       f"sac.{name}.SpatialGate.spatial.conv.weight": (1, 2, 7, 7)})
    shapes.update({"pos_net.linears_position.0.weight": (512, 64), "pos_net.linears_position.0.bias": (512,),
                   "pos_net.linears_position.2.weight": (512, 512), "pos_net.linears_position.2.bias": (512,),
                   "pos_net.linears_position.4.weight": (context_dim, 512),
                   "pos_net.linears_position.4.bias": (context_dim,)})
    return shapes


def block_prefix(block):
    kind, index = block
    if kind == "middle":
        return "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.migc."
    return f"model.diffusion_model.{kind}_blocks.{index}.1.transformer_blocks.0.attn2.migc."


def tiny_migc_state_dict(seed=0, model_channels=32, blocks=MIGC_BLOCKS):
    """Seeded random weights: matrices/convs ~ N(0, 1/fan_in), norm weights 1, biases ~ N(0, 0.02)."""
    gen = torch.Generator().manual_seed(seed)
    state_dict = {}
    for block in blocks:
        for sub_key, shape in migc_sub_key_shapes(_CHANNEL_MULT_OF_BLOCK[block] * model_channels).items():
            if sub_key == "norm.weight":
                value = torch.ones(shape)
            elif len(shape) == 1:
                value = torch.randn(shape, generator=gen) * 0.02
            else:
                fan_in = torch.Size(shape[1:]).numel()
                value = torch.randn(shape, generator=gen) / fan_in ** 0.5
            state_dict[block_prefix(block) + sub_key] = value
    return state_dict


def write_tiny_migc(path, seed=0, model_channels=32, blocks=MIGC_BLOCKS):
    """Write the tiny MIGC checkpoint ``{"state_dict": ...}`` to ``path`` (e.g. .../models/migc/MIGC_SD14.ckpt)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"state_dict": tiny_migc_state_dict(seed, model_channels, blocks)}, path)
    return path
