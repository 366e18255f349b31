"""The pack's main job, headless: AMDM's effect on models with a known answer, then a shipped AMDM
workflow, both through ComfyUI's real executor.

Default (no weights needed):
1. Control transfer. Two exact-mixture models (harness/exact_mixture.py: the exact posterior-mean
   denoiser of blobs at one of 4 positions in one of 4 colours) are wired like real checkpoints: model A
   understands only the position in its prompt, model B only the colour. For 4 prompts x a batch of 16
   seeds, one graph samples A alone, B alone, AMDM (A main + B aux, slerp) and AMDM linear with the real
   AMDM Aggregate Sampler, decodes every sample with the models' VAE and saves images and latents. The
   grid of all 256 decoded samples goes to out/control_transfer_grid.png; the rates of samples with both
   attributes right (nearest mixture component = the prompted one) go to summary.json.
2. The shipped InteractDiffusion + MIGC workflow on tiny SD1.5-shaped models with seeded random weights,
   generated on the fly under the file names the workflow expects and loaded by its real loader nodes.
   Those images are noise-like (random weights); the run proves the whole graph executes.

With real weights: point at your ComfyUI (or keep the pinned copy) and your models folder:

    make demo DEMO_ARGS="--models-dir /path/to/ComfyUI/models --input-image style.png"
    COMFYUI_PATH=/path/to/ComfyUI make demo DEMO_ARGS="--models-dir /path/to/ComfyUI/models"

Writes the images and `summary.json` (per-node timings, UNet calls, AMDM parameters and, by default,
the control-transfer rates) under out/.
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
from harness.runtime import UNetForwards  # noqa: E402

DEFAULT_WORKFLOW = "amdm_interactdiffusion_migc.json"

# The paper's settings (T = 50 DDIM steps, cfg 7.5, s = 20, w = 0.5), except p: on this mixture the
# deviation step lowers transfer (bench/results/control_transfer.md: p = 0.3 -> 0 raises the slerp rate
# from about 65 % to about 79 %), so the demo runs p = 0.
CONTROL_TRANSFER = {
    "prompts": [["top-left", "red"], ["top-right", "green"], ["bottom-left", "blue"], ["bottom-right", "white"]],
    "batch_size": 16, "steps": 50, "cfg": 7.5, "sampler_name": "ddim", "scheduler": "ddim_uniform",
    "weight_2": 0.5, "aggregation_steps": 20, "deviation_step": 0.0, "mean_mode": "reference",
    "noise": "independent",
}
COLUMNS = (  # summary key, grid title, how it samples
    ("main_alone", "A alone (knows position)", "KSampler"),
    ("aux_alone", "B alone (knows colour)", "KSampler"),
    ("amdm", "AMDM: A + aux B, slerp", "sequential"),
    ("amdm_linear", "AMDM: A + aux B, linear", "linear"),
)


def control_transfer_prompt(settings):
    """The API-format graph: two exact-mixture loaders, one prompt node per row (both models get the
    same prompt) and an empty negative; per row and column a sampler, VAEDecode + SaveImage and SaveLatent.
    Row k samples a batch from seed k (AMDM's aux branch draws seed k + 1, its 'independent' noise)."""
    prompt = {
        "model_a": {"class_type": "ExactMixtureLoader", "inputs": {"knows": "position", "prediction": "eps"}},
        "model_b": {"class_type": "ExactMixtureLoader", "inputs": {"knows": "colour", "prediction": "eps"}},
        "negative": {"class_type": "ExactMixturePrompt", "inputs": {"position": "any", "colour": "any"}},
    }
    common = {key: settings[key] for key in ("steps", "cfg", "sampler_name", "scheduler")}
    for row, (position, colour) in enumerate(settings["prompts"]):
        prompt[f"prompt_{row}"] = {"class_type": "ExactMixturePrompt", "inputs": {"position": position, "colour": colour}}
        prompt[f"latent_{row}"] = {"class_type": "EmptyLatentImage",
                                   "inputs": {"width": 256, "height": 256, "batch_size": settings["batch_size"]}}
        positive, latent = [f"prompt_{row}", 0], [f"latent_{row}", 0]
        for key, _, how in COLUMNS:
            node = f"{key}_{row}"
            if how == "KSampler":
                model = ["model_a" if key == "main_alone" else "model_b", 0]
                prompt[node] = {"class_type": "KSampler", "inputs": {
                    "model": model, "positive": positive, "negative": ["negative", 0], "latent_image": latent,
                    "seed": row, "denoise": 1.0, **common}}
            else:
                prompt[node] = {"class_type": "AMDMAggregateSampler", "inputs": {
                    "model": ["model_a", 0], "positive": positive, "negative": ["negative", 0],
                    "model_2": ["model_b", 0], "positive_2": positive, "negative_2": ["negative", 0],
                    "latent_image": latent, "seed": row, "cfg_2": settings["cfg"], "denoise": 1.0,
                    "aggregation": how, **common,
                    **{k: settings[k] for k in ("weight_2", "aggregation_steps", "deviation_step", "mean_mode", "noise")}}}
            prompt[f"decode_{node}"] = {"class_type": "VAEDecode", "inputs": {"samples": [node, 0], "vae": ["model_a", 1]}}
            prompt[f"image_{node}"] = {"class_type": "SaveImage",
                                       "inputs": {"images": [f"decode_{node}", 0], "filename_prefix": f"control/{node}"}}
            prompt[f"save_{node}"] = {"class_type": "SaveLatent",
                                      "inputs": {"samples": [node, 0], "filename_prefix": f"control/{node}"}}
    return prompt


def run_control_transfer(out_dir, settings=CONTROL_TRANSFER):
    """Run the control-transfer graph; write the grid PNG; return the summary's "control_transfer" entry."""
    import folder_paths
    import safetensors.torch
    import torch
    from PIL import Image

    from harness import exact_mixture, exact_mixture_comfy
    from harness.executor import run_graph

    exact_mixture_comfy.load_nodes()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: a second thread only adds synchronisation
    started = time.perf_counter()
    try:
        outputs, _ = run_graph(control_transfer_prompt(settings))
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - started

    def saved(node, kind):
        return [os.path.join(folder_paths.get_directory_by_type(f["type"]), f["subfolder"], f["filename"])
                for f in outputs[node][kind]]

    means = exact_mixture.component_means()
    rates, details, cells = {}, {}, {}
    for key, _, _ in COLUMNS:
        latents, targets_p, targets_c = [], [], []
        for row, (position, colour) in enumerate(settings["prompts"]):
            node = f"{key}_{row}"
            (latent_file,) = saved(f"save_{node}", "latents")
            latents.append(safetensors.torch.load_file(latent_file)["latent_tensor"])
            targets_p += [exact_mixture.POSITIONS.index(position)] * latents[-1].shape[0]
            targets_c += [exact_mixture.COLOURS.index(colour)] * latents[-1].shape[0]
            cells[key, row] = [Image.open(path).convert("RGB") for path in saved(f"image_{node}", "images")]
        result = exact_mixture.score(torch.cat(latents), means, torch.tensor(targets_p), torch.tensor(targets_c))
        rates[key] = round(result["both"], 4)
        details[key] = {name: round(value, 4) for name, value in result.items()}
        details[key]["samples"] = len(targets_p)
    grid = "control_transfer_grid.png"
    draw_grid(os.path.join(out_dir, grid), cells, rates, settings)
    return {
        **rates,
        "rate": "share of samples whose nearest mixture component has the prompted position and colour",
        "samples_each": details["main_alone"]["samples"],
        "chance": {"main_alone": 0.25, "aux_alone": 0.25, "unconditional": 1 / 16},
        "details": details,
        "settings": {**settings, "seeds": f"prompt row k: a batch of {settings['batch_size']} from seed k "
                     f"(AMDM's aux branch: seed k + 1)", "model_a": "exact mixture, knows position (eps)",
                     "model_b": "exact mixture, knows colour (eps)", "negative": "empty prompt"},
        "grid": grid,
        "wall_seconds": round(wall, 3),
    }


def draw_grid(path, cells, rates, settings):
    """One PNG: a row per prompt, a column per sampler, every decoded sample of the batch in each cell."""
    from PIL import Image, ImageDraw, ImageFont

    tile = cells[COLUMNS[0][0], 0][0].size[0]
    per_row = int(len(cells[COLUMNS[0][0], 0]) ** 0.5 + 0.999)
    cell = per_row * tile
    gap, left, top = 12, 150, 64
    rows = len(settings["prompts"])
    width, height = left + len(COLUMNS) * (cell + gap), top + rows * (cell + gap)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font, small = ImageFont.load_default(size=17), ImageFont.load_default(size=15)
    for col, (key, title, _) in enumerate(COLUMNS):
        x = left + col * (cell + gap)
        draw.text((x, 8), title, fill="black", font=font)
        draw.text((x, 32), f"both right: {100 * rates[key]:.0f} %", fill="black", font=small)
        for row in range(rows):
            y = top + row * (cell + gap)
            for i, image in enumerate(cells[key, row]):
                canvas.paste(image, (x + (i % per_row) * tile, y + (i // per_row) * tile))
    for row, (position, colour) in enumerate(settings["prompts"]):
        y = top + row * (cell + gap) + cell // 2 - 20
        draw.text((8, y), "prompt:", fill="black", font=small)
        draw.text((8, y + 20), f"{position}, {colour}", fill="black", font=small)
    canvas.save(path)


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workflow", default=os.path.join(REPO_ROOT, "workflows", DEFAULT_WORKFLOW),
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
    control_transfer = None if args.models_dir else run_control_transfer(args.out)

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
    with UNetForwards() as counter:
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
        "unet_calls_note": "UNet forward passes of the whole graph: the AMDM branches share one per step, "
                           "the side output KSampler makes its own; cond and uncond share one pass "
                           "(InteractDiffusion, MIGC and IP-Adapter all batch them)",
        "node_seconds": {f"{nid} {prompt[nid]['class_type']}": sec for nid, sec in node_timings(executor).items()
                         if nid in prompt},
        "amdm_parameters": {nid: {"class_type": node["class_type"],
                                  **{k: v for k, v in node["inputs"].items() if not isinstance(v, list)}}
                            for nid, node in prompt.items() if node["class_type"].startswith("AMDM")},
        "images": images,
    }
    if control_transfer:
        summary["control_transfer"] = control_transfer
    with open(os.path.join(args.out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    shutil.rmtree(base_dir, ignore_errors=True)
    print(json.dumps({k: summary[k] for k in ("workflow", "wall_seconds", "unet_calls", "images")}, indent=2))
    if control_transfer:
        print("control transfer, both attributes right: " + ", ".join(
            f"{key} {control_transfer[key]:.3f}" for key, _, _ in COLUMNS) + f"; grid {control_transfer['grid']}")
    print(f"wrote {len(images)} image(s) and summary.json to {args.out}")


def _title(workflow, node_id):
    for node in workflow["nodes"]:
        if str(node["id"]) == str(node_id):
            return node.get("title") or node["type"]
    return ""


if __name__ == "__main__":
    main()
