"""Checks run before the first sampling step. Every failure names the branch and what differs."""
import comfy.model_sampling
import comfy.samplers
import torch

from ..amdm_core import NoiseSpace, resolve_mean_mode
from .settings import AMDMInputError, branch_name


def _describe_format(latent_format):
    return f"{type(latent_format).__name__} ({latent_format.latent_channels} channels)"


def check_guider(guider, index):
    if not isinstance(guider, comfy.samplers.CFGGuider):
        raise AMDMInputError(f"{branch_name(index)} is not a GUIDER (got {type(guider).__name__})")
    if getattr(guider, "is_amdm_guider", False):
        raise AMDMInputError(f"{branch_name(index)} is itself an AMDM Guider; nest branches in one AMDM Guider instead")
    if not guider.original_conds:
        raise AMDMInputError(f"{branch_name(index)}'s guider has no conditioning set")


def _prediction_type(sampling):
    """EPS, V_PREDICTION, CONST ...: the first prediction class (a comfy.model_sampling class that is not a
    schedule module) in the MRO. ComfyUI builds a fresh class per model and per ModelSampling* node, so the
    class itself cannot be compared."""
    for cls in type(sampling).__mro__:
        if cls.__module__ == comfy.model_sampling.__name__ and not issubclass(cls, torch.nn.Module):
            return cls.__name__
    return type(sampling).__name__


def noise_space(model_sampling):
    """The branch family's noise space x = a(sigma) x0 + b(sigma) eps, read off the model's own noise
    scaling (docs/algorithm.md, "One space for every family"): no per-family table."""
    def scaling(sigma, noise, latent):
        return model_sampling.noise_scaling(sigma, noise, latent, max_denoise=False)

    return NoiseSpace.from_noise_scaling(scaling, _prediction_type(model_sampling))


def ddpm_sigma_table(model_sampling):
    """The 1000-step discrete DDPM sigma table the "reference" mean is defined on, or None where the
    model's schedule is not one (rectified flow, continuous EDM ...)."""
    if isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete) and not isinstance(
            model_sampling, comfy.model_sampling.CONST):
        return model_sampling.sigmas
    return None


def check_mean_mode(mean_mode, model_sampling):
    """"reference" needs a DDPM table; "auto" picks it where there is one, else "exact"."""
    try:
        return resolve_mean_mode(mean_mode, ddpm_sigma_table(model_sampling))
    except ValueError as error:
        raise AMDMInputError(f"{error} (this model samples as {_prediction_type(model_sampling)})") from None


def _schedule(sampling):
    """What must agree between branches for them to share one diffusion process: the prediction type and
    the noise schedule (the sigma table where the model has one, else its sigma range)."""
    table = getattr(sampling, "sigmas", None)
    if isinstance(table, torch.Tensor):
        return _prediction_type(sampling), table.detach().cpu()
    return _prediction_type(sampling), torch.tensor([float(sampling.sigma_min), float(sampling.sigma_max)])


def check_compatible(patchers):
    """Same latent format and channels, same prediction type and noise schedule as the main branch."""
    main = patchers[0]
    main_format = main.get_model_object("latent_format")
    main_kind, main_table = _schedule(main.get_model_object("model_sampling"))
    for index, patcher in enumerate(patchers[1:], start=1):
        latent_format = patcher.get_model_object("latent_format")
        if type(latent_format) is not type(main_format) or latent_format.latent_channels != main_format.latent_channels:
            raise AMDMInputError(
                f"{branch_name(index)} uses latent format {_describe_format(latent_format)}, the main branch "
                f"{_describe_format(main_format)}; all AMDM branches must be models of one family (one latent space)")
        kind, table = _schedule(patcher.get_model_object("model_sampling"))
        if kind != main_kind:
            raise AMDMInputError(
                f"{branch_name(index)}'s model predicts {kind}, the main branch {main_kind}; all branches need the "
                "same prediction type (eps, v-prediction, rectified flow ...)")
        if table.shape != main_table.shape or not torch.equal(table, main_table):
            raise AMDMInputError(
                f"{branch_name(index)}'s noise schedule (model_sampling sigmas / shift) differs from the main "
                "branch's (e.g. a ModelSampling* or zsnr patch on one branch only); all branches must share one "
                "schedule")


