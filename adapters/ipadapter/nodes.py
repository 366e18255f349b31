"""IP-Adapter Loader (AMDM) and IP-Adapter Apply (AMDM): a lean SD1.5 IP-Adapter for the style branch.

Node and type names differ from the ComfyUI_IPAdapter_plus pack (IPADAPTER), so both packs can be
installed together and neither pack's adapter can be wired into the other's nodes.
"""
import os

import comfy.utils
import folder_paths

from .model import ipadapter_from_state_dict
from .patch import apply_ipadapter

IPADAPTER_FOLDER = "ipadapter"  # models/ipadapter, the folder ComfyUI_IPAdapter_plus also uses


def register_ipadapter_folder():
    """Register models/ipadapter with ComfyUI unless another pack (or extra_model_paths) already did."""
    default = os.path.join(folder_paths.models_dir, IPADAPTER_FOLDER)
    if IPADAPTER_FOLDER in folder_paths.folder_names_and_paths:
        paths, extensions = folder_paths.folder_names_and_paths[IPADAPTER_FOLDER]
        if default not in paths:
            paths.append(default)
        if not extensions:  # registered through extra_model_paths only: no extension filter yet
            folder_paths.folder_names_and_paths[IPADAPTER_FOLDER] = (paths, folder_paths.supported_pt_extensions)
    else:
        folder_paths.folder_names_and_paths[IPADAPTER_FOLDER] = ([default], folder_paths.supported_pt_extensions)


register_ipadapter_folder()


class AMDMIPAdapterLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ipadapter_file": (folder_paths.get_filename_list(IPADAPTER_FOLDER), {
            "tooltip": "An SD1.5 IP-Adapter in models/ipadapter: ip-adapter_sd15.safetensors or "
                       "ip-adapter-plus_sd15.safetensors (and their _light / -face variants)."})}}

    RETURN_TYPES = ("AMDM_IPADAPTER",)
    RETURN_NAMES = ("ipadapter",)
    FUNCTION = "load"
    CATEGORY = "AMDM/IP-Adapter"
    DESCRIPTION = "Loads an SD1.5 IP-Adapter (image projection or Resampler + 16 cross-attention K/V layers)."

    def load(self, ipadapter_file):
        path = folder_paths.get_full_path_or_raise(IPADAPTER_FOLDER, ipadapter_file)
        return (ipadapter_from_state_dict(comfy.utils.load_torch_file(path, safe_load=True), ipadapter_file),)


class AMDMIPAdapterApply:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SD1.5 model; a patched clone is returned."}),
                "ipadapter": ("AMDM_IPADAPTER", {"tooltip": "From IP-Adapter Loader (AMDM)."}),
                "image": ("IMAGE", {"tooltip": "Reference image(s); several images are used together."}),
                "weight": ("FLOAT", {"default": 0.8, "min": -1.0, "max": 5.0, "step": 0.05,
                                     "tooltip": "Scale of the image cross-attention (AMDM used 0.8)."}),
                "start_at": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                       "tooltip": "Fraction of the sampling run where the adapter starts."}),
                "end_at": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                     "tooltip": "Fraction of the sampling run where the adapter stops."}),
            },
            # optional only so that a missing connection gets this pack's error naming the file to load
            "optional": {"clip_vision": ("CLIP_VISION", {
                "tooltip": "Core 'Load CLIP Vision' with CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors."})},
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = "AMDM/IP-Adapter"
    DESCRIPTION = "Returns a clone of the model with IP-Adapter attn2 patches (the UNet weights stay shared)."

    def apply(self, model, ipadapter, image, weight, start_at, end_at, clip_vision=None):
        return (apply_ipadapter(model, ipadapter, clip_vision, image, weight, start_at, end_at),)


NODE_CLASS_MAPPINGS = {
    "AMDMIPAdapterLoader": AMDMIPAdapterLoader,
    "AMDMIPAdapterApply": AMDMIPAdapterApply,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AMDMIPAdapterLoader": "IP-Adapter Loader (AMDM)",
    "AMDMIPAdapterApply": "IP-Adapter Apply (AMDM)",
}
