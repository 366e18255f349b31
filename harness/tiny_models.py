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
    biases 0, embeddings ~ N(0, 0.02); then every floating buffer a checkpoint carries (SD3's pos_embed)
    ~ N(0, 0.02). ComfyUI builds layers and such buffers with torch.empty, so this is required: left alone
    they hold whatever the memory held (NaN in some processes); zeroed norms would make every comparison
    pass trivially."""
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
        saved = module.state_dict(keep_vars=True)
        for name, buffer in module.named_buffers():
            if name in saved and buffer.is_floating_point():
                buffer.copy_(torch.randn(buffer.shape, generator=gen) * 0.02)
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


# --- other families, built from ComfyUI's own model configs ------------------------------------------

TINY_FAMILIES = ("sd15", "sd15_v", "sdxl", "sd3", "flux")


def _family_unet_config(family):
    if family == "sdxl":
        return {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
                "legacy": False, "adm_in_channels": 2816, "num_classes": "sequential", "in_channels": 4,
                "model_channels": 32, "num_res_blocks": [1, 1, 1], "transformer_depth": [0, 1, 1],
                "transformer_depth_output": [0, 0, 1, 1, 1, 1],
                "channel_mult": [1, 2, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": True,
                "context_dim": 2048, "num_heads": -1, "num_head_channels": 32, "use_temporal_resblock": False,
                "use_temporal_attention": False}
    if family == "sd3":  # MMDiT: hidden size 64 * depth
        return {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 1, "adm_in_channels": 2048,
                "context_embedder_config": {"target": "torch.nn.Linear",
                                            "params": {"in_features": 4096, "out_features": 64}},
                "pos_embed_max_size": 16, "num_patches": 256, "pos_embed_scaling_factor": None, "qk_norm": None,
                "x_block_self_attn_layers": []}
    if family == "flux":
        from comfy.ldm.flux.model import FluxParams

        config = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768,
                  "context_in_dim": 4096, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
                  "depth_single_blocks": 1, "axes_dim": [4, 14, 14], "theta": 10000, "patch_size": 2,
                  "qkv_bias": True, "guidance_embed": True}
        if "txt_ids_dims" in FluxParams.__dataclass_fields__:  # newer ComfyUI: Flux.1 has none
            config["txt_ids_dims"] = []
        return config
    raise ValueError(f"unknown tiny family {family!r}; choose one of {TINY_FAMILIES}")


def tiny_family_patcher(family, seed=0):
    """A tiny seeded ModelPatcher of `family` (TINY_FAMILIES) built from ComfyUI's own model config:
    "sd15" the SD1.5 topology, "sd15_v" the same patched to v-prediction by ComfyUI's ModelSamplingDiscrete
    node, "sdxl" / "sd3" (MMDiT, rectified flow) / "flux" (rectified flow) with shrunken widths."""
    if family in ("sd15", "sd15_v"):
        patcher = tiny_model_patcher(seed)
        if family == "sd15_v":
            from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

            node = ModelSamplingDiscrete()
            patcher = getattr(node, node.FUNCTION)(patcher, "v_prediction", False)[0]
        return patcher
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models as supported

    config_cls = {"sdxl": supported.SDXL, "sd3": supported.SD3, "flux": supported.Flux}[family]
    model_config = config_cls(_family_unet_config(family))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    init_weights_(model.diffusion_model, seed)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def family_conditioning(family, seed, batch=1):
    """A CONDITIONING of the shapes `family`'s text encoders give (random, seeded; no text encoder)."""
    gen = torch.Generator().manual_seed(seed)
    if family in ("sd15", "sd15_v"):
        return [[torch.randn(batch, 77, 768, generator=gen), {}]]
    if family == "sdxl":
        return [[torch.randn(batch, 77, 2048, generator=gen),
                 {"pooled_output": torch.randn(batch, 1280, generator=gen), "width": 64, "height": 64}]]
    if family == "sd3":
        return [[torch.randn(batch, 16, 4096, generator=gen),
                 {"pooled_output": torch.randn(batch, 2048, generator=gen)}]]
    if family == "flux":
        return [[torch.randn(batch, 16, 4096, generator=gen),
                 {"pooled_output": torch.randn(batch, 768, generator=gen), "guidance": 3.5}]]
    raise ValueError(f"unknown tiny family {family!r}; choose one of {TINY_FAMILIES}")
