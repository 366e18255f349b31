"""Seeded SD1.5 LoRA files in the key layout kohya's sd-scripts write (never committed).

The layout is spelled out here from the diffusers names of the SD1.5 UNet, independently of ComfyUI's
key map: ``lora_unet_<diffusers module path, dots as underscores>.{lora_down.weight, lora_up.weight,
alpha}`` for the 16 attention modules (down_blocks 0..2 x 2, mid_block x 1, up_blocks 1..3 x 3), each
with proj_in, proj_out, attn1/attn2 to_q/to_k/to_v/to_out_0, ff_net_0_proj and ff_net_2: the 192 layers
of sd-scripts' default LoRA (no conv layers). proj_in / proj_out are 1x1 convolutions in SD1.5, stored
4-D as sd-scripts stores them. ``model_channels=320`` gives the real files' shapes.
"""
import os

import torch

from .tiny_models import TINY_MODEL_CHANNELS

SD15_CONTEXT_DIM = 768
# (diffusers module path, channel multiplier of its level) of the 16 SD1.5 attention modules
SD15_ATTENTIONS = (
    [(f"down_blocks_{level}_attentions_{i}", mult) for level, mult in enumerate((1, 2, 4)) for i in range(2)]
    + [("mid_block_attentions_0", 4)]
    + [(f"up_blocks_{level}_attentions_{i}", mult) for level, mult in zip((1, 2, 3), (4, 2, 1)) for i in range(3)]
)


def sd15_lora_layers(model_channels=TINY_MODEL_CHANNELS):
    """{kohya layer name: (out features, in features, is a 1x1 conv)} of sd-scripts' SD1.5 UNet LoRA."""
    layers = {}
    for module, mult in SD15_ATTENTIONS:
        width = model_channels * mult
        block = f"lora_unet_{module}_transformer_blocks_0"
        layers[f"lora_unet_{module}_proj_in"] = (width, width, True)
        layers[f"lora_unet_{module}_proj_out"] = (width, width, True)
        for attention, context in (("attn1", width), ("attn2", SD15_CONTEXT_DIM)):
            layers[f"{block}_{attention}_to_q"] = (width, width, False)
            layers[f"{block}_{attention}_to_k"] = (width, context, False)
            layers[f"{block}_{attention}_to_v"] = (width, context, False)
            layers[f"{block}_{attention}_to_out_0"] = (width, width, False)
        layers[f"{block}_ff_net_0_proj"] = (8 * width, width, False)  # GEGLU: value and gate
        layers[f"{block}_ff_net_2"] = (width, 4 * width, False)
    return layers


def sd15_lora_state_dict(seed=0, model_channels=TINY_MODEL_CHANNELS, rank=4, strength=0.1, dtype=torch.float16):
    """The flat kohya dict. lora_down ~ N(0, 1/in), lora_up ~ N(0, strength^2), alpha = rank (scale 1): a
    layer's change is about `strength * sqrt(rank)` times the size of its weight."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (out_features, in_features, conv) in sd15_lora_layers(model_channels).items():
        tail = (1, 1) if conv else ()
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, in_features, *tail, generator=gen) / in_features ** 0.5
        sd[f"{name}.lora_up.weight"] = torch.randn(out_features, rank, *tail, generator=gen) * strength
        sd[f"{name}.alpha"] = torch.tensor(float(rank))
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def write_sd15_lora(path, seed=0, model_channels=TINY_MODEL_CHANNELS, rank=4, strength=0.1):
    """Save the LoRA as .safetensors at ``path`` (reused when it already exists); returns its file name,
    as LoraLoaderModelOnly takes it when ``path`` lies in models/loras."""
    import safetensors.torch

    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".partial"
        safetensors.torch.save_file(sd15_lora_state_dict(seed, model_channels, rank, strength), tmp)
        os.replace(tmp, path)
    return os.path.basename(path)
