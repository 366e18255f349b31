"""MIGC on a ComfyUI model: an attn2 replacement on the blocks its checkpoint carries, and, when the
NaiveFuser is on, on every other cross-attention block too.

The schedule is the reference MIGCProcessor's (docs/migc.md): a block with MIGC weights fuses with MIGC
on steps 0..migc_steps, then with the weight-free NaiveFuser up to naive_fuser_steps; every other
cross-attention block fuses with the NaiveFuser on steps 0..naive_fuser_steps; otherwise plain
cross-attention.

A fusion needs, per replaced cross-attention, the layer input (image tokens), the cross-attention of the
image with the global caption AND with every instance phrase, each after the layer's ``to_out``, and
writes back a fused output. ComfyUI's attn2 replacement returns the attention BEFORE ``to_out``, so the
work is split over three per-model patches that share the block's ``extra_options`` dict:

1. ``attn2_patch`` (capture): keeps the layer input of the patched blocks;
2. attn2 replacement at each patched block key: plain attention for every row (what the block would do),
   and, for the cond rows while MIGC / NaiveFuser is active, the instance cross-attentions and the
   fusion, kept aside;
3. ``attn2_output_patch`` (substitute): after ``to_out``, writes the fused cond rows over the output.

Only the patched clone's ``model_options`` carry these patches: the shared UNet is never modified, so
branches cloned from one checkpoint stay independent. Cond and uncond rows are told apart with
``cond_or_uncond``; uncond rows always get plain cross-attention (as MIGC does with the negative prompt).
"""
import zlib

import torch
import torch.nn.functional as F

from ..boxes import normalise_box
from ..common import check_latent_size, cond_rows, current_step
from ..unet_blocks import cross_attention_blocks, cross_attentions
from .load import block_name
from .model import naive_fuse

NODE = "MIGC Apply"

_TOKENS = "migc_image_tokens"
_FUSED = "migc_fused"


class MIGCApplyError(ValueError):
    pass


