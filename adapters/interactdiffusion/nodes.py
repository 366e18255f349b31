"""InteractDiffusion nodes: the loader (models/interactdiffusion/) and the interaction conditioning node."""
import folder_paths
from nodes import MAX_RESOLUTION  # ComfyUI's nodes module

from ..common import check_finite
from .load import FOLDER, load_interactdiffusion
from .patch import NODE, apply_interactions

DEFAULT_INTERACTIONS = "a person | feeding | a cat | 17, 85, 172, 374 | 148, 244, 342, 406"

FOLDER.register()


class InteractDiffusionLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"interactdiffusion_name": (folder_paths.get_filename_list(FOLDER.name), {
            "tooltip": "The add-on file ext_interactdiff_v1.2.pth, from models/interactdiffusion/."})}}

    RETURN_TYPES = ("INTERACTDIFFUSION",)
    FUNCTION = "load"
    CATEGORY = "AMDM/InteractDiffusion"
    DESCRIPTION = "Loads InteractDiffusion's fusers and HOI position net (SD1.x) for InteractDiffusion Apply."

    def load(self, interactdiffusion_name):
        return (load_interactdiffusion(interactdiffusion_name),)


class InteractDiffusionApply:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": ("CONDITIONING", {"tooltip": "The positive conditioning (the negative gets null "
                                                         "objects automatically)."}),
            "clip": ("CLIP", {"tooltip": "The SD1.x CLIP; phrases are encoded to its pooled output."}),
            "interactdiffusion": ("INTERACTDIFFUSION", {"tooltip": "From InteractDiffusion Loader."}),
            "interactions": ("STRING", {"multiline": True, "dynamicPrompts": False, "default": DEFAULT_INTERACTIONS,
                                        "tooltip": "One interaction per line: subject | action | object | "
                                                   "sx0, sy0, sx1, sy1 | ox0, oy0, ox1, oy1 (pixels); up to 30."}),
            "width": ("INT", {"default": 512, "min": 8, "max": MAX_RESOLUTION, "step": 8,
                              "tooltip": "Width of the image the boxes are drawn on (the latent's width x 8)."}),
            "height": ("INT", {"default": 512, "min": 8, "max": MAX_RESOLUTION, "step": 8,
                               "tooltip": "Height of the image the boxes are drawn on."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.01,
                                   "tooltip": "Scale of the fusers' gated residuals; 0 = plain model."}),
            "beta": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                               "tooltip": "Scheduled sampling: the fusers are active during this first "
                                          "fraction of sampling (1 = all of it)."}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "apply"
    CATEGORY = "AMDM/InteractDiffusion"
    DESCRIPTION = "Grounds subject-action-object interactions (two boxes each) with InteractDiffusion."

    def apply(self, conditioning, clip, interactdiffusion, interactions, width, height, strength, beta):
        check_finite(NODE, strength=strength, beta=beta)
        return (apply_interactions(conditioning, clip, interactdiffusion, interactions, width, height,
                                   strength, beta),)


NODE_CLASS_MAPPINGS = {
    "InteractDiffusionLoader": InteractDiffusionLoader,
    "InteractDiffusionApply": InteractDiffusionApply,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "InteractDiffusionLoader": "InteractDiffusion Loader",
    "InteractDiffusionApply": "InteractDiffusion Apply",
}
