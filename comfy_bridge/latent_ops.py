"""LATENT-level AMDM operations for building AMDM by hand (KSamplerAdvanced one step at a time +
Slerp Latent Merge + Deviation Correct). LATENTs hold `process_latent_out` values; the math runs on the
model's sigma-space latent x (= process_latent_in of the LATENT), as in the sampler."""
import torch

from ..amdm_core import deviation_correct, from_vp, reference_mean, slerp, timestep_of_sigma, to_vp
from .checks import check_mean_mode, ddpm_sigma_table, noise_space
from .settings import LATENT_MEAN_MODES, AMDMInputError, check_choice, check_deviation_step, check_weight


def _samples(latent, name):
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor):
        raise AMDMInputError(f"{name} is not a LATENT (no 'samples' tensor)")
    if samples.is_nested:
        raise AMDMInputError(f"{name} is a nested (multi-part) latent; AMDM merges plain image latents only")
    return samples


def slerp_latent_merge(latent_a, latent_b, weight):
    """slerp(a, b; weight) per batch item (weight 0 -> a, 1 -> b). A batch of 1 is used for every item of
    the other input; any other difference in shape is an error (never a silent resize)."""
    weight = check_weight(weight, "Slerp Latent Merge: weight")
    a, b = _samples(latent_a, "latent_a"), _samples(latent_b, "latent_b")
    if a.shape[1:] != b.shape[1:]:
        raise AMDMInputError(
            f"Slerp Latent Merge: latent_a has shape {tuple(a.shape)} and latent_b {tuple(b.shape)}; they need the "
            "same channels and size (same model family, same width/height) - resize one with Upscale Latent first")
    if a.shape[0] != b.shape[0]:
        if min(a.shape[0], b.shape[0]) != 1:
            raise AMDMInputError(
                f"Slerp Latent Merge: batch sizes {a.shape[0]} and {b.shape[0]} differ; give equal batches or a "
                "batch of 1 (used for every item of the other)")
        batch = max(a.shape[0], b.shape[0])
        a, b = a.expand(batch, *a.shape[1:]), b.expand(batch, *b.shape[1:])
    out = (latent_a if latent_a["samples"].shape[0] >= latent_b["samples"].shape[0] else latent_b).copy()
    out["samples"] = slerp(a, b.to(a.dtype), float(weight))
    return out


def deviation_correct_latent(model, merged, branch_in, branch_out, sigmas, step, deviation_step, mean_mode,
                             previous_in=None, previous_out=None):
    """Spec section 5 for one branch after aggregation step `step` (sigma_i -> sigma_{i+1}):

        x' = xbar - p * (xbar - mu) / |xbar - mu|    (VP space at sigma_{i+1}, per batch item)

    mean_mode "exact": mu = the branch's own (un-merged) step result `branch_out`.
    mean_mode "reference": mu = reference_mean(branch_in, E, tau) where E is the branch's eps of the
    previous step, recovered from its input/output of that step (DDIM/Euler: E = (out - in) / (sigma_i -
    sigma_{i-1})) and tau its timestep. No model call either way.
    """
    model_sampling = model.get_model_object("model_sampling")
    check_choice(mean_mode, LATENT_MEAN_MODES, "Deviation Correct: mean_mode")
    check_mean_mode(mean_mode, model_sampling)
    deviation_step = check_deviation_step(deviation_step, "Deviation Correct: deviation_step")
    space = noise_space(model_sampling)
    sigmas = sigmas.detach().float().cpu()
    total = sigmas.shape[0] - 1
    if not 0 <= int(step) < total:
        raise AMDMInputError(f"Deviation Correct: step {step} is not a step of these sigmas (0 .. {total - 1}); "
                             "give the index of the sampling step the branch just ran")
    step = int(step)
    inputs = {"merged": merged, "branch_in": branch_in, "branch_out": branch_out}
    if mean_mode == "reference":
        if previous_in is None or previous_out is None:
            raise AMDMInputError("Deviation Correct: mean_mode reference needs previous_in and previous_out (the "
                                 "branch's latent before and after the previous step); or use mean_mode exact")
        if step < 1:
            raise AMDMInputError("Deviation Correct: mean_mode reference needs a previous step; step 0 is never "
                                 "aggregated (aggregation starts at step 1)")
        inputs.update(previous_in=previous_in, previous_out=previous_out)
    base = model.model
    shape = _samples(merged, "merged").shape
    x = {}
    for name, latent in inputs.items():
        samples = _samples(latent, name)
        if samples.shape != shape:
            raise AMDMInputError(f"Deviation Correct: {name} has shape {tuple(samples.shape)}, merged "
                                 f"{tuple(shape)}; all latents must come from the same run")
        x[name] = base.process_latent_in(samples.float())
    sigma, sigma_next = sigmas[step], sigmas[step + 1]
    if mean_mode == "exact":
        mu = to_vp(x["branch_out"], sigma_next, space)
    else:
        sigma_prev = sigmas[step - 1]
        eps_prev = (x["previous_out"] - x["previous_in"]) / (sigma - sigma_prev)
        table = ddpm_sigma_table(model_sampling).detach().float().cpu()
        mu = reference_mean(to_vp(x["branch_in"], sigma, space), eps_prev, timestep_of_sigma(sigma_prev, table), table)
    corrected = from_vp(deviation_correct(to_vp(x["merged"], sigma_next, space), mu, deviation_step), sigma_next,
                        space)
    out = merged.copy()
    out["samples"] = base.process_latent_out(corrected).to(merged["samples"].dtype)
    return out
