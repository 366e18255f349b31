"""Interaction text -> a CONDITIONING that carries InteractDiffusion like core GLIGEN does.

``cond["gligen"] = ("position", patcher, interactions)``: at sampling ComfyUI calls
``patcher.model.set_position(...)``, installs the returned function as ``middle_patch`` (after attn1 of
every transformer block) and loads the patcher as an additional model. ComfyUI copies the positive's
entry onto the negative; the patch itself gives the unconditional rows null objects.
"""
from dataclasses import dataclass

import torch

from ..boxes import normalise_box, parse_box_lines
from .model import MAX_INTERACTIONS, InteractDiffusion

PHRASE_FIELDS = ("subject", "action", "object")
BOX_FIELDS = ("subject box", "object box")


class InteractDiffusionInputError(ValueError):
    pass


@dataclass
class Interactions:
    """Up to 30 triplets: CLIP pooled phrase features [N, 768] and normalised xyxy boxes [N, 4]."""
    subject_embeddings: torch.Tensor
    action_embeddings: torch.Tensor
    object_embeddings: torch.Tensor
    subject_boxes: torch.Tensor
    object_boxes: torch.Tensor
    strength: float
    beta: float

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

    return Interactions(stack(0), stack(1), stack(2), boxes(0), boxes(1), float(strength), float(beta))


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
    for entry in conditioning:
        if "gligen" in entry[1]:
            raise InteractDiffusionInputError(
                "this conditioning already carries GLIGEN or InteractDiffusion grounding; ComfyUI applies only "
                f"one per conditioning: put all interactions (up to {MAX_INTERACTIONS}) into one "
                "InteractDiffusion Apply node and do not chain it with GLIGENTextBoxApply")
    if strength == 0 or beta == 0:
        return conditioning
    interactions = encode_interactions(clip, items, width, height, strength, beta, model.key_dim)
    return [[tokens, dict(options, gligen=("position", patcher, interactions))] for tokens, options in conditioning]
