"""Reading MIGC checkpoints (``MIGC_SD14.ckpt``) into one MIGC module per UNet block.

The released file is ``{"state_dict": {key: tensor}}`` with ldm-style keys such as
``model.diffusion_model.output_blocks.3.<...>.migc.ea.to_q.weight``. As in the reference loader, a key
is assigned to a block by its block type (``input_blocks`` / ``middle_block`` / ``output_blocks``), the
block number after it and the ``migc`` path element; whatever lies between is ignored. The blocks found
become ComfyUI block keys: ("input", i), ("middle", 0), ("output", i).
"""
import torch
from torch import nn

import comfy.model_management
import comfy.model_patcher
import comfy.ops

from ..common import QUOTE_LIMIT, ModelFileError, ModelFolder, quote
from .model import MIGC

_BLOCK_TYPES = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}


class MIGCFileError(ModelFileError):
    pass


FOLDER = ModelFolder("migc", "MIGC", "the original MIGC_SD14.ckpt (a dict with 'state_dict' holding '...migc...' "
                     "keys; Hugging Face repo limuloo1999/MIGC)", MIGCFileError)


def block_name(block):
    """("output", 3) -> "output_3" (a ModuleDict key)."""
    return f"{block[0]}_{block[1]}"


class MIGCWeights(nn.Module):
    """The MIGC modules of one checkpoint, one per UNet block key (``blocks``), and the file name."""

    def __init__(self, channels_by_block, source, operations=comfy.ops.manual_cast):
        super().__init__()
        self.source = source
        self.blocks = sorted(channels_by_block, key=lambda b: (("input", "middle", "output").index(b[0]), b[1]))
        self.layers = nn.ModuleDict({block_name(b): MIGC(channels_by_block[b], operations=operations)
                                     for b in self.blocks})

    def layer(self, block):
        return self.layers[block_name(block)]


def _fail(file_name, problem):
    raise FOLDER.error(file_name, problem)


def _block_of(key):
    """ldm key -> (("output", 3), "ea.to_q.weight") or None when the key names no block / no migc."""
    parts = key.split(".")
    if "migc" not in parts:
        return None
    for i, part in enumerate(parts[:-1]):
        if part in _BLOCK_TYPES:
            kind = _BLOCK_TYPES[part]
            if kind == "middle":
                return ("middle", 0), ".".join(parts[parts.index("migc") + 1:])
            if parts[i + 1].isdigit():
                return (kind, int(parts[i + 1])), ".".join(parts[parts.index("migc") + 1:])
    return None


def group_state_dict(state_dict, file_name):
    """{key: tensor} -> {block: {sub_key: tensor}}, rejecting keys that are not MIGC block keys."""
    groups = {}
    for key, value in state_dict.items():
        found = _block_of(key) if isinstance(key, str) else None
        if found is None:
            _fail(file_name, f"key {quote(key)} is not a MIGC key (no 'migc' element under an input_blocks/middle_block/"
                        f"output_blocks block)")
        if not isinstance(value, torch.Tensor):
            _fail(file_name, f"key {quote(key)} holds a {type(value).__name__}, not a tensor")
        block, sub_key = found
        groups.setdefault(block, {})[sub_key] = value
    return groups


def _check_block(file_name, block, tensors):
    if "norm.bias" not in tensors:
        _fail(file_name, f"block {block} has no 'migc.norm.bias' (the channel count is read from it)")
    channels = tensors["norm.bias"].shape[0]
    with torch.device("meta"):  # shapes only, nothing allocated
        expected = {k: tuple(v.shape) for k, v in MIGC(channels).state_dict().items()}
    tensors = {k[:QUOTE_LIMIT]: v for k, v in tensors.items()}  # file keys are quoted in messages
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k} {tuple(tensors[k].shape)} (expected {expected[k]})"
             for k in sorted(set(expected) & set(tensors)) if tuple(tensors[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing {', '.join('migc.' + k for k in missing[:6])}"
                        + (f" and {len(missing) - 6} more" if len(missing) > 6 else ""))
    if unexpected:
        problems.append(f"unexpected {', '.join('migc.' + k for k in unexpected[:6])}")
    if wrong:
        problems.append(f"wrong shapes {'; '.join(wrong[:4])}")
    if problems:
        _fail(file_name, f"block {block} ({channels} channels) does not have MIGC's layout: " + "; ".join(problems))
    return channels


def load_migc_file(file_name, operations=comfy.ops.manual_cast):
    """Load and validate a file of models/migc/; returns a MIGCWeights (float32, CPU). The default
    manual_cast ops cast the weights to each input's dtype and device: MIGC follows the UNet's."""
    data = FOLDER.read(file_name)
    if not isinstance(data, dict):
        _fail(file_name, f"it holds a {type(data).__name__}, not a dict")
    if "state_dict" not in data:
        if any(isinstance(k, str) and ".attn2.processor." in k for k in data):
            _fail(file_name, "this is a MIGC++ checkpoint (diffusers-layout '...attn2.processor.migc...' keys, "
                             "boxes and masks); MIGC++ is not supported by this pack")
        _fail(file_name, f"it has no 'state_dict' entry (top-level keys: {quote(', '.join(map(str, list(data)[:5])))})")
    state_dict = data["state_dict"]
    if not isinstance(state_dict, dict) or not state_dict:
        _fail(file_name, "its 'state_dict' is empty or not a dict")
    groups = group_state_dict(state_dict, file_name)
    channels = {block: _check_block(file_name, block, tensors) for block, tensors in groups.items()}
    weights = MIGCWeights(channels, file_name, operations)
    for block, tensors in groups.items():
        weights.layer(block).load_state_dict({k: v.float() for k, v in tensors.items()})
    return weights.float().eval()


def load_migc(file_name):
    """``load_migc_file`` wrapped as a ComfyUI ModelPatcher (loaded as an additional model of the sampling)."""
    return comfy.model_patcher.ModelPatcher(load_migc_file(file_name),
                                            load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())
