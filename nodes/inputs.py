"""Input declarations of the AMDM settings, shared by the sampler nodes and the latent nodes (their allowed
values and validation are in comfy_bridge.settings)."""
from ..amdm_core import AGGREGATION_MODES, MEAN_MODES
from ..comfy_bridge.settings import LATENT_MEAN_MODES, NOISE_MODES


def weight_input(default, tooltip):
    return ("FLOAT", {"default": default, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": tooltip})


def deviation_step_input(tooltip):
    return ("FLOAT", {"default": 0.3, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip": tooltip})


def sampler_tooltip():
    return ("Any sampler: every branch runs the sampler's own code and AMDM merges between its steps. With s > 0, "
            "samplers that choose their own step sizes (dpm_fast, dpm_adaptive) are refused.")


def aggregation_inputs():
    """The settings both sampler nodes take, in saved-workflow order."""
    return {
        "aggregation_steps": ("INT", {"default": 10, "min": 0, "max": 10000, "tooltip":
                                      "s: steps 1..s merge every branch (aux branches run steps 0..s, then stop). "
                                      "Must be smaller than the number of steps; 0 = the main branch alone."}),
        "aggregation": (list(AGGREGATION_MODES), {"default": "paper", "tooltip":
                        "sequential: slerp the aux latents in one by one; paper: the reference code's nested "
                        "formula (2 or 3 branches); linear: plain weighted average (ablation only)."}),
        "deviation_step": deviation_step_input(
            "p: after each merge every branch steps this far (VP latent units) back toward its own mean (the "
            "paper's deviation optimization; 0 disables it)."),
        "mean_mode": (list(MEAN_MODES), {"default": "auto", "tooltip":
                      "auto: reference where the model has a 1000-step DDPM table (SD1.x, SD2.x, SDXL), else exact "
                      "(rectified flow ...); reference: the reference code's one-step posterior mean from the "
                      "previous eps; exact: the branch's own deterministic (DDIM) step result."}),
        "noise": (list(NOISE_MODES), {"default": "independent", "tooltip":
                  "independent: aux branch k starts from the noise of seed + k-1 (branch 2: seed + 1); shared: every "
                  "branch starts from the main noise."}),
    }


def latent_mean_mode_input():
    return (list(LATENT_MEAN_MODES), {"default": "exact", "tooltip":
            "exact: mean = branch_out; reference: the reference code's mean, which needs the previous step's "
            "previous_in / previous_out too (models with a DDPM table only)."})
