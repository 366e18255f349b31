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


class DPMPP2MStep:
    """DPM-Solver++(2M) with per-branch history (this branch's previous D and sigma), t = -log(sigma):

        h = t_next - t
        first step or sigma_next = 0:  x_next = (sigma_next / sigma) x - expm1(-h) D
        otherwise:  r = h_last / h,  D' = (1 + 1/(2r)) D - (1/(2r)) D_prev,
                    x_next = (sigma_next / sigma) x - expm1(-h) D'

    Written in the operation order of k-diffusion's sample_dpmpp_2m, so a single branch reproduces
    ComfyUI's "dpmpp_2m" bit for bit. One object per branch; call it for consecutive steps only."""

    def __init__(self):
        self.previous_denoised = None
        self.previous_sigma = None

    def __call__(self, x, denoised, sigma, sigma_next):
        t, t_next = sigma.log().neg(), sigma_next.log().neg()
        h = t_next - t
        ratio = t_next.neg().exp() / t.neg().exp()
        if self.previous_denoised is None or sigma_next == 0:
            x_next = ratio * x - (-h).expm1() * denoised
        else:
            r = (t - self.previous_sigma.log().neg()) / h
            corrected = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * self.previous_denoised
            x_next = ratio * x - (-h).expm1() * corrected
        self.previous_denoised, self.previous_sigma = denoised, sigma
        return x_next
