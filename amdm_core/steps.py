"""Single sampling steps, one object per branch (so a step keeps per-branch state: its own noise source,
its own multistep history).

Call: step(x, denoise, sigma, sigma_next) -> (x_next, denoised). sigma / sigma_next are 0-dim tensors
(entries of the sigmas schedule); denoise(x, sigma * ones(batch)) is the branch's denoiser, called like
k-diffusion samplers call their model; denoised is its x0 estimate at (x, sigma), the step's first call
(the loop takes the branch's eps and the preview from it). `Step` makes that first call and hands it to
`advance(x, denoised, sigma, sigma_next, denoise)`; second-order steps make their extra calls through
denoise. model_calls(sigma, sigma_next): the calls of one step (CALLS_PER_STEP, or CALLS_TO_ZERO into
sigma_next = 0), summed by lockstep.expected_model_calls. Any object with the same call (and
model_calls) can be a step, e.g. one that runs a sampler function over [sigma, sigma_next].

Each step is written in the operation order of the k-diffusion sampler it reproduces, so that one
branch stepped over a whole schedule equals that sampler bit for bit (docs/algorithm.md, "Samplers").
Family-dependent parts come in as arguments: `rectified_flow` (ComfyUI picks these formulas for CONST
model samplings), `noise_scaling` (the model's own), `noise_sampler(sigma, sigma_next)` (built by the
caller exactly as the sampler would build it for this branch), `s_noise` (times the model's noise scale
where the sampler applies one).
"""
import numpy as np
import torch


def _derivative(x, denoised, sigma):
    """d = (x - D) / sigma = eps (the Karras ODE derivative; k-diffusion's to_d for a scalar sigma)."""
    return (x - denoised) / sigma


def _batch_sigma(sigma, x):
    """sigma * ones(batch): the sigma argument of a model call."""
    return sigma * x.new_ones([x.shape[0]])


def half_log_snr(sigma, rectified_flow=False):
    """lambda = log(a / b): -log(sigma) for eps models, log((1 - sigma) / sigma) = -logit(sigma) for
    rectified flow."""
    return sigma.logit().neg() if rectified_flow else sigma.log().neg()


def sigma_of_half_log_snr(half_log_snr_value, rectified_flow=False):
    """The inverse of half_log_snr: exp(-lambda), or sigmoid(-lambda) for rectified flow."""
    return half_log_snr_value.neg().sigmoid() if rectified_flow else half_log_snr_value.neg().exp()


def ancestral_sigmas(sigma, sigma_next, eta=1.0):
    """(sigma_down, sigma_up) of an ancestral step:
    sigma_up = min(sigma_next, eta * sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)),
    sigma_down = sqrt(sigma_next^2 - sigma_up^2); eta = 0 gives (sigma_next, 0)."""
    if not eta:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


class Step:
    """Base of the exact steps: the first model call, then `advance` (defined by each step)."""

    CALLS_PER_STEP = CALLS_TO_ZERO = 1

    @classmethod
    def model_calls(cls, sigma, sigma_next):
        """Model calls of one step sigma -> sigma_next, the first one included."""
        return cls.CALLS_TO_ZERO if sigma_next == 0 else cls.CALLS_PER_STEP

    def __call__(self, x, denoise, sigma, sigma_next):
        denoised = denoise(x, _batch_sigma(sigma, x))
        return self.advance(x, denoised, sigma, sigma_next, denoise), denoised


class EulerStep(Step):
    """Euler in sigma space == DDIM with eta 0 (the paper's sampler; "euler" and "ddim", every family):

        x_next = x + (sigma_next - sigma) * (x - D) / sigma
    """

    def advance(self, x, denoised, sigma, sigma_next, denoise):
        return x + _derivative(x, denoised, sigma) * (sigma_next - sigma)


class AncestralStep(Step):
    """Euler ancestral (eps models): a deterministic Euler step to sigma_down, then fresh noise of size
    sigma_up from this branch's own `noise_sampler(sigma, sigma_next)`:

        x_next = x + (sigma_down - sigma) * (x - D) / sigma + s_noise * sigma_up * noise

    (x_next = D when sigma_down is 0.)"""

    def __init__(self, noise_sampler, eta=1.0, s_noise=1.0):
        self.noise_sampler = noise_sampler
        self.eta = eta
        self.s_noise = s_noise

    def advance(self, x, denoised, sigma, sigma_next, denoise):
        sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, self.eta)
        if sigma_down == 0:
            return denoised
        return (
            x
            + _derivative(x, denoised, sigma) * (sigma_down - sigma)
            + self.noise_sampler(sigma, sigma_next) * self.s_noise * sigma_up
        )


