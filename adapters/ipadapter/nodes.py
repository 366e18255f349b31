"""IP-Adapter Loader (AMDM) and IP-Adapter Apply (AMDM): a lean SD1.5 IP-Adapter for the style branch.

Node and type names differ from the ComfyUI_IPAdapter_plus pack (IPADAPTER), so both packs can be
installed together and neither pack's adapter can be wired into the other's nodes.
"""
import folder_paths

from .load import FOLDER, ipadapter_from_state_dict
from .patch import apply_ipadapter

FOLDER.register()


class AMDMIPAdapterLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ipadapter_file": (folder_paths.get_filename_list(FOLDER.name), {
            "tooltip": "An SD1.5 IP-Adapter in models/ipadapter: ip-adapter_sd15.safetensors or "
                       "ip-adapter-plus_sd15.safetensors (and their _light / -face variants)."})}}

    RETURN_TYPES = ("AMDM_IPADAPTER",)
    RETURN_NAMES = ("ipadapter",)
    FUNCTION = "load"
    CATEGORY = "AMDM/IP-Adapter"
    DESCRIPTION = "Loads an SD1.5 IP-Adapter (image projection or Resampler + 16 cross-attention K/V layers)."

    def load(self, ipadapter_file):
        return (ipadapter_from_state_dict(FOLDER.read(ipadapter_file), ipadapter_file),)


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
