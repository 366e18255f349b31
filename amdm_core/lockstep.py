"""The AMDM lockstep loop over abstract branches (spec section 3).

A branch is a callable denoise(x, sigma) -> D (the CFG-combined x0 estimate, as ComfyUI's guiders
return it), called with sigma as a float tensor of shape [batch] (sigma_i * ones(batch), exactly as
k-diffusion samplers call their model). Branch 0 is the main branch. Latents live in the family's
NoiseSpace, x = a(sigma) x0 + b(sigma) eps (docs/algorithm.md); EPS_SPACE (a = 1, b = sigma) by default.

    for i = 0 .. T-1:
        every active branch k (aux branches only while i <= s):
            y_k, D_k = step_k(x_k, denoise_k, sigma_i, sigma_{i+1})   # D_k = denoise_k(x_k, sigma_i), its
            eps_k = (x_k - a_i D_k) / b_i                                # first call; more for 2nd order
        if 1 <= i <= s:                                   # step 0 is never aggregated
            xbar = aggregate(y_0 .. y_{N-1}; weights)
            every branch k:  y_k = deviation_correct(xbar, mu_k, p_k)    (VP space at sigma_{i+1})
        every active branch k:  E_k = eps_k;  x_k = y_k

mu_k ("reference"): reference_mean(VP of x_k at sigma_i, E_k, timestep of sigma_{i-1});
mu_k ("exact"): the branch's deterministic DDIM mean x_k + (sigma_{i+1} - sigma_i)(x_k - D_k)/sigma_i, in
VP (DDIM for eps and rectified-flow spaces alike, docs/algorithm.md); "auto": reference where the model
has a DDPM table, else exact.
Model calls: sum over the steps each branch runs of its step's calls (`expected_model_calls`).
"""
from dataclasses import dataclass

import torch

from .aggregation import AGGREGATION_MODES, aggregate
from .deviation import deviation_direction, reference_mean, resolve_mean_mode
from .schedule import EPS_SPACE, from_vp, timestep_of_sigma, to_vp
from .steps import EulerStep


@dataclass
class LockstepResult:
    x: torch.Tensor  # main branch latent after the last step run
    branch_latents: list  # every branch's latent (index 0 = main) at the end of the window / run
    branch_eps: list  # every branch's last eps, (x - a D) / b of its last step
    model_calls: int  # denoiser calls made (the loop's and the steps' own)
    steps_done: int


def expected_model_calls(sigmas, branches, aggregation_steps, model_calls=None):
    """Denoiser calls of a run: the main branch runs steps 0 .. T-1, each aux branch steps 0 .. s (s clamped
    to [0, T - 1]); step i costs model_calls(sigma_i, sigma_{i+1}) calls (a step class's `model_calls`;
    default 1). sigmas: the schedule, or T for T steps of one that ends at 0 (every ComfyUI schedule).
    One call per step (euler, ddim, ancestral, dpmpp_2m, the SDE multistep samplers, lms, lcm, ...):
    T + (N - 1)(s + 1). Two per step but one into sigma 0 (heun, dpm_2, dpmpp_sde, ...):
    2T - 1 + (N - 1)(2(s + 1) - [s = T - 1])."""
    if isinstance(sigmas, int):
        sigmas = torch.linspace(1.0, 0.0, sigmas + 1)
    steps = len(sigmas) - 1
    window = min(max(int(aggregation_steps), 0), steps - 1)
    per_step = [1 if model_calls is None else int(model_calls(sigmas[i], sigmas[i + 1])) for i in range(steps)]
    return sum(per_step) + (int(branches) - 1) * sum(per_step[: window + 1])


def _per_branch(value, count, name):
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} needs one value per branch ({count} branches), got {len(value)}")
        return [float(v) for v in value]
    return [float(value)] * count


def _validate(denoisers, initial_latents, sigmas, aggregation_steps, weights, aggregation):
    n = len(denoisers)
    if n < 1:
        raise ValueError("run_lockstep needs at least one branch (the main one)")
    if len(initial_latents) != n:
        raise ValueError(f"{n} denoisers but {len(initial_latents)} initial latents; give one latent per branch")
    shape = tuple(initial_latents[0].shape)
    for k, latent in enumerate(initial_latents):
        if tuple(latent.shape) != shape:
            raise ValueError(
                f"branch {k}'s latent has shape {tuple(latent.shape)}, the main branch's {shape}; "
                "all branches must share one latent format and batch size"
            )
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError("sigmas must be a 1-D tensor with T + 1 >= 2 entries (the last may be 0)")
    if not bool((sigmas[:-1] > 0).all()):
        raise ValueError("every sigma but the last must be > 0")
    if int(aggregation_steps) < 0:
        raise ValueError(f"aggregation_steps must be >= 0, got {aggregation_steps}")
    if len(weights) != n - 1:
        raise ValueError(f"weights needs one value per aux branch ({n - 1}), got {len(weights)}")
    if aggregation not in AGGREGATION_MODES:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATION_MODES}")
    if aggregation == "paper" and n > 3:
        raise ValueError(f"aggregation 'paper' is defined for 2 or 3 branches, got {n}; use 'sequential'")


