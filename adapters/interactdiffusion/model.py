"""InteractDiffusion's add-on layers for an SD1.x UNet: the HOI position net and the gated self-attention
fusers, plus the GLIGEN protocol (``set_position``) through which ComfyUI installs them as ``middle_patch``.

Architecture (as in the public reference, jiuntian/interactdiffusion and its WebUI extension):

- Position net: every box (x0, y0, x1, y1, normalised) -> Fourier features (8 frequencies, sin and cos,
  64 values); every phrase -> CLIP pooled text feature (768). Padded interactions (mask 0) use learned
  null features instead. subject and object tokens = ``linears(cat(phrase, fourier(box)))``, action token
  = ``linear_action(cat(action phrase, fourier(between box)))``; each token gets the embedding of its
  interaction index (0..29) and of its role (subject 0, object 1, action 2). Output
  ``cat([subjects, actions, objects])`` = 90 tokens.
- Fuser, after attn1 of every transformer block (x: visual tokens, o: grounding tokens):
  ``x += s * tanh(alpha_attn) * SelfAttn(LN1(cat(x, Linear(o))))[:, :len(x)]`` and
  ``x += s * tanh(alpha_dense) * FF(LN2(x))``, where s = strength while the UNet timestep
  t >= (1 - beta) * 1000 (scheduled sampling), else the fuser is skipped.
"""
import torch
from torch import nn

import comfy.gligen
import comfy.model_sampling
import comfy.ops
from comfy.ldm.modules.attention import CrossAttention, FeedForward

ops = comfy.ops.manual_cast  # casts weights to the input's dtype/device: the fusers follow the UNet's dtype

SD1_HEADS = 8
MAX_INTERACTIONS = 30
FOURIER_FREQS = 8
HIDDEN = 512
ROLE_SUBJECT, ROLE_OBJECT, ROLE_ACTION = 0, 1, 2


class ModelMismatchError(RuntimeError):
    """The InteractDiffusion layers do not fit the UNet they are sampled with."""


def between_boxes(subject_boxes, object_boxes):
    """The action box: on each axis, the interval between the 2nd and 3rd of the four sorted
    coordinates of the subject and object boxes (the gap between them, or their overlap)."""
    xs = torch.cat([subject_boxes[..., 0::2], object_boxes[..., 0::2]], dim=-1).sort(dim=-1).values
    ys = torch.cat([subject_boxes[..., 1::2], object_boxes[..., 1::2]], dim=-1).sort(dim=-1).values
    return torch.stack([xs[..., 1], ys[..., 1], xs[..., 2], ys[..., 2]], dim=-1)


class IndexEmbedding(nn.Module):
    """A learned table of vectors (interaction index or role); ``emb`` keeps the file's key names."""

    def __init__(self, count, dim):
        super().__init__()
        self.emb = nn.Embedding(count, dim)


def _mlp(in_dim, out_dim):
    return nn.Sequential(ops.Linear(in_dim, HIDDEN), nn.SiLU(), ops.Linear(HIDDEN, HIDDEN), nn.SiLU(),
                         ops.Linear(HIDDEN, out_dim))


class HOIPositionNet(nn.Module):
    """Interaction triplets -> grounding tokens [B, 3 * N, out_dim] in the order subjects, actions, objects."""

    def __init__(self, in_dim=768, out_dim=768, fourier_freqs=FOURIER_FREQS, max_interactions=MAX_INTERACTIONS):
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.fourier_embedder = comfy.gligen.FourierEmbedder(num_freqs=fourier_freqs)
        self.position_dim = fourier_freqs * 2 * 4  # sin and cos of x0, y0, x1, y1
        self.interaction_embedding = IndexEmbedding(max_interactions, out_dim)
        self.position_embedding = IndexEmbedding(3, out_dim)  # roles
        self.linears = _mlp(in_dim + self.position_dim, out_dim)
        self.linear_action = _mlp(in_dim + self.position_dim, out_dim)
        self.null_positive_feature = nn.Parameter(torch.zeros(in_dim))
        self.null_action_feature = nn.Parameter(torch.zeros(in_dim))
        self.null_position_feature = nn.Parameter(torch.zeros(self.position_dim))

    def forward(self, subject_boxes, object_boxes, masks, subject_embeddings, object_embeddings, action_embeddings):
        count = subject_boxes.shape[1]
        like = dict(device=subject_boxes.device, dtype=subject_boxes.dtype)
        keep = masks.unsqueeze(-1)

        def or_null(values, null):
            return values * keep + (1 - keep) * null.to(**like).view(1, 1, -1)

        null_box = self.null_position_feature
        subject_pos = or_null(self.fourier_embedder(subject_boxes), null_box)
        object_pos = or_null(self.fourier_embedder(object_boxes), null_box)
        action_pos = or_null(self.fourier_embedder(between_boxes(subject_boxes, object_boxes)), null_box)
        subject_text = or_null(subject_embeddings, self.null_positive_feature)
        object_text = or_null(object_embeddings, self.null_positive_feature)
        action_text = or_null(action_embeddings, self.null_action_feature)

        subjects = self.linears(torch.cat([subject_text, subject_pos], dim=-1))
        objects = self.linears(torch.cat([object_text, object_pos], dim=-1))
        actions = self.linear_action(torch.cat([action_text, action_pos], dim=-1))

        index = self.interaction_embedding.emb.weight[:count].to(**like).unsqueeze(0)
        roles = self.position_embedding.emb.weight.to(**like)
        subjects = subjects + index + roles[ROLE_SUBJECT]
        objects = objects + index + roles[ROLE_OBJECT]
        actions = actions + index + roles[ROLE_ACTION]
        return torch.cat([subjects, actions, objects], dim=1)


