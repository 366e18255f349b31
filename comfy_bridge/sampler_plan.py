"""How each branch is stepped for the user's SAMPLER (docs/nodes.md, "Samplers").

Two ways, decided before any model call:
- exact: an amdm_core step object reproduces the sampler's per-branch state (noise stream, multistep
  history) bit for bit; the main branch continues with it after the window.
- slices: any other sampler is run by ComfyUI's own sampler function over one-step sigma slices in the
  window (its multistep history restarts every window step; SDE noise comes from one seeded stream per
  branch), and the main branch then continues with the user's sampler over the remaining sigmas.
Where a window exists, the adaptive-step samplers (dpm_fast, dpm_adaptive) are refused (with s = 0 nothing
is stepped in lockstep and they run as usual). A SAMPLER is recognised by its sampler function; refusals
name it as the user chose it (KSampler's list: `uni_pc`, not `sample_unipc`).
"""
import functools
import inspect

import comfy.model_sampling
import comfy.samplers
import torch
from comfy.extra_samplers import uni_pc as k_uni_pc
from comfy.k_diffusion import deis as k_deis
from comfy.k_diffusion import sa_solver as k_sa_solver
from comfy.k_diffusion import sampling as k_sampling

from .. import amdm_core
from .checks import AMDMInputError

_ADAPTIVE = ("chooses its own step sizes, so its branches cannot step in lockstep on one sigma schedule; pick a "
             "fixed-step sampler (e.g. dpmpp_2m or euler)")
REFUSED = {"dpm_fast": _ADAPTIVE, "dpm_adaptive": _ADAPTIVE}


@functools.lru_cache(maxsize=1)
def _names_by_function():
    """{sampler function's qualified name: the KSampler name a user picks}, from ComfyUI's own list."""
    names = {}
    for name in comfy.samplers.KSampler.SAMPLERS:
        names.setdefault(_function_key(comfy.samplers.sampler_object(name).sampler_function), name)
    return names


def _function_key(function):
    return getattr(function, "__module__", ""), getattr(function, "__qualname__", repr(function))


def exact_sampler_names():
    """The KSampler names reproduced exactly per branch ("ddim" is euler on the ddim path)."""
    return [name for name in comfy.samplers.KSampler.SAMPLERS
            if getattr(comfy.samplers.sampler_object(name).sampler_function, "__name__", None) in EXACT]


def sampler_display_name(sampler):
    """The name a user knows this SAMPLER by (KSampler's list), else its function's or class's name."""
    function = getattr(sampler, "sampler_function", None)
    if function is None:
        return type(sampler).__name__
    return _names_by_function().get(_function_key(function), getattr(function, "__name__", type(sampler).__name__))


def _noise_scale(model_sampling):
    """The model's noise multiplier for SDE samplers (ComfyUI 0.33 reads `noise_scale`; absent means 1)."""
    return getattr(model_sampling, "noise_scale", 1.0)


def _brownian(cpu):
    """A BrownianTreeNoiseSampler over the branch's whole schedule, seeded with its seed, as the SDE
    samplers build one (sigmas as the run gave them, before any first-sigma offset)."""
    def build(branch, sigmas):
        positive = sigmas[sigmas > 0]
        return k_sampling.BrownianTreeNoiseSampler(branch.x, positive.min(), sigmas.max(),
                                                   seed=branch.extra_args.get("seed"), cpu=cpu)
    return build


def _gaussian(branch, sigmas):
    return k_sampling.default_noise_sampler(branch.x, seed=branch.extra_args.get("seed"))


class _Exact:
    """One exact sampler: which options it takes (any other option sends the SAMPLER down the slices
    path rather than being ignored), how its noise is drawn and how its step is built."""

    def __init__(self, build, options=(), noise=None, offsets_first_sigma=False, writes_last_sigma=False):
        self.build = build
        self.options = frozenset(options) | ({"noise_sampler"} if noise else frozenset())
        self.noise = noise
        self.offsets_first_sigma = offsets_first_sigma
        self.writes_last_sigma = writes_last_sigma


def _sde(step_class, **fixed):
    def build(options, ms, noise_sampler, sigmas):
        return step_class(noise_sampler, eta=options.get("eta", 1.0),
                          s_noise=options.get("s_noise", 1.0) * _noise_scale(ms),
                          rectified_flow=isinstance(ms, comfy.model_sampling.CONST),
                          **{**fixed, **{k: options[k] for k in fixed if k in options}})
    return build


