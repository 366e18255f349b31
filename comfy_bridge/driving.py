"""A branch's sampler, driven: the user's own SAMPLER with its model calls routed through the lockstep's hooks
(amdm_core.lockstep), and the synthetic model of the dry run that maps its steps.

A KSAMPLER keeps its own sample() (noise scaling, inpaint noise, the final un-scaling) and its own sampler
function; only the model that function is handed is wrapped, so the latent the hooks see is the function's
own (not the copy KSamplerX0Inpaint blends for an inpaint mask). Any other SAMPLER is handed the wrapped
guider as its model. Checked on ComfyUI 0.3.75 and 0.33.0: `KSAMPLER.sample` calls
`sampler_function(model_k, noise, sigmas, extra_args=, callback=, disable=, **extra_options)` and a guider's
`inner_sample` calls `sampler.sample(guider, sigmas, extra_args, callback, noise, latent_image,
denoise_mask, disable_pbar)` (comfy/samplers.py).
"""
import copy
import functools

import comfy.samplers
import torch


def _names_by_function():
    """{sampler's key: the KSampler name a user picks}, from ComfyUI's own list as it is now (a sampler
    registered at run time included)."""
    names = {}
    for name in comfy.samplers.KSampler.SAMPLERS:
        names.setdefault(_sampler_key(comfy.samplers.sampler_object(name)), name)
    return names


def _sampler_key(sampler):
    """A KSAMPLER's function by qualified name, and whether it re-seeds its inpaint noise ("ddim" is euler
    that does)."""
    function = sampler.sampler_function
    return (getattr(function, "__module__", ""), getattr(function, "__qualname__", repr(function)),
            bool((sampler.inpaint_options or {}).get("random", False)))


def sampler_display_name(sampler):
    """The name a user knows this SAMPLER by (KSampler's list: `uni_pc`, not `sample_unipc`), else its
    function's or class's name."""
    function = getattr(sampler, "sampler_function", None)
    if function is None:
        return type(sampler).__name__
    return _names_by_function().get(_sampler_key(sampler), getattr(function, "__name__", type(sampler).__name__))


class ModelCall:
    """One model call as the sampler made it; calling it with (x, sigma) evaluates the model."""
    __slots__ = ("model", "kwargs")

    def __init__(self, model, kwargs):
        self.model = model
        self.kwargs = kwargs

    def __call__(self, x, sigma):
        return self.model(x, sigma, **self.kwargs)


class _HookedModel:
    """The model a sampler calls, routed through the hooks; every other attribute is the model's own."""

    def __init__(self, model, hooks):
        self._model = model
        self._hooks = hooks

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, x, sigma, **kwargs):
        return self._hooks.model(x, sigma, ModelCall(self._model, kwargs))


class _OnHookedModel(comfy.samplers.Sampler):
    """A SAMPLER that is not a KSAMPLER, run on the hooked guider."""

    def __init__(self, sampler, hooks):
        self.sampler = sampler
        self.hooks = hooks

    def max_denoise(self, model_wrap, sigmas):
        return self.sampler.max_denoise(model_wrap, sigmas)

    def sample(self, model_wrap, *args, **kwargs):
        return self.hooks.returned(self.sampler.sample(_HookedModel(model_wrap, self.hooks), *args, **kwargs))


def driven(sampler, hooks):
    """`sampler` with its model calls routed through `hooks` (.model, .returned)."""
    if not isinstance(sampler, comfy.samplers.KSAMPLER):
        return _OnHookedModel(sampler, hooks)
    function = sampler.sampler_function

    @functools.wraps(function)
    def hooked(model, x, sigmas, *args, **kwargs):
        return hooks.returned(function(_HookedModel(model, hooks), x, sigmas, *args, **kwargs))

    hooked_sampler = copy.copy(sampler)
    hooked_sampler.sampler_function = hooked
    return hooked_sampler


def without_own_noise_sampler(sampler):
    """An aux branch's copy of the SAMPLER: a noise sampler object in its options belongs to the main branch
    (sharing it would interleave the branches' draws); without one each branch's function builds its own
    from its seed."""
    options = getattr(sampler, "extra_options", None)
    if not options or "noise_sampler" not in options:
        return sampler
    own = copy.copy(sampler)
    own.extra_options = {k: v for k, v in options.items() if k != "noise_sampler"}
    return own


def dry_denoiser(model_wrap, own_post_cfg):
    """The synthetic model of a dry run, D(x, sigma) = x / (1 + sigma^2) (the x0 estimate of unit-variance
    data), standing in for the branch's guider: like a guider it runs the post-CFG functions the sampler
    itself added to model_options (the cfg_pp samplers read the uncond estimate through one), not the
    user's own (`own_post_cfg`), which may need the real model."""
    cfg = getattr(model_wrap, "cfg", 1.0)

    def denoise(x, sigma, call):
        scale = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if scale.ndim == 1 and scale.shape[0] == x.shape[0]:
            scale = scale.reshape([-1] + [1] * (x.ndim - 1))
        denoised = x / (1 + scale**2)
        options = call.kwargs.get("model_options") or {}
        for function in options.get("sampler_post_cfg_function", []):
            if any(function is own for own in own_post_cfg):
                continue
            denoised = function({"denoised": denoised, "cond": None, "uncond": None, "cond_scale": cfg,
                                 "model": getattr(model_wrap, "inner_model", None), "uncond_denoised": denoised,
                                 "cond_denoised": denoised, "sigma": sigma, "model_options": options, "input": x})
        return denoised

    return denoise
