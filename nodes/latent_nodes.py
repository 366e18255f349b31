"""Slerp Latent Merge and Deviation Correct: AMDM's two latent operations as nodes, for building AMDM by
hand with KSamplerAdvanced. Declarations only; the work is in comfy_bridge.latent_ops."""
from ..comfy_bridge.latent_ops import deviation_correct_latent, slerp_latent_merge
from .inputs import deviation_step_input, latent_mean_mode_input, weight_input

CATEGORY = "latent/amdm"


class AMDMSlerpLatentMerge:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "latent_a": ("LATENT", {"tooltip": "The first latent (e.g. the main branch's)."}),
            "latent_b": ("LATENT", {"tooltip": "The second latent; same shape, or batch 1 to broadcast."}),
            "weight": weight_input(0.5, "Weight of latent_b: 0 returns latent_a, 1 latent_b."),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "merge"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Spherical interpolation per batch item (keeps the norm of near-orthogonal noisy latents, "
                   "unlike a linear blend). A batch of 1 is used for every item of the other input.")

    def merge(self, latent_a, latent_b, weight):
        return (slerp_latent_merge(latent_a, latent_b, weight),)


class AMDMDeviationCorrect:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The branch's model (for its latent scaling and sigma table)."}),
                "merged": ("LATENT", {"tooltip": "The merged latent after step `step` (Slerp Latent Merge output)."}),
                "branch_in": ("LATENT", {"tooltip": "The branch's latent that entered step `step`."}),
                "branch_out": ("LATENT", {"tooltip": "The branch's own (un-merged) result of step `step`."}),
                "sigmas": ("SIGMAS", {"tooltip": "The run's sigmas (BasicScheduler with the same steps/scheduler)."}),
                "step": ("INT", {"default": 1, "min": 0, "max": 10000,
                                 "tooltip": "Index of the step just run (KSamplerAdvanced start_at_step)."}),
                "deviation_step": deviation_step_input("p: distance (VP latent units) moved back toward the branch."),
                "mean_mode": latent_mean_mode_input(),
            },
            "optional": {
                "previous_in": ("LATENT", {"tooltip": "reference mode: the branch's latent that entered step - 1."}),
                "previous_out": ("LATENT", {"tooltip": "reference mode: the branch's own result of step - 1."}),
            },
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "correct"
    CATEGORY = CATEGORY
    DESCRIPTION = ("AMDM deviation optimization without a model call: moves the merged latent a fixed distance "
                   "back toward one branch's mean; the result is that branch's input for the next step.")

    def correct(self, model, merged, branch_in, branch_out, sigmas, step, deviation_step, mean_mode,
                previous_in=None, previous_out=None):
        return (deviation_correct_latent(model, merged, branch_in, branch_out, sigmas, step, deviation_step, mean_mode,
                                         previous_in, previous_out),)


NODE_CLASS_MAPPINGS = {"AMDMSlerpLatentMerge": AMDMSlerpLatentMerge, "AMDMDeviationCorrect": AMDMDeviationCorrect}
NODE_DISPLAY_NAME_MAPPINGS = {"AMDMSlerpLatentMerge": "Slerp Latent Merge", "AMDMDeviationCorrect": "Deviation Correct"}
