"""AMDMGuider: several branches sampled in lockstep, each prepared by its own guider's stock path.

The seam (docs/nodes.md, "Design"): every branch, the main one and each aux one, runs its OWN guider's
`sample()` exactly as SamplerCustomAdvanced would run it, with a `BranchCapture` in place of the user's
SAMPLER. ComfyUI's stock path prepares the branch (cond copies, hooks, model_options clone,
`prepare_model_patcher`, OUTER_SAMPLE / SAMPLER_SAMPLE wrappers, `prepare_sampling`, `pre_run`,
`process_conds`, a guider's own `outer_sample` / `inner_sample` overrides, noise scaling) and hands the
capture its denoiser; the capture records it and opens the next branch's `sample()` inside it. The
innermost capture runs amdm_core.run_lockstep over all recorded denoisers; the result unwinds through
every branch's own `finally` cleanup. No sequence of ComfyUI's sampling code is copied here.

The aux patchers are attached to a clone of the main patcher as additional models, so the main branch's
`prepare_sampling` loads every branch in ONE `load_models_gpu` call; the nested calls find them loaded.
"""
import copy

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch

from ..amdm_core import run_lockstep
from .branches import PatcherSwitch, check_switchable, cond_models
from .checks import (check_compatible, check_guider, check_mean_mode, check_no_hooks, check_run, ddpm_sigma_table,
                     noise_space)
from .sampler_plan import plan_sampler
from .settings import AMDMInputError, branch_name, check_cfg

ADDITIONAL_MODELS_KEY = "amdm_branches"


class _Branch:
    """What one branch's stock path handed its capture: the denoiser (KSamplerX0Inpaint over the branch's
    prepared guider), its start latent (noise already scaled for sigma_0) and its extra_args."""

    def __init__(self, denoiser, x, extra_args, callback):
        self.denoiser = denoiser
        self.x = x
        self.extra_args = extra_args
        self.callback = callback
        self.patcher = denoiser.inner_model.model_patcher

    def __call__(self, x, sigma):
        return self.denoiser(x, sigma, **self.extra_args)


class _LockstepRun:
    """One AMDM run: opens the branches one inside the other, then runs the loop in the innermost."""

    def __init__(self, aux_guiders, aux_noise, aux_seeds, latent_image, sigmas, denoise_mask, plan, settings):
        self.aux_guiders = aux_guiders
        self.aux_noise = aux_noise
        self.aux_seeds = aux_seeds
        self.latent_image = latent_image
        self.sigmas = sigmas
        self.denoise_mask = denoise_mask
        self.plan = plan
        self.settings = settings
        self.branches = []
        self.final = None  # every branch's latent when the run ends
        self.aux_denoised = []  # each aux branch's last x0 estimate

    def enter(self, branch):
        """Called by each branch's capture with its prepared denoiser; returns that branch's final latent."""
        self.branches.append(branch)
        index = len(self.branches)
        if index <= len(self.aux_guiders):
            # The next branch's own stock sample(), nested in this one: its preparation and cleanup are
            # ComfyUI's; its capture calls enter() again. Inpaint noise is the branch's own noise (a
            # "random" inpaint option would re-seed torch's global generator for every branch).
            guider = copy.copy(self.aux_guiders[index - 1])
            guider.sample(self.aux_noise[index - 1], self.latent_image, BranchCapture(self, {}), self.sigmas,
                          denoise_mask=self.denoise_mask, callback=None, disable_pbar=True,
                          seed=self.aux_seeds[index - 1])
        else:
            self.final = self._run()
        return self.final[index - 1]

    @torch.no_grad()
    def _run(self):
        branches = self.branches
        main = branches[0]
        sigmas = main.denoiser.sigmas
        model_sampling = main.denoiser.inner_model.inner_model.model_sampling
        switch = PatcherSwitch([b.patcher for b in branches])
        step_denoised = {}  # each branch's x0 estimate at the start of its latest step

        def denoiser(branch):
            def denoise(x, sigma):
                switch.activate(branch.patcher)
                return branch(x, sigma)
            return denoise

        def recorded(index, step):
            def run_step(x, denoise, sigma, sigma_next):
                x_next, step_denoised[index] = step(x, denoise, sigma, sigma_next)
                return x_next, step_denoised[index]
            return run_step

        def on_step(i, denoised, x_now):
            if main.callback is not None:
                main.callback({"i": i, "denoised": denoised, "x": x_now, "sigma": sigmas[i], "sigma_hat": sigmas[i]})

        plan, settings = self.plan, self.settings
        denoisers = [denoiser(b) for b in branches]
        steps = [recorded(k, plan.make_step(k, b, sigmas, model_sampling)) for k, b in enumerate(branches)]
        window = min(int(settings.aggregation_steps), sigmas.shape[-1] - 2)
        try:
            result = run_lockstep(
                denoisers, [b.x for b in branches], plan.run_sigmas(sigmas, model_sampling),
                aggregation_steps=settings.aggregation_steps, weights=list(settings.weights),
                aggregation=settings.aggregation, deviation_steps=settings.deviation_step,
                mean_mode=settings.mean_mode, sigma_table=ddpm_sigma_table(model_sampling),
                space=noise_space(model_sampling), make_step=lambda k: steps[k], callback=on_step,
                check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
                stop_after_window=plan.exact is None)
            latents = list(result.branch_latents)
            if plan.exact is None and window + 1 < sigmas.shape[-1] - 1:
                latents[0] = plan.finish_main(main, latents[0], sigmas, window, main.callback, denoisers[0])
            plan.finish_sigmas(sigmas)
        finally:
            switch.activate(main.patcher)  # the main branch's patches live again, as after its own run
            switch.close()  # drops the other branches' kept weights
        self.aux_denoised = [step_denoised[k] for k in range(1, len(branches))]
        return latents


