"""Predictor-corrector steps: UniPC ("uni_pc", "uni_pc_bh2") and SA-Solver ("sa_solver", "sa_solver_pece").

Both evaluate the model at their *predicted* latent x^p_i, then correct the latent of step i from the
previous corrected latent and that evaluation, and predict x^p_{i+1} from the corrected one. As an AMDM
step (same call as steps.py), step i is handed the latent the model sees at sigma_i, makes the call,
corrects, predicts, and returns x^p_{i+1}. Aggregation replaces the x^p_i a branch carries (the lockstep
writes the merged latent into the tensor the step handed out, during the step's first model call); the
corrector would rebuild the latent from x^c_{i-1} and keep only the model's answer at the aggregated latent,
so the step carries the aggregation's displacement through (docs/algorithm.md, "Predictor-correctors"):

    x^c_i = corrector(x^c_{i-1}, history, D_i) + (x_i - x^p_i)

x_i: the latent the model saw. Where it still holds the x^p_i the step handed out (compared by value after
the call), the displacement is skipped and a whole run equals the sampler bit for bit (operation order as in
ComfyUI).
"""
import torch


def _per_item(v, dims):
    """A [batch] vector shaped to broadcast over a latent of `dims` dimensions."""
    return v[(...,) + (None,) * (dims - 1)]


def _k_diffusion_scale(t, dims):
    """sqrt(1 + t^2) per batch item: a k-diffusion latent at sigma t is its VP view times this."""
    return (_per_item(t, dims) ** 2 + 1.0) ** 0.5


def _log_alpha(t):
    """UniPC's VP view of a k-diffusion latent at sigma t: log alpha = log(1 / sqrt(1 + t^2))."""
    return 0.5 * torch.log(1 / ((t * t) + 1))


def _std(t):
    """sigma_VP = sqrt(1 - alpha^2)."""
    return torch.sqrt(1. - torch.exp(2. * _log_alpha(t)))


def _lambda(t):
    """lambda = log(alpha / sigma_VP) = -log t."""
    log_alpha = _log_alpha(t)
    return log_alpha - 0.5 * torch.log(1. - torch.exp(2. * log_alpha))


