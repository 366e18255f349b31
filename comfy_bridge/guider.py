"""AMDMGuider: several branches sampled in lockstep, each prepared by its own guider's stock path and stepped
by the user's own sampler.

The seam (docs/nodes.md, "How it runs inside ComfyUI"): every branch, the main one and each aux one, runs its
OWN guider's `sample()` exactly as SamplerCustomAdvanced would run it, with a `_Capture` in place of the
user's SAMPLER. ComfyUI's stock path prepares the branch (cond copies, hooks, model_options clone,
`prepare_model_patcher`, OUTER_SAMPLE / SAMPLER_SAMPLE wrappers, `prepare_sampling`, `pre_run`,
`process_conds`, a guider's own `outer_sample` / `inner_sample` overrides) and hands the capture what it
hands any sampler; the capture records it and opens the next branch's `sample()` inside it. The innermost
capture runs the user's SAMPLER for every branch (comfy_bridge.driving) in amdm_core.run_lockstep, which acts
between its steps; the results unwind through every branch's own `finally` cleanup. No sequence of ComfyUI's
sampling code is copied here.

The aux patchers are attached to a clone of the main patcher as additional models, so the main branch's
`prepare_sampling` loads every branch in ONE `load_models_gpu` call; the nested calls find them loaded.
"""
import copy
import functools

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch

from ..amdm_core import NotSteppable, dry_run, map_steps, run_lockstep
from .batching import BatchedEvaluation
from .branches import PatcherSwitch, check_switchable, cond_models, weight_state
from .checks import (check_compatible, check_guider, check_mean_mode, check_no_hooks, check_run, check_seeds,
                     ddpm_sigma_table, noise_space)
from .driving import driven, dry_denoiser, sampler_display_name, without_own_noise_sampler
from .predictor_correctors import own_predictor_corrector
from .settings import AMDMInputError, branch_name, check_cfg, check_denoise

ADDITIONAL_MODELS_KEY = "amdm_branches"


class _Captured:
    """What one branch's stock path handed its sampler (CFGGuider.inner_sample: `sampler.sample(guider,
    sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)`)."""

    def __init__(self, model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar):
        self.model_wrap = model_wrap
        self.sigmas = sigmas
        self.extra_args = extra_args
        self.callback = callback
        self.noise = noise
        self.latent_image = latent_image
        self.denoise_mask = denoise_mask
        self.disable_pbar = disable_pbar

    @property
    def patcher(self):
        return self.model_wrap.model_patcher

    def sample(self, sampler, hooks, dry=False):
        """Run `sampler` on this branch with its model calls through `hooks`; a dry run works on copies of
        what the sampler may change (its sigmas, extra_args) and reports to the hooks only."""
        user_callback = None if dry else self.callback

        def callback(step, denoised, x, total_steps):
            hooks.report(step, denoised)
            if user_callback is not None:
                return user_callback(step, denoised, x, total_steps)

        sigmas, extra_args = (self.sigmas.clone(), dict(self.extra_args)) if dry else (self.sigmas, self.extra_args)
        return driven(sampler, hooks).sample(self.model_wrap, sigmas, extra_args, callback, self.noise,
                                             self.latent_image, self.denoise_mask, dry or self.disable_pbar)


class _Capture(comfy.samplers.Sampler):
    """The SAMPLER each branch's own `guider.sample()` runs: it hands what it is given to the run."""

    def __init__(self, run):
        self.run = run

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        return self.run.enter(_Captured(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                                        disable_pbar))


def _rng_devices(latent):
    return [latent.device] if latent.device.type == "cuda" else []


class _LockstepRun:
    """One AMDM run: opens the branches one inside the other, then runs them in the innermost."""

    def __init__(self, aux_guiders, aux_noise, aux_seeds, latent_image, sigmas, denoise_mask, sampler, settings):
        self.aux_guiders = aux_guiders
        self.aux_noise = aux_noise
        self.aux_seeds = aux_seeds
        self.latent_image = latent_image
        self.sigmas = sigmas
        self.denoise_mask = denoise_mask
        self.sampler = sampler
        self.settings = settings
        self.branches = []
        self.latents = None  # every branch's latent when the run ends
        self.aux_denoised = []  # each aux branch's x0 estimate of its last step

    def enter(self, captured):
        """Called by each branch's capture; returns that branch's latent."""
        self.branches.append(captured)
        index = len(self.branches)
        if index <= len(self.aux_guiders):
            # The next branch's own stock sample(), nested in this one: its preparation and cleanup are
            # ComfyUI's; its capture calls enter() again. Its own copy of the sigmas: some samplers write
            # into theirs (uni_pc).
            guider = copy.copy(self.aux_guiders[index - 1])
            guider.sample(self.aux_noise[index - 1], self.latent_image, _Capture(self), self.sigmas.clone(),
                          denoise_mask=self.denoise_mask, callback=None, disable_pbar=True,
                          seed=self.aux_seeds[index - 1])
        else:
            self.latents = self._run()
        return self.latents[index - 1]

    @torch.no_grad()
    def _run(self):
        branches = self.branches
        main = branches[0]
        model_sampling = main.model_wrap.inner_model.model_sampling
        denoise = dry_denoiser(main.model_wrap, _post_cfg_functions(main))
        devices = _rng_devices(main.noise)

        def dry_result(sampler):
            return dry_run(functools.partial(main.sample, sampler, dry=True), denoise, devices).result

        # the user's SAMPLER, or the pack's own predictor-corrector where a dry run proves them equal
        sampler = own_predictor_corrector(self.sampler, dry_result, sampler_display_name(self.sampler)) or self.sampler
        samplers = [sampler] + [without_own_noise_sampler(sampler)] * (len(branches) - 1)
        try:
            step_map = map_steps(functools.partial(main.sample, sampler, dry=True), main.sigmas.shape[-1] - 1, denoise,
                                 devices)
        except NotSteppable as error:
            raise AMDMInputError(f"sampler {sampler_display_name(self.sampler)!r} {error}") from None
        patchers = [b.patcher for b in branches]
        switch = PatcherSwitch(patchers)
        evaluate = BatchedEvaluation(patchers, [weight_state(p) for p in patchers], switch)
        settings = self.settings
        try:
            result = run_lockstep(
                [functools.partial(b.sample, s) for b, s in zip(branches, samplers)], step_map,
                aggregation_steps=settings.aggregation_steps, weights=list(settings.weights),
                aggregation=settings.aggregation, deviation_steps=settings.deviation_step,
                mean_mode=settings.mean_mode, sigma_table=ddpm_sigma_table(model_sampling),
                space=noise_space(model_sampling), final_sigma=main.sigmas[-1], evaluate=evaluate,
                check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
                rng_devices=devices)
        finally:
            try:
                switch.activate(main.patcher)  # the main branch's patches live again, as after its own run
            finally:
                switch.close()  # drops the other branches' kept weights
        self.aux_denoised = result.aux_denoised
        return result.latents