class AncestralRFStep(AncestralStep):
    """Euler ancestral for rectified flow (x = (1 - sigma) x0 + sigma eps; ComfyUI's euler_ancestral on a
    CONST model): step down to sigma_down = sigma_next (1 + (sigma_next / sigma - 1) eta), then rescale
    the signal and renoise back to sigma_next:

        x' = (sigma_down / sigma) x + (1 - sigma_down / sigma) D
        x_next = ((1 - sigma_next) / (1 - sigma_down)) x'
                 + s_noise * sqrt(sigma_next^2 - sigma_down^2 (1 - sigma_next)^2 / (1 - sigma_down)^2) * noise

    (x_next = D when sigma_next is 0; no noise when eta is 0.)"""

    def advance(self, x, denoised, sigma, sigma_next, denoise):
        if sigma_next == 0:
            return denoised
        sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * self.eta)
        signal_next, signal_down = 1 - sigma_next, 1 - sigma_down
        renoise = (sigma_next**2 - sigma_down**2 * signal_next**2 / signal_down**2) ** 0.5
        down_ratio = sigma_down / sigma
        x = down_ratio * x + (1 - down_ratio) * denoised
        if self.eta > 0:
            x = (signal_next / signal_down) * x + self.noise_sampler(sigma, sigma_next) * self.s_noise * renoise
        return x


class HeunStep(Step):
    """Heun (Karras et al. 2022, algorithm 2 with no churn): an Euler step, a second model call at its
    end, and the average slope; a plain Euler step into sigma_next = 0.

        d = (x - D) / sigma,  x2 = x + (sigma_next - sigma) d,  d2 = (x2 - D(x2, sigma_next)) / sigma_next
        x_next = x + (sigma_next - sigma) (d + d2) / 2
    """

    CALLS_PER_STEP, CALLS_TO_ZERO = 2, 1

    def advance(self, x, denoised, sigma, sigma_next, denoise):
        d = _derivative(x, denoised, sigma)
        dt = sigma_next - sigma
        if sigma_next == 0:
            return x + d * dt
        x_2 = x + d * dt
        d_2 = _derivative(x_2, denoise(x_2, _batch_sigma(sigma_next, x)), sigma_next)
        return x + (d + d_2) / 2 * dt


def lms_coefficient(order, sigmas, i, j):
    """The linear-multistep weight of the derivative j steps back, for the step sigmas[i] -> sigmas[i+1]:
    the integral over [sigmas[i], sigmas[i+1]] of the Lagrange basis polynomial through
    sigmas[i], .., sigmas[i-order+1] that is 1 at sigmas[i-j]. Computed exactly (float64, the integral
    of the expanded polynomial, shifted to sigmas[i]); ComfyUI integrates the same polynomial
    numerically, so a caller that needs its exact digits passes its function to LMSStep instead."""
    if order - 1 > i:
        raise ValueError(f"LMS order {order} needs {order} previous steps, step {i} has {i + 1}")
    origin = float(sigmas[i])
    nodes = [float(sigmas[i - k]) - origin for k in range(order)]
    poly = [1.0]  # coefficients in u = tau - sigmas[i], lowest degree first
    for k in range(order):
        if k == j:
            continue
        scale = nodes[j] - nodes[k]
        shifted = [0.0] + poly  # u * poly
        poly = [(hi - nodes[k] * lo) / scale for hi, lo in zip(shifted, poly + [0.0])]
    h = float(sigmas[i + 1]) - origin
    return sum(c * h ** (m + 1) / (m + 1) for m, c in enumerate(poly))


class LMSStep(Step):
    """Linear multistep (order up to 4) on this branch's own derivative history d_i = (x_i - D_i)/sigma_i:

        x_next = x + sum_j coefficient(order_i, sigmas, i, j) * d_{i-j},  order_i = min(i + 1, order)
        x_next = D at sigma_next = 0

    coefficient(order, sigmas, i, j) -> float takes the float32 schedule so far as a numpy array (as
    k-diffusion's linear_multistep_coeff does). One object per branch, for consecutive steps from step 0."""

    def __init__(self, order=4, coefficient=lms_coefficient):
        self.order = order
        self.coefficient = coefficient
        self.derivatives = []
        self.seen_sigmas = []

    def advance(self, x, denoised, sigma, sigma_next, denoise):
        self.derivatives.append(_derivative(x, denoised, sigma))
        if len(self.derivatives) > self.order:
            self.derivatives.pop(0)
        self.seen_sigmas.append(float(sigma))
        if sigma_next == 0:
            return denoised
        i = len(self.seen_sigmas) - 1
        schedule = np.array(self.seen_sigmas + [float(sigma_next)], dtype=np.float32)
        order = min(i + 1, self.order)
        coefficients = [self.coefficient(order, schedule, i, j) for j in range(order)]
        return x + sum(c * d for c, d in zip(coefficients, reversed(self.derivatives)))