class UniPCStep:
    """UniPC multistep in data prediction (Zhao et al. 2023, arXiv 2302.04867), order min(3, T - 1) with
    lower orders at the start and the end, B(h) = h ("bh1") or e^h - 1 ("bh2"), on the VP latent
    v = x / sqrt(1 + sigma^2) with the x0 prediction m_i = (v - sigma_VP eps_i) / alpha_i:

        predictor to t:  v^p = (sigma_VP,t / sigma_VP,s) v^c - alpha_t (e^{-h} - 1) m_s
                               - alpha_t B(h) sum_k rho^p_k (m_{s_k} - m_s) / r_k
        corrector at t:  v^c = (the same first two terms) - alpha_t B(h) (sum_k rho^c_k (m_{s_k} - m_s) / r_k
                               + rho^c_last (m_t - m_s))
        rho from R rho = b, R_{kj} = r_j^k, b_k = k! phi_{k+1}(h) / B(h) (rho = 1/2 where the system has one entry)

    with h = lambda_t - lambda_s and r_k = (lambda_{s_k} - lambda_s) / h; the last step predicts into
    sigma 0.001 without a corrector (into the schedule's last sigma when that is not 0) and returns
    v / alpha. schedule: the run's sigmas (the orders depend on its length). One call per step."""

    def __init__(self, schedule, variant="bh1"):
        if variant not in ("bh1", "bh2"):
            raise ValueError(f"unknown UniPC variant {variant!r}; use 'bh1' or 'bh2'")
        self.variant = variant
        self.steps = len(schedule) - 1
        self.order = min(3, self.steps - 1)
        self.index = 0
        self.history = []  # (t, m) of the last `order` evaluations
        self.corrected = None  # v^c of the previous step
        self.pending = None  # what the next step's corrector needs of this step's prediction
        self.predicted = self.handed_out = None  # handed_out: a copy of the latent the last step returned

    def __call__(self, x, denoise, sigma, sigma_next):
        dims = x.dim()
        t = sigma.expand(x.shape[0])
        if self.index == 0:
            v = x / torch.sqrt(1.0 + sigma ** 2.0)
            model_input = v * _k_diffusion_scale(t, dims)
        else:
            model_input = x
        denoised = denoise(model_input, t)
        if self.index > 0:
            # aggregated: its VP view (the model saw the aggregated latent itself)
            v = self.predicted if torch.equal(x, self.handed_out) else x / _k_diffusion_scale(t, dims)
        eps = (model_input - denoised) / _per_item(t, dims)
        m = (v - _per_item(_std(t), dims) * eps) / _per_item(torch.exp(_log_alpha(t)), dims)
        if self.index == 0:
            corrected = v
        else:
            corrected = self._correct(m, dims)
            if v is not self.predicted:
                corrected = corrected + (v - self.predicted)
        self.history = (self.history + [(t, m)])[-max(self.order, 1):]
        self.corrected = corrected
        self.index += 1
        if self.steps == 1:  # ComfyUI's one-step UniPC makes no update: the latent only leaves VP
            return self._leave_vp(v, sigma_next), denoised
        j = self.index  # this step predicts the latent at schedule[j]
        final = j == self.steps
        order = j if j < self.order else min(self.order, self.steps + 1 - j)
        t_next = (self._final_t(sigma_next) if final else sigma_next).expand(x.shape[0])
        v_next = self._predict(corrected, t_next, order, corrector=not final, dims=dims)
        if final:
            return self._leave_vp(v_next, sigma_next), denoised
        self.predicted = v_next
        handed_out = v_next * _k_diffusion_scale(t_next, dims)
        self.handed_out = handed_out.clone()
        return handed_out, denoised

    @staticmethod
    def _final_t(sigma_next):
        return torch.full_like(sigma_next, 0.001) if sigma_next == 0 else sigma_next

    @classmethod
    def _leave_vp(cls, v, sigma_next):
        """The run's result, v / alpha at the last sigma (0.001 for a last 0), as ComfyUI returns it."""
        return v / torch.exp(_log_alpha(cls._final_t(sigma_next)))

    def _predict(self, v, t, order, corrector, dims):
        (t_s, m_s) = self.history[-1]
        lambda_s, lambda_t = _lambda(t_s), _lambda(t)
        std_s, std_t = _std(t_s), _std(t)
        alpha_t = torch.exp(_log_alpha(t))
        h = lambda_t - lambda_s
        ratios, differences = [], []
        for k in range(1, order):
            t_k, m_k = self.history[-(k + 1)]
            r_k = ((_lambda(t_k) - lambda_s) / h)[0]
            ratios.append(r_k)
            differences.append((m_k - m_s) / r_k)
        ratios.append(1.)
        ratios = torch.tensor(ratios, device=v.device)
        hh = -h[0]
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if self.variant == "bh1" else torch.expm1(hh)
        powers, rhs, factorial = [], [], 1
        for k in range(1, order + 1):
            powers.append(torch.pow(ratios, k - 1))
            rhs.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        powers = torch.stack(powers)
        rhs = torch.tensor(rhs, device=v.device)
        if differences:
            differences = torch.stack(differences, dim=1)
            rhos_p = torch.tensor([0.5], device=v.device) if order == 2 else torch.linalg.solve(powers[:-1, :-1], rhs[:-1])
            prediction = torch.tensordot(differences, rhos_p, dims=([1], [0]))
        else:
            differences, prediction = None, 0
        base = _per_item(std_t / std_s, dims) * v - _per_item(alpha_t * h_phi_1, dims) * m_s
        scale = _per_item(alpha_t * b_h, dims)
        if corrector:
            rhos_c = torch.tensor([0.5], device=v.device) if order == 1 else torch.linalg.solve(powers, rhs)
            self.pending = (base, scale, differences, rhos_c, m_s)
        return base - scale * prediction

    def _correct(self, m_t, dims):
        base, scale, differences, rhos_c, m_s = self.pending
        correction = 0 if differences is None else torch.tensordot(differences, rhos_c[:-1], dims=([1], [0]))
        return base - scale * (correction + rhos_c[-1] * (m_t - m_s))


