"""AMDMGuider: several branches sampled in lockstep inside ComfyUI's own sampling path.

The main branch runs the stock `CFGGuider.sample` of its own guider (so OUTER_SAMPLE / SAMPLER_SAMPLE
wrappers, inpaint masks, denoise handling, `process_latent_in/out` and the "ddim" re-seed all stay stock)
with a `LockstepSampler` in place of the user's SAMPLER. The aux patchers are attached to a clone of the
main patcher as additional models, so ONE `load_models_gpu` loads every branch. Inside the sampler,
amdm_core.run_lockstep steps every branch with step objects that reproduce the user's sampler exactly
(per-branch noise for ancestral steps, per-branch history for DPM++ 2M), aggregates in the window and
then continues the main branch alone.
"""
import copy

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy.k_diffusion import sampling as k_sampling

from ..amdm_core import AncestralStep, DPMPP2MStep, EulerStep, run_lockstep
from .branches import PatcherSwitch, PreparedBranch, cond_models
from .checks import (AMDMInputError, branch_name, check_compatible, check_guider, check_no_hooks, check_run)

SUPPORTED_SAMPLERS = ("ddim", "euler", "euler_ancestral", "dpmpp_2m")
ADDITIONAL_MODELS_KEY = "amdm_branches"


def sampler_kind(sampler):
    """Which amdm_core step reproduces this SAMPLER one step at a time: "euler" (also ComfyUI's "ddim"),
    "euler_ancestral" or "dpmpp_2m"; anything else is refused before any model call."""
    function = getattr(sampler, "sampler_function", None)
    options = getattr(sampler, "extra_options", {}) or {}
    if function is k_sampling.sample_euler:
        if float(options.get("s_churn", 0.0)) > 0.0:
            raise AMDMInputError("euler with s_churn > 0 adds unseeded noise and is not supported by AMDM; "
                                 "use s_churn 0 or euler_ancestral")
        return "euler"
    if function is k_sampling.sample_euler_ancestral:
        return "euler_ancestral"
    if function is k_sampling.sample_dpmpp_2m:
        return "dpmpp_2m"
    name = getattr(function, "__name__", type(sampler).__name__).replace("sample_", "")
    raise AMDMInputError(
        f"sampler {name!r} cannot be stepped branch by branch by AMDM (multistep history / extra model calls "
        f"per step); supported samplers: {', '.join(SUPPORTED_SAMPLERS)}")


class LockstepSampler(comfy.samplers.KSAMPLER):
    """A KSAMPLER whose sampler function runs amdm_core.run_lockstep over the main branch (the model the
    stock path hands it) and the aux branches (prepared here)."""

    def __init__(self, user_sampler, kind, aux_guiders, aux_noise, aux_seeds, settings):
        super().__init__(self._lockstep, extra_options={}, inpaint_options=user_sampler.inpaint_options)
        self.kind = kind
        self.step_options = dict(user_sampler.extra_options or {})
        self.aux_guiders = aux_guiders
        self.aux_noise = aux_noise
        self.aux_seeds = aux_seeds
        self.settings = settings
        self.aux_denoised = []  # each aux branch's last x0 estimate, after a run
        self._run = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self._run = {"main_guider": model_wrap, "latent_image": latent_image, "denoise_mask": denoise_mask,
                     "max_denoise": self.max_denoise(model_wrap, sigmas)}
        try:
            return super().sample(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                                  disable_pbar)
        finally:
            self._run = None

    def _make_step(self, branch, x, seed):
        if self.kind == "euler":
            return EulerStep()
        if self.kind == "dpmpp_2m":
            return DPMPP2MStep()
        # Exactly what sample_euler_ancestral builds: the SAMPLER's own noise sampler, else one seeded from
        # the run's seed; aux branches get their own stream (never the main branch's object).
        noise_sampler = self.step_options.get("noise_sampler") if branch == 0 else None
        noise_sampler = noise_sampler or k_sampling.default_noise_sampler(x, seed=seed)
        return AncestralStep(noise_sampler, eta=self.step_options.get("eta", 1.0),
                             s_noise=self.step_options.get("s_noise", 1.0))

    @torch.no_grad()
    def _lockstep(self, model, x, sigmas, extra_args=None, callback=None, disable=None):
        run = self._run
        main_guider = run["main_guider"]
        main_patcher = main_guider.model_patcher
        latent_image, denoise_mask = run["latent_image"], run["denoise_mask"]
        model_sampling = main_guider.inner_model.model_sampling
        seed = extra_args.get("seed")
        branches = [PreparedBranch(g) for g in self.aux_guiders]
        switch = PatcherSwitch([main_patcher] + [b.patcher for b in branches])
        last_aux_denoised = {}
        try:
            aux_x = []
            for branch, noise, branch_seed in zip(branches, self.aux_noise, self.aux_seeds):
                noise = noise.to(x.device)
                branch.enter(noise, latent_image, denoise_mask, sigmas, branch_seed)
                aux_x.append(model_sampling.noise_scaling(sigmas[0], noise, latent_image, run["max_denoise"]))

            def main_denoise(x_in, sigma):
                switch.activate(main_patcher)
                return model(x_in, sigma, **extra_args)

            def aux_denoiser(index, branch):
                def denoise(x_in, sigma):
                    switch.activate(branch.patcher)
                    last_aux_denoised[index] = branch(x_in, sigma)
                    return last_aux_denoised[index]
                return denoise

            denoisers = [main_denoise] + [aux_denoiser(k, b) for k, b in enumerate(branches, start=1)]
            initial = [x] + aux_x
            seeds = [seed] + list(self.aux_seeds)

            def on_step(i, denoised, x_now):
                if callback is not None:
                    callback({"i": i, "denoised": denoised, "x": x_now})

            result = run_lockstep(
                denoisers, initial, sigmas,
                aggregation_steps=self.settings.aggregation_steps, weights=list(self.settings.weights),
                aggregation=self.settings.aggregation, deviation_steps=self.settings.deviation_step,
                mean_mode=self.settings.mean_mode, sigma_table=model_sampling.sigmas,
                make_step=lambda k: self._make_step(k, initial[k], seeds[k]), callback=on_step,
                check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted)
            self.aux_denoised = [last_aux_denoised[k] for k in sorted(last_aux_denoised)]
            return result.x
        finally:
            try:
                for branch in reversed(branches):
                    branch.exit()
            finally:
                switch.activate(main_patcher)  # the main branch's patches live again, as after its own run


