"""UniPC and SA-Solver as the pack's own sampler functions, used in place of ComfyUI's ONLY where a dry run on
the running ComfyUI proves them equal (docs/algorithm.md, "Predictor-correctors").

These samplers evaluate the model at a predicted latent and rebuild their state from the previous corrected
one, so writing the merged latent into the predicted one would reach them only through the model's answer.
amdm_core's steps carry the merge's displacement through their corrector instead. Before a run uses one, both
functions run the run's own schedule on the dry run's synthetic model (comfy_bridge.driving.dry_denoiser)
and their results must be equal bit for bit; where they are not (a ComfyUI whose arithmetic changed), the run
drives ComfyUI's own function like any other sampler and one log line says so (once per sampler and
process). The check runs for every run: two dry runs cost no model call.
"""
import copy
import logging

import torch
from comfy.k_diffusion import sampling as k_sampling

from ..amdm_core import SASolverStep, UniPCStep

try:  # where a ComfyUI lacks them, its samplers are driven like any other
    from comfy.extra_samplers import uni_pc as _uni_pc
    from comfy.k_diffusion import sa_solver as _sa_solver
except ImportError:
    _uni_pc = _sa_solver = None

log = logging.getLogger(__name__)


def _run_steps(step, model, x, sigmas, extra_args, callback, disable):
    """A k-diffusion sampler loop around an amdm_core step: step i is handed the latent the model sees, makes
    its calls through the model and reports its first x0 estimate."""
    for i in k_sampling.trange(len(sigmas) - 1, disable=disable):
        entering = x
        x, denoised = step(x, lambda latent, sigma: model(latent, sigma, **extra_args), sigmas[i], sigmas[i + 1])
        if callback is not None:
            callback({"x": entering, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
    return x


def sample_unipc_steps(model, x, sigmas, extra_args=None, callback=None, disable=None, variant="bh1"):
    """ComfyUI's sample_unipc as UniPCStep; like ComfyUI's it writes 0.001 over a last sigma of 0 (where
    KSAMPLER then un-scales the result)."""
    step = UniPCStep(sigmas, variant=variant)
    if sigmas[-1] == 0:
        sigmas[-1] = 0.001
    return _run_steps(step, model, x, sigmas, extra_args or {}, callback, disable)


def sample_unipc_bh2_steps(model, x, sigmas, extra_args=None, callback=None, disable=None):
    return sample_unipc_steps(model, x, sigmas, extra_args, callback, disable, variant="bh2")


def sample_sa_solver_steps(model, x, sigmas, extra_args=None, callback=None, disable=False, tau_func=None,
                           s_noise=1.0, noise_sampler=None, predictor_order=3, corrector_order=4, use_pece=False,
                           simple_order_2=False):
    """ComfyUI's sample_sa_solver as SASolverStep, set up as ComfyUI's function sets itself up: the branch's
    seeded noise, s_noise times the model's noise scale, the first-sigma offset schedule and its half-log-SNR,
    stochastic between 20 % and 80 % of the model's sigma range unless tau_func is given."""
    if len(sigmas) <= 1:
        return x
    extra_args = extra_args or {}
    if noise_sampler is None:
        noise_sampler = k_sampling.default_noise_sampler(x, seed=extra_args.get("seed"))
    model_sampling = model.inner_model.model_patcher.get_model_object("model_sampling")
    schedule = k_sampling.offset_first_sigma_for_snr(sigmas, model_sampling)
    if tau_func is None:
        tau_func = _sa_solver.get_tau_interval_func(model_sampling.percent_to_sigma(0.2),
                                                    model_sampling.percent_to_sigma(0.8), eta=1.0)
    lambdas = k_sampling.sigma_to_half_log_snr(schedule, model_sampling=model_sampling)
    step = SASolverStep(noise_sampler, schedule, lambdas, tau_func, _sa_solver.compute_stochastic_adams_b_coeffs,
                        s_noise=s_noise * getattr(model_sampling, "noise_scale", 1.0), predictor_order=predictor_order,
                        corrector_order=corrector_order, pece=use_pece, simple_order_2=simple_order_2)
    return _run_steps(step, model, x, schedule, extra_args, callback, disable)


def sample_sa_solver_pece_steps(model, x, sigmas, extra_args=None, callback=None, disable=False, **options):
    return sample_sa_solver_steps(model, x, sigmas, extra_args, callback, disable, use_pece=True, **options)


def _own_functions():
    """{ComfyUI's function: the pack's own}, for the functions this ComfyUI has."""
    own = {}
    if _uni_pc is not None:
        own[getattr(_uni_pc, "sample_unipc", None)] = sample_unipc_steps
        own[getattr(_uni_pc, "sample_unipc_bh2", None)] = sample_unipc_bh2_steps
    if _sa_solver is not None:
        own[getattr(k_sampling, "sample_sa_solver", None)] = sample_sa_solver_steps
        own[getattr(k_sampling, "sample_sa_solver_pece", None)] = sample_sa_solver_pece_steps
    own.pop(None, None)
    return own


_OWN = _own_functions()
_reported = set()  # samplers whose difference was logged


def own_predictor_corrector(sampler, dry_result, name):
    """The pack's own copy of `sampler` where it is one of ComfyUI's predictor-correctors and the two are equal
    on this run's dry run (dry_result(sampler) -> the dry run's result), else None."""
    own_function = _OWN.get(getattr(sampler, "sampler_function", None))
    if own_function is None:
        return None
    own = copy.copy(sampler)
    own.sampler_function = own_function
    try:
        equal = torch.equal(dry_result(sampler), dry_result(own))
    except TypeError:  # options the pack's function does not take
        equal = False
    if not equal and name not in _reported:
        _reported.add(name)
        log.warning("comfyui-amdm: sampler %r of this ComfyUI differs from the pack's predictor-corrector step; its "
                    "branches are driven by ComfyUI's own function (the merged latent reaches it through the model's "
                    "answer only)", name)
    return own if equal else None