def _sde_pair(name, step_class, options, **fixed):
    """An SDE sampler and its _gpu twin: the same step on a Brownian tree kept on the CPU or the device."""
    return {variant: _Exact(_sde(step_class, **fixed), options=options, noise=_brownian(cpu=cpu),
                            offsets_first_sigma=True)
            for variant, cpu in ((name, True), (name + "_gpu", False))}


def _ancestral(eps_class, flow_class):
    """ComfyUI switches to the rectified-flow formula on CONST model samplings (only that one takes the
    model's noise scale)."""
    def build(options, ms, noise_sampler, sigmas):
        eta, s_noise = options.get("eta", 1.0), options.get("s_noise", 1.0)
        if isinstance(ms, comfy.model_sampling.CONST):
            return flow_class(noise_sampler, eta=eta, s_noise=s_noise * _noise_scale(ms))
        return eps_class(noise_sampler, eta=eta, s_noise=s_noise)
    return build


def _er_sde(options, ms, noise_sampler, sigmas):
    """ER-SDE reads e^{-lambda} of the whole (first-sigma offset) schedule, as one vector like ComfyUI."""
    offset = k_sampling.offset_first_sigma_for_snr(sigmas, ms)
    er_lambdas = k_sampling.sigma_to_half_log_snr(offset, ms).neg().exp()
    return amdm_core.ERSDEStep(noise_sampler, er_lambdas, s_noise=options.get("s_noise", 1.0) * _noise_scale(ms),
                               max_stage=options.get("max_stage", 3))


def _res_multistep(eta):
    def build(options, ms, noise_sampler, sigmas):
        return amdm_core.ResMultistepStep(noise_sampler, eta=options.get("eta", eta),
                                          s_noise=options.get("s_noise", 1.0) * _noise_scale(ms))
    return build


def _sa_solver(pece):
    """SA-Solver's lambdas over the first-sigma offset schedule (one vector) and its default tau: stochastic
    between 20 % and 80 % of the model's sigma range, as ComfyUI builds them."""
    def build(options, ms, noise_sampler, sigmas):
        offset = k_sampling.offset_first_sigma_for_snr(sigmas, ms)
        tau = options.get("tau_func") or k_sa_solver.get_tau_interval_func(ms.percent_to_sigma(0.2),
                                                                          ms.percent_to_sigma(0.8), eta=1.0)
        return amdm_core.SASolverStep(
            noise_sampler, offset, k_sampling.sigma_to_half_log_snr(offset, model_sampling=ms), tau,
            k_sa_solver.compute_stochastic_adams_b_coeffs, s_noise=options.get("s_noise", 1.0) * _noise_scale(ms),
            predictor_order=options.get("predictor_order", 3), corrector_order=options.get("corrector_order", 4),
            pece=pece or options.get("use_pece", False), simple_order_2=options.get("simple_order_2", False))
    return build


_SA_SOLVER_OPTIONS = {"tau_func", "s_noise", "predictor_order", "corrector_order", "simple_order_2"}
_CHURN_OPTIONS = {"s_churn", "s_tmin", "s_tmax", "s_noise"}  # exact with s_churn 0 only (_INEXACT_WHEN)

