"""Tiny, seeded, randomly initialised SD1.5-shaped models for tests, the demo and CPU benchmarks.

The UNet keeps the real SD1.5 topology (4 levels, 2 res blocks, transformer blocks at input 1,2,4,5,7,8,
the middle block and output 3..11, context 768), so adapters keyed by block find their blocks; only
``model_channels`` shrinks (320 -> 32). A test-only model config registered with ComfyUI lets
``CheckpointLoaderSimple`` detect it; the VAE is TAESD-format (real ComfyUI VAE class, 2.4 M params);
the CLIP is the real SD1 text encoder with random weights. Nothing here is ever committed: files are
generated at run time under a temp or output folder.
"""
import os

import torch

TINY_MODEL_CHANNELS = 32
SD15_TRANSFORMER_BLOCKS = (
    [("input", i) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0)] + [("output", i) for i in range(3, 12)]
)


def init_weights_(module, seed):
    """Fill every parameter deterministically: matrices/convs ~ N(0, 1/fan_in), 1-D weights (norms) 1,
    biases 0, embeddings ~ N(0, 0.02). ComfyUI builds layers without initialising them, so this is
    required; zeroed norms would make every comparison pass trivially."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "embedding" in name and param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
            elif param.ndim >= 2:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=gen) / fan_in ** 0.5)
            elif name.endswith("weight") or name.endswith("scale"):
                param.fill_(1.0)
            else:
                param.zero_()
    return module


def tiny_unet_config(model_channels=TINY_MODEL_CHANNELS):
    """ComfyUI UNetModel kwargs of SD1.5 with a narrower width."""
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": model_channels,
        "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "channel_mult": [1, 2, 4, 4],
        "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
        "num_heads": 8, "num_head_channels": -1, "use_temporal_resblock": False,
        "use_temporal_attention": False,
    }


def register_tiny_sd15():
    """Make ComfyUI's checkpoint detection accept the tiny width (test/demo only; idempotent)."""
    import comfy.supported_models as supported

    for config in supported.models:
        if getattr(config, "amdm_tiny", False):
            return config

    class TinySD15(supported.SD15):
        amdm_tiny = True
        unet_config = dict(supported.SD15.unet_config, model_channels=TINY_MODEL_CHANNELS)

    supported.models.insert(0, TinySD15)
    return TinySD15


def tiny_model_patcher(seed=0):
    """An in-memory SD1.5-shaped ModelPatcher (float32, CPU) with seeded random weights."""
    import comfy.model_management
    import comfy.model_patcher

    config_cls = register_tiny_sd15()
    unet_config = {k: v for k, v in tiny_unet_config().items()}
    model_config = config_cls(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    init_weights_(model.diffusion_model, seed)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def _unet_state_dict(seed):
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    import comfy.ops

    unet = UNetModel(**tiny_unet_config(), dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    return init_weights_(unet, seed).state_dict()


def _taesd_state_dict(seed):
    import comfy.taesd.taesd

    return init_weights_(comfy.taesd.taesd.TAESD(latent_channels=4), seed).state_dict()


def _clip_state_dict(seed):
    import comfy.sd1_clip

    clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32)
    sd = init_weights_(clip, seed).state_dict()
    return {k.replace("clip_l.", "", 1): v for k, v in sd.items() if k.startswith("clip_l.")}


def tiny_checkpoint_state_dict(seed=0):
    """A full SD1.5-layout checkpoint dict: tiny UNet, TAESD-format VAE, random SD1 CLIP (fp16)."""
    register_tiny_sd15()
    sd = {}
    for key, value in _unet_state_dict(seed).items():
        sd["model.diffusion_model." + key] = value
    for key, value in _taesd_state_dict(seed + 1).items():
        sd["first_stage_model." + key] = value
    for key, value in _clip_state_dict(seed + 2).items():
        if key.startswith("transformer."):
            sd["cond_stage_model." + key] = value
    return {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def write_tiny_checkpoint(path, seed=0):
    """Save the tiny checkpoint as .safetensors at ``path`` (reused when it already exists)."""
    import safetensors.torch

    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".partial"
        safetensors.torch.save_file(tiny_checkpoint_state_dict(seed), tmp)
        os.replace(tmp, path)
    return path
