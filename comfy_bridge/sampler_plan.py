"""Which amdm_core step reproduces the user's SAMPLER branch by branch (docs/nodes.md, "Samplers").

A SAMPLER is recognised by its k-diffusion sampler function; its name as the user chose it comes from
ComfyUI's own sampler list, so a refusal names `uni_pc`, not `sample_unipc`.
"""
import functools

import comfy.samplers
from comfy.k_diffusion import sampling as k_sampling

from ..amdm_core import AncestralStep, DPMPP2MStep, EulerStep
from .checks import AMDMInputError

EXACT_SAMPLERS = ("ddim", "euler", "euler_ancestral", "dpmpp_2m")


@functools.lru_cache(maxsize=1)
def _names_by_function():
    """{sampler function's qualified name: the KSampler name a user picks}, from ComfyUI's own list."""
    names = {}
    for name in comfy.samplers.KSampler.SAMPLERS:
        try:
            function = comfy.samplers.sampler_object(name).sampler_function
        except Exception:  # a sampler whose optional dependency is missing: it cannot be the user's either
            continue
        names.setdefault(_function_key(function), name)
    return names


def _function_key(function):
    return getattr(function, "__module__", ""), getattr(function, "__qualname__", repr(function))


def sampler_display_name(sampler):
    """The name a user knows this SAMPLER by (KSampler's list), else its function's or class's name."""
    function = getattr(sampler, "sampler_function", None)
    if function is None:
        return type(sampler).__name__
    return _names_by_function().get(_function_key(function), getattr(function, "__name__", type(sampler).__name__))


class SamplerPlan:
    """How each branch is stepped: make_step(k, branch) -> the amdm_core step object of branch k."""

    def __init__(self, kind, options):
        self.kind = kind
        self.options = options

    def make_step(self, index, branch):
        if self.kind == "euler":
            return EulerStep()
        if self.kind == "dpmpp_2m":
            return DPMPP2MStep()
        # Exactly what sample_euler_ancestral builds: the SAMPLER's own noise sampler, else one seeded from
        # the branch's seed; aux branches get their own stream (never the main branch's object).
        noise_sampler = self.options.get("noise_sampler") if index == 0 else None
        noise_sampler = noise_sampler or k_sampling.default_noise_sampler(branch.x, seed=branch.extra_args.get("seed"))
        return AncestralStep(noise_sampler, eta=self.options.get("eta", 1.0), s_noise=self.options.get("s_noise", 1.0))


def plan_sampler(sampler, settings):
    """The plan for `sampler`, or an AMDMInputError naming it, before any model call."""
    if not isinstance(sampler, comfy.samplers.KSAMPLER):
        raise AMDMInputError(
            f"the SAMPLER {sampler_display_name(sampler)!r} is not a k-diffusion sampler (KSAMPLER); AMDM steps "
            "every branch one step at a time and needs one")
    function = sampler.sampler_function
    options = dict(sampler.extra_options or {})
    if function is k_sampling.sample_euler:
        if float(options.get("s_churn", 0.0)) > 0.0:
            raise AMDMInputError("euler with s_churn > 0 adds unseeded noise and is not supported by AMDM; "
                                 "use s_churn 0 or euler_ancestral")
        return SamplerPlan("euler", options)
    if function is k_sampling.sample_euler_ancestral:
        return SamplerPlan("euler_ancestral", options)
    if function is k_sampling.sample_dpmpp_2m:
        return SamplerPlan("dpmpp_2m", options)
    raise AMDMInputError(
        f"sampler {sampler_display_name(sampler)!r} cannot be stepped branch by branch by AMDM yet; supported "
        f"samplers: {', '.join(EXACT_SAMPLERS)}")
