"""The InteractDiffusion add-on file (``ext_interactdiff_v1.2.pth``): folder, expected layout, validation, loading.

The file is a flat state dict (no ``model.diffusion_model.`` prefix) holding only the add-on layers:
one fuser per SD1.x transformer block under ``<block>.1.transformer_blocks.0.fuser.`` (17 tensors each)
and the HOI position net under ``position_net.``. Block widths are model_channels x (1, 1, 2, 2, 4, 4 |
4 | 4, 4, 4, 2, 2, 2, 1, 1, 1); the real file has model_channels 320 (SD1.5). The width is read from the
file and checked again against the UNet at sampling time.
"""
import torch

import comfy.model_management
import comfy.model_patcher
import comfy.ops

from ..common import QUOTE_LIMIT, ModelFileError, ModelFolder, quote
from .model import FOURIER_FREQS, HIDDEN, MAX_INTERACTIONS, InteractDiffusion

SD1_CONTEXT_DIM = 768
SD15_MODEL_CHANNELS = 320

# (block prefix in the ldm UNet, width multiplier), in ComfyUI's transformer_index order.
SD1_TRANSFORMER_BLOCKS = (
    [(f"input_blocks.{i}", m) for i, m in ((1, 1), (2, 1), (4, 2), (5, 2), (7, 4), (8, 4))]
    + [("middle_block", 4)]
    + [(f"output_blocks.{i}", m) for i, m in ((3, 4), (4, 4), (5, 4), (6, 2), (7, 2), (8, 2), (9, 1), (10, 1), (11, 1))]
)
FUSER_PATH = ".1.transformer_blocks.0.fuser."
FIRST_FUSER_LINEAR = SD1_TRANSFORMER_BLOCKS[0][0] + FUSER_PATH + "linear.weight"
HOI_ONLY_KEYS = ("position_net.linear_action.0.weight", "position_net.interaction_embedding.emb.weight",
                 "position_net.position_embedding.emb.weight", "position_net.null_action_feature")
SHOWN = 5


class InteractDiffusionFileError(ModelFileError):
    """The file is not an InteractDiffusion SD1.x add-on file; the message says what it is and what to do."""


# models/gligen/ is deliberately not searched: GLIGEN files there are rejected by this loader anyway
FOLDER = ModelFolder("interactdiffusion", "InteractDiffusion", "the add-on file ext_interactdiff_v1.2.pth (Hugging "
                     "Face repo jiuntian/interactiondiffusion-weight)", InteractDiffusionFileError)


def fuser_shapes(query_dim, context_dim=SD1_CONTEXT_DIM):
    """Parameter name -> shape of one GatedSelfAttentionDense (8 heads, GEGLU feed-forward x4)."""
    return {
        "linear.weight": (query_dim, context_dim), "linear.bias": (query_dim,),
        "attn.to_q.weight": (query_dim, query_dim), "attn.to_k.weight": (query_dim, query_dim),
        "attn.to_v.weight": (query_dim, query_dim),
        "attn.to_out.0.weight": (query_dim, query_dim), "attn.to_out.0.bias": (query_dim,),
        "ff.net.0.proj.weight": (8 * query_dim, query_dim), "ff.net.0.proj.bias": (8 * query_dim,),
        "ff.net.2.weight": (query_dim, 4 * query_dim), "ff.net.2.bias": (query_dim,),
        "norm1.weight": (query_dim,), "norm1.bias": (query_dim,),
        "norm2.weight": (query_dim,), "norm2.bias": (query_dim,),
        "alpha_attn": (), "alpha_dense": (),
    }


def position_net_shapes(dim=SD1_CONTEXT_DIM):
    """Parameter name -> shape of the HOI position net (in_dim = out_dim = CLIP width)."""
    fourier = FOURIER_FREQS * 2 * 4
    shapes = {
        "interaction_embedding.emb.weight": (MAX_INTERACTIONS, dim), "position_embedding.emb.weight": (3, dim),
        "null_positive_feature": (dim,), "null_action_feature": (dim,), "null_position_feature": (fourier,),
    }
    for mlp in ("linears", "linear_action"):
        for index, (n_out, n_in) in zip((0, 2, 4), ((HIDDEN, dim + fourier), (HIDDEN, HIDDEN), (dim, HIDDEN))):
            shapes[f"{mlp}.{index}.weight"] = (n_out, n_in)
            shapes[f"{mlp}.{index}.bias"] = (n_out,)
    return shapes


def expected_layout(model_channels=SD15_MODEL_CHANNELS):
    """Every key of the add-on file and its shape, for an SD1.x UNet of width ``model_channels``."""
    layout = {}
    for block, mult in SD1_TRANSFORMER_BLOCKS:
        for name, shape in fuser_shapes(model_channels * mult).items():
            layout[block + FUSER_PATH + name] = shape
    for name, shape in position_net_shapes().items():
        layout["position_net." + name] = shape
    return layout


def _first(items):
    items = sorted(str(k)[:QUOTE_LIMIT] for k in items)
    return ", ".join(items[:SHOWN]) + (f" (and {len(items) - SHOWN} more)" if len(items) > SHOWN else "")


def _what_to_do():
    return FOLDER.what_to_do() + "."