class DPMPP2MStep(Step):
    """DPM-Solver++(2M) with per-branch history (this branch's previous D and sigma), t = -log(sigma)
    (the same formulas on every family):

        h = t_next - t
        first step or sigma_next = 0:  x_next = (sigma_next / sigma) x - expm1(-h) D
        otherwise:  r = h_last / h,  D' = (1 + 1/(2r)) D - (1/(2r)) D_prev,
                    x_next = (sigma_next / sigma) x - expm1(-h) D'
    """

    def __init__(self):
        self.previous_denoised = None
        self.previous_sigma = None

    def advance(self, x, denoised, sigma, sigma_next, denoise):
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


class _SDEMultistep(Step):
    """Shared state of the DPM-Solver++ SDE multistep steps: lambda = half_log_snr, h = lambda_next -
    lambda, the eta-damped data-prediction update and the Brownian noise term

        x' = (sigma_next / sigma) e^{-h eta} x + alpha_next (1 - e^{-h (1 + eta)}) D,
        alpha_next = sigma_next e^{lambda_next}
        noise term: s_noise sigma_next sqrt(1 - e^{-2 h eta}) noise(sigma, sigma_next)
    and x_next = D at sigma_next = 0."""

    def __init__(self, noise_sampler, eta=1.0, s_noise=1.0, rectified_flow=False):
        self.noise_sampler = noise_sampler
        self.eta = eta
        self.s_noise = s_noise
        self.rectified_flow = rectified_flow
        self.previous_denoised = []  # most recent first
        self.previous_h = []

    def advance(self, x, denoised, sigma, sigma_next, denoise):
        h = self.previous_h[0] if self.previous_h else None
        if sigma_next == 0:
            x = denoised
        else:
            lambda_s = half_log_snr(sigma, self.rectified_flow)
            lambda_t = half_log_snr(sigma_next, self.rectified_flow)
            h = lambda_t - lambda_s
            h_eta = h * (self.eta + 1)
            alpha_t = sigma_next * lambda_t.exp()
            x = sigma_next / sigma * (-h * self.eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            x = self.correct(x, denoised, h, h_eta, alpha_t)
            if self.eta > 0 and self.s_noise > 0:
                x = x + (self.noise_sampler(sigma, sigma_next) * sigma_next
                         * (-2 * h * self.eta).expm1().neg().sqrt() * self.s_noise)
        self.previous_denoised = [denoised] + self.previous_denoised[:1]
        self.previous_h = [h] + self.previous_h[:1]
        return x


class DPMPP2MSDEStep(_SDEMultistep):
    """DPM-Solver++(2M) SDE ("dpmpp_2m_sde", "_gpu"; solver_type "heun" for "dpmpp_2m_sde_heun"): the
    shared SDE update plus, from the second step on (r = h_last / h),

        midpoint: x' += 0.5 alpha_next (1 - e^{-h_eta}) (D - D_prev) / r
        heun:     x' += alpha_next ((1 - e^{-h_eta}) / (-h_eta) + 1) (D - D_prev) / r
    """

    def __init__(self, noise_sampler, eta=1.0, s_noise=1.0, solver_type="midpoint", rectified_flow=False):
        if solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
        super().__init__(noise_sampler, eta, s_noise, rectified_flow)
        self.solver_type = solver_type

    def correct(self, x, denoised, h, h_eta, alpha_t):
        if not self.previous_denoised:
            return x
        r = self.previous_h[0] / h
        difference = denoised - self.previous_denoised[0]
        if self.solver_type == "heun":
            return x + alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * difference
        return x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * difference


class DPMPP3MSDEStep(_SDEMultistep):
    """DPM-Solver++(3M) SDE ("dpmpp_3m_sde", "_gpu"): the shared SDE update plus, with r0 = h_1 / h and
    r1 = h_2 / h of this branch's previous steps, phi_2 = expm1(-h_eta) / h_eta + 1 and
    phi_3 = phi_2 / h_eta - 1/2:

        two previous steps: d1_0 = (D - D_1) / r0, d1_1 = (D_1 - D_2) / r1,
                            d1 = d1_0 + (d1_0 - d1_1) r0 / (r0 + r1), d2 = (d1_0 - d1_1) / (r0 + r1),
                            x' += alpha_next phi_2 d1 - alpha_next phi_3 d2
        one previous step:  x' += alpha_next phi_2 (D - D_1) / r0
    """

    def correct(self, x, denoised, h, h_eta, alpha_t):
        if len(self.previous_denoised) == 2 and self.previous_h[1] is not None:
            r0, r1 = self.previous_h[0] / h, self.previous_h[1] / h
            d1_0 = (denoised - self.previous_denoised[0]) / r0
            d1_1 = (self.previous_denoised[0] - self.previous_denoised[1]) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_2 = h_eta.neg().expm1() / h_eta + 1
            phi_3 = phi_2 / h_eta - 0.5
            return x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
        if self.previous_denoised:
            r = self.previous_h[0] / h
            phi_2 = h_eta.neg().expm1() / h_eta + 1
            return x + (alpha_t * phi_2) * ((denoised - self.previous_denoised[0]) / r)
        return x


class DPMPPSDEStep(Step):
    """DPM-Solver++ SDE ("dpmpp_sde", "_gpu"), two model calls per step (one into sigma_next = 0, where
    x_next = D). With lambda = half_log_snr, h = lambda_next - lambda, an intermediate point at
    lambda_1 = lambda + r h (sigma_1 its sigma, alpha = sigma e^lambda), and ancestral splits of each
    sub-step in e^{-lambda} (sd, su = ancestral_sigmas(e^{-lambda}, e^{-lambda'}, eta), h' = -log(sd) - lambda):

        x2 = (alpha_1 / alpha) e^{-h'} x - alpha_1 expm1(-h') D + alpha_1 s_noise su noise(sigma, sigma_1)
        D2 = denoise(x2, sigma_1)
        x_next = (alpha_next / alpha) e^{-h''} x - alpha_next expm1(-h'') ((1 - 1/(2r)) D + D2 / (2r))
                 + alpha_next s_noise su'' noise(sigma, sigma_next)
    """

    CALLS_PER_STEP, CALLS_TO_ZERO = 2, 1

    def __init__(self, noise_sampler, eta=1.0, s_noise=1.0, r=1 / 2, rectified_flow=False):
        self.noise_sampler = noise_sampler
        self.eta = eta
        self.s_noise = s_noise
        self.r = r
        self.rectified_flow = rectified_flow

    def advance(self, x, denoised, sigma, sigma_next, denoise):
        if sigma_next == 0:
            return denoised
        eta, s_noise, r = self.eta, self.s_noise, self.r
        lambda_s = half_log_snr(sigma, self.rectified_flow)
        lambda_t = half_log_snr(sigma_next, self.rectified_flow)
        h = lambda_t - lambda_s
        lambda_s_1 = lambda_s + r * h
        fac = 1 / (2 * r)
        sigma_s_1 = sigma_of_half_log_snr(lambda_s_1, self.rectified_flow)
        alpha_s = sigma * lambda_s.exp()
        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_t = sigma_next * lambda_t.exp()

        sd, su = ancestral_sigmas(lambda_s.neg().exp(), lambda_s_1.neg().exp(), eta)
        h_ = sd.log().neg() - lambda_s
        x_2 = (alpha_s_1 / alpha_s) * (-h_).exp() * x - alpha_s_1 * (-h_).expm1() * denoised
        if eta > 0 and s_noise > 0:
            x_2 = x_2 + alpha_s_1 * self.noise_sampler(sigma, sigma_s_1) * s_noise * su
        denoised_2 = denoise(x_2, _batch_sigma(sigma_s_1, x))

        sd, su = ancestral_sigmas(lambda_s.neg().exp(), lambda_t.neg().exp(), eta)
        h_ = sd.log().neg() - lambda_s
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (alpha_t / alpha_s) * (-h_).exp() * x - alpha_t * (-h_).expm1() * denoised_d
        if eta > 0 and s_noise > 0:
            x = x + alpha_t * self.noise_sampler(sigma, sigma_next) * s_noise * su
        return x


class LCMStep(Step):
    """Latent consistency sampling ("lcm"): jump to the x0 estimate, then renoise it to sigma_next with
    the model's own noise scaling (x_next = a(sigma_next) D + b(sigma_next) noise); x_next = D at 0.
    noise_scaling(sigma, noise, latent) -> latent at sigma (ComfyUI: model_sampling.noise_scaling)."""

    def __init__(self, noise_sampler, noise_scaling):
        self.noise_sampler = noise_sampler
        self.noise_scaling = noise_scaling

    def advance(self, x, denoised, sigma, sigma_next, denoise):
        if sigma_next > 0:
            return self.noise_scaling(sigma_next, self.noise_sampler(sigma, sigma_next), denoised)
        return denoised


class ResMultistepStep(Step):
    """RES second-order multistep (Zhang et al. 2023, arXiv 2308.02157; "res_multistep", eta 0, and
    "res_multistep_ancestral"), t = -log(sigma), per-branch history (previous D, sigma_down, sigma):

        sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, eta)
        first step or sigma_down = 0:  x' = x + (sigma_down - sigma) (x - D) / sigma
        otherwise:  h = t(sigma_down) - t(sigma),  c2 = (t(sigma_prev) - t(sigma_down_prev)) / h,
                    phi1(u) = expm1(u)/u, phi2(u) = (phi1(u) - 1)/u,
                    b1 = phi1(-h) - phi2(-h)/c2, b2 = phi2(-h)/c2 (NaN -> 0),
                    x' = e^{-h} x + h (b1 D + b2 D_prev)
        x_next = x' + s_noise sigma_up noise(sigma, sigma_next)   (where sigma_up > 0)
    """

    def __init__(self, noise_sampler=None, eta=0.0, s_noise=1.0):
        if eta and noise_sampler is None:
            raise ValueError("res_multistep with eta > 0 adds noise: give it a noise_sampler")
        self.noise_sampler = noise_sampler
        self.eta = eta
        self.s_noise = s_noise
        self.previous = None  # (D, sigma_down, sigma) of this branch's previous step

    def advance(self, x, denoised, sigma, sigma_next, denoise):
        sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, self.eta)
        if sigma_down == 0 or self.previous is None:
            x = x + _derivative(x, denoised, sigma) * (sigma_down - sigma)
        else:
            old_denoised, old_sigma_down, old_sigma = self.previous
            t, t_old, t_next, t_prev = (s.log().neg() for s in (sigma, old_sigma_down, sigma_down, old_sigma))
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1 = torch.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            b1 = torch.nan_to_num(phi1 - phi2 / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2 / c2, nan=0.0)
            x = h.neg().exp() * x + h * (b1 * denoised + b2 * old_denoised)
        if sigma_up > 0:
            x = x + self.noise_sampler(sigma, sigma_next) * self.s_noise * sigma_up
        self.previous = (denoised, sigma_down, sigma)
        return x