def box_masks(boxes, width, height):
    """Pixel boxes -> (instance masks [1, N, h, w], background mask [1, 1, h, w]) on the latent grid
    (h, w) = (height // 8, width // 8), made as MIGC does: a 0/1 mask per box at pixel resolution
    (rows int(y0)..int(y1)-1, columns int(x0)..int(x1)-1), background = 1 - union, both resized
    bilinearly."""
    size = (height // 8, width // 8)
    if not boxes:
        return torch.zeros(1, 0, *size), torch.ones(1, 1, *size)
    full = torch.zeros(1, len(boxes), height, width)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        full[0, i, int(y0):int(y1), int(x0):int(x1)] = 1.0
    background = 1.0 - full.sum(dim=1, keepdim=True).clamp(max=1.0)
    return (F.interpolate(full, size=size, mode="bilinear"),
            F.interpolate(background, size=size, mode="bilinear"))


def fusion_mode(step, instance_count, migc_steps, naive_fuser_steps, has_migc_weights):
    """MIGC's schedule for one block: "migc" while step <= migc_steps on a block with MIGC weights, else
    "naive" while step <= naive_fuser_steps (on every cross-attention block), else None (plain
    cross-attention); None with no instances."""
    if instance_count == 0:
        return None
    if has_migc_weights and step <= migc_steps:
        return "migc"
    if step <= naive_fuser_steps:
        return "naive"
    return None


def slot_order(step, block):
    """SAC's instance-slot permutation. MIGC draws a fresh torch.randperm(28) per call from the global
    RNG; here it is drawn from a generator seeded by (block, step), so a run is reproducible and never
    disturbs the sampler's random state."""
    seed = zlib.crc32(f"{block_name(block)}:{step}".encode())
    return torch.randperm(28, generator=torch.Generator().manual_seed(seed))


class MIGCPatch:
    """The three patches of one MIGC Apply (see the module docstring). Holds no per-call state."""

    def __init__(self, weights, attn2_by_block, phrase_contexts, pooled, boxes, width, height,
                 migc_steps, naive_fuser_steps, ca_scale=1.0, ea_scale=1.0, sac_scale=1.0):
        self.weights = weights
        self.attn2_by_block = attn2_by_block
        self.phrase_contexts = phrase_contexts  # per instance [1, tokens, 768]
        self.pooled = pooled                    # [N, 768]
        self.width, self.height = width, height
        self.instance_masks, self.background_mask = box_masks(boxes, width, height)
        # MIGC's PositionNet takes (x0, x1, y0, y1), normalised
        self.position_boxes = torch.tensor([[b[0], b[2], b[1], b[3]] for b in
                                            (normalise_box(box, width, height) for box in boxes)]).reshape(-1, 4)
        self.migc_steps, self.naive_fuser_steps = migc_steps, naive_fuser_steps
        self.ca_scale, self.ea_scale, self.sac_scale = ca_scale, ea_scale, sac_scale

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options; the patch is immutable, so clones share it
        return self

    @property
    def blocks(self):
        return tuple(self.attn2_by_block)

    def capture(self, n, context, value, extra_options):
        if extra_options.get("block") in self.attn2_by_block:
            extra_options[_TOKENS] = n
        return n, context, value

    def _mode(self, extra_options):
        step = current_step(extra_options)
        if step is None:
            raise MIGCApplyError(
                "MIGC needs the sampling schedule to count steps (transformer_options 'sample_sigmas' and "
                "'sigmas', set by ComfyUI's samplers); this model was called outside a sampler that provides them")
        return step, fusion_mode(step, len(self.phrase_contexts), self.migc_steps, self.naive_fuser_steps,
                                 extra_options["block"] in self.weights.blocks)

    def attention(self, q, k, v, extra_options):
        from comfy.ldm.modules import attention as comfy_attention

        block = extra_options["block"]
        tokens = extra_options.pop(_TOKENS, None)
        heads = extra_options["n_heads"]

        def attend(q_, k_, v_):  # exactly what the block's CrossAttention would call
            return comfy_attention.optimized_attention(q_, k_, v_, heads,
                                                       attn_precision=extra_options.get("attn_precision"),
                                                       transformer_options=extra_options)

        out = attend(q, k, v)
        step, mode = self._mode(extra_options)
        rows = cond_rows(extra_options, q.shape[0])
        if mode is None or not rows:
            return out
        check_latent_size(NODE, self.width, self.height, extra_options, MIGCApplyError)
        attn2 = self.attn2_by_block[block]
        q_cond = q[rows]
        ca_x = [attn2.to_out(out[rows])]
        for context in self.phrase_contexts:
            context = context.to(q)
            k_i = attn2.to_k(context).expand(len(rows), -1, -1)
            v_i = attn2.to_v(context).expand(len(rows), -1, -1)
            ca_x.append(attn2.to_out(attend(q_cond, k_i, v_i)))
        ca_x = torch.stack(ca_x, dim=1)
        masks = self.instance_masks.to(q).expand(len(rows), -1, -1, -1)
        if mode == "migc":
            background = self.background_mask.to(q).expand(len(rows), -1, -1, -1)
            fused = self.weights.layer(block)(
                ca_x, tokens[rows], masks, background, self.position_boxes.to(q), self.pooled.to(q),
                self.height, self.width, slot_order(step, block).to(q.device),
                self.ca_scale, self.ea_scale, self.sac_scale)
        else:
            fused = naive_fuse(ca_x, masks, self.height, self.width)
        extra_options[_FUSED] = (rows, fused)
        return out

    def substitute(self, out, extra_options):
        if extra_options.get("block") not in self.attn2_by_block:
            return out
        if _TOKENS in extra_options:
            raise MIGCApplyError(
                f"MIGC's attention replacement on block {extra_options['block']} did not run: a patch applied "
                f"after MIGC Apply (another adapter replacing attn2 there) took its place; put that adapter on "
                f"a separate model branch")
        fused = extra_options.pop(_FUSED, None)
        if fused is None:
            return out
        rows, values = fused
        out = out.clone()
        out[rows] = values.to(out.dtype)
        return out


def find_attn2(diffusion_model, block):
    """The attn2 module of the first transformer of a UNet block key, or None."""
    attentions = cross_attentions(diffusion_model, block)
    return attentions[0] if attentions else None


def existing_migc(model_patcher):
    patches = model_patcher.model_options.get("transformer_options", {}).get("patches", {})
    return any(isinstance(getattr(p, "__self__", None), MIGCPatch) for p in patches.get("attn2_patch", []))


def encode_phrases(clip, phrases):
    """Token embeddings [1, tokens, 768] per phrase and pooled embeddings [N, 768] (CLIP's final-norm EOS
    state, not projected: what MIGC's text encoder calls pooler_output)."""
    contexts, pooled = [], []
    for phrase in phrases:
        encoded = clip.encode_from_tokens(clip.tokenize(phrase), return_pooled="unprojected", return_dict=True)
        contexts.append(encoded["cond"].float().cpu())
        pooled.append(encoded["pooled_output"].float().cpu().reshape(-1))
    return contexts, (torch.stack(pooled) if pooled else torch.zeros(0, 768))


def _check_model(model_patcher, weights, naive_fuser_steps):
    """The attn2 module of every block MIGC Apply patches: the MIGC blocks of ``weights`` and, when the
    NaiveFuser can run (naive_fuser_steps >= 0), every other cross-attention block; or a clear error."""
    if existing_migc(model_patcher):
        raise MIGCApplyError("this model already has MIGC applied; use one MIGC Apply per model branch "
                             "(put all instances in its text, one per line)")
    diffusion_model = model_patcher.model.diffusion_model
    replaced = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    attn2_by_block = {}
    for block in weights.blocks:
        attn2 = find_attn2(diffusion_model, block)
        if attn2 is None:
            raise MIGCApplyError(
                f"{weights.source} has MIGC weights for UNet block {block}, but this model has no cross-attention "
                f"there; MIGC needs an SD1.x (SD1.4/1.5) model")
        channels = weights.layer(block).norm.weight.shape[0]
        if attn2.to_q.in_features != channels or attn2.to_k.in_features != 768:
            raise MIGCApplyError(
                f"{weights.source} expects {channels} channels and a 768-d text context at block {block}; this "
                f"model has {attn2.to_q.in_features} channels and a {attn2.to_k.in_features}-d context there. "
                f"MIGC needs an SD1.x (SD1.4/1.5) model")
        attn2_by_block[block] = attn2
    if naive_fuser_steps >= 0:
        for block in cross_attention_blocks(diffusion_model):
            attn2_by_block.setdefault(block, find_attn2(diffusion_model, block))
    for block in attn2_by_block:
        if any(key[:2] == block for key in replaced):
            role = "a MIGC block" if block in weights.blocks else "a block the NaiveFuser runs on (naive_fuser_steps >= 0)"
            raise MIGCApplyError(
                f"this model already has an attention replacement on block {block} (another adapter, e.g. "
                f"IP-Adapter), {role}; MIGC cannot share that block: use a separate model branch")
    return attn2_by_block


def patch_model(model_patcher, migc_patcher, phrase_contexts, pooled, boxes, width, height, migc_steps,
                naive_fuser_steps, ca_scale=1.0, ea_scale=1.0, sac_scale=1.0):
    """A clone of ``model_patcher`` with MIGC on the blocks of ``migc_patcher``'s checkpoint (and, when
    naive_fuser_steps >= 0, the NaiveFuser on every cross-attention block), for instances given as encoded
    phrases and pixel boxes (in order; none = plain cross-attention)."""
    if width % 8 or height % 8:
        raise MIGCApplyError(f"width and height must be multiples of 8 (latent size x8), got {width}x{height}")
    attn2_by_block = _check_model(model_patcher, migc_patcher.model, naive_fuser_steps)
    patch = MIGCPatch(migc_patcher.model, attn2_by_block, phrase_contexts, pooled, boxes, width, height,
                      migc_steps, naive_fuser_steps, ca_scale, ea_scale, sac_scale)
    patched = model_patcher.clone()
    patched.set_model_attn2_patch(patch.capture)
    for kind, index in patch.blocks:
        patched.set_model_attn2_replace(patch.attention, kind, index)
    patched.set_model_attn2_output_patch(patch.substitute)
    patched.set_additional_models("migc", [migc_patcher])
    return patched


def apply_migc(model_patcher, migc_patcher, clip, instances, width, height, migc_steps, naive_fuser_steps,
               ca_scale=1.0, ea_scale=1.0, sac_scale=1.0):
    """``patch_model`` for instances [(phrase, (x0, y0, x1, y1) in pixels)], phrases encoded with ``clip``."""
    _check_model(model_patcher, migc_patcher.model, naive_fuser_steps)  # fail before the text encoder runs
    contexts, pooled = encode_phrases(clip, [phrase for phrase, _box in instances])
    return patch_model(model_patcher, migc_patcher, contexts, pooled, [box for _phrase, box in instances],
                       width, height, migc_steps, naive_fuser_steps, ca_scale, ea_scale, sac_scale)