class BranchCapture(comfy.samplers.KSAMPLER):
    """The SAMPLER one branch's own `guider.sample()` runs: KSAMPLER.sample builds the branch's denoiser
    and start latent as for any sampler, then calls this function, which hands them to the run."""

    def __init__(self, run, inpaint_options):
        super().__init__(self._enter, extra_options={}, inpaint_options=inpaint_options)
        self.run = run

    def _enter(self, model, x, sigmas, extra_args=None, callback=None, disable=None):
        return self.run.enter(_Branch(model, x, extra_args, callback))


class AMDMGuider(comfy.samplers.CFGGuider):
    """A GUIDER for SamplerCustomAdvanced: a main GUIDER plus aux GUIDERs (any CFGGuider subclass, each
    run with its own semantics) aggregated by AMDM. Validated on construction (before any step)."""

    is_amdm_guider = True

    def __init__(self, main_guider, aux_guiders, settings):
        guiders = [main_guider, *aux_guiders]
        settings.validate(len(guiders))
        for index, guider in enumerate(guiders):
            check_guider(guider, index)
        check_compatible([g.model_patcher for g in guiders])
        check_switchable([g.model_patcher for g in guiders])
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
        check_run(sigmas, latent_image, self.model_patcher.get_model_object("model_sampling"),
                  self.model_patcher.get_model_object("latent_format"), self.settings.aggregation_steps)
        plan = plan_sampler(sampler)
        check_mean_mode(self.settings.mean_mode, self.model_patcher.get_model_object("model_sampling"))
        aux_noise, aux_seeds = self._aux_noise(noise, latent_image, seed)
        if self.settings.is_no_op:
            return self._sample_main_alone(noise, latent_image, sampler, sigmas, denoise_mask, callback,
                                           disable_pbar, seed, aux_noise, aux_seeds)
        plan.check_steppable()
        main = copy.copy(self.main_guider)
        main.model_patcher = self.main_guider.model_patcher.clone()
        attached = []
        for guider in self.aux_guiders:
            attached += [guider.model_patcher] + cond_models(guider)
        main.model_patcher.set_additional_models(ADDITIONAL_MODELS_KEY, attached)
        run = _LockstepRun(self.aux_guiders, aux_noise, aux_seeds, latent_image, sigmas, denoise_mask, plan,
                           self.settings)
        output = main.sample(noise, latent_image, BranchCapture(run, sampler.inpaint_options), sigmas, denoise_mask,
                             callback, disable_pbar, seed)
        self.last_aux_denoised = run.aux_denoised
        return output

    def _sample_main_alone(self, noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed,
                           aux_noise, aux_seeds):
        """Settings under which AMDM changes nothing (s = 0, or every weight 0 and p = 0): the main branch
        is the user's own sampler, run by its own guider, bit for bit. Every branch then enters step s
        from the main latent (the aggregate of weight 0), so each aux branch's aux_denoised output is its
        own guider's x0 estimate there (at step 0: from its own start noise). Model calls: T + (N - 1)."""
        step = min(int(self.settings.aggregation_steps), sigmas.shape[-1] - 2)
        entering = {}

        def watch(i, denoised, x, total_steps):
            if i == step:
                entering["x"] = x.clone()
            if callback is not None:
                return callback(i, denoised, x, total_steps)

        output = self.main_guider.sample(noise, latent_image, sampler, sigmas, denoise_mask, watch, disable_pbar,
                                         seed)
        for guider, branch_noise, branch_seed in zip(self.aux_guiders, aux_noise, aux_seeds):
            evaluation = _DenoiseOnce(step, entering.get("x") if step > 0 else None)
            copy.copy(guider).sample(branch_noise, latent_image, BranchCapture(evaluation, {}), sigmas,
                                     denoise_mask, None, True, branch_seed)
            self.last_aux_denoised.append(evaluation.denoised)
        return output


class _DenoiseOnce:
    """A capture target that evaluates one branch's denoiser once, at step `step`, on latent x (None: the
    branch's own start latent), instead of sampling."""

    def __init__(self, step, x):
        self.step = step
        self.x = x
        self.denoised = None

    @torch.no_grad()
    def enter(self, branch):
        x = branch.x if self.x is None else self.x.to(branch.x)
        sigma = branch.denoiser.sigmas[self.step]
        self.denoised = branch(x, sigma * x.new_ones([x.shape[0]]))
        return branch.x


def aggregate_sample(branches, latent, seed, steps, sampler_name, scheduler, denoise, settings):
    """The AMDM Aggregate Sampler: KSampler's own steps (noise, sigmas, preview callback) with an AMDMGuider.

    branches: [(model, positive, negative, cfg), ...], main first. Returns (main LATENT, aux x0 LATENT).
    """
    guiders = []
    for index, (model, positive, negative, cfg) in enumerate(branches):
        if model is None or positive is None or negative is None:
            raise AMDMInputError(f"{branch_name(index)} needs a model, a positive and a negative conditioning")
        cfg = check_cfg(cfg, f"the cfg of {branch_name(index)}")
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