def _dpm_solver_2(x, d, sigma, sigma_to, denoise):
    """The DPM-Solver-2 step of k-diffusion's dpm_2 samplers, sigma -> sigma_to through the log-midpoint
    sigma_mid = exp((log sigma + log sigma_to) / 2): x2 = x + (sigma_mid - sigma) d,
    x_next = x + (sigma_to - sigma) (x2 - D(x2, sigma_mid)) / sigma_mid."""
    sigma_mid = sigma.log().lerp(sigma_to.log(), 0.5).exp()
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = _derivative(x_2, denoise(x_2, _batch_sigma(sigma_mid, x)), sigma_mid)
    return x + d_2 * (sigma_to - sigma)


class DPM2Step(Step):
    """DPM-Solver-2 ("dpm_2", no churn): the log-midpoint step (_dpm_solver_2) to sigma_next, two model
    calls; a plain Euler step into sigma_next = 0."""

    CALLS_PER_STEP, CALLS_TO_ZERO = 2, 1

    def advance(self, x, denoised, sigma, sigma_next, denoise):
        d = _derivative(x, denoised, sigma)
        if sigma_next == 0:
            return x + d * (sigma_next - sigma)
        return _dpm_solver_2(x, d, sigma, sigma_next, denoise)


class DPM2AncestralStep(AncestralStep):
    """DPM-Solver-2 ancestral ("dpm_2_ancestral", eps models): the log-midpoint step to sigma_down, then
    s_noise * sigma_up * noise; an Euler step when sigma_down is 0 (ancestral_sigmas)."""

    CALLS_PER_STEP, CALLS_TO_ZERO = 2, 1

    def advance(self, x, denoised, sigma, sigma_next, denoise):
        sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, self.eta)
        d = _derivative(x, denoised, sigma)
        if sigma_down == 0:
            return x + d * (sigma_down - sigma)
        x = _dpm_solver_2(x, d, sigma, sigma_down, denoise)
        return x + self.noise_sampler(sigma, sigma_next) * self.s_noise * sigma_up


