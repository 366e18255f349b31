"""Tiny, seeded CLIP vision stand-ins for tests, workflows and the demo (never committed): the IP-Adapter
image encoder (CLIP-ViT-H-14-laion2B-s32B-b79K) and Flux Redux's SigLIP encoder
(sigclip_vision_patch14_384), each in the real (HF transformers) key layout at a tiny width.

ComfyUI's ``comfy.clip_vision.load`` picks the architecture from a fixed JSON by key presence only
(encoder layer 47 -> ViT-bigG, 30 -> ViT-H, 22 -> ViT-L or, at width 1152, SigLIP 384/512; DINOv2 layer
39/23) and builds it at full size whatever the file holds (missing tensors stay uninitialised); the
smallest model any accepted file yields is ViT-L (303 M parameters), the real ViT-H has 632 M and takes
~5 s per image on 2 CPU cores, SigLIP 384 has 428 M. So each tiny encoder is a test-only config (real
image size and patch grid, real key names, width 64, 2-3 layers) registered with ComfyUI's detection by
``register_tiny_clip_vision``, the way ``tiny_models.register_tiny_sd15`` registers the tiny UNet: the
real ``CLIPVisionLoader`` -> ``ClipVisionModel`` -> ``CLIPVisionModelProjection`` path then loads and
runs it. Users need the real files.
"""
import json
import os
import tempfile

import torch

from .tiny_models import init_weights_

# CLIP-ViT-H's grid (224 px, 14 px patches: 256 patches + the class token) at width 64
TINY_CLIP_VISION_CONFIG = {
    "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 3,
    "image_size": 224, "patch_size": 14, "num_channels": 3, "projection_dim": 48, "hidden_act": "gelu",
    "layer_norm_eps": 1e-5, "model_type": "clip_vision_model",
}
# SigLIP so400m 384's grid (384 px, 14 px patches: 729 tokens, no class token) and preprocessing at width 64
TINY_SIGLIP_VISION_CONFIG = {
    "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2,
    "image_size": 384, "patch_size": 14, "num_channels": 3, "hidden_act": "gelu_pytorch_tanh",
    "model_type": "siglip_vision_model", "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
}
TINY_VISION_CONFIGS = {"clip": TINY_CLIP_VISION_CONFIG, "siglip": TINY_SIGLIP_VISION_CONFIG}


def _positions(config):
    patches = (config["image_size"] // config["patch_size"]) ** 2
    return patches + (config["model_type"] == "clip_vision_model")  # CLIP adds a class token


def _config_path(name):
    """ClipVisionModel of ComfyUI 0.3.75 takes a JSON path; written atomically (test processes share /tmp)."""
    path = os.path.join(tempfile.gettempdir(), f"amdm_tiny_{name}_vision_config.json")
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(TINY_VISION_CONFIGS[name], fh)
    os.replace(tmp, path)
    return path


def _tiny_config_name(sd, prefix):
    """The name of the tiny config whose width, token count and layer count ``sd`` has, or None."""
    positions = sd.get(prefix + "vision_model.embeddings.position_embedding.weight")
    for name, config in TINY_VISION_CONFIGS.items():
        last = config["num_hidden_layers"] - 1
        if (positions is not None and tuple(positions.shape) == (_positions(config), config["hidden_size"])
                and f"{prefix}vision_model.encoder.layers.{last}.layer_norm1.weight" in sd
                and f"{prefix}vision_model.encoder.layers.{last + 1}.layer_norm1.weight" not in sd):
            return name
    return None


def register_tiny_clip_vision():
    """Let ComfyUI's CLIP vision detection recognise the tiny configs (test/demo only; idempotent).
    Every other file goes to ComfyUI's own detection unchanged."""
    import comfy.clip_vision

    detect = comfy.clip_vision.load_clipvision_from_sd
    if getattr(detect, "amdm_tiny", False):
        return

    def load_clipvision_from_sd(sd, prefix="", convert_keys=False):
        name = None if convert_keys else _tiny_config_name(sd, prefix)
        if name is None:
            return detect(sd, prefix=prefix, convert_keys=convert_keys)
        clip = comfy.clip_vision.ClipVisionModel(_config_path(name))
        missing, unexpected = clip.load_sd({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
        if missing:
            raise RuntimeError(f"tiny {name} vision file lacks {missing[:4]}")
        return clip

    load_clipvision_from_sd.amdm_tiny = True
    comfy.clip_vision.load_clipvision_from_sd = load_clipvision_from_sd


def vision_state_dict(name, seed=0):
    """Random weights of the tiny config ``name`` ("clip" or "siglip") in the real key layout
    (``vision_model.*``, CLIP's ``visual_projection.weight``); float16 like the distributed files."""
    import comfy.clip_model
    import comfy.ops

    model = comfy.clip_model.CLIPVisionModelProjection(TINY_VISION_CONFIGS[name], torch.float32, "cpu",
                                                       comfy.ops.disable_weight_init)
    init_weights_(model, seed)
    if name == "clip":  # init_weights_ zeroes 1-D embeddings; the class token should carry signal
        with torch.no_grad():
            model.vision_model.embeddings.class_embedding.normal_(generator=torch.Generator().manual_seed(seed + 1))
    return {k: v.half().contiguous() for k, v in model.state_dict().items()}


def write_tiny_clip_vision(path, seed=0):
    """The CLIP-ViT-H stand-in at ``path`` (models/clip_vision/...); registers its config in this process."""
    import safetensors.torch

    register_tiny_clip_vision()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    safetensors.torch.save_file(vision_state_dict("clip", seed), path)
    return path