class _CountedDenoiser:
    """A branch's denoiser that counts its calls (the loop's and its step's own)."""

    def __init__(self, denoise):
        self.denoise = denoise
        self.calls = 0

    def __call__(self, x, sigma):
        self.calls += 1
        return self.denoise(x, sigma)


def run_lockstep(
    denoisers,
    initial_latents,
    sigmas,
    *,
    aggregation_steps,
    weights,
    aggregation="sequential",
    deviation_steps=0.3,
    mean_mode="auto",
    sigma_table=None,
    space=EPS_SPACE,
    make_step=lambda branch_index: EulerStep(),
    callback=None,
    check_interrupt=None,
    stop_after_window=False,
):
    """Sample N branches in lockstep with AMDM aggregation during steps 1 .. s (module docstring).

    denoisers[k](x, sigma[batch]) -> D; initial_latents[k]: branch k's start x (noise already scaled for
    sigmas[0]); sigmas: 1-D, T + 1 entries (0-dim entries are handed to the steps); aggregation_steps: s;
    weights: one per aux branch; deviation_steps: p for every branch or a list of p_k; mean_mode: "auto",
    "reference" or "exact"; sigma_table: the model's 1000-step discrete DDPM sigma table, None where it has
    none (required for "reference"); space: the family's NoiseSpace (x = a x0 + b eps); make_step(k) -> the
    step object of branch k, step(x, denoise_k, sigma, sigma_next) -> (x_next, D at (x, sigma)) (see
    steps.py); callback(i, main D, main x after step i); check_interrupt() before each step (raise to stop); stop_after_window: return right
    after step s, leaving the tail to the caller.
    """
    weights = list(weights)
    _validate(denoisers, initial_latents, sigmas, aggregation_steps, weights, aggregation)
    n = len(denoisers)
    mean_mode = resolve_mean_mode(mean_mode, sigma_table)
    total_steps = sigmas.numel() - 1
    window = min(int(aggregation_steps), total_steps - 1)
    p = _per_branch(deviation_steps, n, "deviation_steps")
    # Host copies for the scalar look-ups (timesteps, alphas): on an accelerator each would be a sync.
    host_sigmas = sigmas.detach().cpu()
    host_table = sigma_table.detach().cpu() if isinstance(sigma_table, torch.Tensor) else sigma_table
    if n > 1 and window >= 1:
        space.check(host_sigmas[0])
    counted = [_CountedDenoiser(d) for d in denoisers]
    steps = [make_step(k) for k in range(n)]

    x = list(initial_latents)
    eps_prev = [None] * n
    steps_done = 0
    for i in range(total_steps):
        if check_interrupt is not None:
            check_interrupt()
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        active = range(n) if i <= window else range(1)
        aggregated = n > 1 and 1 <= i <= window
        y = list(x)
        eps = list(eps_prev)
        slope = [None] * n
        main_denoised = None
        for k in active:
            y[k], denoised = steps[k](x[k], counted[k], sigma, sigma_next)
            slope[k] = (x[k] - denoised) / sigma  # the Euler derivative; = eps for eps models
            eps[k] = slope[k] if space is EPS_SPACE else space.eps(x[k], denoised, sigma)
            if k == 0:
                main_denoised = denoised

        if aggregated:
            xbar = aggregate(y, weights, aggregation)
            xbar_vp = to_vp(xbar, sigma_next, space)
            t_prev = timestep_of_sigma(host_sigmas[i - 1], host_table) if mean_mode == "reference" else None
            for k in range(n):
                if mean_mode == "reference":
                    mu = reference_mean(to_vp(x[k], sigma, space), eps_prev[k], t_prev, host_table)
                else:
                    mu = to_vp(x[k] + slope[k] * (sigma_next - sigma), sigma_next, space)
                # from_vp is linear: step in VP, then scale only the correction back, so p = 0 leaves
                # xbar bit-identical (no round trip through VP).
                y[k] = xbar - p[k] * from_vp(deviation_direction(xbar_vp, mu), sigma_next, space)

        for k in active:
            x[k], eps_prev[k] = y[k], eps[k]
        steps_done = i + 1
        if callback is not None:
            callback(i, main_denoised, x[0])
        if stop_after_window and i == window:
            break

    return LockstepResult(
        x=x[0], branch_latents=list(x), branch_eps=list(eps_prev), model_calls=sum(c.calls for c in counted),
        steps_done=steps_done,
    )