def _flow_down_and_renoise(sigma, sigma_next, eta):
    """The rectified-flow ancestral split (see AncestralRFStep): sigma_down, the signal ratio
    (1 - sigma_next) / (1 - sigma_down) and the renoise coefficient."""
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    signal_next, signal_down = 1 - sigma_next, 1 - sigma_down
    renoise = (sigma_next**2 - sigma_down**2 * signal_next**2 / signal_down**2) ** 0.5
    return sigma_down, signal_next / signal_down, renoise


class DPM2AncestralRFStep(AncestralStep):
    """DPM-Solver-2 ancestral for rectified flow ("dpm_2_ancestral" on a CONST model): the log-midpoint
    step to the flow sigma_down, then x_next = ((1 - sigma_next)/(1 - sigma_down)) x' + s_noise renoise
    noise (AncestralRFStep's split); an Euler step, no noise, when sigma_down is 0."""

    CALLS_PER_STEP, CALLS_TO_ZERO = 2, 1

    def advance(self, x, denoised, sigma, sigma_next, denoise):
        sigma_down, signal_ratio, renoise = _flow_down_and_renoise(sigma, sigma_next, self.eta)
        d = _derivative(x, denoised, sigma)
        if sigma_down == 0:
            return x + d * (sigma_down - sigma)
        x = _dpm_solver_2(x, d, sigma, sigma_down, denoise)
        return signal_ratio * x + self.noise_sampler(sigma, sigma_next) * self.s_noise * renoise


