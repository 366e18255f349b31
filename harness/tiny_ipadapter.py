"""Tiny, seeded IP-Adapter and CLIP vision files for tests, workflows and the demo (never committed).

``write_tiny_ipadapter`` writes the public ``ip-adapter_sd15`` / ``ip-adapter-plus_sd15`` safetensors key
layout (spelled out below, independently of the pack's loader) with random weights, sized for the tiny
UNet (its to_k_ip / to_v_ip widths follow ``model_channels``) and for the tiny CLIP vision model; the plus
Resampler has the real files' 768 width, depth 4 and 16 queries. With ``model_channels=320,
clip_embed_dim=1024, clip_hidden_dim=1280`` it gives the real files' shapes (22,319,616 / 49,087,488 parameters = the 44.6 / 98.2 MB fp16 downloads).

CLIP vision: ComfyUI 0.3.75's ``comfy.clip_vision.load`` picks the architecture from a fixed JSON by key
presence only (encoder layer 47 -> ViT-bigG, 30 -> ViT-H, 22 -> ViT-L or SigLIP, DINOv2 layer 39/23) and
builds it at full size whatever the file holds (missing tensors stay uninitialised); the smallest model
any accepted file yields is ViT-L (303 M parameters); the real SD1.5 encoder, ViT-H, has 632 M and takes
~5 s per image on 2 CPU cores. So the tiny encoder is a test-only config (3 layers, width 64, the real
224 px / 14 px patch grid, real HF key names) registered with ComfyUI's detection by
``register_tiny_clip_vision``, the way ``tiny_models.register_tiny_sd15`` registers the tiny UNet:
the real ``CLIPVisionLoader`` -> ``ClipVisionModel`` -> ``CLIPVisionModelProjection`` path then
loads and runs it. Users need the real CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors.
"""
import json
import os
import tempfile

import torch

from .tiny_models import TINY_MODEL_CHANNELS, init_weights_

TINY_CLIP_VISION_CONFIG = {
    "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 3,
    "image_size": 224, "patch_size": 14, "num_channels": 3, "projection_dim": 48, "hidden_act": "gelu",
    "layer_norm_eps": 1e-5, "model_type": "clip_vision_model",
}
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


def _tiny_config_path():
    """ClipVisionModel takes a JSON path; written atomically (several test processes may share /tmp)."""
    path = os.path.join(tempfile.gettempdir(), "amdm_tiny_clip_vision_config.json")
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(TINY_CLIP_VISION_CONFIG, fh)
    os.replace(tmp, path)
    return path


def _is_tiny_clip_vision(sd, prefix):
    width = sd.get(prefix + "vision_model.embeddings.class_embedding")
    last = TINY_CLIP_VISION_CONFIG["num_hidden_layers"] - 1
    return (width is not None and tuple(width.shape) == (TINY_CLIP_VISION_CONFIG["hidden_size"],)
            and f"{prefix}vision_model.encoder.layers.{last}.layer_norm1.weight" in sd
            and f"{prefix}vision_model.encoder.layers.{last + 1}.layer_norm1.weight" not in sd)


def register_tiny_clip_vision():
    """Let ComfyUI's CLIP vision detection recognise the tiny config (test/demo only; idempotent).
    Every other file goes to ComfyUI's own detection unchanged."""
    import comfy.clip_vision

    detect = comfy.clip_vision.load_clipvision_from_sd
    if getattr(detect, "amdm_tiny", False):
        return

    def load_clipvision_from_sd(sd, prefix="", convert_keys=False):
        if convert_keys or not _is_tiny_clip_vision(sd, prefix):
            return detect(sd, prefix=prefix, convert_keys=convert_keys)
        clip = comfy.clip_vision.ClipVisionModel(_tiny_config_path())
        missing, unexpected = clip.load_sd({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
        if missing:
            raise RuntimeError(f"tiny CLIP vision file lacks {missing[:4]}")
        return clip

    load_clipvision_from_sd.amdm_tiny = True
    comfy.clip_vision.load_clipvision_from_sd = load_clipvision_from_sd


def tiny_clip_vision_state_dict(seed=0):
    """Random weights in the real (HF transformers) key layout of CLIP-ViT-H-14-laion2B-s32B-b79K:
    ``vision_model.*`` and ``visual_projection.weight``; float16 like the distributed file."""
    import comfy.clip_model
    import comfy.ops

    model = comfy.clip_model.CLIPVisionModelProjection(TINY_CLIP_VISION_CONFIG, torch.float32, "cpu",
                                                       comfy.ops.disable_weight_init)
    init_weights_(model, seed)
    with torch.no_grad():  # init_weights_ zeroes 1-D embeddings; the class token should carry signal
        model.vision_model.embeddings.class_embedding.normal_(generator=torch.Generator().manual_seed(seed + 1))
    return {k: v.half().contiguous() for k, v in model.state_dict().items()}


def write_tiny_clip_vision(path, seed=0):
    """Save the tiny CLIP vision model at ``path`` (e.g. models/clip_vision/<name>.safetensors) and
    register its config with ComfyUI's detection in this process; returns ``path``."""
    import safetensors.torch

    register_tiny_clip_vision()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    safetensors.torch.save_file(tiny_clip_vision_state_dict(seed), path)
    return path
