"""Single sampling steps in sigma space. One step object per branch, so a step may keep per-branch
state (an ancestral step its own noise source). Call: step(x, denoised, sigma, sigma_next) -> x_next,
with sigma / sigma_next 0-dim tensors (entries of the sigmas schedule)."""


def _derivative(x, denoised, sigma):
    """d = (x - D) / sigma = eps (the Karras ODE derivative; k-diffusion's to_d for a scalar sigma)."""
    return (x - denoised) / sigma


class EulerStep:
    """Euler in sigma space == DDIM with eta 0 (the paper's sampler):

        x_next = x + (sigma_next - sigma) * (x - D) / sigma

    Written in the same operation order as k-diffusion's sample_euler, so a single branch reproduces
    ComfyUI's "euler"/"ddim" samplers bit for bit."""

    def __call__(self, x, denoised, sigma, sigma_next):
        return x + _derivative(x, denoised, sigma) * (sigma_next - sigma)


def ancestral_sigmas(sigma, sigma_next, eta=1.0):
    """(sigma_down, sigma_up) of an ancestral step:
    sigma_up = min(sigma_next, eta * sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)),
    sigma_down = sqrt(sigma_next^2 - sigma_up^2); eta = 0 gives (sigma_next, 0)."""
    if not eta:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


class AncestralStep:
    """Euler ancestral (eps models): a deterministic Euler step to sigma_down, then fresh noise of size
    sigma_up from this branch's own `noise_sampler(sigma, sigma_next)`:

        x_next = x + (sigma_down - sigma) * (x - D) / sigma + s_noise * sigma_up * noise

    (x_next = D when sigma_down is 0, as in k-diffusion's sample_euler_ancestral.)"""

    def __init__(self, noise_sampler, eta=1.0, s_noise=1.0):
        self.noise_sampler = noise_sampler
        self.eta = eta
        self.s_noise = s_noise

    def __call__(self, x, denoised, sigma, sigma_next):
        sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, self.eta)
        if sigma_down == 0:
            return denoised
        return (
            x
            + _derivative(x, denoised, sigma) * (sigma_down - sigma)
            + self.noise_sampler(sigma, sigma_next) * self.s_noise * sigma_up
        )