class DPMPP2SAncestralStep(AncestralStep):
    """DPM-Solver++(2S) ancestral ("dpmpp_2s_ancestral", eps models), t = -log(sigma), to sigma_down
    through the midpoint s = t + h/2 (h = t_down - t):

        x2 = (sigma_s / sigma) x - expm1(-h/2) D,   x' = (sigma_down / sigma) x - expm1(-h) D(x2, sigma_s)
        x_next = x' + s_noise sigma_up noise  (sigma_next > 0)
    an Euler step when sigma_down is 0."""

    CALLS_PER_STEP, CALLS_TO_ZERO = 2, 1

    def advance(self, x, denoised, sigma, sigma_next, denoise):
        sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, self.eta)
        if sigma_down == 0:
            x = x + _derivative(x, denoised, sigma) * (sigma_down - sigma)
        else:
            t, t_next = sigma.log().neg(), sigma_down.log().neg()
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (s.neg().exp() / t.neg().exp()) * x - (-h * 0.5).expm1() * denoised
            denoised_2 = denoise(x_2, _batch_sigma(s.neg().exp(), x))
            x = (t_next.neg().exp() / t.neg().exp()) * x - (-h).expm1() * denoised_2
        if sigma_next > 0:
            x = x + self.noise_sampler(sigma, sigma_next) * self.s_noise * sigma_up
        return x


class DPMPP2SAncestralRFStep(AncestralStep):
    """DPM-Solver++(2S) ancestral for rectified flow ("dpmpp_2s_ancestral" on a CONST model): with the
    flow split (AncestralRFStep) and lambda = log((1 - sigma)/sigma), the midpoint sigma_s at
    (lambda + lambda_down)/2 (0.9999 when sigma = 1):

        u = (sigma_s/sigma) x + (1 - sigma_s/sigma) D,  x' = (sigma_down/sigma) x + (1 - sigma_down/sigma) D(u, sigma_s)
        x_next = ((1 - sigma_next)/(1 - sigma_down)) x' + s_noise renoise noise   (eta > 0)
    an Euler step into sigma_next = 0."""

    CALLS_PER_STEP, CALLS_TO_ZERO = 2, 1

    def advance(self, x, denoised, sigma, sigma_next, denoise):
        sigma_down, signal_ratio, renoise = _flow_down_and_renoise(sigma, sigma_next, self.eta)
        if sigma_next == 0:
            return x + _derivative(x, denoised, sigma) * (sigma_down - sigma)
        if sigma == 1.0:
            sigma_s = 0.9999
        else:
            t_i, t_down = ((1 - sigma) / sigma).log(), ((1 - sigma_down) / sigma_down).log()
            sigma_s = ((t_i + 0.5 * (t_down - t_i)).exp() + 1) ** -1
        s_ratio = sigma_s / sigma
        u = s_ratio * x + (1 - s_ratio) * denoised
        denoised_2 = denoise(u, _batch_sigma(sigma_s, x))
        down_ratio = sigma_down / sigma
        x = down_ratio * x + (1 - down_ratio) * denoised_2
        if self.eta > 0:
            x = signal_ratio * x + self.noise_sampler(sigma, sigma_next) * self.s_noise * renoise
        return x


class DDPMStep(Step):
    """Ancestral DDPM ("ddpm"), in the VP form of an eps model (abar = 1/(1 + sigma^2), whatever the
    family, as ComfyUI does): alpha = abar / abar_next, X = x / sqrt(1 + sigma^2), eps = (x - D)/sigma,

        mu = (X - (1 - alpha) eps / sqrt(1 - abar)) / sqrt(alpha)
             + sqrt((1 - alpha)(1 - abar_next)/(1 - abar)) noise        (sigma_next > 0)
        x_next = mu sqrt(1 + sigma_next^2)   (x_next = mu at sigma_next = 0)
    """

    def __init__(self, noise_sampler):
        self.noise_sampler = noise_sampler

    def advance(self, x, denoised, sigma, sigma_next, denoise):
        x_vp = x / torch.sqrt(1.0 + sigma**2.0)
        eps = (x - denoised) / sigma
        alpha_bar = 1 / ((sigma * sigma) + 1)
        alpha_bar_next = 1 / ((sigma_next * sigma_next) + 1)
        alpha = alpha_bar / alpha_bar_next
        mu = (1.0 / alpha).sqrt() * (x_vp - (1 - alpha) * eps / (1 - alpha_bar).sqrt())
        if sigma_next > 0:
            mu = mu + ((1 - alpha) * (1.0 - alpha_bar_next) / (1.0 - alpha_bar)).sqrt() * self.noise_sampler(sigma, sigma_next)
        if sigma_next != 0:
            mu = mu * torch.sqrt(1.0 + sigma_next**2.0)
        return mu


class _DerivativeHistory(Step):
    """The last max_order - 1 derivatives d = (x - D)/sigma (and sigmas) of this branch, oldest first."""

    def __init__(self, max_order):
        self.max_order = max_order
        self.derivatives = []
        self.seen_sigmas = []

    def _remember(self, d, sigma):
        self.derivatives = (self.derivatives + [d])[-(self.max_order - 1):] if self.max_order > 1 else []
        self.seen_sigmas.append(sigma)


