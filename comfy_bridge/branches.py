"""Aux branches prepared as CFGGuider.sample would prepare them, and the switch between branches that
share one UNet.

The main branch runs ComfyUI's stock `CFGGuider.sample` path; the aux branches are stepped from inside
it, so they get the same per-run preparation here (cond copies, hook preprocessing, a model_options
clone, `prepare_model_patcher`, `pre_run`, `process_conds`) and the same cleanup, in `finally`.
Their models are loaded by the main branch's single `load_models_gpu` (see guider.py).
"""
import copy

import comfy.hooks
import comfy.model_patcher
import comfy.sampler_helpers
import comfy.samplers


def cond_models(guider):
    """The models a guider's conditioning needs loaded (ControlNets, GLIGEN, additional_models), as
    `prepare_sampling` collects them."""
    models, _ = comfy.sampler_helpers.get_additional_models(guider.original_conds, guider.model_patcher.model_dtype())
    return models


class PreparedBranch:
    """One aux branch during a run: a shallow copy of its guider (the user's guider is never modified),
    prepared on enter() and restored on exit()."""

    def __init__(self, guider):
        self.guider = copy.copy(guider)
        self.patcher = guider.model_patcher
        self.denoiser = None
        self.extra_args = None
        self._entered = False

    def enter(self, noise, latent_image, denoise_mask, sigmas, seed):
        """latent_image is the main branch's, already `process_latent_in`-ed (the branches share a latent
        format); noise is this branch's own noise (used by inpainting masks)."""
        guider, patcher = self.guider, self.patcher
        device = patcher.load_device
        guider.conds = {k: [c.copy() for c in conds] for k, conds in guider.original_conds.items()}
        comfy.samplers.preprocess_conds_hooks(guider.conds)
        self._orig_hook_mode = patcher.hook_mode
        guider.model_options = comfy.model_patcher.create_model_options_clone(guider.model_options)
        self._entered = True
        if comfy.samplers.get_total_hook_groups_in_conds(guider.conds) <= 1:
            patcher.hook_mode = comfy.hooks.EnumHookMode.MinVram
        comfy.sampler_helpers.prepare_model_patcher(patcher, guider.conds, guider.model_options)
        comfy.samplers.filter_registered_hooks_on_conds(guider.conds, guider.model_options)
        guider.inner_model = patcher.model
        comfy.samplers.cast_to_load_options(guider.model_options, device=device, dtype=patcher.model_dtype())
        patcher.pre_run()
        guider.conds = comfy.samplers.process_conds(guider.inner_model, noise, guider.conds, device, latent_image,
                                                    denoise_mask, seed, latent_shapes=[latent_image.shape])
        model_options = comfy.model_patcher.create_model_options_clone(guider.model_options)
        model_options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
        self.extra_args = {"model_options": model_options, "seed": seed, "denoise_mask": denoise_mask}
        self.denoiser = comfy.samplers.KSamplerX0Inpaint(guider, sigmas)
        self.denoiser.latent_image = latent_image
        self.denoiser.noise = noise

    def __call__(self, x, sigma):
        return self.denoiser(x, sigma, **self.extra_args)

    def exit(self):
        """Undo enter() (safe after a partial enter); mirrors outer_sample's and sample's finally blocks."""
        if not self._entered:
            return
        guider, patcher = self.guider, self.patcher
        try:
            patcher.cleanup()
            if hasattr(guider, "conds"):
                comfy.sampler_helpers.cleanup_models(guider.conds, [])
        finally:
            comfy.samplers.cast_to_load_options(guider.model_options, device=patcher.offload_device)
            patcher.hook_mode = self._orig_hook_mode
            patcher.restore_hook_patches()
            self.denoiser = self.extra_args = None
            self._entered = False


def _patch_state(patcher):
    """What a patcher writes INTO the shared module at load: weight patches (by uuid), object patches and
    injections. Two clones with equal states can run interleaved without any re-load."""
    weights = patcher.patches_uuid if (patcher.patches or patcher.weight_wrapper_patches) else None
    objects = tuple(sorted((name, id(obj)) for name, obj in patcher.object_patches.items()))
    return weights, objects, tuple(sorted(patcher.injections)), patcher.force_cast_weights


class PatcherSwitch:
    """Makes a branch's patcher the live one on its (possibly shared) BaseModel before each call.

    `current_patcher` is a single slot on the BaseModel: it is re-pointed for every call. Where clones of
    one BaseModel differ in weight or object patches, `load_models_gpu` leaves an arbitrary one live, so
    before a call the branch's own patches are re-applied with `partially_load`, the same call ComfyUI's
    loader makes when it switches between clones (exact: weights are re-patched from the backups)."""

    def __init__(self, patchers):
        states = {}
        for patcher in patchers:
            states.setdefault(id(patcher.model), set()).add(_patch_state(patcher))
        self._needs_reload = {model_id for model_id, s in states.items() if len(s) > 1}
        self._live = {}

    def activate(self, patcher):
        model = patcher.model
        if id(model) in self._needs_reload:
            state = _patch_state(patcher)
            if self._live.get(id(model)) != state:
                # A fully loaded model stays fully loaded (what LoadedModel.model_load asks for); a partially
                # loaded one keeps its current budget.
                extra_memory = 0 if model.model_lowvram else 1e32
                patcher.partially_load(patcher.load_device, extra_memory)
                self._live[id(model)] = state
        model.current_patcher = patcher
