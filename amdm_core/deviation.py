"""Deviation optimization (docs/algorithm.md, section 5: the paper's equation 10), in VP space, per batch item.

After aggregation every branch k is pulled from the aggregate xbar a fixed distance p_k back toward
its own mean mu_k (one normalised gradient-ascent step on log N(x; mu_k, .)):

    x_k' = xbar - p_k * (xbar - mu_k) / |xbar - mu_k|
"""
import torch

from .schedule import one_step_alpha

MEAN_MODES = ("auto", "reference", "exact")

_ZERO_DISTANCE = 1e-12  # |xbar - mu| below this: already at the mean, no direction to move in


def deviation_direction(xbar_vp, mu_vp):
    """u = (xbar - mu) / |xbar - mu| per batch item (float32 math, xbar's dtype out); u = 0 for an item
    whose distance is (near) zero, so that the step leaves it where it is."""
    if xbar_vp.shape != mu_vp.shape:
        raise ValueError(f"xbar and mu differ in shape: {tuple(xbar_vp.shape)} vs {tuple(mu_vp.shape)}")
    batch = xbar_vp.shape[0]
    diff = xbar_vp.reshape(batch, -1).float() - mu_vp.reshape(batch, -1).float()
    dist = diff.norm(dim=1, keepdim=True)
    unit = torch.where(dist > _ZERO_DISTANCE, diff / dist.clamp_min(_ZERO_DISTANCE), torch.zeros_like(diff))
    return unit.reshape(xbar_vp.shape).to(xbar_vp.dtype)


def deviation_correct(xbar_vp, mu_vp, p):
    """x' = xbar - p * (xbar - mu) / |xbar - mu| per batch item (VP space); x' = xbar where
    |xbar - mu| is (near) zero. p is an absolute length in VP latent units (default 0.3 in the paper)."""
    direction = deviation_direction(xbar_vp, mu_vp)
    return (xbar_vp.float() - float(p) * direction.float()).to(xbar_vp.dtype)


def resolve_mean_mode(mean_mode, sigma_table):
    """The mean mode a run uses: "auto" is "reference" where the model has a 1000-step discrete DDPM
    table (sigma_table not None) and "exact" where it has none (e.g. rectified flow); "reference"
    without a table is an error (its formula is defined on that table)."""
    if mean_mode not in MEAN_MODES:
        raise ValueError(f"unknown mean_mode {mean_mode!r}; choose one of {MEAN_MODES}")
    if mean_mode == "auto":
        return "exact" if sigma_table is None else "reference"
    if mean_mode == "reference" and sigma_table is None:
        raise ValueError(
            "mean_mode 'reference' needs sigma_table, the model's 1000-step discrete DDPM sigma table "
            "(ComfyUI: model_sampling.sigmas of an eps / v-prediction model); this model has none (for example "
            "a rectified-flow model): use mean_mode 'auto' or 'exact'"
        )
    return mean_mode


def reference_mean(x_vp, eps_prev, t_prev, sigma_table):
    """The "reference" mu (no extra model call): the one-step DDPM posterior-mean formula applied to the
    branch's VP input of this step, X, reusing its eps of the previous step, E:

        alpha = abar_tau / abar_{tau-1}  (1 - beta_tau of the 1000-step table), abar = abar_tau
        mu    = (X - (1 - alpha) / sqrt(1 - abar) * E) / sqrt(alpha)

    t_prev = tau, the discrete timestep of the previous step (the one that produced E).
    """
    if x_vp.shape != eps_prev.shape:
        raise ValueError(f"x and eps differ in shape: {tuple(x_vp.shape)} vs {tuple(eps_prev.shape)}")
    alpha, alpha_bar = one_step_alpha(t_prev, sigma_table)
    mean = (x_vp.float() - (1.0 - alpha) / (1.0 - alpha_bar) ** 0.5 * eps_prev.float()) / alpha**0.5
    return mean.to(x_vp.dtype)