def check_no_hooks(guiders):
    """Hooks re-patch weights per step through the shared module: only the main branch may use them, and
    only when no aux branch shares its UNet."""
    main_model = guiders[0].model_patcher.model
    for index, guider in enumerate(guiders):
        has_hooks = any("hooks" in cond for conds in guider.original_conds.values() for cond in conds)
        has_hooks = has_hooks or bool(guider.model_patcher.hook_patches)
        if not has_hooks:
            continue
        if index > 0:
            raise AMDMInputError(
                f"{branch_name(index)} carries hooks (conditioning or model hooks); hooks are supported on the "
                "main branch only - apply the LoRA with a LoRA loader instead")
        if any(g.model_patcher.model is main_model for g in guiders[1:]):
            raise AMDMInputError(
                "the main branch carries hooks and shares its UNet with an aux branch (two Load Checkpoint nodes "
                "of one file give one model), so the hooks would leak into the aux branch; apply the LoRA with a "
                "LoraLoaderModelOnly node on the main branch's model instead (weight patches are switched per "
                "branch), or set the hooks on no branch")


def check_run(sigmas, latent_image, model_sampling, latent_format, aggregation_steps):
    """Per-run checks: the sigma table gives T steps with s < T; the latent matches the models; the
    family's noise space has noise at the first sigma (an image-to-image flow that starts from the image
    has none to aggregate)."""
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise AMDMInputError("the sigmas need at least two entries (one sampling step)")
    total = sigmas.shape[0] - 1
    if int(aggregation_steps) > total - 1:
        raise AMDMInputError(
            f"aggregation_steps s = {aggregation_steps} but this run has {total} sampling steps (0 .. {total - 1}); "
            f"the aux branches run steps 0 .. s, so s must be at most {total - 1}")
    if latent_image.is_nested:
        raise AMDMInputError("nested (multi-part) latents, as audio-video families use, are not supported by "
                             "AMDM; sample one latent")
    dimensions = getattr(latent_format, "latent_dimensions", 2)
    if latent_image.ndim != dimensions + 2:
        expected = {1: "[batch, channels, length]", 2: "[batch, channels, height, width]",
                    3: "[batch, channels, frames, height, width]"}.get(dimensions, f"{dimensions + 2}-D")
        raise AMDMInputError(
            f"the latent has shape {tuple(latent_image.shape)} ({latent_image.ndim}-D), but the models' latent format "
            f"{_describe_format(latent_format)} samples {expected} latents; make the latent with this model "
            "family's empty-latent node or VAE")
    if latent_image.shape[0] == 0:
        raise AMDMInputError(f"the latent has shape {tuple(latent_image.shape)}: an empty batch; give at least one "
                             "latent (batch_size >= 1)")
    if latent_image.shape[1] != latent_format.latent_channels:
        raise AMDMInputError(
            f"the latent has shape {tuple(latent_image.shape)}, {latent_image.shape[1]} channels, but the models' "
            f"latent format {_describe_format(latent_format)} expects {latent_format.latent_channels}; encode the "
            "image with this model family's VAE / use its empty-latent node")
    if int(aggregation_steps) > 0:
        try:
            noise_space(model_sampling).check(sigmas[0])
        except ValueError as error:
            raise AMDMInputError(f"{error}; AMDM cannot aggregate this model's latents") from None
    return total


_MAX_SEED = 2**64 - 1


def check_seeds(sampler, name, seeds):
    """A SAMPLER whose inpaint option "random" re-seeds torch with seed + 1 ("ddim") cannot take the seed
    2^64 - 1 (ComfyUI fails with "Overflow when unpacking long long"); seeds[k] is branch k's seed."""
    if not getattr(sampler, "inpaint_options", {}).get("random", False):
        return
    for index, seed in enumerate(seeds):
        if seed is not None and int(seed) == _MAX_SEED:
            which = "the seed" if index == 0 else f"{branch_name(index)}'s noise seed (seed + {index})"
            raise AMDMInputError(
                f"{which} is {_MAX_SEED}, but sampler {name!r} re-seeds with seed + 1, which overflows; use a seed "
                f"below {_MAX_SEED - len(seeds) + 1}")
