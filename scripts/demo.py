"""The pack's main job, headless: run a shipped AMDM workflow through ComfyUI's real executor.

Default (no weights needed): tiny SD1.5-shaped models with seeded random weights are generated on the
fly and saved under the file names the workflow expects, then loaded by the workflow's real loader
nodes. The images are noise-like (random weights); the run proves the whole graph executes.

With real weights: point at your ComfyUI (or keep the pinned copy) and your models folder:

    make demo DEMO_ARGS="--models-dir /path/to/ComfyUI/models --input-image style.png"
    COMFYUI_PATH=/path/to/ComfyUI make demo DEMO_ARGS="--models-dir /path/to/ComfyUI/models"

Writes the images and `summary.json` (per-node timings, UNet calls, AMDM parameters) under out/.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from harness import runtime, tiny_models  # noqa: E402

DEFAULT_WORKFLOW = "amdm_interactdiffusion_migc.json"


def prepare_files(workflow, base_dir, input_types, tiny, input_image):
    """Tiny mode: write seeded stand-ins for every file the workflow's loaders name, in each real file
    format and under its real name. Real mode: check the files exist. --input-image feeds LoadImage."""
    import folder_paths

    from harness.workflow_files import expected_files, stage_files

    files = expected_files([workflow], input_types)
    if tiny:
        checkpoint = os.path.join(base_dir, "tiny_sd15.safetensors")
        stage_files(base_dir, files, tiny_models.write_tiny_checkpoint(checkpoint))
    for folder, name in sorted(files):
        if folder == "input":
            target = os.path.join(folder_paths.get_input_directory(), name)
            if input_image:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copyfile(input_image, target)
            elif not os.path.exists(target):
                raise SystemExit(f"the workflow loads the image {name!r}: pass --input-image")
        elif folder_paths.get_full_path(folder, name) is None:
            raise SystemExit(f"the workflow needs models/{folder}/{name}, which is not in --models-dir")


class UNetCallCounter:
    """Counts UNet forward passes (BaseModel.apply_model; cond and uncond batched count once)."""

    def __enter__(self):
        import comfy.model_base

        self.calls = 0
        self._original = comfy.model_base.BaseModel.apply_model
        original = self._original

        def counted(model, *args, **kwargs):
            self.calls += 1
            return original(model, *args, **kwargs)

        comfy.model_base.BaseModel.apply_model = counted
        return self

    def __exit__(self, *exc):
        import comfy.model_base

        comfy.model_base.BaseModel.apply_model = self._original


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workflow", default=os.path.join(REPO_ROOT, "example_workflows", DEFAULT_WORKFLOW),
                        help="a UI-format workflow file (default: the InteractDiffusion + MIGC example)")
    parser.add_argument("--models-dir", help="a ComfyUI models folder with the real weights (else tiny random ones)")
    parser.add_argument("--input-image", help="image for the workflow's LoadImage node (style reference)")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "out"), help="output folder (default out/)")
    parser.add_argument("--scale", type=int, default=None,
                        help="divide the image size and the boxes by this (default 4 with tiny models: "
                             "128x128 instead of 512x512, since a tiny UNet's attention at 64x64 latents "
                             "is slow on a CPU; 1 with --models-dir)")
    args = parser.parse_args()

    tiny = args.models_dir is None
    os.makedirs(args.out, exist_ok=True)
    base_dir = tempfile.mkdtemp(prefix="amdm_demo_")
    runtime.boot(base_dir)
    if tiny:
        tiny_models.register_tiny_sd15()
    import folder_paths
    import nodes
    from harness.executor import node_timings, run_graph
    from harness.workflow_api import scale_workflow, ui_to_api

    if args.models_dir:
        for folder in ("checkpoints", "interactdiffusion", "migc", "ipadapter", "clip_vision", "loras", "vae"):
            folder_paths.add_model_folder_path(folder, os.path.join(os.path.abspath(args.models_dir), folder))
    runtime.load_pack()

    def input_types(class_type):
        return nodes.NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()

    with open(args.workflow) as fh:
        workflow = json.load(fh)
    scale = args.scale or (4 if tiny else 1)
    if scale > 1:
        workflow = scale_workflow(workflow, input_types, scale)
    prepare_files(workflow, base_dir, input_types, tiny, args.input_image)
    prompt = ui_to_api(workflow, input_types)

    started = time.perf_counter()
    with UNetCallCounter() as counter:
        outputs, executor = run_graph(prompt)
    wall = time.perf_counter() - started

    images = []
    for node_id, ui in outputs.items():
        for image in ui.get("images", []):
            source = os.path.join(folder_paths.get_directory_by_type(image["type"]), image["subfolder"], image["filename"])
            target = os.path.join(args.out, f"{os.path.splitext(os.path.basename(args.workflow))[0]}_{node_id}_{image['filename']}")
            shutil.copyfile(source, target)
            images.append({"node": node_id, "title": _title(workflow, node_id), "file": os.path.relpath(target, args.out)})
    summary = {
        "workflow": os.path.basename(args.workflow),
        "weights": "tiny random (generated, seeded)" if tiny else os.path.abspath(args.models_dir),
        "image_scale": f"1/{scale} of the workflow's size",
        "comfyui": runtime.comfyui_dir(),
        "wall_seconds": round(wall, 3),
        "unet_calls": counter.calls,
        "unet_calls_note": "UNet forward passes of the whole graph (AMDM branches and the side output); "
                           "cond and uncond share a pass unless their patches differ (GLIGEN-style "
                           "InteractDiffusion conditioning runs them as two passes)",
        "node_seconds": {f"{nid} {prompt[nid]['class_type']}": sec for nid, sec in node_timings(executor).items()
                         if nid in prompt},
        "amdm_parameters": {nid: {"class_type": node["class_type"],
                                  **{k: v for k, v in node["inputs"].items() if not isinstance(v, list)}}
                            for nid, node in prompt.items() if node["class_type"].startswith("AMDM")},
        "images": images,
    }
    with open(os.path.join(args.out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    shutil.rmtree(base_dir, ignore_errors=True)
    print(json.dumps({k: summary[k] for k in ("workflow", "wall_seconds", "unet_calls", "images")}, indent=2))
    print(f"wrote {len(images)} image(s) and summary.json to {args.out}")


def _title(workflow, node_id):
    for node in workflow["nodes"]:
        if str(node["id"]) == str(node_id):
            return node.get("title") or node["type"]
    return ""


if __name__ == "__main__":
    main()