class AMDMGuider(comfy.samplers.CFGGuider):
    """A GUIDER for SamplerCustomAdvanced: a main GUIDER plus aux GUIDERs (CFGGuider, DualCFGGuider,
    PerpNegGuider ...) aggregated by AMDM. Validated on construction (before any step)."""

    is_amdm_guider = True

    def __init__(self, main_guider, aux_guiders, settings):
        guiders = [main_guider, *aux_guiders]
        settings.validate(len(guiders))
        for index, guider in enumerate(guiders):
            check_guider(guider, index)
        check_compatible([g.model_patcher for g in guiders])
        check_no_hooks(guiders)
        super().__init__(main_guider.model_patcher)
        self.main_guider = main_guider
        self.aux_guiders = list(aux_guiders)
        self.settings = settings
        self.noise_batch_index = None  # set by the Aggregate Sampler node from the latent's batch_index
        self.last_aux_denoised = []

    def set_conds(self, *args, **kwargs):
        raise TypeError("an AMDM Guider takes its conditioning from its branch guiders")

    def predict_noise(self, *args, **kwargs):
        raise TypeError("an AMDM Guider is not a single denoiser; run it with SamplerCustomAdvanced")

    def _aux_noise(self, noise, latent_image, seed):
        """Noise per aux branch: 'independent' draws seed + k (a private generator, the same numbers as
        KSampler with that seed); 'shared' reuses the main noise. All-zero main noise (add_noise off /
        DisableNoise) stays zero for every branch."""
        count = len(self.aux_guiders)
        if not torch.any(noise):
            return [torch.zeros_like(noise) for _ in range(count)], [seed] * count
        if self.settings.noise == "shared":
            return [noise.clone() for _ in range(count)], [seed] * count
        if seed is None:
            raise AMDMInputError("noise 'independent' derives each aux branch's noise from the seed, but the NOISE "
                                 "input has no seed; use a RandomNoise node or noise 'shared'")
        seeds = [(int(seed) + k) % 2**64 for k in range(1, count + 1)]
        return [comfy.sample.prepare_noise_inner(latent_image, torch.Generator().manual_seed(s), self.noise_batch_index)
                for s in seeds], seeds

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        if sigmas.shape[-1] == 0:
            return latent_image
        check_run(sigmas, latent_image, self.model_patcher.get_model_object("latent_format"),
                  self.settings.aggregation_steps)
        kind = sampler_kind(sampler)
        aux_noise, aux_seeds = self._aux_noise(noise, latent_image, seed)

        main = copy.copy(self.main_guider)
        main.model_patcher = self.main_guider.model_patcher.clone()
        attached = []
        for guider in self.aux_guiders:
            attached += [guider.model_patcher] + cond_models(guider)
        main.model_patcher.set_additional_models(ADDITIONAL_MODELS_KEY, attached)
        lockstep = LockstepSampler(sampler, kind, self.aux_guiders, aux_noise, aux_seeds, self.settings)
        output = main.sample(noise, latent_image, lockstep, sigmas, denoise_mask, callback, disable_pbar, seed)
        self.last_aux_denoised = lockstep.aux_denoised
        return output


def aggregate_sample(branches, latent, seed, steps, sampler_name, scheduler, denoise, settings):
    """The AMDM Aggregate Sampler: KSampler's own steps (noise, sigmas, preview callback) with an AMDMGuider.

    branches: [(model, positive, negative, cfg), ...], main first. Returns (main LATENT, aux x0 LATENT).
    """
    if sampler_name not in SUPPORTED_SAMPLERS:
        raise AMDMInputError(f"sampler {sampler_name!r} is not supported by AMDM; choose one of {SUPPORTED_SAMPLERS}")
    guiders = []
    for index, (model, positive, negative, cfg) in enumerate(branches):
        if model is None or positive is None or negative is None:
            raise AMDMInputError(f"{branch_name(index)} needs a model, a positive and a negative conditioning")
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        guiders.append(guider)
    amdm = AMDMGuider(guiders[0], guiders[1:], settings)

    model = branches[0][0]
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    batch_index = latent.get("batch_index")
    amdm.noise_batch_index = batch_index
    noise = comfy.sample.prepare_noise(latent_image, seed, batch_index)
    sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                     scheduler=scheduler, denoise=denoise, model_options=model.model_options).sigmas
    callback = latent_preview.prepare_callback(model, steps)
    disable_pbar = not comfy.utils.PROGRESS_BAR_ENABLED
    samples = amdm.sample(noise, latent_image, comfy.samplers.sampler_object(sampler_name), sigmas,
                          denoise_mask=latent.get("noise_mask"), callback=callback, disable_pbar=disable_pbar,
                          seed=seed)
    out = latent.copy()
    out["samples"] = samples.to(comfy.model_management.intermediate_device())
    aux = amdm.last_aux_denoised
    if not aux:  # denoise 0: nothing ran
        return out, out
    aux_out = {"samples": model.model.process_latent_out(torch.cat(aux).float()).to(
        comfy.model_management.intermediate_device())}
    return out, aux_out