class SASolverStep:
    """SA-Solver (Xue et al. 2023, arXiv 2309.05019): stochastic Adams predictor (order <= 3) and corrector
    (order <= 4) in lambda = half_log_snr on the branch's history of D, tau(sigma) the stochasticity:

        corrector at sigma_i:  x^c = (sigma_i / sigma_{i-1}) e^{-tau^2 h} x^c_{i-1} + sum_k b^c_k D_{i-k} + noise_{i-1}
        predictor:             x^p = (sigma_{i+1} / sigma_i) e^{-tau^2 h} x^c + sum_k b^p_k D_{i-k}
                                     + sigma_{i+1} sqrt(1 - e^{-2 tau^2 h}) s_noise z,   h = lambda_{i+1} - lambda_i
        x_next = D at sigma 0

    No corrector in step 0 nor into sigma 0 (except PECE, which re-evaluates D at every corrected latent);
    orders drop near the end of a schedule that ends at 0. schedule / lambdas: the run's (first-sigma
    offset) sigmas and their half-log-SNR as one vector; tau(sigma) -> float;
    adams_coefficients(sigma_to, lambdas, lambda_s, lambda_t, tau, simple_order_2, is_corrector_step) -> b
    (ComfyUI's, for its digits); noise_sampler(sigma, sigma_next)."""

    def __init__(self, noise_sampler, schedule, lambdas, tau, adams_coefficients, s_noise=1.0, predictor_order=3,
                 corrector_order=4, pece=False, simple_order_2=False):
        self.noise_sampler = noise_sampler
        self.steps = len(schedule) - 1
        self.lower_order_to_end = float(schedule[-1]) == 0
        self.lambdas = lambdas
        self.tau = tau
        self.adams_coefficients = adams_coefficients
        self.s_noise = s_noise
        self.predictor_order = predictor_order
        self.corrector_order = corrector_order
        self.pece = pece
        self.simple_order_2 = simple_order_2
        self.index = 0
        self.predictions = []
        self.corrected = self.previous_sigma = None
        self.handed_out = None  # a copy of the latent the last step returned
        self.h = self.tau_t = self.noise = 0.0

    def __call__(self, x, denoise, sigma, sigma_next):
        i, lambdas = self.index, self.lambdas
        s_in = x.new_ones([x.shape[0]])
        denoised = first = denoise(x, sigma * s_in)
        self.predictions = (self.predictions + [denoised])[-max(self.predictor_order, self.corrector_order):]
        predictor_order = min(self.predictor_order, len(self.predictions))
        corrects = not (i == 0 or (sigma_next == 0 and not self.pece))
        corrector_order = min(self.corrector_order, len(self.predictions)) if corrects else 0
        if self.lower_order_to_end:
            predictor_order = min(predictor_order, self.steps - 1 - i)
            corrector_order = min(corrector_order, self.steps - i)
        if corrector_order == 0:
            corrected = x
        else:
            b = self.adams_coefficients(sigma, lambdas[i - corrector_order + 1:i + 1], lambdas[i - 1], lambdas[i],
                                        self.tau_t, self.simple_order_2, is_corrector_step=True)
            history = torch.stack(self.predictions[-corrector_order:], dim=1)
            corrected = (sigma / self.previous_sigma * (-(self.tau_t ** 2) * self.h).exp() * self.corrected
                         + torch.tensordot(history, b, dims=([1], [0])))
            if self.tau_t > 0 and self.s_noise > 0:
                corrected = corrected + self.noise
            if not torch.equal(x, self.handed_out):
                corrected = corrected + (x - self.handed_out)
            if self.pece:
                denoised = denoise(corrected, sigma * s_in)
                self.predictions[-1] = denoised
        self.corrected, self.previous_sigma = corrected, sigma
        self.index += 1
        if sigma_next == 0:
            return denoised, first
        self.tau_t = self.tau(sigma_next)
        b = self.adams_coefficients(sigma_next, lambdas[i - predictor_order + 1:i + 1], lambdas[i], lambdas[i + 1],
                                    self.tau_t, self.simple_order_2, is_corrector_step=False)
        history = torch.stack(self.predictions[-predictor_order:], dim=1)
        self.h = lambdas[i + 1] - lambdas[i]
        predicted = (sigma_next / sigma * (-(self.tau_t ** 2) * self.h).exp() * corrected
                     + torch.tensordot(history, b, dims=([1], [0])))
        if self.tau_t > 0 and self.s_noise > 0:
            self.noise = (self.noise_sampler(sigma, sigma_next) * sigma_next
                          * (-2 * self.tau_t ** 2 * self.h).expm1().neg().sqrt() * self.s_noise)
            predicted = predicted + self.noise
        self.handed_out = predicted.clone()
        return predicted, first
