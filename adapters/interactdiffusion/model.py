"""InteractDiffusion's add-on layers for an SD1.x UNet: the HOI position net and the gated self-attention
fusers, as plain torch modules built from ``operations`` (a comfy.ops class, as ComfyUI's own modules).

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
  t >= (1 - beta) * 1000 (scheduled sampling, decided by the patch), else the fuser is skipped.
"""
import torch
from torch import nn

import comfy.gligen
import comfy.ops
from comfy.ldm.modules.attention import CrossAttention, FeedForward

DEFAULT_OPS = comfy.ops.disable_weight_init  # no init cost: every weight comes from the file

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

    def __init__(self, count, dim, operations=DEFAULT_OPS):
        super().__init__()
        self.emb = operations.Embedding(count, dim)


def _mlp(in_dim, out_dim, operations):
    return nn.Sequential(operations.Linear(in_dim, HIDDEN), nn.SiLU(), operations.Linear(HIDDEN, HIDDEN), nn.SiLU(),
                         operations.Linear(HIDDEN, out_dim))


class HOIPositionNet(nn.Module):
    """Interaction triplets -> grounding tokens [B, 3 * N, out_dim] in the order subjects, actions, objects."""

    def __init__(self, in_dim=768, out_dim=768, fourier_freqs=FOURIER_FREQS, max_interactions=MAX_INTERACTIONS,
                 operations=DEFAULT_OPS):
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.fourier_embedder = comfy.gligen.FourierEmbedder(num_freqs=fourier_freqs)
        self.position_dim = fourier_freqs * 2 * 4  # sin and cos of x0, y0, x1, y1
        self.interaction_embedding = IndexEmbedding(max_interactions, out_dim, operations)
        self.position_embedding = IndexEmbedding(3, out_dim, operations)  # roles
        self.linears = _mlp(in_dim + self.position_dim, out_dim, operations)
        self.linear_action = _mlp(in_dim + self.position_dim, out_dim, operations)
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

    def __init__(self, query_dim, context_dim=768, n_heads=SD1_HEADS, operations=DEFAULT_OPS):
        super().__init__()
        self.query_dim = query_dim
        self.linear = operations.Linear(context_dim, query_dim)
        self.attn = CrossAttention(query_dim=query_dim, context_dim=query_dim, heads=n_heads,
                                   dim_head=query_dim // n_heads, operations=operations)
        self.ff = FeedForward(query_dim, glu=True, operations=operations)
        self.norm1 = operations.LayerNorm(query_dim)
        self.norm2 = operations.LayerNorm(query_dim)
        self.alpha_attn = nn.Parameter(torch.tensor(0.0))
        self.alpha_dense = nn.Parameter(torch.tensor(0.0))

    def forward(self, x, tokens, scale):
        visual = x.shape[1]
        tokens = self.linear(tokens.to(x))
        gate_attn = torch.tanh(self.alpha_attn).to(x)
        gate_dense = torch.tanh(self.alpha_dense).to(x)
        x = x + scale * gate_attn * self.attn(self.norm1(torch.cat([x, tokens], dim=1)))[:, :visual]
        return x + scale * gate_dense * self.ff(self.norm2(x))


class InteractDiffusion(nn.Module):
    """Fusers in UNet transformer-block order (ComfyUI's ``transformer_index``) + the HOI position net."""

    def __init__(self, block_names, block_channels, key_dim=768, source="InteractDiffusion", operations=DEFAULT_OPS):
        super().__init__()
        self.block_names = list(block_names)
        self.fusers = nn.ModuleList([GatedSelfAttentionFuser(c, key_dim, operations=operations) for c in block_channels])
        self.position_net = HOIPositionNet(key_dim, key_dim, operations=operations)
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
