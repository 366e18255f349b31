"""Tiny, seeded stand-ins for the public Flux and SDXL files the Flux and SDXL workflows load, in the key
layouts of those files (never committed; generated at run time):

- flux1-dev-fp8.safetensors (Comfy-Org's all-in-one checkpoint): model.diffusion_model.* (Black Forest
  Labs' keys), text_encoders.clip_l.* and text_encoders.t5xxl.* (HF keys), vae.* (ae.safetensors' ldm
  autoencoder);
- flux-canny-controlnet-v3.safetensors (XLabs): BFL double_blocks / img_in / txt_in ..., controlnet_blocks,
  input_hint_block, pos_embed_input;
- flux1-redux-dev.safetensors: redux_up.* / redux_down.*;
- sigclip_vision_patch14_384.safetensors: SigLIP with HF keys (harness/tiny_clip_vision.py);
- sd_xl_base_1.0.safetensors and the fine-tune: model.diffusion_model.*, conditioner.embedders.0.transformer.*
  (CLIP-L, HF keys), conditioner.embedders.1.model.* (CLIP-G, OpenCLIP keys), first_stage_model.* (the ldm
  autoencoder with its quant convs);
- diffusers_xl_canny_full.safetensors: the diffusers ControlNetModel layout (conv_in, time/add_embedding,
  down_blocks, mid_block, controlnet_cond_embedding, controlnet_down_blocks, controlnet_mid_block).

The checkpoints are written the way ComfyUI's own CheckpointSave writes them (each model config's
``process_*_state_dict_for_saving``), which is how the Comfy-Org checkpoints were made. What is tiny: the
denoisers (Flux: 1 double + 1 single block of width 128 with the real 128-wide heads; SDXL's UNet block
layout at width 32 with one transformer per attention block), the text encoders (CLIP-L / CLIP-G / T5 with
the real vocabularies, width 64, 2-3 layers), the Redux projection and the ControlNets (sized for those
denoisers). The VAEs are the real autoencoders at full size (84 M parameters; ComfyUI 0.3.75 detects the
ldm VAE at width 128 only).

ComfyUI detects models by the shapes of real files, so the tiny sizes are test-only configs registered
with its detection by ``register_tiny_flux_sdxl`` (as ``tiny_models.register_tiny_sd15`` does for SD1.5):
model configs TinyFlux / TinySDXL (with tiny text encoders), and the two loaders that build a fixed
architecture whatever the file holds, the Redux style model and the diffusers ControlNet, get wrappers
that build the tiny sizes for tiny files and leave every other file to ComfyUI.
"""
import os

import torch

from .tiny_models import init_weights_

FLUX_CHECKPOINT = "flux1-dev-fp8.safetensors"
FLUX_CONTROLNET = "flux-canny-controlnet-v3.safetensors"
FLUX_REDUX = "flux1-redux-dev.safetensors"
SIGCLIP_VISION = "sigclip_vision_patch14_384.safetensors"
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
SDXL_FINETUNE = "animagine-xl-3.1.safetensors"
SDXL_CONTROLNET = "diffusers_xl_canny_full.safetensors"