class IPNDMStep(_DerivativeHistory):
    """Improved PNDM ("ipndm"): Adams-Bashforth on this branch's derivatives d (newest d_0), order
    min(max_order, i + 1), dt = sigma_next - sigma:

        1: x + dt d_0;  2: x + dt (3 d_0 - d_1)/2;  3: x + dt (23 d_0 - 16 d_1 + 5 d_2)/12;
        4: x + dt (55 d_0 - 59 d_1 + 37 d_2 - 9 d_3)/24;   x_next = D at sigma_next = 0
    """

    def __init__(self, max_order=4):
        super().__init__(max_order)

    def advance(self, x, denoised, sigma, sigma_next, denoise):
        d = (x - denoised) / sigma
        b = self.derivatives
        order = min(self.max_order, len(self.seen_sigmas) + 1)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x_next = denoised
        elif order == 1:
            x_next = x + dt * d
        elif order == 2:
            x_next = x + dt * (3 * d - b[-1]) / 2
        elif order == 3:
            x_next = x + dt * (23 * d - 16 * b[-1] + 5 * b[-2]) / 12
        else:
            x_next = x + dt * (55 * d - 59 * b[-1] + 37 * b[-2] - 9 * b[-3]) / 24
        self._remember(d, sigma)
        return x_next


class IPNDMVStep(_DerivativeHistory):
    """Improved PNDM with variable steps ("ipndm_v"): the Adams-Bashforth weights of `IPNDMStep` for the
    uneven spacing h_n = sigma_next - sigma, h_{n-k} = the earlier steps of this branch's schedule
    (the coefficient formulas of Zhang & Chen's iPNDM-v, written in k-diffusion's operation order)."""

    def __init__(self, max_order=4):
        super().__init__(max_order)

    def advance(self, x, denoised, sigma, sigma_next, denoise):
        d = (x - denoised) / sigma
        b, t = self.derivatives, self.seen_sigmas
        order = min(self.max_order, len(t) + 1)
        h_n = sigma_next - sigma
        if sigma_next == 0:
            x_next = denoised
        elif order == 1:
            x_next = x + (sigma_next - sigma) * d
        elif order == 2:
            h_n_1 = sigma - t[-1]
            coeff1 = (2 + (h_n / h_n_1)) / 2
            coeff2 = -(h_n / h_n_1) / 2
            x_next = x + (sigma_next - sigma) * (coeff1 * d + coeff2 * b[-1])
        elif order == 3:
            h_n_1, h_n_2 = sigma - t[-1], t[-1] - t[-2]
            temp = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
            coeff1 = (2 + (h_n / h_n_1)) / 2 + temp
            coeff2 = -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp
            coeff3 = temp * h_n_1 / h_n_2
            x_next = x + (sigma_next - sigma) * (coeff1 * d + coeff2 * b[-1] + coeff3 * b[-2])
        else:
            h_n_1, h_n_2, h_n_3 = sigma - t[-1], t[-1] - t[-2], t[-2] - t[-3]
            temp1 = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
            temp2 = ((1 - h_n / (3 * (h_n + h_n_1))) / 2 + (1 - h_n / (2 * (h_n + h_n_1))) * h_n / (6 * (h_n + h_n_1 + h_n_2))) \
                * (h_n * (h_n + h_n_1) * (h_n + h_n_1 + h_n_2)) / (h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3))
            ratio = h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))
            coeff1 = (2 + (h_n / h_n_1)) / 2 + temp1 + temp2
            coeff2 = -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1 - (1 + (h_n_1 / h_n_2) + ratio) * temp2
            coeff3 = temp1 * h_n_1 / h_n_2 + ((h_n_1 / h_n_2) + ratio * (1 + h_n_2 / h_n_3)) * temp2
            coeff4 = -temp2 * ratio * h_n_1 / h_n_2
            x_next = x + (sigma_next - sigma) * (coeff1 * d + coeff2 * b[-1] + coeff3 * b[-2] + coeff4 * b[-3])
        self._remember(d, sigma)
        return x_next


class DEISStep(_DerivativeHistory):
    """DEIS multistep ("deis"): x_next = x + sum_j c_{i,j} d_{i-j} with this branch's derivative history
    and the schedule's coefficient table c (order min(max_order, i + 1); an Euler step at order 1 and
    into sigma_next <= 0). coefficients[i] are the step-i weights, newest first, computed once from the
    whole schedule by the caller (ComfyUI: k-diffusion's deis.get_deis_coeff_list(sigmas, max_order))."""

    def __init__(self, coefficients, max_order=3):
        super().__init__(max_order)
        self.coefficients = coefficients

    def advance(self, x, denoised, sigma, sigma_next, denoise):
        d = (x - denoised) / sigma
        i = len(self.seen_sigmas)
        order = 1 if sigma_next <= 0 else min(self.max_order, i + 1)
        if order == 1:
            x_next = x + (sigma_next - sigma) * d
        else:
            weights = self.coefficients[i]
            x_next = x + weights[0] * d
            for weight, previous in zip(weights[1:order], reversed(self.derivatives)):
                x_next = x_next + weight * previous
        self._remember(d, sigma)
        return x_next