# Keyed by the sampler function's name in comfy.k_diffusion.sampling or comfy.extra_samplers.uni_pc ("ddim" is
# sample_euler).
EXACT = {
    "sample_euler": _Exact(lambda o, ms, ns, sigmas: amdm_core.EulerStep(), options=_CHURN_OPTIONS),
    "sample_euler_ancestral": _Exact(_ancestral(amdm_core.AncestralStep, amdm_core.AncestralRFStep),
                                     options={"eta", "s_noise"}, noise=_gaussian),
    "sample_dpm_2": _Exact(lambda o, ms, ns, sigmas: amdm_core.DPM2Step(), options=_CHURN_OPTIONS),
    "sample_dpm_2_ancestral": _Exact(_ancestral(amdm_core.DPM2AncestralStep, amdm_core.DPM2AncestralRFStep),
                                     options={"eta", "s_noise"}, noise=_gaussian),
    "sample_dpmpp_2s_ancestral": _Exact(_ancestral(amdm_core.DPMPP2SAncestralStep,
                                                   amdm_core.DPMPP2SAncestralRFStep),
                                        options={"eta", "s_noise"}, noise=_gaussian),
    "sample_ddpm": _Exact(lambda o, ms, ns, sigmas: amdm_core.DDPMStep(ns), noise=_gaussian),
    "sample_ipndm": _Exact(lambda o, ms, ns, sigmas: amdm_core.IPNDMStep(max_order=o.get("max_order", 4)),
                           options={"max_order"}),
    "sample_ipndm_v": _Exact(lambda o, ms, ns, sigmas: amdm_core.IPNDMVStep(max_order=o.get("max_order", 4)),
                             options={"max_order"}),
    "sample_deis": _Exact(lambda o, ms, ns, sigmas: amdm_core.DEISStep(
                              k_deis.get_deis_coeff_list(sigmas, o.get("max_order", 3),
                                                         deis_mode=o.get("deis_mode", "tab")),
                              max_order=o.get("max_order", 3)),
                          options={"max_order", "deis_mode"}),
    "sample_gradient_estimation": _Exact(lambda o, ms, ns, sigmas: amdm_core.GradientEstimationStep(
                                             ge_gamma=o.get("ge_gamma", 2.0)), options={"ge_gamma"}),
    "sample_er_sde": _Exact(_er_sde, options={"s_noise", "max_stage"}, noise=_gaussian, offsets_first_sigma=True),
    "sample_heun": _Exact(lambda o, ms, ns, sigmas: amdm_core.HeunStep(), options=_CHURN_OPTIONS),
    "sample_lms": _Exact(lambda o, ms, ns, sigmas: amdm_core.LMSStep(order=o.get("order", 4),
                                                                     coefficient=k_sampling.linear_multistep_coeff),
                         options={"order"}),
    "sample_dpmpp_2m": _Exact(lambda o, ms, ns, sigmas: amdm_core.DPMPP2MStep()),
    **_sde_pair("sample_dpmpp_sde", amdm_core.DPMPPSDEStep, {"eta", "s_noise", "r"}, r=1 / 2),
    **_sde_pair("sample_dpmpp_2m_sde", amdm_core.DPMPP2MSDEStep, {"eta", "s_noise", "solver_type"},
                solver_type="midpoint"),
    **_sde_pair("sample_dpmpp_2m_sde_heun", amdm_core.DPMPP2MSDEStep, {"eta", "s_noise", "solver_type"},
                solver_type="heun"),
    **_sde_pair("sample_dpmpp_3m_sde", amdm_core.DPMPP3MSDEStep, {"eta", "s_noise"}),
    "sample_lcm": _Exact(lambda o, ms, ns, sigmas: amdm_core.LCMStep(ns, ms.noise_scaling), noise=_gaussian),
    "sample_res_multistep": _Exact(_res_multistep(0.0), options={"s_noise"}),
    "sample_res_multistep_ancestral": _Exact(_res_multistep(1.0), options={"eta", "s_noise"}, noise=_gaussian),
    # ComfyUI's uni_pc writes 0.001 into the run's last sigma, where KSAMPLER then un-scales the latent.
    "sample_unipc": _Exact(lambda o, ms, ns, sigmas: amdm_core.UniPCStep(sigmas, variant=o.get("variant", "bh1")),
                           options={"variant"}, writes_last_sigma=True),
    "sample_unipc_bh2": _Exact(lambda o, ms, ns, sigmas: amdm_core.UniPCStep(sigmas, variant="bh2"),
                               writes_last_sigma=True),
    "sample_sa_solver": _Exact(_sa_solver(pece=False), options=_SA_SOLVER_OPTIONS | {"use_pece"}, noise=_gaussian,
                               offsets_first_sigma=True),
    "sample_sa_solver_pece": _Exact(_sa_solver(pece=True), options=_SA_SOLVER_OPTIONS, noise=_gaussian,
                                    offsets_first_sigma=True),
}
# Options with which a sampler is no longer the one reproduced (churn adds noise from the global generator).
_INEXACT_WHEN = {name: lambda o: float(o.get("s_churn", 0.0)) > 0.0
                 for name in ("sample_euler", "sample_heun", "sample_dpm_2")}


