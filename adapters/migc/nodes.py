"""ComfyUI nodes: MIGC Loader (models/migc -> MIGC) and MIGC Apply (MODEL + instances -> MODEL)."""
import folder_paths

from ..boxes import parse_box_lines
from ..common import check_finite
from .load import FOLDER, load_migc
from .model import MAX_INSTANCES
from .patch import NODE, apply_migc

FOLDER.register()


def parse_instances(text, width, height):
    """The instances text (``phrase | x0, y0, x1, y1`` per line, pixels) -> [(phrase, box)]."""
    items = parse_box_lines(text, ("phrase",), ("box",), width, height, MAX_INSTANCES, "instance")
    return [(phrases[0], boxes[0]) for phrases, boxes in items]


class MIGCLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"migc_name": (folder_paths.get_filename_list(FOLDER.name), {
            "tooltip": f"MIGC checkpoint (MIGC_SD14.ckpt) in ComfyUI/models/{FOLDER.name}/"})}}

    RETURN_TYPES = ("MIGC",)
    FUNCTION = "load"
    CATEGORY = "AMDM/MIGC"
    DESCRIPTION = "Loads MIGC weights; the UNet blocks they patch are read from the file's keys."

    def load(self, migc_name):
        return (load_migc(migc_name),)


class MIGCApply:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "SD1.x model; a patched copy is returned"}),
                "clip": ("CLIP", {"tooltip": "the text encoder of the model, for the instance phrases"}),
                "migc": ("MIGC", {"tooltip": "From MIGC Loader."}),
                "instances": ("STRING", {
                    "multiline": True, "default": "a red apple | 64, 256, 224, 416\na green pear | 288, 224, 448, 432",
                    "tooltip": "one instance per line: 'phrase | x0, y0, x1, y1' (pixels, top-left origin)"}),
                "width": ("INT", {"default": 512, "min": 64, "max": 8192, "step": 8,
                                  "tooltip": "image width in pixels (the boxes' frame and the latent's width x8)"}),
                "height": ("INT", {"default": 512, "min": 64, "max": 8192, "step": 8,
                                   "tooltip": "image height in pixels"}),
                "migc_steps": ("INT", {"default": 10, "min": -1, "max": 10000, "tooltip":
                               "MIGC runs on sampling steps 0..migc_steps (0-based, inclusive: MIGC's "
                               "MIGCsteps); -1 = never"}),
                "naive_fuser_steps": ("INT", {"default": -1, "min": -1, "max": 10000, "tooltip":
                                      "the weight-free NaiveFuser runs on steps 0..naive_fuser_steps (0-based, "
                                      "inclusive) in every cross-attention block MIGC does not run in (all "
                                      "blocks without MIGC weights; the MIGC blocks after migc_steps), as in "
                                      "MIGC's reference code; -1 = never. Later steps: plain cross-attention"}),
            },
            "optional": {
                "ca_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                                       "tooltip": "weight of each instance's cross-attention"}),
                "ea_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                                       "tooltip": "weight of each instance's enhancement attention"}),
                "sac_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                                        "tooltip": "multiplier of the instance logits in the shading aggregation"}),
            },
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = "AMDM/MIGC"
    DESCRIPTION = ("Multi-instance generation: each phrase is drawn inside its box. Returns a patched copy of "
                   "the model; sample it with the global caption as the positive prompt.")

    def apply(self, model, clip, migc, instances, width, height, migc_steps, naive_fuser_steps,
              ca_scale=1.0, ea_scale=1.0, sac_scale=1.0):
        check_finite(NODE, ca_scale=ca_scale, ea_scale=ea_scale, sac_scale=sac_scale)
        items = parse_instances(instances, width, height)
        return (apply_migc(model, migc, clip, items, width, height, migc_steps, naive_fuser_steps,
                           ca_scale, ea_scale, sac_scale),)


NODE_CLASS_MAPPINGS = {"MIGCLoader": MIGCLoader, "MIGCApply": MIGCApply}
NODE_DISPLAY_NAME_MAPPINGS = {"MIGCLoader": "MIGC Loader", "MIGCApply": "MIGC Apply"}
