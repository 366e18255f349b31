"""SD1.5 IP-Adapter architecture and file layout (plain torch, no ComfyUI import).

Two public layouts are read (tencent-ailab/IP-Adapter, h94/IP-Adapter ``models/``):

- ``ip-adapter_sd15`` (also ``_light``): ``image_proj.proj`` (Linear E -> T*768) + ``image_proj.norm``
  (LayerNorm 768) turn the CLIP vision image embedding (E = 1024 for ViT-H) into T = 4 tokens.
- ``ip-adapter-plus_sd15`` (also ``plus-face``): ``image_proj`` is a Resampler (16 learned queries,
  4 perceiver layers) over the CLIP vision penultimate hidden states (width 1280 for ViT-H).

Both carry ``ip_adapter.<n>.to_k_ip.weight`` / ``to_v_ip.weight`` ([C, 768], no bias) for the 16
cross-attention layers. ``n`` is the layer's position in diffusers' attention-processor list (down blocks,
up blocks, then the mid block; self-attention takes the even positions and has no weights), so only the
odd n = 1..31 appear. ``SD15_BLOCK_OF_INDEX`` maps them to ComfyUI's attn2 patch keys.
"""
import re

import torch
from torch import nn

CROSS_ATTENTION_DIM = 768  # SD1.x text-context width: the image tokens live in the same space
RESAMPLER_HEAD_DIM = 64  # the reference Resampler always uses 64-wide heads

# ComfyUI keys of the SD1.5 transformer blocks, in diffusers' processor order (down, up, mid).
_SD15_BLOCKS_IN_DIFFUSERS_ORDER = (
    [("input", i) for i in (1, 2, 4, 5, 7, 8)] + [("output", i) for i in range(3, 12)] + [("middle", 0)]
)
SD15_BLOCK_OF_INDEX = {2 * position + 1: block for position, block in enumerate(_SD15_BLOCKS_IN_DIFFUSERS_ORDER)}

SUPPORTED_LAYOUTS = "ip-adapter_sd15 / ip-adapter_sd15_light (4 tokens) and ip-adapter-plus_sd15 / " \
                    "ip-adapter-plus-face_sd15 (Resampler, 16 tokens)"


class IPAdapterLayoutError(ValueError):
    """A weight file that is not one of the supported SD1.5 IP-Adapter layouts."""


class ImageProjection(nn.Module):
    """tokens = LayerNorm(reshape(W e + b, [T, D])): one CLIP image embedding -> T context tokens."""

    def __init__(self, embed_dim, tokens, dim=CROSS_ATTENTION_DIM):
        super().__init__()
        self.tokens = tokens
        self.dim = dim
        self.proj = nn.Linear(embed_dim, tokens * dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, image_embeds):
        return self.norm(self.proj(image_embeds).reshape(-1, self.tokens, self.dim))


class PerceiverAttention(nn.Module):
    """Latents attend to [features; latents]: softmax(q k^T / sqrt(d)) v over both, per head.

    q = W_q LN2(latents); (k, v) = W_kv [LN1(features); LN2(latents)]; out = W_o(concat heads)."""

    def __init__(self, dim, heads, head_dim=RESAMPLER_HEAD_DIM):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, features, latents):
        features = self.norm1(features)
        latents = self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1)
        b = latents.shape[0]
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(b, latents.shape[1], -1)
        return self.to_out(out)