class _SliceProxy:
    """The branch denoiser as a sampler function sees it (attributes such as inner_model pass through);
    keeps the slice's first x0 estimate."""

    def __init__(self, denoise, denoiser):
        self._denoise = denoise
        self._denoiser = denoiser
        self.first = None

    def __getattr__(self, name):
        return getattr(self._denoiser, name)

    def __call__(self, x, sigma, **extra_args):
        denoised = self._denoise(x, sigma)
        if self.first is None:
            self.first = denoised
        return denoised


class SliceStep:
    """ComfyUI's own sampler function over the one-step slice [sigma, sigma_next], as an amdm_core step:
    the function makes every model call itself (so samplers that hook their own calls, as the cfg_pp ones
    do, work) and the slice's first x0 estimate is the step's D."""

    def __init__(self, function, options, branch):
        self.function = function
        self.options = options
        self.branch = branch

    def __call__(self, x, denoise, sigma, sigma_next):
        proxy = _SliceProxy(denoise, self.branch.denoiser)
        x_next = self.function(proxy, x, torch.stack([sigma, sigma_next]), extra_args=self.branch.extra_args,
                               callback=None, disable=True, **self.options)
        return x_next, proxy.first


class SamplerPlan:
    """The user's SAMPLER resolved for one run."""

    def __init__(self, sampler, function, options, exact):
        self.sampler = sampler
        self.function = function
        self.options = options
        self.exact = exact
        self.name = sampler_display_name(sampler)

    def check_steppable(self):
        """Raise before any model call where the sampler cannot step branches in lockstep."""
        if self.name in REFUSED:
            raise AMDMInputError(f"sampler {self.name!r} {REFUSED[self.name]}")

    def run_sigmas(self, sigmas, model_sampling):
        """The sigmas the steps see: the SDE samplers move a rectified-flow first sigma of 1 off the
        singular log-SNR, as their ComfyUI functions do."""
        if self.exact is not None and self.exact.offsets_first_sigma:
            return k_sampling.offset_first_sigma_for_snr(sigmas, model_sampling)
        return sigmas

    def make_step(self, index, branch, sigmas, model_sampling):
        """Branch `index`'s step object (the main branch keeps a noise sampler the SAMPLER carries)."""
        options = dict(self.options)
        own_noise = options.pop("noise_sampler", None) if index == 0 else None
        options.pop("noise_sampler", None)
        if self.exact is None:
            if "noise_sampler" in inspect.signature(self.function).parameters:
                options["noise_sampler"] = own_noise or _gaussian(branch, sigmas)
            return SliceStep(self.function, options, branch)
        noise_sampler = own_noise or (self.exact.noise(branch, sigmas) if self.exact.noise else None)
        return self.exact.build(options, model_sampling, noise_sampler, sigmas)

    def finish_sigmas(self, sigmas):
        """After the run: the sigmas as the user's sampler leaves them (uni_pc writes 0.001 over a last 0)."""
        if self.exact is not None and self.exact.writes_last_sigma and sigmas[-1] == 0:
            sigmas[-1] = 0.001

    def finish_main(self, branch, x, sigmas, window, callback, branch_denoise):
        """Slices path: the main branch after the window, by the user's sampler over sigmas[window + 1:]."""
        def shifted(step):
            if callback is not None:
                callback({**step, "i": step["i"] + window + 1})

        proxy = _SliceProxy(branch_denoise, branch.denoiser)
        # A copy: some samplers (uni_pc) write into the sigmas they are given.
        return self.function(proxy, x, sigmas[window + 1:].clone(), extra_args=branch.extra_args, callback=shifted,
                             disable=True, **self.options)


def plan_sampler(sampler):
    """The plan for `sampler`, or an AMDMInputError naming it, before any model call."""
    if not isinstance(sampler, comfy.samplers.KSAMPLER):
        raise AMDMInputError(
            f"the SAMPLER {sampler_display_name(sampler)!r} is not a k-diffusion sampler (KSAMPLER); AMDM steps "
            "every branch one step at a time and needs one")
    function = sampler.sampler_function
    options = dict(sampler.extra_options or {})
    name = getattr(function, "__name__", "")
    own = any(getattr(module, name, None) is function for module in (k_sampling, k_uni_pc))  # not a look-alike
    key = name if own else None
    exact = EXACT.get(key)
    if exact is not None and (set(options) - exact.options or _INEXACT_WHEN.get(key, lambda o: False)(options)):
        exact = None
    return SamplerPlan(sampler, function, options, exact)
