"""ComfyUI sigma space <-> the paper's variance-preserving (VP) space, for every model family.

ComfyUI's k-diffusion samplers carry ``x = a(sigma) x0 + b(sigma) eps`` (docs/algorithm.md, section
"One space for every family"): a = 1, b = sigma for eps / v-prediction / EDM / x0 models ("sigma
space"), a = 1 - sigma, b = sigma for rectified flow. The paper works with
``x_vp = sqrt(abar) * x0 + sqrt(1 - abar) * eps``; the VP latent with the same signal-to-noise ratio is

    x_vp = x / sqrt(a^2 + b^2),      abar = a^2 / (a^2 + b^2)

(for eps models x_vp = x / sqrt(1 + sigma^2), abar = 1 / (1 + sigma^2)). A `NoiseSpace` holds a(sigma)
and b(sigma); `EPS_SPACE` and `FLOW_SPACE` are the two closed forms, `NoiseSpace.from_noise_scaling`
reads them off a model's own noise scaling.

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


class NoiseSpace:
    """The space a family's sampler carries x in: x = a(sigma) x0 + b(sigma) eps.

    name: for messages; scales: sigma -> (a, b), each a number or a tensor shaped like sigma (a 0-dim
    tensor, or one value per batch item). Its VP latent is x / sqrt(a^2 + b^2) (docs/algorithm.md).
    """

    def __init__(self, name, scales):
        self.name = name
        self._scales = scales

    def __repr__(self):
        return f"NoiseSpace({self.name!r})"

    @classmethod
    def from_noise_scaling(cls, noise_scaling, name="model"):
        """The space of a model whose noise scaling is `noise_scaling(sigma, noise, latent)` -> the
        latent at sigma (ComfyUI: model_sampling.noise_scaling with max_denoise=False):
            a(sigma) = noise_scaling(sigma, 0, 1),   b(sigma) = noise_scaling(sigma, 1, 0)."""

        def scales(sigma):
            sigma = torch.as_tensor(sigma)
            shape = sigma.reshape(-1).shape  # one value per batch item (or one)
            ones = torch.ones(shape, dtype=sigma.dtype if sigma.is_floating_point() else torch.float32,
                              device=sigma.device)
            zeros = torch.zeros_like(ones)
            a = noise_scaling(sigma, zeros.clone(), ones.clone())
            b = noise_scaling(sigma, ones.clone(), zeros.clone())
            return a.reshape(shape), b.reshape(shape)

        return cls(name, scales)

    def scales(self, sigma, like):
        """(a, b) at sigma, each a tensor broadcast over the latent `like` (per batch item where sigma
        is [B]), in like's dtype."""
        a, b = self._scales(sigma)
        return _broadcast_sigma(a, like), _broadcast_sigma(b, like)

    def vp_scale(self, sigma, like):
        """sqrt(a^2 + b^2), broadcast over `like`: x_vp = x / vp_scale."""
        a, b = self.scales(sigma, like)
        return (a**2 + b**2) ** 0.5

    def eps(self, x, denoised, sigma):
        """The noise in a latent x whose x0 estimate is D: eps = (x - a D) / b (needs b > 0)."""
        a, b = self.scales(sigma, x)
        return (x - a * denoised) / b

    def alpha_bar(self, sigma):
        """abar = a^2 / (a^2 + b^2) at a scalar sigma, as a Python float (float64 math)."""
        a, b = self.scales(torch.as_tensor(sigma, dtype=torch.float64), torch.zeros((), dtype=torch.float64))
        return float(a**2 / (a**2 + b**2))

    def check(self, sigma):
        """Raise ValueError unless the latent at sigma > 0 holds noise: b(sigma) > 0, a(sigma) >= 0, finite."""
        a, b = self.scales(torch.as_tensor(sigma, dtype=torch.float64), torch.zeros((), dtype=torch.float64))
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())
                and bool((b > 0).all()) and bool((a >= 0).all())):
            raise ValueError(
                f"the noise space {self.name!r} gives signal scale a = {a.tolist()} and noise scale b = {b.tolist()} "
                f"at sigma {float(sigma):g}; AMDM needs a >= 0 and b > 0 (a latent that carries noise) to find its "
                "VP latent x / sqrt(a^2 + b^2)"
            )


class _EpsSpace(NoiseSpace):
    """a = 1, b = sigma, written in the operation order this package has always used (bit-stable)."""

    def __init__(self):
        super().__init__("eps", lambda sigma: (1.0, sigma))

    def scales(self, sigma, like):
        return _broadcast_sigma(1.0, like), _broadcast_sigma(sigma, like)

    def vp_scale(self, sigma, like):
        return (1.0 + _broadcast_sigma(sigma, like) ** 2) ** 0.5

    def eps(self, x, denoised, sigma):
        return (x - denoised) / _broadcast_sigma(sigma, x)


EPS_SPACE = _EpsSpace()
FLOW_SPACE = NoiseSpace("rectified flow", lambda sigma: (1.0 - sigma, sigma))


def to_vp(x, sigma, space=EPS_SPACE):
    """x_vp = x / sqrt(a^2 + b^2) (eps models: x / sqrt(1 + sigma^2)). sigma: a number, a 0-dim tensor or
    one value per batch item."""
    return x / space.vp_scale(sigma, x)


def from_vp(x_vp, sigma, space=EPS_SPACE):
    """x = x_vp * sqrt(a^2 + b^2). Inverse of `to_vp`."""
    return x_vp * space.vp_scale(sigma, x_vp)


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