def _post_cfg_functions(captured):
    return list(captured.extra_args.get("model_options", {}).get("sampler_post_cfg_function", []))


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
        KSampler with that seed, at the batch positions the main noise took); 'shared' reuses the main noise.
        All-zero main noise (add_noise off / DisableNoise) stays zero for every branch."""
        count = len(self.aux_guiders)
        if not torch.any(noise):
            return [torch.zeros_like(noise) for _ in range(count)], [seed] * count
        if self.settings.noise == "shared":
            return [noise.clone() for _ in range(count)], [seed] * count
        if seed is None:
            raise AMDMInputError("noise 'independent' derives each aux branch's noise from the seed, but the NOISE "
                                 "input has no seed; use a RandomNoise node or noise 'shared'")
        positions = self.noise_batch_index
        if positions is None:
            positions = noise_positions(noise, latent_image, seed)
        seeds = [(int(seed) + k) % 2**64 for k in range(1, count + 1)]
        return [comfy.sample.prepare_noise_inner(latent_image, torch.Generator().manual_seed(s), positions)
                for s in seeds], seeds

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        self.last_aux_denoised = []
        if sigmas.shape[-1] == 0:
            return latent_image
        check_run(sigmas, latent_image, self.model_patcher.get_model_object("model_sampling"),
                  self.model_patcher.get_model_object("latent_format"), self.settings.aggregation_steps)
        check_mean_mode(self.settings.mean_mode, self.model_patcher.get_model_object("model_sampling"))
        aux_noise, aux_seeds = self._aux_noise(noise, latent_image, seed)
        check_seeds(sampler, sampler_display_name(sampler), [seed] + aux_seeds)
        if self.settings.is_no_op:
            return self._sample_main_alone(noise, latent_image, sampler, sigmas, denoise_mask, callback,
                                           disable_pbar, seed, aux_noise, aux_seeds)
        main = copy.copy(self.main_guider)
        main.model_patcher = self.main_guider.model_patcher.clone()
        attached = []
        for guider in self.aux_guiders:
            attached += [guider.model_patcher] + cond_models(guider)
        main.model_patcher.set_additional_models(ADDITIONAL_MODELS_KEY, attached)
        run = _LockstepRun(self.aux_guiders, aux_noise, aux_seeds, latent_image, sigmas, denoise_mask, sampler,
                           self.settings)
        output = main.sample(noise, latent_image, _Capture(run), sigmas, denoise_mask, callback, disable_pbar, seed)
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
            evaluated = []
            copy.copy(guider).sample(branch_noise, latent_image, _denoise_once(step, entering.get("x"), evaluated),
                                     sigmas, denoise_mask, None, True, branch_seed)
            self.last_aux_denoised += evaluated
        return output


def _denoise_once(step, entering, evaluated):
    """A SAMPLER that evaluates its branch's denoiser once, at step `step`, on the latent `entering` (None: the
    branch's own start latent), and appends the x0 estimate to `evaluated` instead of sampling."""
    def evaluate(model, x, sigmas, extra_args=None, callback=None, disable=None):
        latent = x if entering is None or step == 0 else entering.to(x)
        evaluated.append(model(latent, sigmas[step] * latent.new_ones([latent.shape[0]]), **(extra_args or {})))
        return x

    return comfy.samplers.KSAMPLER(evaluate)


def noise_positions(noise, latent_image, seed, limit=4096):
    """The batch_index the main noise was drawn with (a latent after Latent From Batch or Repeat Latent Batch
    carries one; SamplerCustomAdvanced's NOISE honours it but a GUIDER is never shown it): each item's position
    in `seed`'s stream of per-item draws (comfy.sample.prepare_noise_inner with noise_inds), found by drawing
    that stream. None where the noise is the seed's plain draw, or not found within `limit` draws."""
    if noise.shape != latent_image.shape or torch.equal(
            noise, comfy.sample.prepare_noise_inner(latent_image, torch.Generator().manual_seed(seed))):
        return None
    count = 64
    while True:
        draws = comfy.sample.prepare_noise_inner(latent_image, torch.Generator().manual_seed(seed), list(range(count)))
        positions = []
        for item in noise:
            found = [i for i in range(count) if torch.equal(draws[i], item)]
            if not found:
                break
            positions.append(found[0])
        else:
            return positions
        if count >= limit:
            return None
        count = min(2 * count, limit)


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

    check_denoise(denoise)
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