class GradientEstimationStep(Step):
    """Gradient estimation ("gradient_estimation", Permenter & Yuan): an Euler step plus, from the second
    step on, (ge_gamma - 1)(d - d_prev) dt with this branch's previous derivative; x_next = D at 0."""

    def __init__(self, ge_gamma=2.0):
        self.ge_gamma = ge_gamma
        self.previous_derivative = None

    def advance(self, x, denoised, sigma, sigma_next, denoise):
        d = _derivative(x, denoised, sigma)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = denoised
        else:
            x = x + d * dt
            if self.previous_derivative is not None:
                x = x + (self.ge_gamma - 1) * (d - self.previous_derivative) * dt
        self.previous_derivative = d
        return x


def er_sde_noise_scaler(value):
    """The ER-SDE solver's default noise scaler: v (e^{v^0.3} + 10)."""
    return value * ((value**0.3).exp() + 10.0)


class ERSDEStep(Step):
    """Extended reverse-time SDE solver, VP ER-SDE-Solver-3 ("er_sde", Cui et al. 2023, arXiv
    2309.06169), in er_lambda = e^{-lambda} = b/a (lambda = half_log_snr), per-branch history of D and
    its first difference, stage min(max_stage, i + 1), 200-point quadrature of the scaler integrals:

        alpha = sigma / er_lambda,  r = scaler(er_lambda_next) / scaler(er_lambda)
        x' = (alpha_next / alpha) r x + alpha_next (1 - r) D
           + stage 2: alpha_next (dt + S_1 scaler(er_lambda_next)) (D - D_1)/(er_lambda - er_lambda_1)
           + stage 3: alpha_next (dt^2/2 + S_2 scaler(er_lambda_next)) (second difference)
        x_next = x' + alpha_next s_noise sqrt(er_lambda_next^2 - er_lambda^2 r^2) noise;  D at sigma_next = 0

    er_lambdas: e^{-half_log_snr} of the whole (offset) schedule, computed by the caller as one vector
    (ComfyUI: sigma_to_half_log_snr(sigmas, model_sampling).neg().exp()), indexed by step."""

    INTEGRATION_POINTS = 200.0

    def __init__(self, noise_sampler, er_lambdas, s_noise=1.0, max_stage=3, noise_scaler=er_sde_noise_scaler):
        self.noise_sampler = noise_sampler
        self.er_lambdas = er_lambdas
        self.s_noise = s_noise
        self.max_stage = max_stage
        self.noise_scaler = noise_scaler
        self.step_index = 0
        self.previous_denoised = None
        self.previous_difference = None

    def advance(self, x, denoised, sigma, sigma_next, denoise):
        i, lambdas, scaler = self.step_index, self.er_lambdas, self.noise_scaler
        stage = min(self.max_stage, i + 1)
        if sigma_next == 0:
            x = denoised
        else:
            er_lambda_s, er_lambda_t = lambdas[i], lambdas[i + 1]
            alpha_s, alpha_t = sigma / er_lambda_s, sigma_next / er_lambda_t
            r = scaler(er_lambda_t) / scaler(er_lambda_s)
            x = alpha_t / alpha_s * r * x + alpha_t * (1 - r) * denoised
            if stage >= 2:
                dt = er_lambda_t - er_lambda_s
                step_size = -dt / self.INTEGRATION_POINTS
                points = torch.arange(0, self.INTEGRATION_POINTS, dtype=torch.float32, device=x.device)
                positions = er_lambda_t + points * step_size
                scaled = scaler(positions)
                integral = torch.sum(1 / scaled) * step_size
                difference = (denoised - self.previous_denoised) / (er_lambda_s - lambdas[i - 1])
                x = x + alpha_t * (dt + integral * scaler(er_lambda_t)) * difference
                if stage >= 3:
                    integral_u = torch.sum((positions - er_lambda_s) / scaled) * step_size
                    second = (difference - self.previous_difference) / ((er_lambda_s - lambdas[i - 2]) / 2)
                    x = x + alpha_t * ((dt**2) / 2 + integral_u * scaler(er_lambda_t)) * second
                self.previous_difference = difference
            if self.s_noise > 0:
                x = x + alpha_t * self.noise_sampler(sigma, sigma_next) * self.s_noise * (
                    er_lambda_t**2 - er_lambda_s**2 * r**2).sqrt().nan_to_num(nan=0.0)
        self.previous_denoised = denoised
        self.step_index += 1
        return x
