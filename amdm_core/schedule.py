"""ComfyUI sigma space <-> the paper's variance-preserving (VP) space, for SD1.x-style eps models.

ComfyUI's k-diffusion samplers carry ``x = x0 + sigma * eps`` ("sigma space"). The paper works with
``x_vp = sqrt(abar) * x0 + sqrt(1 - abar) * eps``. With ``abar = 1 / (1 + sigma^2)`` the two are related by

    x_vp = x / sqrt(1 + sigma^2)

The 1000-entry ``sigma_table`` is what ComfyUI's ``model_sampling.sigmas`` holds: ascending, entry t is
the sigma of discrete training timestep t, ``sigma_t = sqrt((1 - abar_t) / abar_t)``.
"""
import math

import torch


def alpha_bar_from_sigma(sigma):
    """abar = 1 / (1 + sigma^2)."""
    return 1.0 / (1.0 + sigma**2)


def sigma_from_alpha_bar(alpha_bar):
    """sigma = sqrt((1 - abar) / abar)."""
    return ((1.0 - alpha_bar) / alpha_bar) ** 0.5


def _broadcast_sigma(sigma, x):
    """sigma as a tensor that broadcasts over x: a scalar stays a scalar, a per-batch [B] tensor gets
    trailing singleton dims so that item b scales x[b]."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype if x.is_floating_point() else torch.float32, device=x.device)
    if sigma.ndim == 0 or sigma.numel() == 1:
        return sigma.reshape(())
    if sigma.ndim != 1 or sigma.shape[0] != x.shape[0]:
        raise ValueError(
            f"sigma must be a scalar or one value per batch item (shape [{x.shape[0]}]); got shape {tuple(sigma.shape)}"
        )
    return sigma.reshape([-1] + [1] * (x.ndim - 1))


def to_vp(x, sigma):
    """x_vp = x / sqrt(1 + sigma^2). sigma: a number, a 0-dim tensor or one value per batch item."""
    s = _broadcast_sigma(sigma, x)
    return x / (1.0 + s**2) ** 0.5


def from_vp(x_vp, sigma):
    """x = x_vp * sqrt(1 + sigma^2). Inverse of `to_vp`."""
    s = _broadcast_sigma(sigma, x_vp)
    return x_vp * (1.0 + s**2) ** 0.5


def _scalar(value, what):
    """A python float from a number or a tensor whose entries are all equal (e.g. sigma * ones(batch))."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().reshape(-1).double()
        if flat.numel() == 0:
            raise ValueError(f"{what} is an empty tensor")
        if not bool((flat == flat[0]).all()):
            raise ValueError(f"{what} differs across the batch ({flat.tolist()}); pass a single value")
        return float(flat[0])
    return float(value)


def _check_table(sigma_table):
    if not isinstance(sigma_table, torch.Tensor) or sigma_table.ndim != 1 or sigma_table.numel() < 2:
        raise ValueError(
            "sigma_table must be the 1-D discrete sigma table of the model (ComfyUI: model_sampling.sigmas, "
            "1000 ascending entries)"
        )


def timestep_of_sigma(sigma, sigma_table):
    """The discrete timestep t whose table sigma is nearest to `sigma` in log space:
    t = argmin_t |log sigma - log sigma_table[t]| (what ComfyUI's model_sampling.timestep computes)."""
    _check_table(sigma_table)
    value = _scalar(sigma, "sigma")
    if not value > 0.0:
        raise ValueError(f"sigma must be > 0 to have a timestep; got {value}")
    log_table = sigma_table.detach().double().log()
    return int((math.log(value) - log_table).abs().argmin())


def one_step_alpha(t, sigma_table):
    """(alpha_t, abar_t) of the discrete table: abar_t = 1 / (1 + sigma_table[t]^2),
    alpha_t = abar_t / abar_{t-1} (= 1 - beta_t) with abar_{-1} = 1. Python floats, float64 math."""
    _check_table(sigma_table)
    t = int(t)
    if not 0 <= t < sigma_table.numel():
        raise ValueError(f"timestep {t} is outside the table (0 .. {sigma_table.numel() - 1})")
    table = sigma_table.detach().double()
    abar_t = float(alpha_bar_from_sigma(table[t]))
    abar_prev = 1.0 if t == 0 else float(alpha_bar_from_sigma(table[t - 1]))
    return abar_t / abar_prev, abar_t


def scaled_linear_sigma_table(beta_start=0.00085, beta_end=0.012, timesteps=1000):
    """The SD1.x training table: betas = linspace(sqrt(beta_start), sqrt(beta_end), T)^2,
    abar = cumprod(1 - betas), sigma = sqrt((1 - abar) / abar). float32, ascending (as ComfyUI holds it)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1.0 - betas, dim=0)
    return sigma_from_alpha_bar(alpha_bar).float()


def ddim_uniform_sigmas(sigma_table, steps):
    """ComfyUI's "ddim_uniform" schedule: every (len(table) // steps)-th table sigma starting at index 1,
    descending, then 0. For the SD1.5 table and 50 steps these are timesteps 981, 961, ..., 1.
    Like ComfyUI's, it gives MORE than `steps` sigmas when steps does not divide the table length
    (12 steps: stride 83, 13 steps)."""
    _check_table(sigma_table)
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    stride = max(sigma_table.numel() // int(steps), 1)
    picked = [float(sigma_table[i]) for i in range(1, sigma_table.numel(), stride)]
    return torch.tensor(picked[::-1] + [0.0], dtype=torch.float32)
