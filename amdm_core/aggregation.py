"""Spherical aggregation of branch latents (docs/algorithm.md, section 4).

All math is per batch item (dim 0; batch items are never mixed), over the flattened item, in float32;
the result has the input dtype.
"""
import torch

AGGREGATION_MODES = ("sequential", "paper", "linear")

PARALLEL_TOLERANCE = 1e-6  # 1 - |cos(theta)| below this: slerp is numerically 0/0, use the linear blend
_ZERO_NORM = 1e-12  # an item with a smaller norm has no direction


def _per_item_weight(w, batch, device):
    """w as a float32 column [B, 1]: a number, a 0-dim tensor or one weight per batch item. A plain number
    stays a Python float (rounded to float32, so the arithmetic is the same): building a device tensor from
    it would be a blocking host-to-device copy on every call."""
    if isinstance(w, (int, float)):
        return float(torch.tensor(float(w), dtype=torch.float32))
    w = torch.as_tensor(w, dtype=torch.float32, device=device)
    if w.numel() == 1:
        return w.reshape(1, 1).expand(batch, 1)
    if w.ndim != 1 or w.shape[0] != batch:
        raise ValueError(f"the weight must be a number or one value per batch item ([{batch}]); got {tuple(w.shape)}")
    return w.reshape(batch, 1)


def _check_pair(a, b):
    if a.shape != b.shape:
        raise ValueError(f"cannot aggregate latents of different shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim < 1:
        raise ValueError("latents need a batch dimension (dim 0)")


def lerp(a, b, w):
    """Linear blend (1 - w) * a + w * b per batch item, float32 math, input dtype out. Ablation only."""
    _check_pair(a, b)
    batch = a.shape[0]
    a32, b32 = a.reshape(batch, -1).float(), b.reshape(batch, -1).float()
    w = _per_item_weight(w, batch, a.device)
    return ((1.0 - w) * a32 + w * b32).reshape(a.shape).to(a.dtype)


def slerp(a, b, w):
    """Spherical interpolation per batch item b over the flattened item, in float32:

        cos(theta) = <a, b> / (|a| |b|), clamped to [-1, 1]
        slerp(a, b; w) = sin((1 - w) theta) / sin(theta) * a + sin(w theta) / sin(theta) * b

    w is the weight of the SECOND argument: w = 0 returns a, w = 1 returns b (exactly).
    Guards: where 1 - |cos(theta)| < 1e-6 (near-parallel, and near-anti-parallel where the great circle
    is undefined) or either item is (near) zero, the item falls back to the linear blend, computed as
    a + w (b - a) so that equal items give back a exactly; the result is always finite. w: a number or one
    weight per batch item. Result in a's dtype.
    """
    _check_pair(a, b)
    batch = a.shape[0]
    a32, b32 = a.reshape(batch, -1).float(), b.reshape(batch, -1).float()
    w = _per_item_weight(w, batch, a.device)

    norm_a = a32.norm(dim=1, keepdim=True)
    norm_b = b32.norm(dim=1, keepdim=True)
    has_direction = (norm_a > _ZERO_NORM) & (norm_b > _ZERO_NORM)
    cos = ((a32 * b32).sum(dim=1, keepdim=True) / (norm_a * norm_b).clamp_min(_ZERO_NORM**2)).clamp(-1.0, 1.0)
    spherical = has_direction & (1.0 - cos.abs() >= PARALLEL_TOLERANCE)

    theta = torch.acos(cos)
    # Where the item is not spherical, use a harmless theta so that no 0/0 is ever formed.
    sin_theta = torch.where(spherical, torch.sin(theta), torch.ones_like(theta))
    great_circle = torch.sin((1.0 - w) * theta) / sin_theta * a32 + torch.sin(w * theta) / sin_theta * b32
    return torch.where(spherical, great_circle, a32 + w * (b32 - a32)).reshape(a.shape).to(a.dtype)


def aggregate(latents, weights, mode="sequential"):
    """Merge branch latents into one, latents[0] being the main branch, weights[j] belonging to aux j+1.

    sequential (any N):  xbar = x_0; for j = 1 .. N-1: xbar = slerp(xbar, x_j; w_j)
    paper (N = 2 or 3, the reference code's nested formula; main appears twice when N = 3):
        N = 2: xbar = slerp(x_0, x_1; w_1)
        N = 3: I1 = slerp(x_1, x_0; w_1)   # w_1 is the weight of the MAIN branch here
               I2 = slerp(x_0, x_2; w_2)
               xbar = slerp(I1, I2; w_2)   # w_2 reused as the outer weight
    linear (ablation): the sequential order with (1 - w) a + w b instead of slerp.
    """
    latents = list(latents)
    weights = list(weights)
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; choose one of {AGGREGATION_MODES}")
    if not latents:
        raise ValueError("aggregate needs at least the main branch latent")
    if len(weights) != len(latents) - 1:
        raise ValueError(
            f"aggregate needs one weight per aux branch: {len(latents) - 1} aux latents but {len(weights)} weights"
        )
    if mode == "paper":
        if len(latents) > 3:
            raise ValueError(
                f"the paper's nested formula is defined for 2 or 3 branches, got {len(latents)}; use 'sequential'"
            )
        if len(latents) == 3:
            main, aux1, aux2 = latents
            w1, w2 = weights
            return slerp(slerp(aux1, main, w1), slerp(main, aux2, w2), w2)
    blend = lerp if mode == "linear" else slerp
    merged = latents[0]
    for latent, w in zip(latents[1:], weights):
        merged = blend(merged, latent, w)
    return merged
