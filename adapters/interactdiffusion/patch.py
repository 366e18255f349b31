"""InteractDiffusion on ComfyUI's sampling: interactions carried by a CONDITIONING, fusers installed as
``middle_patch`` (after attn1 of every transformer block), cond and uncond in ONE batched UNet call.

Why not ``cond["gligen"]`` as core GLIGEN does: ComfyUI builds a fresh patches dict for every entry
carrying "gligen", and batches two entries only when they hold the very same patches object, so a
GLIGEN-style positive and its negative always cost two UNet passes per step. The one conditioning
entry ComfyUI copies onto the negative AND batches by identity is ``cond["control"]`` (with
``control_apply_to_uncond``): the interactions travel as an ``InteractionControl`` there. Just before
each UNet call ComfyUI asks it for ControlNet residuals (``get_control``); it adds the fuser patch to
that call's ``transformer_options`` instead (and passes on the residuals of any ControlNet chained to
it). The patch then gives the cond rows the objects and the uncond rows the null objects, as the
original feeds masks 0 to the unconditional half.
"""
from dataclasses import dataclass

import torch

import comfy.controlnet
import comfy.model_sampling

from ..boxes import normalise_box, parse_box_lines
from ..common import UNCOND, check_latent_size, current_sigma, row_kinds
from .model import MAX_INTERACTIONS, InteractDiffusion

PHRASE_FIELDS = ("subject", "action", "object")
BOX_FIELDS = ("subject box", "object box")
NODE = "InteractDiffusion Apply"


class InteractDiffusionInputError(ValueError):
    pass


@dataclass
class Interactions:
    """Up to 30 triplets: CLIP pooled phrase features [N, 768] and normalised xyxy boxes [N, 4], and the
    settings and image size (pixels) they were given with."""
    subject_embeddings: torch.Tensor
    action_embeddings: torch.Tensor
    object_embeddings: torch.Tensor
    subject_boxes: torch.Tensor
    object_boxes: torch.Tensor
    strength: float
    beta: float
    width: int
    height: int

    @property
    def count(self):
        return self.subject_boxes.shape[0]


def parse_interactions(text, width, height):
    """Lines ``subject | action | object | sx0, sy0, sx1, sy1 | ox0, oy0, ox1, oy1`` (pixels)."""
    return parse_box_lines(text, PHRASE_FIELDS, BOX_FIELDS, width, height, MAX_INTERACTIONS, "interaction")


def pooled_phrase_feature(clip, phrase):
    """CLIP's unprojected pooled output (the EOS token after the final layer norm), as the original."""
    _, pooled = clip.encode_from_tokens(clip.tokenize(phrase), return_pooled="unprojected")
    return pooled.reshape(-1).float().cpu()


def encode_interactions(clip, items, width, height, strength, beta, key_dim):
    if clip is None:
        raise InteractDiffusionInputError(
            "the clip input is None: connect the CLIP output of the SD1.x checkpoint loader")
    features = {}
    for phrases, _ in items:
        for phrase in phrases:
            if phrase not in features:
                features[phrase] = pooled_phrase_feature(clip, phrase)
    width_found = next(iter(features.values())).shape[0]
    if width_found != key_dim:
        raise InteractDiffusionInputError(
            f"the CLIP gives {width_found}-wide pooled features, InteractDiffusion needs {key_dim} (the SD1.x "
            f"CLIP-L text encoder): connect the CLIP of an SD1.x checkpoint")

    def stack(field):
        return torch.stack([features[phrases[field]] for phrases, _ in items])

    def boxes(field):
        return torch.tensor([normalise_box(b[field], width, height) for _, b in items], dtype=torch.float32)

    return Interactions(stack(0), stack(1), stack(2), boxes(0), boxes(1), float(strength), float(beta),
                        int(width), int(height))


_SD1_SAMPLING = []


def sd1_timestep(sigma):
    """The integer SD1.x timestep (0..999) the UNet is run at for ``sigma`` (ComfyUI's
    ModelSamplingDiscrete.timestep: nearest entry of the 1000-step table). InteractDiffusion exists for
    SD1.x only, whose schedule is this one; the middle patch sees sigma but not the model."""
    if not _SD1_SAMPLING:
        _SD1_SAMPLING.append(comfy.model_sampling.ModelSamplingDiscrete())
    return int(_SD1_SAMPLING[0].timestep(torch.as_tensor(sigma, dtype=torch.float32).reshape(1).cpu()))


def first_inactive_timestep(beta):
    """Scheduled sampling as the reference WebUI extension does it (timestep_to_alpha with stage_one =
    beta, no decay stage): the fusers run while the timestep t >= (1 - beta) * 1000. Rounded, because
    e.g. (1 - 0.7) * 1000 is 300.00000000000006 and t = 300 must count (the reference compares in float32)."""
    return round((1.0 - beta) * 1000.0, 6)