def _recognise_other_formats(sd, name):
    """Clear errors for the files people most often pick by mistake."""
    keys = list(sd)
    if any(k.startswith(("down_blocks.", "up_blocks.", "mid_block.")) for k in keys):
        raise InteractDiffusionFileError(
            f"{quote(name)} is in diffusers format (keys like '{_first(k for k in keys if '_blocks.' in k)}'); this "
            f"loader reads the original ldm layout. {_what_to_do()}")
    if any(".fuser." in k and ".transformer_blocks." in k and ".transformer_blocks.0." not in k for k in keys):
        raise InteractDiffusionFileError(
            f"{quote(name)} has fusers in deeper transformer stacks (keys like "
            f"'{_first(k for k in keys if '.transformer_blocks.0.' not in k and '.fuser.' in k)}'): it is "
            f"SDXL-shaped. InteractDiffusion in ComfyUI supports SD1.x only (InteractDiffusion-XL exists only "
            f"in diffusers format). {_what_to_do()}")
    position_keys = [k for k in keys if k.startswith("position_net.")]
    if position_keys and not any(k in sd for k in HOI_ONLY_KEYS):
        raise InteractDiffusionFileError(
            f"{quote(name)} is a GLIGEN file (its position_net has no interaction layers: missing "
            f"{', '.join(HOI_ONLY_KEYS)}). Load GLIGEN files with the core GLIGENLoader from models/gligen/. "
            f"{_what_to_do()}")
    linear = sd.get(FIRST_FUSER_LINEAR)
    if linear is not None and linear.ndim == 2 and linear.shape[1] != SD1_CONTEXT_DIM:
        family = "SD2.x" if linear.shape[1] == 1024 else "non-SD1.x"
        raise InteractDiffusionFileError(
            f"{quote(name)} is {family}-shaped: its fusers take {linear.shape[1]}-wide grounding tokens, SD1.x "
            f"InteractDiffusion uses {SD1_CONTEXT_DIM} ('{FIRST_FUSER_LINEAR}' has shape "
            f"{tuple(linear.shape)}). Only SD1.x is supported. {_what_to_do()}")


def validate_state_dict(sd, name):
    """Check keys and shapes against the SD1.x layout; returns model_channels (320 for the real file)."""
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        top = quote(list(sd)[:SHOWN]) if isinstance(sd, dict) else type(sd).__name__
        raise InteractDiffusionFileError(
            f"{quote(name)} is not a flat state dict of tensors (top level: {top}); full InteractDiffusion "
            f"checkpoints (interact-diffusion-v1*.pth) and other models are not the add-on file. {_what_to_do()}")
    _recognise_other_formats(sd, name)
    linear = sd.get(FIRST_FUSER_LINEAR)
    model_channels = linear.shape[0] if linear is not None and linear.ndim == 2 else SD15_MODEL_CHANNELS
    layout = expected_layout(model_channels)
    missing = set(layout) - set(sd)
    unexpected = set(sd) - set(layout)
    if missing or unexpected:
        raise InteractDiffusionFileError(
            f"{quote(name)} does not have the InteractDiffusion SD1.x layout "
            f"({len(layout)} tensors: 16 fusers + position_net): "
            + (f"missing {len(missing)} keys: {_first(missing)}; " if missing else "")
            + (f"unexpected {len(unexpected)} keys: {_first(unexpected)}; " if unexpected else "")
            + _what_to_do())
    wrong = [f"{k} is {tuple(sd[k].shape)}, expected {layout[k]}" for k in sorted(layout)
             if tuple(sd[k].shape) != layout[k]]
    if wrong:
        raise InteractDiffusionFileError(
            f"{quote(name)} has the InteractDiffusion key names but {len(wrong)} tensors have the wrong shape for an "
            f"SD1.x UNet of model_channels {model_channels}: {'; '.join(wrong[:SHOWN])}. {_what_to_do()}")
    return model_channels


def build_model(sd, name, operations=comfy.ops.manual_cast):
    """An InteractDiffusion module holding the validated weights of ``sd`` (float32, CPU). The default
    manual_cast ops cast the weights to each input's dtype and device: the fusers follow the UNet's."""
    model_channels = validate_state_dict(sd, name)
    blocks = [block for block, _ in SD1_TRANSFORMER_BLOCKS]
    model = InteractDiffusion(blocks, [model_channels * mult for _, mult in SD1_TRANSFORMER_BLOCKS],
                              SD1_CONTEXT_DIM, source=name, operations=operations)
    own = {}
    for index, block in enumerate(blocks):
        prefix = block + FUSER_PATH
        own.update({f"fusers.{index}.{k[len(prefix):]}": v for k, v in sd.items() if k.startswith(prefix)})
    own.update({k: v for k, v in sd.items() if k.startswith("position_net.")})
    model.load_state_dict({k: v.float() for k, v in own.items()}, strict=True)
    return model


def load_interactdiffusion(file_name):
    """Read, validate and wrap a file of models/interactdiffusion/ as a ComfyUI ModelPatcher (loaded as
    an additional model of the sampling)."""
    model = build_model(FOLDER.read(file_name), file_name)
    if comfy.model_management.should_use_fp16():
        model = model.half()
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())