TEXT_WIDTH = 64  # the tiny text encoders' width: Flux's context and vector width, half of SDXL's context
TINY_CLIP_L = {  # CLIP ViT-L/14's text tower (vocabulary, 77 positions, quick_gelu) at width 64
    "hidden_size": TEXT_WIDTH, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 3,
    "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "projection_dim": TEXT_WIDTH, "bos_token_id": 0, "eos_token_id": 49407, "pad_token_id": 1,
    "model_type": "clip_text_model",
}
TINY_CLIP_G = dict(TINY_CLIP_L, hidden_act="gelu")  # OpenCLIP bigG's text tower at width 64
TINY_T5 = {  # T5 v1.1 XXL's encoder (vocabulary, gated gelu, 32 relative buckets) at width 64
    "d_model": TEXT_WIDTH, "d_kv": 32, "num_heads": 2, "d_ff": 128, "num_layers": 2, "vocab_size": 32128,
    "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True, "relative_attention_num_buckets": 32,
    "layer_norm_epsilon": 1e-6, "model_type": "t5",
}
FLUX_HIDDEN = 128  # one head of the real head width (128 = sum of the real axes_dim)
TINY_SIGLIP_WIDTH = 64
SDXL_CONTEXT = 2 * TEXT_WIDTH          # CLIP-L hidden states next to CLIP-G's
SDXL_ADM = TEXT_WIDTH + 6 * 256        # CLIP-G's pooled projection + 6 size/crop embeddings of 256
TINY_SDXL_UNET = {  # SDXL's block layout (3 levels of 2 res blocks, no attention at the first, linear
    # projections, 64-wide heads) with one transformer where SDXL has 2 or 10, at width 32
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": SDXL_ADM, "in_channels": 4, "model_channels": 32,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 1, 1, 1, 1], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": SDXL_CONTEXT,
    "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def flux_params():
    """FluxParams of the tiny Flux dev (guidance-distilled)."""
    from comfy.ldm.flux.model import FluxParams

    params = {"in_channels": 16, "out_channels": 16, "vec_in_dim": TEXT_WIDTH, "context_in_dim": TEXT_WIDTH,
              "hidden_size": FLUX_HIDDEN, "mlp_ratio": 4.0, "num_heads": 1, "depth": 1, "depth_single_blocks": 1,
              "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True}
    if "txt_ids_dims" in FluxParams.__dataclass_fields__:  # newer ComfyUI: Flux.1 has none
        params["txt_ids_dims"] = []
    return params


# ---------------------------------------------------------------- registration with ComfyUI's detection

def _text_encoder(config, device, dtype, model_options, **options):
    import comfy.sd1_clip

    return comfy.sd1_clip.SDClipModel(device=device, dtype=dtype, textmodel_json_config=dict(config),
                                      model_options=model_options, **options)


def _classes():
    """The test-only model configs and text encoders (built on first use: they subclass ComfyUI's)."""
    import comfy.sdxl_clip
    import comfy.supported_models as supported
    import comfy.supported_models_base
    import comfy.text_encoders.flux
    import comfy.text_encoders.t5

    class TinyFluxClipModel(comfy.text_encoders.flux.FluxClipModel):
        """Flux's CLIP-L + T5 pair at the tiny sizes (ComfyUI builds the real sizes from fixed JSONs)."""

        def __init__(self, device="cpu", dtype=None, model_options={}):
            torch.nn.Module.__init__(self)
            self.clip_l = _text_encoder(TINY_CLIP_L, device, dtype, model_options, return_projected_pooled=False)
            self.t5xxl = _text_encoder(TINY_T5, device, dtype, {**model_options, "model_name": "t5xxl"},
                                       special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5)
            self.dtypes = {dtype}

    class TinySDXLClipModel(comfy.sdxl_clip.SDXLClipModel):
        """SDXL's CLIP-L + CLIP-G pair (penultimate layers, CLIP-G's projected pooled output), tiny."""

        def __init__(self, device="cpu", dtype=None, model_options={}):
            torch.nn.Module.__init__(self)
            self.clip_l = _text_encoder(TINY_CLIP_L, device, dtype, model_options, layer="hidden", layer_idx=-2,
                                        layer_norm_hidden_state=False)
            self.clip_g = _text_encoder(TINY_CLIP_G, device, dtype, {**model_options, "model_name": "clip_g"},
                                        layer="hidden", layer_idx=-2, layer_norm_hidden_state=False,
                                        special_tokens={"start": 49406, "end": 49407, "pad": 0},
                                        return_projected_pooled=True)
            self.dtypes = {dtype}

    class TinyFlux(supported.Flux):
        unet_config = {"image_model": "flux", "guidance_embed": True, "hidden_size": FLUX_HIDDEN}

        def __init__(self, unet_config):
            # 0.3.75's detection sets Flux's 24 heads (3072 wide); the heads here have the real width
            super().__init__(dict(unet_config, num_heads=unet_config["hidden_size"] // sum(unet_config["axes_dim"])))

        def clip_target(self, state_dict={}):
            return comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer, TinyFluxClipModel)

    class TinySDXL(supported.SDXL):
        unet_config = {"model_channels": TINY_SDXL_UNET["model_channels"], "use_linear_in_transformer": True,
                       "context_dim": SDXL_CONTEXT, "adm_in_channels": SDXL_ADM, "use_temporal_attention": False}

        def clip_target(self, state_dict={}):
            return comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, TinySDXLClipModel)

    return TinyFlux, TinySDXL, TinyFluxClipModel, TinySDXLClipModel


_registered = {}


def register_tiny_flux_sdxl():
    """Register the tiny configs and loaders with ComfyUI (test/demo only; idempotent). Returns
    (TinyFlux, TinySDXL, TinyFluxClipModel, TinySDXLClipModel)."""
    if _registered:
        return _registered["classes"]
    import comfy.model_detection
    import comfy.sd
    import comfy.supported_models as supported

    from .tiny_clip_vision import register_tiny_clip_vision

    classes = _classes()
    for config in classes[:2]:
        supported.models.insert(0, config)
    register_tiny_clip_vision()

    load_style_model = comfy.sd.load_style_model

    def load_tiny_style_model(ckpt_path):
        import comfy.ldm.flux.redux
        import comfy.utils

        sd = comfy.utils.load_torch_file(ckpt_path, safe_load=True)
        down = sd.get("redux_down.weight")
        if down is None or tuple(down.shape) != (TEXT_WIDTH, 3 * TEXT_WIDTH):
            return load_style_model(ckpt_path)
        model = comfy.ldm.flux.redux.ReduxImageEncoder(redux_dim=TINY_SIGLIP_WIDTH, txt_in_features=TEXT_WIDTH)
        model.load_state_dict(sd)
        return comfy.sd.StyleModel(model)

    comfy.sd.load_style_model = load_tiny_style_model

    from_diffusers = comfy.model_detection.unet_config_from_diffusers_unet

    def unet_config_from_diffusers_unet(state_dict, dtype=None):
        conv_in = state_dict.get("conv_in.weight")
        add = state_dict.get("add_embedding.linear_1.weight")
        if (conv_in is not None and add is not None and conv_in.shape[0] == TINY_SDXL_UNET["model_channels"]
                and add.shape[1] == SDXL_ADM):
            return dict(TINY_SDXL_UNET, dtype=dtype)
        return from_diffusers(state_dict, dtype)

    comfy.model_detection.unet_config_from_diffusers_unet = unet_config_from_diffusers_unet
    _registered["classes"] = classes
    return classes


# ---------------------------------------------------------------- state dicts

def _half(sd):
    return {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def _autoencoder_state_dict(latent_channels, quant_convs, seed):
    """The ldm autoencoder of Stable Diffusion / Flux (width 128, 4 levels, 2 res blocks): encoder.*,
    decoder.* and, with ``quant_convs`` (SD / SDXL), quant_conv / post_quant_conv."""
    from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder

    ddconfig = {"double_z": True, "z_channels": latent_channels, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    parts = {"encoder": Encoder(**ddconfig), "decoder": Decoder(**ddconfig)}
    if quant_convs:
        parts["quant_conv"] = torch.nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        parts["post_quant_conv"] = torch.nn.Conv2d(latent_channels, latent_channels, 1)
    sd = {}
    for offset, (name, module) in enumerate(parts.items()):
        init_weights_(module, seed + offset)
        sd.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    return sd


def bfl_layout(sd):
    """Black Forest Labs' key names of a ComfyUI Flux module's state dict: newer ComfyUI names the q/k
    RMSNorm weights ``*_norm.weight`` (and renames the released files' ``*_norm.scale`` on load)."""
    return {(k[:-len("weight")] + "scale" if k.endswith("_norm.weight") else k): v for k, v in sd.items()}


def _checkpoint_state_dict(config, clip_model_class, vae_sd, seed, unet_layout=dict):
    """A checkpoint of ``config`` (a registered tiny model config instance) as CheckpointSave writes it,
    the denoiser's keys in ``unet_layout``."""
    model = config.get_model({})
    init_weights_(model.diffusion_model, seed)
    clip = init_weights_(clip_model_class(device="cpu", dtype=torch.float32), seed + 1)
    sd = {}
    sd.update(config.process_unet_state_dict_for_saving(unet_layout(model.diffusion_model.state_dict())))
    sd.update(config.process_clip_state_dict_for_saving(clip.state_dict()))
    sd.update(config.process_vae_state_dict_for_saving(vae_sd))
    return _half(sd)


def flux_checkpoint_state_dict(seed=0):
    tiny_flux, _, flux_clip, _ = register_tiny_flux_sdxl()
    config = tiny_flux(dict(flux_params(), image_model="flux"))
    config.set_inference_dtype(torch.float32, None)
    return _checkpoint_state_dict(config, flux_clip, _autoencoder_state_dict(16, False, seed + 2), seed, bfl_layout)


def sdxl_checkpoint_state_dict(seed=0):
    _, tiny_sdxl, _, sdxl_clip = register_tiny_flux_sdxl()
    config = tiny_sdxl({k: v for k, v in TINY_SDXL_UNET.items()})
    config.set_inference_dtype(torch.float32, None)
    return _checkpoint_state_dict(config, sdxl_clip, _autoencoder_state_dict(4, True, seed + 2), seed)


def flux_controlnet_state_dict(seed=0):
    """XLabs' Flux ControlNet layout (pixel-space hint) for the tiny Flux: one double block, no single
    block (ComfyUI counts both from the file)."""
    import comfy.ldm.flux.controlnet
    import comfy.ops

    register_tiny_flux_sdxl()
    params = dict(flux_params(), depth_single_blocks=0)
    control = comfy.ldm.flux.controlnet.ControlNetFlux(latent_input=False, image_model="flux", dtype=torch.float32,
                                                       operations=comfy.ops.disable_weight_init, **params)
    return _half(bfl_layout(init_weights_(control, seed).state_dict()))


def redux_state_dict(seed=0):
    """Flux Redux's projection of SigLIP tokens into T5's space: redux_up (x3), SiLU, redux_down."""
    import comfy.ldm.flux.redux

    register_tiny_flux_sdxl()
    model = comfy.ldm.flux.redux.ReduxImageEncoder(redux_dim=TINY_SIGLIP_WIDTH, txt_in_features=TEXT_WIDTH)
    return _half(init_weights_(model, seed).state_dict())


def sdxl_controlnet_state_dict(seed=0):
    """The diffusers ControlNetModel layout of an SDXL ControlNet sized for the tiny SDXL UNet: ComfyUI's
    ldm ControlNet keys renamed by the inverse of the map ComfyUI reads diffusers ControlNets with."""
    import comfy.cldm.cldm
    import comfy.utils

    register_tiny_flux_sdxl()
    config = {k: v for k, v in TINY_SDXL_UNET.items() if k != "out_channels"}
    control = init_weights_(comfy.cldm.cldm.ControlNet(hint_channels=3, dtype=torch.float32, **config), seed)
    ldm_sd = control.state_dict()
    # SDXL's class embedding is diffusers' add_embedding (ComfyUI's map also names it class_embedding)
    to_diffusers = {ldm: diffusers for diffusers, ldm in comfy.utils.unet_to_diffusers(TINY_SDXL_UNET).items()
                    if not diffusers.startswith("class_embedding.")}
    to_diffusers["middle_block_out.0.weight"] = "controlnet_mid_block.weight"
    to_diffusers["middle_block_out.0.bias"] = "controlnet_mid_block.bias"
    hint_convs = sorted({int(k.split(".")[1]) for k in ldm_sd if k.startswith("input_hint_block.")})
    for position, index in enumerate(hint_convs):
        name = ("conv_in" if position == 0 else "conv_out" if position == len(hint_convs) - 1
                else f"blocks.{position - 1}")
        for suffix in ("weight", "bias"):
            to_diffusers[f"input_hint_block.{index}.{suffix}"] = f"controlnet_cond_embedding.{name}.{suffix}"
    for key in ldm_sd:
        if key.startswith("zero_convs."):
            to_diffusers[key] = key.replace("zero_convs.", "controlnet_down_blocks.").replace(".0.", ".", 1)
    unmapped = sorted(set(ldm_sd) - set(to_diffusers))
    if unmapped:
        raise RuntimeError(f"no diffusers name for ControlNet keys {unmapped[:4]}")
    return _half({to_diffusers[k]: v for k, v in ldm_sd.items()})


# ---------------------------------------------------------------- files

def _save(sd, path):
    import safetensors.torch

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".partial"
    safetensors.torch.save_file(sd, tmp)
    os.replace(tmp, path)
    return path


def write_stand_in(name, path):
    """Write the stand-in of the public file ``name`` (a key of STAND_INS) at ``path``."""
    return _save(STAND_INS[name](), path)


def _siglip_state_dict():
    from .tiny_clip_vision import vision_state_dict

    register_tiny_flux_sdxl()
    return vision_state_dict("siglip", seed=70)


STAND_INS = {  # public file name -> its stand-in's state dict (seeded: the fine-tune differs from the base)
    FLUX_CHECKPOINT: lambda: flux_checkpoint_state_dict(seed=10),
    FLUX_CONTROLNET: lambda: flux_controlnet_state_dict(seed=20),
    FLUX_REDUX: lambda: redux_state_dict(seed=30),
    SIGCLIP_VISION: _siglip_state_dict,
    SDXL_CHECKPOINT: lambda: sdxl_checkpoint_state_dict(seed=40),
    SDXL_FINETUNE: lambda: sdxl_checkpoint_state_dict(seed=50),
    SDXL_CONTROLNET: lambda: sdxl_controlnet_state_dict(seed=60),
}
