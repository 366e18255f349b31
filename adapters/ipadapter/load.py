"""Reading SD1.5 IP-Adapter files of models/ipadapter/: the two public layouts, validated with errors that
say what the file is and what to put there, built into an ``IPAdapter`` (float32, CPU).
"""
import re

import torch

from ..common import QUOTE_LIMIT, ModelFileError, ModelFolder, quote
from .model import (CROSS_ATTENTION_DIM, RESAMPLER_HEAD_DIM, SD15_BLOCK_OF_INDEX, SUPPORTED_LAYOUTS, IPAdapter,
                    ImageProjection, Resampler)


class IPAdapterLayoutError(ModelFileError):
    """A weight file that is not one of the supported SD1.5 IP-Adapter layouts."""


# models/ipadapter, the folder ComfyUI_IPAdapter_plus also uses
FOLDER = ModelFolder("ipadapter", "IP-Adapter", "an SD1.5 IP-Adapter such as ip-adapter_sd15.safetensors or "
                     "ip-adapter-plus_sd15.safetensors (Hugging Face repo h94/IP-Adapter, models/)", IPAdapterLayoutError)


def flatten_state_dict(sd):
    """The .bin files nest ``{"image_proj": {...}, "ip_adapter": {...}}``; safetensors are flat."""
    flat = {}
    for key, value in sd.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": tensor for inner, tensor in flatten_state_dict(value).items()})
        else:
            flat[str(key)] = value
    return flat


def _keys(keys, count=4):
    """The first ``count`` keys for a message, each cut to the quote limit."""
    return [str(k)[:QUOTE_LIMIT] for k in sorted(keys)[:count]]


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
        raise FOLDER.error(source, f"it lacks 'image_proj.{key}' (truncated or another layout); "
                                   f"supported: {SUPPORTED_LAYOUTS}")
    return tuple(sd[key].shape)


def _build_image_projection(sd, source):
    out_features, embed_dim = _proj_shape(sd, "proj.weight", source)
    (dim,) = _proj_shape(sd, "norm.weight", source)
    if out_features % dim:
        raise FOLDER.error(source, f"image_proj.proj.weight {out_features}x"
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
        raise FOLDER.error(source, f"Resampler widths (attention {inner}, "
                                   f"feed-forward {hidden}, latents {dim}) are not the reference's")
    resampler = Resampler(embed_dim, dim, queries, depth, inner // RESAMPLER_HEAD_DIM, hidden // dim, output_dim)
    return resampler, embed_dim


def ipadapter_from_state_dict(sd, source):
    """Validate a state dict against the SD1.5 layouts and build an ``IPAdapter`` (float32, CPU).

    Raises ``IPAdapterLayoutError`` naming ``source`` and what was found for any other layout."""
    if not isinstance(sd, dict):
        raise FOLDER.error(source, f"it holds a {type(sd).__name__}, not a dict of tensors")
    sd = flatten_state_dict(sd)
    not_tensors = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise FOLDER.error(source, f"it holds other things than tensors (at {quote(not_tensors[0])}): not an IP-Adapter file")
    proj = {k[len("image_proj."):]: v for k, v in sd.items() if k.startswith("image_proj.")}
    adapter = {k[len("ip_adapter."):]: v for k, v in sd.items() if k.startswith("ip_adapter.")}
    kv_keys = {k for k in adapter if re.fullmatch(r"\d+\.to_[kv]_ip\.weight", k) and adapter[k].ndim == 2}
    if not proj or not kv_keys:
        sample = quote(", ".join(sorted(map(str, sd))[:4])) if sd else "no tensors"
        raise FOLDER.error(source, f"it is not an IP-Adapter file: it has no image_proj.* and "
                                   f"ip_adapter.<n>.to_k_ip.weight keys (found: {sample})")
    indices = sorted({int(k.split(".")[0]) for k in kv_keys})
    context_widths = sorted({tuple(adapter[k].shape)[-1] for k in kv_keys})
    foreign = _describe_foreign_layout(proj, adapter, context_widths[-1], indices)
    if len(context_widths) > 1:
        foreign.append(f"to_k_ip/to_v_ip with mixed context widths {context_widths}")
    proj_is_linear = "proj.weight" in proj and "norm.weight" in proj
    proj_is_resampler = "latents" in proj and "proj_in.weight" in proj
    if not (proj_is_linear or proj_is_resampler) and not foreign:
        foreign.append(f"an unknown image_proj ({', '.join(_keys(proj))}, ...)")
    if foreign:
        raise FOLDER.error(source, f"it is not a supported SD1.5 layout: found {'; '.join(foreign)}. This loader reads "
                                   f"{SUPPORTED_LAYOUTS}; use the ComfyUI_IPAdapter_plus pack for SDXL / FaceID adapters")
    unexpected = sorted(set(adapter) - kv_keys)
    missing = [f"{n}.to_{kv}_ip.weight" for n in SD15_BLOCK_OF_INDEX for kv in "kv"
               if f"{n}.to_{kv}_ip.weight" not in adapter]
    if unexpected or missing:
        raise FOLDER.error(source, f"ip_adapter keys missing {missing[:4]} / "
                                   f"unexpected {_keys(unexpected)}; the file is incomplete or another layout")

    kind = "Resampler" if proj_is_resampler else "image projection"
    try:
        image_proj, input_width = (_build_resampler if proj_is_resampler else _build_image_projection)(proj, source)
        image_proj.load_state_dict({k: v.float() for k, v in proj.items()})
    except (RuntimeError, ValueError, TypeError) as error:  # shapes of another rank or size
        if isinstance(error, IPAdapterLayoutError):
            raise
        detail = str(error).strip().splitlines()[0][:QUOTE_LIMIT] if str(error).strip() else type(error).__name__
        raise FOLDER.error(source, f"image_proj does not match the {kind} layout ({detail})") from None
    image_proj.eval()
    token_width = image_proj.norm_out.normalized_shape[0] if proj_is_resampler else image_proj.dim
    if token_width != CROSS_ATTENTION_DIM:
        raise FOLDER.error(source, f"image_proj makes {token_width}-wide tokens, "
                                   f"the SD1.5 cross-attention reads {CROSS_ATTENTION_DIM}")
    to_k, to_v, index_of_block = {}, {}, {}
    for n, block in SD15_BLOCK_OF_INDEX.items():
        k, v = adapter[f"{n}.to_k_ip.weight"], adapter[f"{n}.to_v_ip.weight"]
        if k.shape != v.shape:
            raise FOLDER.error(source, f"ip_adapter.{n} to_k_ip {tuple(k.shape)} "
                                       f"and to_v_ip {tuple(v.shape)} differ")
        to_k[block], to_v[block], index_of_block[block] = k.float(), v.float(), n
    return IPAdapter(source, image_proj, proj_is_resampler, input_width, to_k, to_v, index_of_block)
