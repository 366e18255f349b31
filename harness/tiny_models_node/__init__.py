"""A test/demo-only ComfyUI custom-node folder: lets a real server process (main.py) load the tiny test
weights. It registers the same test-only model configs the in-process tests register
(tiny_models.register_tiny_sd15, tiny_clip_vision.register_tiny_clip_vision,
tiny_flux_sdxl.register_tiny_flux_sdxl); everything else in the
server stays stock ComfyUI. Link it into <base>/custom_nodes/ beside the pack; never ship it to users.
"""
import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
if _REPO_ROOT not in sys.path:
    sys.path.append(_REPO_ROOT)  # appended: ComfyUI's own modules (`nodes`, `utils`) keep precedence

from harness import tiny_clip_vision, tiny_flux_sdxl, tiny_models  # noqa: E402

tiny_models.register_tiny_sd15()
tiny_clip_vision.register_tiny_clip_vision()
tiny_flux_sdxl.register_tiny_flux_sdxl()

NODE_CLASS_MAPPINGS = {}
