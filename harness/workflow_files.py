"""The shipped workflows (workflows/) and tiny generated stand-ins for every model file
they name, saved under those names: used by tests/test_workflows.py, tests/test_browser.py and anything
that runs the shipped graphs on CPU (convert with harness.workflow_api)."""
import glob
import json
import os

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ComfyUI's template browser and comfy-test both look in a top-level workflows/ folder.
WORKFLOW_DIR = os.path.join(REPO_ROOT, "workflows")
# The paper's examples (file stems in workflows/), all with the AMDM Aggregate Sampler or by hand.
REQUIRED_WORKFLOWS = ("amdm_interactdiffusion_migc", "amdm_interactdiffusion_ipadapter",
                      "amdm_interactdiffusion_migc_ipadapter", "amdm_by_hand")
# AMDM Guider on SamplerCustomAdvanced (one GUIDER per branch, a non-default sampler).
GUIDER_WORKFLOW = "amdm_guider"
# The families users run now: branches that carry different controls (a ControlNet main branch each).
FLUX_WORKFLOW = "amdm_flux_controlnet_redux"
SDXL_WORKFLOW = "amdm_sdxl_controlnet_finetune"
# loader node -> (widget holding the file name, ComfyUI models/ folder or "input")
FILE_WIDGETS = {
    "CheckpointLoaderSimple": ("ckpt_name", "checkpoints"),
    "InteractDiffusionLoader": ("interactdiffusion_name", "interactdiffusion"),
    "MIGCLoader": ("migc_name", "migc"),
    "AMDMIPAdapterLoader": ("ipadapter_file", "ipadapter"),
    "CLIPVisionLoader": ("clip_name", "clip_vision"),
    "ControlNetLoader": ("control_net_name", "controlnet"),
    "StyleModelLoader": ("style_model_name", "style_models"),
    "LoadImage": ("image", "input"),
}


def shipped_workflows():
    """Stems of every workflow file shipped in workflows/."""
    return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(WORKFLOW_DIR, "*.json")))


def load_workflow(name):
    with open(os.path.join(WORKFLOW_DIR, name + ".json")) as fh:
        return json.load(fh)


def expected_files(workflows, input_types):
    """{(folder, file name)} that the workflows' loader nodes name."""
    from .workflow_api import widget_layout

    files = set()
    for workflow in workflows:
        for node in workflow["nodes"]:
            if node["type"] in FILE_WIDGETS:
                widget, folder = FILE_WIDGETS[node["type"]]
                names = [name for name, _ in widget_layout(input_types(node["type"]))]
                files.add((folder, node["widgets_values"][names.index(widget)]))
    return files


def stage_files(base_dir, files, tiny_checkpoint_path, store_dir=None):
    """Tiny seeded stand-ins under ``base_dir/models/<folder>/<name>`` (``base_dir/input`` for images) in
    each real file format: the SD1.5 checkpoint is a link to the session's tiny SD1.5 file, the Flux and
    SDXL files come from harness/tiny_flux_sdxl.py. With ``store_dir`` (another base directory) every
    stand-in is written there once and linked from ``base_dir``, so several servers share one copy."""
    from .tiny_clip_vision import write_tiny_clip_vision
    from .tiny_flux_sdxl import STAND_INS, register_tiny_flux_sdxl, write_stand_in
    from .tiny_interactdiffusion import write_tiny_interactdiffusion
    from .tiny_ipadapter import write_tiny_ipadapter
    from .tiny_migc import write_tiny_migc

    register_tiny_flux_sdxl()  # this process loads them too
    writers = {"interactdiffusion": write_tiny_interactdiffusion, "migc": write_tiny_migc,
               "ipadapter": write_tiny_ipadapter, "clip_vision": write_tiny_clip_vision,
               "checkpoints": lambda path: os.symlink(tiny_checkpoint_path, path), "input": write_test_image}
    for folder, name in sorted(files):
        relative = folder if folder == "input" else os.path.join("models", folder)
        path = os.path.join(store_dir or base_dir, relative, name)
        if not os.path.lexists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if name in STAND_INS:
                write_stand_in(name, path)
            else:
                writers[folder](path)
        link = os.path.join(base_dir, relative, name)
        if not os.path.lexists(link):
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(path, link)
    return base_dir


def write_test_image(path, seed=0, size=96):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path