class FuserPatch:
    """The ``middle_patch`` ComfyUI calls after attn1 of every transformer block.

    Rows of the batch that belong to the unconditional pass get the null tokens, the others the
    interaction tokens. The fusers run while the SD1.x timestep of the current sigma is >= ``min_timestep``.
    ``size`` (width, height in pixels) is checked against the sampled latent when given.
    """

    def __init__(self, model, cond_tokens, null_tokens, strength, min_timestep, size=None):
        self.model = model
        self.cond_tokens = cond_tokens
        self.null_tokens = null_tokens
        self.strength = strength
        self.min_timestep = min_timestep
        self.size = size

    def active(self, extra_options):
        if self.strength == 0:
            return False
        sigma = current_sigma(extra_options)
        return self.min_timestep <= 0 or sigma is None or sd1_timestep(sigma) >= self.min_timestep

    def __call__(self, x, extra_options):
        if self.size is not None:
            check_latent_size(NODE, *self.size, extra_options, InteractDiffusionInputError)
        if not self.active(extra_options):
            return x
        fuser = self.model.fuser_for(extra_options["transformer_index"], x)
        kinds = row_kinds(extra_options, x.shape[0])
        tokens = torch.cat([self.null_tokens if kind == UNCOND else self.cond_tokens for kind in kinds])
        return fuser(x, tokens, self.strength)


class InteractionControl(comfy.controlnet.ControlBase):
    """The interactions of one InteractDiffusion Apply, in ``cond["control"]`` (see the module docstring).

    ComfyUI loads ``patcher`` with the sampling (``get_models``), runs ``get_control`` before every UNet
    call of the entries carrying this object and calls ``cleanup`` after sampling. A ControlNet applied
    later chains this object as its ``previous_controlnet``; one applied before is chained here."""

    def __init__(self, patcher, interactions):
        super().__init__()
        self.patcher = patcher
        self.interactions = interactions
        self._tokens = {}  # device -> (cond tokens, null tokens), computed once per sampling

    @property
    def model(self):
        return self.patcher.model

    def copy(self):
        control = InteractionControl(self.patcher, self.interactions)
        self.copy_to(control)
        return control

    def get_models(self):
        return super().get_models() + [self.patcher]

    def tokens(self, device):
        if device not in self._tokens:
            self._tokens[device] = (self.model.tokens(self.interactions, device), self.model.tokens(None, device))
        return self._tokens[device]

    def fuser_patch(self, device):
        cond_tokens, null_tokens = self.tokens(device)
        interactions = self.interactions
        return FuserPatch(self.model, cond_tokens, null_tokens, interactions.strength,
                          first_inactive_timestep(interactions.beta), (interactions.width, interactions.height))

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        previous = None
        if self.previous_controlnet is not None:
            previous = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
        patches = dict(transformer_options.get("patches", {}))  # a new dict: nothing shared is modified
        patches["middle_patch"] = list(patches.get("middle_patch", [])) + [self.fuser_patch(x_noisy.device)]
        transformer_options["patches"] = patches
        return previous

    def cleanup(self):
        self._tokens = {}
        super().cleanup()


def interaction_controls(control):
    """Every InteractionControl in a ControlNet chain (``previous_controlnet`` links)."""
    found = []
    while control is not None:
        if isinstance(control, InteractionControl):
            found.append(control)
        control = getattr(control, "previous_controlnet", None)
    return found


def apply_interactions(conditioning, clip, patcher, text, width, height, strength, beta):
    """The conditioning with the interactions attached to every entry (inputs are never modified).

    Strength 0 or beta 0 switch the fusers off for the whole sampling: the conditioning passes through
    unchanged (after the text is checked), so the result is exactly the plain model's.
    """
    model = getattr(patcher, "model", None)
    if not isinstance(model, InteractDiffusion):
        raise InteractDiffusionInputError(
            "the interactdiffusion input is not an InteractDiffusion model: connect an InteractDiffusion Loader")
    items = parse_interactions(text, width, height)
    for _, options in conditioning:
        if "gligen" in options or interaction_controls(options.get("control")):
            raise InteractDiffusionInputError(
                "this conditioning already carries GLIGEN or InteractDiffusion grounding; both drive the same "
                f"gated self-attention: put all interactions (up to {MAX_INTERACTIONS}) into one "
                "InteractDiffusion Apply node and do not chain it with GLIGENTextBoxApply or another "
                "InteractDiffusion Apply")
    if strength == 0 or beta == 0:
        return conditioning
    interactions = encode_interactions(clip, items, width, height, strength, beta, model.key_dim)
    out, controls = [], {}  # one control per chained ControlNet: entries sharing it batch together
    for tokens, options in conditioning:
        previous = options.get("control")
        if id(previous) not in controls:
            controls[id(previous)] = InteractionControl(patcher, interactions).set_previous_controlnet(previous)
        control = controls[id(previous)]
        # copied onto the negative by ComfyUI (as Apply ControlNet's old node does) unless a ControlNet
        # already chained here says otherwise
        apply_to_uncond = options.get("control_apply_to_uncond", True) if previous is not None else True
        out.append([tokens, dict(options, control=control, control_apply_to_uncond=apply_to_uncond)])
    return out