def feed_forward(dim, mult):
    """LN -> Linear(dim, mult*dim, no bias) -> GELU -> Linear(mult*dim, dim, no bias); indices 0/1/3
    are the file's ``layers.<i>.1.<j>`` keys."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class Resampler(nn.Module):
    """Perceiver resampler: Q learned latents, ``depth`` x (latents += attn(x, latents); latents +=
    ff(latents)) with x = W_in features, then tokens = LayerNorm(W_out latents)."""

    def __init__(self, embed_dim, dim, queries, depth, heads, ff_mult, output_dim=CROSS_ATTENTION_DIM):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, queries, dim))
        self.proj_in = nn.Linear(embed_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads), feed_forward(dim, ff_mult)]) for _ in range(depth))

    def forward(self, hidden_states):
        latents = self.latents.expand(hidden_states.shape[0], -1, -1)
        features = self.proj_in(hidden_states)
        for attention, ff in self.layers:
            latents = attention(features, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class IPAdapter:
    """A loaded SD1.5 IP-Adapter: the image projection and, per ComfyUI block key, the [C, 768]
    to_k_ip / to_v_ip matrices. ``plus`` adapters read CLIP penultimate hidden states, the others the
    projected image embedding (``input_width`` is that feature width)."""

    def __init__(self, source, image_proj, plus, input_width, to_k, to_v, index_of_block):
        self.source = source
        self.image_proj = image_proj
        self.plus = plus
        self.input_width = input_width
        self.to_k = to_k
        self.to_v = to_v
        self.index_of_block = index_of_block

    @property
    def kind(self):
        return "ip-adapter-plus_sd15 (Resampler)" if self.plus else "ip-adapter_sd15 (image projection)"

    @torch.no_grad()
    def image_tokens(self, clip_features):
        """[N, E] embeddings (or [N, L, H] hidden states for plus) -> [N, T, 768] context tokens."""
        device = next(self.image_proj.parameters()).device  # features may come from the GPU (--gpu-only)
        return self.image_proj(clip_features.to(device, torch.float32))

    @torch.no_grad()
    def block_keys_values(self, block, tokens):
        """K_ip = tokens W_k^T, V_ip = tokens W_v^T for one block (tokens [.., T, 768] -> [.., T, C])."""
        return tokens @ self.to_k[block].t(), tokens @ self.to_v[block].t()


def flatten_state_dict(sd):
    """The .bin files nest ``{"image_proj": {...}, "ip_adapter": {...}}``; safetensors are flat."""
    flat = {}
    for key, value in sd.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": tensor for inner, tensor in flatten_state_dict(value).items()})
        else:
            flat[key] = value
    return flat


def _describe_foreign_layout(proj_keys, adapter_keys, context_width, indices):
    """What a file that is not a supported SD1.5 layout looks like, in words (keys without their
    image_proj. / ip_adapter. prefix)."""
    found = []
    if any("lora" in k for k in adapter_keys):
        found.append("LoRA weights in ip_adapter.* (a FaceID adapter)")
    if any(k.startswith("perceiver_resampler.") for k in proj_keys):
        found.append("image_proj.perceiver_resampler.* (a FaceID Plus adapter)")
    elif "proj.0.weight" in proj_keys:
        found.append("an MLP image_proj (proj.0/proj.2: a FaceID, portrait or full-face adapter)")
    families = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL", 4096: "Kolors"}
    if context_width is not None and context_width != CROSS_ATTENTION_DIM:
        family = families.get(context_width, "not SD1.x")
        found.append(f"cross-attention context width {context_width} ({family}; SD1.5 uses 768)")
    if indices and indices != sorted(SD15_BLOCK_OF_INDEX):
        found.append(f"{len(indices)} IP attention layers numbered {min(indices)}..{max(indices)} "
                     f"(SD1.5 has 16: 1, 3, ..., 31)")
    return found


def _proj_shape(sd, key, source):
    if key not in sd:
        raise IPAdapterLayoutError(f"IP-Adapter file '{source}' lacks '{key}' (truncated or another layout); "
                                   f"supported: {SUPPORTED_LAYOUTS}")
    return tuple(sd[key].shape)


def _build_image_projection(sd, source):
    out_features, embed_dim = _proj_shape(sd, "proj.weight", source)
    (dim,) = _proj_shape(sd, "norm.weight", source)
    if out_features % dim:
        raise IPAdapterLayoutError(f"IP-Adapter file '{source}': image_proj.proj.weight {out_features}x"
                                   f"{embed_dim} is not a multiple of the token width {dim}")
    return ImageProjection(embed_dim, out_features // dim, dim), embed_dim


def _build_resampler(sd, source):
    _, queries, dim = _proj_shape(sd, "latents", source)
    _, embed_dim = _proj_shape(sd, "proj_in.weight", source)
    output_dim, _ = _proj_shape(sd, "proj_out.weight", source)
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))})
    inner, _ = _proj_shape(sd, "layers.0.0.to_q.weight", source)
    hidden, _ = _proj_shape(sd, "layers.0.1.1.weight", source)
    if inner % RESAMPLER_HEAD_DIM or hidden % dim:
        raise IPAdapterLayoutError(f"IP-Adapter file '{source}': Resampler widths (attention {inner}, "
                                   f"feed-forward {hidden}, latents {dim}) are not the reference's")
    resampler = Resampler(embed_dim, dim, queries, depth, inner // RESAMPLER_HEAD_DIM, hidden // dim, output_dim)
    return resampler, embed_dim


def ipadapter_from_state_dict(sd, source):
    """Validate a state dict against the SD1.5 layouts and build an ``IPAdapter`` (float32, CPU).

    Raises ``IPAdapterLayoutError`` naming ``source`` and what was found for any other layout."""
    sd = flatten_state_dict(sd)
    proj = {k[len("image_proj."):]: v for k, v in sd.items() if k.startswith("image_proj.")}
    adapter = {k[len("ip_adapter."):]: v for k, v in sd.items() if k.startswith("ip_adapter.")}
    kv_keys = {k for k in adapter if re.fullmatch(r"\d+\.to_[kv]_ip\.weight", k)}
    if not proj or not kv_keys:
        sample = ", ".join(sorted(sd)[:4]) or "no tensors"
        raise IPAdapterLayoutError(
            f"'{source}' is not an IP-Adapter file: it has no image_proj.* and ip_adapter.<n>.to_k_ip.weight "
            f"keys (found: {sample}). Put an SD1.5 IP-Adapter ({SUPPORTED_LAYOUTS}) in models/ipadapter.")
    indices = sorted({int(k.split(".")[0]) for k in kv_keys})
    context_widths = sorted({tuple(adapter[k].shape)[-1] for k in kv_keys})
    foreign = _describe_foreign_layout(proj, adapter, context_widths[-1], indices)
    if len(context_widths) > 1:
        foreign.append(f"to_k_ip/to_v_ip with mixed context widths {context_widths}")
    proj_is_linear = "proj.weight" in proj and "norm.weight" in proj
    proj_is_resampler = "latents" in proj and "proj_in.weight" in proj
    if not (proj_is_linear or proj_is_resampler) and not foreign:
        foreign.append(f"an unknown image_proj ({', '.join(sorted(proj)[:4])}, ...)")
    if foreign:
        raise IPAdapterLayoutError(
            f"IP-Adapter file '{source}' is not a supported SD1.5 layout: found {'; '.join(foreign)}. "
            f"This loader reads {SUPPORTED_LAYOUTS}; use those SD1.5 files (h94/IP-Adapter, models/), "
            f"or the ComfyUI_IPAdapter_plus pack for SDXL / FaceID adapters.")
    unexpected = sorted(set(adapter) - kv_keys)
    missing = [f"{n}.to_{kv}_ip.weight" for n in SD15_BLOCK_OF_INDEX for kv in "kv"
               if f"{n}.to_{kv}_ip.weight" not in adapter]
    if unexpected or missing:
        raise IPAdapterLayoutError(f"IP-Adapter file '{source}': ip_adapter keys missing {missing[:4]} / "
                                   f"unexpected {unexpected[:4]}; the file is incomplete or another layout")

    image_proj, input_width = (_build_resampler if proj_is_resampler else _build_image_projection)(proj, source)
    try:
        image_proj.load_state_dict({k: v.float() for k, v in proj.items()})
    except RuntimeError as error:
        kind = "Resampler" if proj_is_resampler else "image projection"
        raise IPAdapterLayoutError(f"IP-Adapter file '{source}': image_proj does not match the {kind} "
                                   f"layout: {error}") from None
    image_proj.eval()
    token_width = image_proj.norm_out.normalized_shape[0] if proj_is_resampler else image_proj.dim
    if token_width != CROSS_ATTENTION_DIM:
        raise IPAdapterLayoutError(f"IP-Adapter file '{source}': image_proj makes {token_width}-wide tokens, "
                                   f"the SD1.5 cross-attention reads {CROSS_ATTENTION_DIM}")
    to_k, to_v, index_of_block = {}, {}, {}
    for n, block in SD15_BLOCK_OF_INDEX.items():
        k, v = adapter[f"{n}.to_k_ip.weight"], adapter[f"{n}.to_v_ip.weight"]
        if k.shape != v.shape:
            raise IPAdapterLayoutError(f"IP-Adapter file '{source}': ip_adapter.{n} to_k_ip {tuple(k.shape)} "
                                       f"and to_v_ip {tuple(v.shape)} differ")
        to_k[block], to_v[block], index_of_block[block] = k.float(), v.float(), n
    return IPAdapter(source, image_proj, proj_is_resampler, input_width, to_k, to_v, index_of_block)
