"""Checks run before the first sampling step. Every failure names the branch and what differs."""
from dataclasses import dataclass

import comfy.model_sampling
import comfy.samplers
import torch

from ..amdm_core import AGGREGATION_MODES, MEAN_MODES

NOISE_MODES = ("independent", "shared")
MAX_BRANCHES = 4


class AMDMInputError(ValueError):
    """A bad AMDM input, found before any model call."""


def branch_name(index):
    """Branch 0 is the main branch; aux branch k is named after its node inputs (model_2, guider_2 ...)."""
    return "the main branch" if index == 0 else f"branch {index + 1}"


@dataclass(frozen=True)
class AggregationSettings:
    """The AMDM parameters shared by both sampler nodes (spec sections 3-5)."""
    aggregation_steps: int  # s: steps 1 .. s are aggregated; aux branches run steps 0 .. s
    weights: tuple  # one per aux branch, in [0, 1]
    aggregation: str = "paper"
    deviation_step: float = 0.3  # p, in VP latent units
    mean_mode: str = "reference"
    noise: str = "independent"

    @property
    def is_no_op(self):
        """True where aggregation changes nothing: s = 0, or every weight 0 with p = 0 (spec section 3)."""
        return int(self.aggregation_steps) == 0 or (
            all(float(w) == 0.0 for w in self.weights) and float(self.deviation_step) == 0.0)

    def validate(self, branch_count):
        if not 2 <= branch_count <= MAX_BRANCHES:
            raise AMDMInputError(
                f"AMDM needs 2 to {MAX_BRANCHES} branches (a main one and aux ones), got {branch_count}")
        if len(self.weights) != branch_count - 1:
            raise AMDMInputError(f"{branch_count} branches need {branch_count - 1} weights, got {len(self.weights)}")
        for index, weight in enumerate(self.weights, start=1):
            if not 0.0 <= float(weight) <= 1.0:
                raise AMDMInputError(
                    f"the weight of {branch_name(index)} is {weight}; weights must lie in [0, 1] "
                    "(0 keeps the main latent, 1 takes the aux one)")
        if int(self.aggregation_steps) < 0:
            raise AMDMInputError(f"aggregation_steps must be >= 0, got {self.aggregation_steps}")
        if not float(self.deviation_step) >= 0.0:
            raise AMDMInputError(
                f"deviation_step must be >= 0 (a length in VP latent units), got {self.deviation_step}")
        if self.aggregation not in AGGREGATION_MODES:
            raise AMDMInputError(f"unknown aggregation {self.aggregation!r}; choose one of {AGGREGATION_MODES}")
        if self.aggregation == "paper" and branch_count > 3:
            raise AMDMInputError(
                f"aggregation 'paper' (the reference code's nested formula) is defined for 2 or 3 branches, "
                f"this run has {branch_count}; choose 'sequential'")
        if self.mean_mode not in MEAN_MODES:
            raise AMDMInputError(f"unknown mean_mode {self.mean_mode!r}; choose one of {MEAN_MODES}")
        if self.noise not in NOISE_MODES:
            raise AMDMInputError(f"unknown noise mode {self.noise!r}; choose one of {NOISE_MODES}")


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


def check_model_sampling(patcher, index):
    """AMDM's deviation step lives in VP space: the branch must be an eps/v-prediction model in sigma space
    (x = x0 + sigma * eps, sigma_data 1) with a discrete sigma table."""
    sampling = patcher.get_model_object("model_sampling")
    kind = _prediction_type(sampling)
    if isinstance(sampling, comfy.model_sampling.CONST) or not isinstance(sampling, comfy.model_sampling.EPS):
        raise AMDMInputError(
            f"{branch_name(index)}'s model samples as {kind} (a flow / non-VP parameterisation); AMDM's "
            "aggregation is defined for VP diffusion models (SD1.x, SD2.x, SDXL eps or v-prediction)")
    has_table = isinstance(getattr(sampling, "sigmas", None), torch.Tensor)
    if float(getattr(sampling, "sigma_data", 1.0)) != 1.0 or not has_table:
        raise AMDMInputError(
            f"{branch_name(index)}'s model sampling ({kind}) has no discrete VP sigma table with sigma_data 1; "
            "AMDM needs one (SD1.x, SD2.x, SDXL)")
    return sampling


def check_compatible(patchers):
    """Same latent format and channels, same model sampling type and sigma table as the main branch."""
    main = patchers[0]
    main_format = main.get_model_object("latent_format")
    main_sampling = check_model_sampling(main, 0)
    for index, patcher in enumerate(patchers[1:], start=1):
        latent_format = patcher.get_model_object("latent_format")
        if type(latent_format) is not type(main_format) or latent_format.latent_channels != main_format.latent_channels:
            raise AMDMInputError(
                f"{branch_name(index)} uses latent format {_describe_format(latent_format)}, the main branch "
                f"{_describe_format(main_format)}; all AMDM branches must be models of one family (one latent space)")
        sampling = check_model_sampling(patcher, index)
        if _prediction_type(sampling) != _prediction_type(main_sampling):
            raise AMDMInputError(
                f"{branch_name(index)}'s model predicts {_prediction_type(sampling)}, the main branch "
                f"{_prediction_type(main_sampling)}; all branches need the same prediction type (eps / v-prediction)")
        table, main_table = sampling.sigmas.detach().cpu(), main_sampling.sigmas.detach().cpu()
        if table.shape != main_table.shape or not torch.equal(table, main_table):
            raise AMDMInputError(
                f"{branch_name(index)}'s noise schedule (model_sampling sigma table) differs from the main "
                "branch's (e.g. a ModelSamplingDiscrete / zsnr patch on one branch only); all branches must "
                "share one schedule")


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
                "the main branch carries hooks and shares its UNet with an aux branch; hooks would leak into the "
                "aux branch - load the aux model separately or drop the hooks")


def check_run(sigmas, latent_image, latent_format, aggregation_steps):
    """Per-run checks: the sigma table gives T steps with s < T; the latent matches the models."""
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise AMDMInputError("the sigmas need at least two entries (one sampling step)")
    total = sigmas.shape[0] - 1
    if int(aggregation_steps) > total - 1:
        raise AMDMInputError(
            f"aggregation_steps s = {aggregation_steps} but this run has {total} sampling steps (0 .. {total - 1}); "
            f"the aux branches run steps 0 .. s, so s must be at most {total - 1}")
    if latent_image.is_nested:
        raise AMDMInputError("nested (multi-part) latents are not supported by AMDM")
    if latent_image.ndim != 4:
        raise AMDMInputError(f"AMDM samples image latents [batch, channels, height, width]; got shape "
                             f"{tuple(latent_image.shape)}")
    if latent_image.shape[1] != latent_format.latent_channels:
        raise AMDMInputError(
            f"the latent has {latent_image.shape[1]} channels but the models' latent format "
            f"{_describe_format(latent_format)} expects {latent_format.latent_channels}; encode the image with "
            "this model family's VAE")
    return total
