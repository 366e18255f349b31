"""A test/demo-only ComfyUI custom-node folder: the exact-mixture model family (harness.exact_mixture_comfy)
as a loader and a prompt node, so graphs wire it like a real checkpoint and text encoder. Loaded by the
demo, tests and benchmarks (harness.exact_mixture_comfy.load_nodes); never shipped to users.
"""
import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
if _REPO_ROOT not in sys.path:
    sys.path.append(_REPO_ROOT)  # appended: ComfyUI's own modules (`nodes`, `utils`) keep precedence

from harness import exact_mixture, exact_mixture_comfy  # noqa: E402

CATEGORY = "AMDM test models"
ANY = "any"


class ExactMixtureLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "knows": (list(exact_mixture_comfy.KNOWLEDGE), {"tooltip": "The prompt attributes this model understands."}),
            "prediction": (list(exact_mixture_comfy.PREDICTIONS), {"tooltip":
                           "eps: SD1.5's discrete schedule; flow: rectified flow (SD3's shift 3)."}),
        }}

    RETURN_TYPES = ("MODEL", "VAE")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "A model whose denoiser is the exact posterior mean of a blob-position x colour mixture."

    def load(self, knows, prediction):
        return exact_mixture_comfy.exact_mixture_patcher(knows, prediction), exact_mixture_comfy.ExactMixtureVAE()


class ExactMixturePrompt:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "position": ([ANY, *exact_mixture.POSITIONS], {"tooltip": "Where the blob is ('any': not prompted)."}),
            "colour": ([ANY, *exact_mixture.COLOURS], {"tooltip": "The blob's colour ('any': not prompted)."}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = "The exact-mixture models' text encoder: a CONDITIONING naming a position and a colour."

    def encode(self, position, colour):
        p = None if position == ANY else exact_mixture.POSITIONS.index(position)
        c = None if colour == ANY else exact_mixture.COLOURS.index(colour)
        return (exact_mixture_comfy.conditioning([p], [c]),)


NODE_CLASS_MAPPINGS = {"ExactMixtureLoader": ExactMixtureLoader, "ExactMixturePrompt": ExactMixturePrompt}
NODE_DISPLAY_NAME_MAPPINGS = {"ExactMixtureLoader": "Exact Mixture Loader (test)",
                              "ExactMixturePrompt": "Exact Mixture Prompt (test)"}
