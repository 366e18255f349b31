"""Install an SD1.5 IP-Adapter on a ComfyUI model as attn2 replace patches (no weight patch).

Every SD1.5 cross-attention block gets ``out = attn(q, k, v) + weight * attn(q, K_ip, V_ip)`` where
K_ip / V_ip are the block's to_k_ip / to_v_ip applied to the image tokens (positive side) or to the
tokens of a zero image embedding (negative side), as the reference IPAttnProcessor does. Patches live in
the clone's ``model_options``, so the clone shares its UNet with every other branch.
"""
import torch

import comfy.ldm.modules.attention
import comfy.model_management

from ..common import UNCOND, check_finite, current_sigma, row_kinds
from ..unet_blocks import cross_attentions
from .model import CROSS_ATTENTION_DIM, SD15_BLOCK_OF_INDEX

NODE = "IP-Adapter Apply (AMDM)"
REAL_CLIP_VISION = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"


class IPAdapterApplyError(ValueError):
    """A model, CLIP vision model or setting that the IP-Adapter cannot be applied with."""


class IPAdapterAttention:
    """attn2 replace callback for one block (ComfyUI passes projected q, k, v; heads in extra_options).

    ``positive_kv`` / ``negative_kv`` are (K_ip, V_ip) of shape [1, T, C]; ``inner`` is a replace
    patch that was already on this block (its output is used instead of plain attention, so stacked
    adapters add up). Outside sigma_end <= sigma <= sigma_start, or at weight 0, the result is exactly
    the unpatched cross-attention."""

    def __init__(self, positive_kv, negative_kv, weight, sigma_start, sigma_end, inner=None):
        self.positive_kv = positive_kv
        self.negative_kv = negative_kv
        self.weight = weight
        self.sigma_start = sigma_start
        self.sigma_end = sigma_end
        self.inner = inner

    def active(self, extra_options):
        if self.weight == 0:
            return False
        sigma = current_sigma(extra_options)
        if sigma is None:  # called outside a sampler: nothing to gate on
            return True
        return self.sigma_end <= sigma <= self.sigma_start

    def _image_keys_values(self, q, extra_options):
        keys, values = [], []
        for kind in row_kinds(extra_options, q.shape[0]):
            k, v = self.negative_kv if kind == UNCOND else self.positive_kv
            keys.append(k)
            values.append(v)
        return (torch.cat(keys).to(device=q.device, dtype=q.dtype),
                torch.cat(values).to(device=q.device, dtype=q.dtype))

    def __call__(self, q, k, v, extra_options):
        # looked up at call time: ComfyUI picks the attention implementation after import
        attention = comfy.ldm.modules.attention.optimized_attention
        heads, precision = extra_options["n_heads"], extra_options.get("attn_precision")
        if self.inner is not None:
            out = self.inner(q, k, v, extra_options)
        else:
            out = attention(q, k, v, heads, attn_precision=precision, transformer_options=extra_options)
        if not self.active(extra_options):
            return out
        ip_k, ip_v = self._image_keys_values(q, extra_options)
        image_out = attention(q, ip_k, ip_v, heads, attn_precision=precision, transformer_options=extra_options)
        return out + self.weight * image_out

    def to(self, device_or_dtype):
        """ModelPatcher moves patches with the model: to its device, then to its dtype."""
        if isinstance(device_or_dtype, torch.dtype) and not device_or_dtype.is_floating_point:
            return self
        moved = [tuple(t.to(device_or_dtype) for t in kv) for kv in (self.positive_kv, self.negative_kv)]
        inner = self.inner.to(device_or_dtype) if hasattr(self.inner, "to") else self.inner
        return IPAdapterAttention(*moved, self.weight, self.sigma_start, self.sigma_end, inner)


def check_model_fits(model, adapter):
    """Raise IPAdapterApplyError unless every adapter block is one SD1.5 cross-attention of the right width."""
    diffusion_model = model.get_model_object("diffusion_model")
    for block, n in adapter.index_of_block.items():
        width = adapter.to_k[block].shape[0]
        attentions = cross_attentions(diffusion_model, block)
        if len(attentions) != 1:
            raise IPAdapterApplyError(
                f"IP-Adapter '{adapter.source}' needs one cross-attention at {block} (ip_adapter.{n}); this "
                f"model has {len(attentions)} there. It is not an SD1.5 UNet: use an SD1.5 checkpoint.")
        model_width, model_context = attentions[0].to_k.weight.shape
        if (model_width, model_context) != (width, CROSS_ATTENTION_DIM):
            raise IPAdapterApplyError(
                f"IP-Adapter '{adapter.source}' does not fit this model at {block}: the model's cross-attention "
                f"is {model_width} wide with a {model_context}-wide context, ip_adapter.{n} expects {width} "
                f"and {CROSS_ATTENTION_DIM}. Use an SD1.5 checkpoint with an SD1.5 IP-Adapter.")


