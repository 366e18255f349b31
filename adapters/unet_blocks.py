"""UNet blocks by the keys ComfyUI's attention patches use: ("input" | "middle" | "output", index)."""
from comfy.ldm.modules.attention import BasicTransformerBlock


def unet_block(diffusion_model, block):
    """The module of one block key of ComfyUI's UNetModel, or None if the UNet has no such block."""
    kind, index = block
    if kind == "middle":
        return diffusion_model.middle_block
    blocks = diffusion_model.input_blocks if kind == "input" else diffusion_model.output_blocks
    return blocks[index] if 0 <= index < len(blocks) else None


def cross_attentions(diffusion_model, block):
    """The attn2 (cross-attention) modules of every transformer block inside one UNet block, in order."""
    module = unet_block(diffusion_model, block)
    if module is None:
        return []
    return [m.attn2 for m in module.modules() if isinstance(m, BasicTransformerBlock) and m.attn2 is not None]


def cross_attention_blocks(diffusion_model):
    """Every block key of the UNet that holds a cross-attention, in UNet order (16 in SD1.x)."""
    keys = ([("input", i) for i in range(len(diffusion_model.input_blocks))] + [("middle", 0)]
            + [("output", i) for i in range(len(diffusion_model.output_blocks))])
    return [key for key in keys if cross_attentions(diffusion_model, key)]
