"""InteractDiffusion nodes: the loader (models/interactdiffusion/) and the interaction conditioning node."""
import os

import folder_paths
from nodes import MAX_RESOLUTION  # ComfyUI's nodes module

from .conditioning import apply_interactions
from .weights import MODEL_FOLDER, load_interactdiffusion

DEFAULT_INTERACTIONS = "a person | feeding | a cat | 17, 85, 172, 374 | 148, 244, 342, 406"


def register_model_folder():
    """``models/interactdiffusion/`` (plus any ``interactdiffusion:`` paths from extra_model_paths.yaml).
    models/gligen/ is deliberately not listed: GLIGEN files there are rejected by this loader anyway."""
    folder_paths.add_model_folder_path(MODEL_FOLDER, os.path.join(folder_paths.models_dir, MODEL_FOLDER),
                                       is_default=True)
    paths, extensions = folder_paths.folder_names_and_paths[MODEL_FOLDER]
    folder_paths.folder_names_and_paths[MODEL_FOLDER] = (paths, set(extensions) | folder_paths.supported_pt_extensions)


register_model_folder()


class InteractDiffusionLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"interactdiffusion_name": (folder_paths.get_filename_list(MODEL_FOLDER), {
            "tooltip": "The add-on file ext_interactdiff_v1.2.pth, from models/interactdiffusion/."})}}

    RETURN_TYPES = ("INTERACTDIFFUSION",)
    FUNCTION = "load"
    CATEGORY = "AMDM/InteractDiffusion"
    DESCRIPTION = "Loads InteractDiffusion's fusers and HOI position net (SD1.x) for InteractDiffusion Apply."

    def load(self, interactdiffusion_name):
        path = folder_paths.get_full_path(MODEL_FOLDER, interactdiffusion_name)
        if path is None:
            raise FileNotFoundError(
                f"InteractDiffusion file '{interactdiffusion_name}' not found in models/{MODEL_FOLDER}/ (searched: "
                f"{', '.join(folder_paths.get_folder_paths(MODEL_FOLDER))}); download ext_interactdiff_v1.2.pth "
                f"from the Hugging Face repo jiuntian/interactiondiffusion-weight into that folder")
        return (load_interactdiffusion(path),)


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