def _zero_pixels_penultimate(clip_vision):
    """Penultimate hidden states of an all-zero (already normalised) pixel tensor: the reference's
    negative input for plus adapters (``image_encoder(torch.zeros_like(clip_image))``)."""
    comfy.model_management.load_model_gpu(clip_vision.patcher)
    size = clip_vision.image_size
    pixels = torch.zeros(1, 3, size, size, device=clip_vision.load_device)
    return clip_vision.model(pixel_values=pixels, intermediate_output=-2)[1].to(
        comfy.model_management.intermediate_device())


def image_features(adapter, clip_vision, image):
    """(positive, negative) CLIP features: image embeds and zeros, or for plus adapters penultimate
    hidden states of the image and of a zero pixel tensor."""
    if clip_vision is None:
        raise IPAdapterApplyError(
            f"{NODE} has no CLIP vision model: connect a core 'Load CLIP Vision' node with "
            f"{REAL_CLIP_VISION} (in models/clip_vision) to its clip_vision input.")
    encoded = clip_vision.encode_image(image, crop=True)
    positive = encoded["penultimate_hidden_states"] if adapter.plus else encoded["image_embeds"]
    if positive.shape[-1] != adapter.input_width:
        what = "penultimate hidden states" if adapter.plus else "image embeddings"
        raise IPAdapterApplyError(
            f"IP-Adapter '{adapter.source}' ({adapter.kind}) needs CLIP vision {what} of width "
            f"{adapter.input_width}; the connected CLIP vision model gives {positive.shape[-1]}. "
            f"SD1.5 IP-Adapters use ViT-H: {REAL_CLIP_VISION} in models/clip_vision (1024-wide embeddings, "
            f"1280-wide hidden states); only ip-adapter_sd15_vit-G needs ViT-bigG.")
    if adapter.plus:  # one zero image per reference image, like the reference's zeros_like(clip_image)
        negative = _zero_pixels_penultimate(clip_vision).expand(positive.shape[0], -1, -1)
    else:
        negative = torch.zeros_like(positive)
    return positive, negative


def _check_settings(weight, start_at, end_at):
    check_finite(NODE, weight=weight, start_at=start_at, end_at=end_at)
    if not (0.0 <= start_at <= end_at <= 1.0):
        raise IPAdapterApplyError(f"{NODE}: start_at ({start_at}) and end_at ({end_at}) must "
                                  f"satisfy 0 <= start_at <= end_at <= 1 (fractions of the sampling run)")


def apply_ipadapter(model, adapter, clip_vision, image, weight, start_at, end_at):
    """A clone of ``model`` with the adapter's attn2 replace patches on the 16 SD1.5 blocks; the input
    model is left untouched (all checks run before the clone)."""
    _check_settings(weight, start_at, end_at)
    check_model_fits(model, adapter)
    positive, negative = image_features(adapter, clip_vision, image)
    # several reference images: their tokens are concatenated, every latent attends to all of them
    positive_tokens = adapter.image_tokens(positive).reshape(1, -1, CROSS_ATTENTION_DIM)
    negative_tokens = adapter.image_tokens(negative).reshape(1, -1, CROSS_ATTENTION_DIM)
    sampling = model.get_model_object("model_sampling")
    sigma_start, sigma_end = sampling.percent_to_sigma(start_at), sampling.percent_to_sigma(end_at)

    patched = model.clone()
    existing = patched.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
    for block in SD15_BLOCK_OF_INDEX.values():
        # ComfyUI looks up (kind, index, transformer_index) before (kind, index): wrap whichever is there
        key = (*block, 0) if (*block, 0) in existing else block
        patch = IPAdapterAttention(adapter.block_keys_values(block, positive_tokens),
                                   adapter.block_keys_values(block, negative_tokens),
                                   float(weight), sigma_start, sigma_end, inner=existing.get(key))
        patched.set_model_attn2_replace(patch, *key)
    return patched