class GatedSelfAttentionFuser(nn.Module):
    """GLIGEN's gated self-attention (same parameter names as the file), with the gate scale passed per
    call so that one loaded model can serve several conditionings with different strengths."""

    def __init__(self, query_dim, context_dim=768, n_heads=SD1_HEADS):
        super().__init__()
        self.query_dim = query_dim
        self.linear = ops.Linear(context_dim, query_dim)
        self.attn = CrossAttention(query_dim=query_dim, context_dim=query_dim, heads=n_heads,
                                   dim_head=query_dim // n_heads, operations=ops)
        self.ff = FeedForward(query_dim, glu=True, operations=ops)
        self.norm1 = ops.LayerNorm(query_dim)
        self.norm2 = ops.LayerNorm(query_dim)
        self.alpha_attn = nn.Parameter(torch.tensor(0.0))
        self.alpha_dense = nn.Parameter(torch.tensor(0.0))

    def forward(self, x, tokens, scale):
        visual = x.shape[1]
        tokens = self.linear(tokens.to(x))
        gate_attn = torch.tanh(self.alpha_attn).to(x)
        gate_dense = torch.tanh(self.alpha_dense).to(x)
        x = x + scale * gate_attn * self.attn(self.norm1(torch.cat([x, tokens], dim=1)))[:, :visual]
        return x + scale * gate_dense * self.ff(self.norm2(x))


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

    Rows of the batch that belong to the unconditional pass (``cond_or_uncond`` 1) get the null tokens,
    as the original feeds masks 0 to the uncond half. The fusers run while the SD1.x timestep of the
    current sigma is >= ``min_timestep``.
    """

    def __init__(self, model, cond_tokens, null_tokens, strength, min_timestep):
        self.model = model
        self.cond_tokens = cond_tokens
        self.null_tokens = null_tokens
        self.strength = strength
        self.min_timestep = min_timestep

    def active(self, extra_options):
        sigmas = extra_options.get("sigmas")
        if self.strength == 0:
            return False
        return self.min_timestep <= 0 or sigmas is None or sd1_timestep(sigmas.reshape(-1)[0]) >= self.min_timestep

    def __call__(self, x, extra_options):
        if not self.active(extra_options):
            return x
        fuser = self.model.fuser_for(extra_options["transformer_index"], x)
        kinds = extra_options.get("cond_or_uncond") or [0]
        rows = x.shape[0] // len(kinds)
        tokens = torch.cat([(self.null_tokens if kind == 1 else self.cond_tokens).expand(rows, -1, -1)
                            for kind in kinds])
        return fuser(x, tokens, self.strength)


class InteractDiffusion(nn.Module):
    """Fusers in UNet transformer-block order (ComfyUI's ``transformer_index``) + the HOI position net."""

    def __init__(self, block_names, block_channels, key_dim=768, source="InteractDiffusion"):
        super().__init__()
        self.block_names = list(block_names)
        self.fusers = nn.ModuleList([GatedSelfAttentionFuser(c, key_dim) for c in block_channels])
        self.position_net = HOIPositionNet(key_dim, key_dim)
        self.key_dim = key_dim
        self.source = source

    def fuser_for(self, transformer_index, x):
        """The fuser of one transformer block, after checking that it fits the block's width."""
        widths = [f.query_dim for f in self.fusers]
        if transformer_index >= len(self.fusers) or x.shape[-1] != widths[transformer_index]:
            expected = (f"the fuser for {self.block_names[transformer_index]} expects {widths[transformer_index]}"
                        if transformer_index < len(widths) else f"the file has only {len(widths)} fusers")
            raise ModelMismatchError(
                f"InteractDiffusion file '{self.source}' does not fit this model: transformer block "
                f"{transformer_index} of the UNet has {x.shape[-1]} channels, {expected} (fuser widths {widths}, "
                f"SD1.x layout with model_channels {widths[0]}). Use it with an SD1.x (SD1.4/1.5-based) "
                f"checkpoint; SD2.x, SDXL and other families are not supported.")
        return self.fusers[transformer_index]

    def tokens(self, interactions, device):
        """Grounding tokens [1, 90, key_dim] (float32) for ``interactions`` (None: all null)."""
        boxes = torch.zeros(2, 1, MAX_INTERACTIONS, 4, device=device)
        embeddings = torch.zeros(3, 1, MAX_INTERACTIONS, self.key_dim, device=device)
        masks = torch.zeros(1, MAX_INTERACTIONS, device=device)
        if interactions is not None:
            count = interactions.count
            boxes[0, 0, :count] = interactions.subject_boxes.to(device)
            boxes[1, 0, :count] = interactions.object_boxes.to(device)
            embeddings[0, 0, :count] = interactions.subject_embeddings.to(device, torch.float32)
            embeddings[1, 0, :count] = interactions.object_embeddings.to(device, torch.float32)
            embeddings[2, 0, :count] = interactions.action_embeddings.to(device, torch.float32)
            masks[0, :count] = 1.0
        with torch.no_grad():
            return self.position_net(boxes[0], boxes[1], masks, embeddings[0], embeddings[1], embeddings[2])

    def set_position(self, latent_shape, interactions, device):
        """GLIGEN protocol (comfy/samplers.py): the middle_patch for a conditioning carrying interactions."""
        return FuserPatch(self, self.tokens(interactions, device), self.tokens(None, device),
                          interactions.strength, first_inactive_timestep(interactions.beta))

    def set_empty(self, latent_shape, device):
        """GLIGEN protocol for a non-"position" entry: null objects, full strength, whole sampling."""
        null = self.tokens(None, device)
        return FuserPatch(self, null, null, 1.0, first_inactive_timestep(1.0))
