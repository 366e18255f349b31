"""AMDM Aggregate Sampler (KSampler-like) and AMDM Guider (for SamplerCustomAdvanced): declarations only;
the work is in comfy_bridge.guider. Input names and order are part of saved workflows: do not reorder."""
import comfy.samplers

from ..comfy_bridge.guider import AMDMGuider, aggregate_sample
from ..comfy_bridge.settings import AggregationSettings
from .inputs import aggregation_inputs, sampler_tooltip, weight_input

CATEGORY = "sampling/amdm"
AUX_BRANCHES = (2, 3, 4)  # branch 2 is required, 3 and 4 optional
DEFAULT_WEIGHTS = {2: 0.5, 3: 0.6, 4: 0.5}  # reference UI: w1 = 0.5, w2 = 0.6 (docs/algorithm.md, section 6)


def _weight_input(branch):
    return weight_input(DEFAULT_WEIGHTS[branch], f"Slerp weight of branch {branch} (0 keeps the main latent, 1 takes "
                        f"branch {branch}'s). In 'paper' mode with 3 branches weight_2 weighs the main branch inside "
                        "the first pair and weight_3 is also the outer weight (the reference code's formula).")


def _cfg_input(branch):
    return ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                      "tooltip": f"CFG scale of branch {branch}."})


def _settings(aggregation_steps, weights, aggregation, deviation_step, mean_mode, noise):
    return AggregationSettings(aggregation_steps=aggregation_steps, weights=tuple(weights), aggregation=aggregation,
                               deviation_step=deviation_step, mean_mode=mean_mode, noise=noise)


class AMDMAggregateSampler:
    @classmethod
    def INPUT_TYPES(cls):
        required = {
            "model": ("MODEL", {"tooltip": "The main branch's model: its image is the result."}),
            "positive": ("CONDITIONING", {"tooltip": "The main branch's positive prompt (its caption)."}),
            "negative": ("CONDITIONING", {"tooltip": "The main branch's negative prompt."}),
            "model_2": ("MODEL", {"tooltip": "Aux branch 2 (e.g. MIGC when the main branch is InteractDiffusion)."}),
            "positive_2": ("CONDITIONING", {"tooltip": "Aux branch 2's positive prompt."}),
            "negative_2": ("CONDITIONING", {"tooltip": "Aux branch 2's negative prompt."}),
            "latent_image": ("LATENT", {"tooltip": "The start latent (empty for txt2img, encoded for img2img)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                             "tooltip": "The main branch's noise seed (the same noise KSampler draws)."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "Sampling steps T."}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "CFG scale of the main branch."}),
            "cfg_2": _cfg_input(2),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"default": "ddim", "tooltip":
                             "ddim = DDIM eta 0, the paper's. " + sampler_tooltip()}),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"default": "ddim_uniform", "tooltip":
                          "Noise schedule (ddim_uniform = the paper's DDIM timesteps)."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                  "Fraction of the schedule to run (below 1 for img2img), as in KSampler."}),
            "weight_2": _weight_input(2),
        }
        required.update(aggregation_inputs())
        optional = {}
        for branch in AUX_BRANCHES[1:]:
            optional.update({f"model_{branch}": ("MODEL", {"tooltip": f"Aux branch {branch}'s model."}),
                             f"positive_{branch}": ("CONDITIONING", {"tooltip": f"Branch {branch}'s positive prompt."}),
                             f"negative_{branch}": ("CONDITIONING", {"tooltip": f"Branch {branch}'s negative prompt."}),
                             f"cfg_{branch}": _cfg_input(branch),
                             f"weight_{branch}": _weight_input(branch)})
        return {"required": required, "optional": optional}

    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("latent", "aux_denoised")
    OUTPUT_TOOLTIPS = ("The main branch's result.",
                       "Each aux branch's x0 estimate at its last step (step s), branch 2's batch first.")
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = ("AMDM: samples the main and aux branches in lockstep, merges their latents by slerp during "
                   "steps 1..s with a deviation step back toward each branch, then finishes the main branch alone.")

    def sample(self, model, positive, negative, model_2, positive_2, negative_2, latent_image, seed, steps, cfg, cfg_2,
               sampler_name, scheduler, denoise, weight_2, aggregation_steps, aggregation, deviation_step, mean_mode,
               noise, **optional):
        branches = [(model, positive, negative, cfg), (model_2, positive_2, negative_2, cfg_2)]
        weights = [weight_2]
        for branch in AUX_BRANCHES[1:]:
            parts = [optional.get(f"{name}_{branch}") for name in ("model", "positive", "negative")]
            if all(part is None for part in parts):
                continue
            branches.append((*parts, optional.get(f"cfg_{branch}", 7.5)))
            weights.append(optional.get(f"weight_{branch}", DEFAULT_WEIGHTS[branch]))
        settings = _settings(aggregation_steps, weights, aggregation, deviation_step, mean_mode, noise)
        return aggregate_sample(branches, latent_image, seed, steps, sampler_name, scheduler, denoise, settings)


class AMDMGuiderNode:
    @classmethod
    def INPUT_TYPES(cls):
        required = {"guider": ("GUIDER", {"tooltip": "The main branch (any GUIDER: CFGGuider, DualCFGGuider, ...)."}),
                    "guider_2": ("GUIDER", {"tooltip": "Aux branch 2."}),
                    "weight_2": _weight_input(2)}
        required.update(aggregation_inputs())
        optional = {}
        for branch in AUX_BRANCHES[1:]:
            optional.update({f"guider_{branch}": ("GUIDER", {"tooltip": f"Aux branch {branch}."}),
                             f"weight_{branch}": _weight_input(branch)})
        return {"required": required, "optional": optional}

    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"
    CATEGORY = CATEGORY
    DESCRIPTION = ("AMDM as a GUIDER for SamplerCustomAdvanced: the main branch and up to 3 aux branches are any "
                   "GUIDERs (CFGGuider, DualCFGGuider, ...), each run with its own semantics, all stepped by the "
                   "wired SAMPLER; during steps 1..s their latents are merged by slerp with a deviation step, then "
                   "the main branch finishes alone. " + sampler_tooltip())

    def get_guider(self, guider, guider_2, weight_2, aggregation_steps, aggregation, deviation_step, mean_mode, noise,
                   **optional):
        aux, weights = [guider_2], [weight_2]
        for branch in AUX_BRANCHES[1:]:
            if optional.get(f"guider_{branch}") is not None:
                aux.append(optional[f"guider_{branch}"])
                weights.append(optional.get(f"weight_{branch}", DEFAULT_WEIGHTS[branch]))
        settings = _settings(aggregation_steps, weights, aggregation, deviation_step, mean_mode, noise)
        return (AMDMGuider(guider, aux, settings),)


NODE_CLASS_MAPPINGS = {"AMDMAggregateSampler": AMDMAggregateSampler, "AMDMGuider": AMDMGuiderNode}
NODE_DISPLAY_NAME_MAPPINGS = {"AMDMAggregateSampler": "AMDM Aggregate Sampler", "AMDMGuider": "AMDM Guider"}
