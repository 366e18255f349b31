"""The shipped workflows (workflows/): the paper's settings and the AMDM Guider graph, every node of the
pack used somewhere, in step with the nodes' current inputs, and executed in the real ComfyUI after a
conversion to API format by code (harness/workflow_api.py; no hand-kept API twin).

Execution runs on tiny generated weights saved under the file names the workflows name. For CPU time
the test edits the converted graphs: 128 x 128 instead of 512 x 512 (width/height and every box divided
by 4, so the boxes keep their place) and, for the workflows of more than 10 steps (the 50-step paper
workflow, the 20-step guider workflow), 10 steps with s = 4; every other setting is the shipped one. The shipped files keep the paper's settings.
"""
import os

import numpy as np
import pytest
from PIL import Image

from harness.workflow_api import check_workflow, scale_workflow, ui_to_api, widget_layout
from harness.workflow_files import (GUIDER_WORKFLOW, REQUIRED_WORKFLOWS, WORKFLOW_DIR, expected_files,
                                    load_workflow, shipped_workflows, stage_files)

CAPTION = "A red hair girl is drinking from a blue bottle of water, oil painting"
CPU_SCALE = 4
CPU_STEPS, CPU_AGGREGATION_STEPS = 10, 4
SIZE_AT_CPU_SCALE = 512 // CPU_SCALE
SAMPLING_WIDGETS = ("seed", "steps", "cfg", "sampler_name", "scheduler", "denoise")


@pytest.fixture(scope="module")
def input_types(pack, comfy):
    return lambda node_type: comfy.NODE_CLASS_MAPPINGS[node_type].INPUT_TYPES()


@pytest.fixture(scope="module")
def workflow_files(input_types, comfy_base, tiny_checkpoint):
    """Tiny stand-ins for every file the shipped workflows name, in the in-process ComfyUI's folders."""
    files = expected_files([load_workflow(name) for name in shipped_workflows()], input_types)
    stage_files(comfy_base, files, os.path.join(comfy_base, "models", "checkpoints", tiny_checkpoint))
    return files


def widgets(node, input_types):
    """{widget name: value} of a UI node."""
    names = [name for name, _ in widget_layout(input_types(node["type"]))]
    return {name: value for name, value in zip(names, node["widgets_values"]) if name}


def nodes_of(workflow, node_type):
    return [n for n in workflow["nodes"] if n["type"] == node_type]


def upstream(workflow, node, input_name):
    """The node feeding ``node``'s input ``input_name``."""
    link_id = next(s["link"] for s in node["inputs"] if s["name"] == input_name)
    source_id = next(link[1] for link in workflow["links"] if link[0] == link_id)
    return next(n for n in workflow["nodes"] if n["id"] == source_id)


def model_source(workflow, node, input_name="model"):
    """Follow a MODEL input up through model-patching nodes to the node that loads the weights."""
    source = upstream(workflow, node, input_name)
    while any(s["name"] == "model" and s.get("link") is not None for s in source["inputs"]):
        source = upstream(workflow, source, "model")
    return source


def test_workflows_are_shipped_with_thumbnails():
    assert set(REQUIRED_WORKFLOWS) | {GUIDER_WORKFLOW} <= set(shipped_workflows())
    for name in shipped_workflows():
        workflow = load_workflow(name)
        assert workflow["version"] == 0.4 and workflow["nodes"] and workflow["links"]
        thumbnail = os.path.join(WORKFLOW_DIR, name + ".jpg")
        assert os.path.getsize(thumbnail) < 100_000, f"{name}.jpg is not a small thumbnail"
        with Image.open(thumbnail) as image:
            assert image.format == "JPEG" and min(image.size) >= 100


@pytest.mark.parametrize("name", shipped_workflows())
def test_workflow_widgets_match_node_inputs(name, input_types, workflow_files):
    """Fails when a node's inputs are renamed, added, removed or reordered without the workflows being
    rebuilt (scripts/build_workflows.py)."""
    assert check_workflow(load_workflow(name), input_types) == []


def test_input_change_is_caught(input_types):
    """The check above is not vacuous: each kind of input change is reported on the changed node."""
    workflow = load_workflow("amdm_interactdiffusion_migc")

    def changed(edit):
        def types(node_type):
            spec = input_types(node_type)
            if node_type != "AMDMAggregateSampler":
                return spec
            required = dict(spec["required"])
            edit(required)
            return dict(spec, required=required)
        return check_workflow(workflow, types)

    def rename(req):
        req["weight_aux"] = req.pop("weight_2")

    def insert(req):
        items = list(req.items())
        items.insert(8, ("eta", ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0})))
        req.clear()
        req.update(items)

    def swap(req):
        items = list(req.items())
        a, b = [i for i, (k, _) in enumerate(items) if k in ("steps", "cfg")]
        items[a], items[b] = items[b], items[a]
        req.clear()
        req.update(items)

    def new_link_input(req):
        req["mask"] = ("MASK",)

    for edit in (rename, insert, swap, new_link_input, lambda req: req.pop("noise")):
        problems = changed(edit)
        assert problems and all("AMDMAggregateSampler" in p for p in problems), (edit, problems)


@pytest.mark.parametrize("name", REQUIRED_WORKFLOWS)
def test_paper_workflow_has_its_settings(name, input_types):
    workflow = load_workflow(name)
    loaders = nodes_of(workflow, "CheckpointLoaderSimple")
    assert len(loaders) == 1, "one SD1.5 checkpoint loader feeds every branch"
    for node in workflow["nodes"]:
        if any(s["name"].startswith("model") and s["type"] == "MODEL" and s.get("link") for s in node["inputs"]):
            for slot in node["inputs"]:
                if slot["type"] == "MODEL" and slot.get("link"):
                    assert model_source(workflow, node, slot["name"]) is loaders[0], (node["type"], slot["name"])
    captions = [widgets(n, input_types)["text"] for n in nodes_of(workflow, "CLIPTextEncode")]
    assert CAPTION in captions
    for node in nodes_of(workflow, "InteractDiffusionApply"):
        subject, action, obj = [f.strip() for f in widgets(node, input_types)["interactions"].split("|")[:3]]
        assert subject.lower().removeprefix("a ") in CAPTION.lower() and action in CAPTION and obj in CAPTION
    for node in nodes_of(workflow, "MIGCApply"):
        for line in widgets(node, input_types)["instances"].splitlines():
            assert line.split("|")[0].strip().lower().removeprefix("a ") in CAPTION.lower()
    assert len(nodes_of(workflow, "Note")) >= 3 and len(workflow["groups"]) >= 4

    # the side output: the main branch alone, same seed and sampling settings as the AMDM run
    plain = nodes_of(workflow, "KSampler")
    assert len(plain) == 1
    plain_settings = widgets(plain[0], input_types)
    main_positive = upstream(workflow, plain[0], "positive")
    assert main_positive["type"] == "InteractDiffusionApply"
    decode = [n for n in nodes_of(workflow, "VAEDecode") if upstream(workflow, n, "samples") is plain[0]]
    assert decode and any(upstream(workflow, n, "images") is decode[0] for n in nodes_of(workflow, "SaveImage"))

    samplers = nodes_of(workflow, "AMDMAggregateSampler")
    if name == "amdm_by_hand":
        assert not samplers
        steps = nodes_of(workflow, "KSamplerAdvanced")
        assert len(steps) >= 4 and nodes_of(workflow, "AMDMSlerpLatentMerge")
        assert nodes_of(workflow, "AMDMDeviationCorrect")
        first = next(n for n in steps if widgets(n, input_types)["start_at_step"] == 0
                     and upstream(workflow, n, "positive") is main_positive)
        settings = widgets(first, input_types)
        assert settings["noise_seed"] == plain_settings["seed"]
        for key in ("steps", "cfg", "sampler_name", "scheduler"):
            assert settings[key] == plain_settings[key], key
        return
    assert len(samplers) == 1
    amdm = widgets(samplers[0], input_types)
    assert upstream(workflow, samplers[0], "positive") is main_positive
    for key in SAMPLING_WIDGETS:
        assert amdm[key] == plain_settings[key], key
    expected = {
        "amdm_interactdiffusion_migc": dict(steps=50, aggregation_steps=20, weight_2=0.5, deviation_step=0.3, cfg=7.5),
        "amdm_interactdiffusion_ipadapter": dict(steps=10, aggregation_steps=5, weight_2=0.5),
        "amdm_interactdiffusion_migc_ipadapter": dict(steps=10, aggregation_steps=5, weight_2=0.5, weight_3=0.65,
                                                      aggregation="paper"),
    }[name]
    assert {k: amdm[k] for k in expected} == expected
    assert (amdm["sampler_name"], amdm["scheduler"]) == ("ddim", "ddim_uniform")
    for node in nodes_of(workflow, "AMDMIPAdapterApply"):
        assert widgets(node, input_types)["weight"] == 0.8


def test_every_node_of_the_pack_is_in_a_shipped_workflow(pack):
    used = {node["type"] for name in shipped_workflows() for node in load_workflow(name)["nodes"]}
    assert sorted(set(pack.NODE_CLASS_MAPPINGS) - used) == []


def test_guider_workflow_has_two_guiders_and_a_non_default_sampler(input_types):
    """AMDM Guider on SamplerCustomAdvanced: a CFGGuider per branch (the main one on the InteractDiffusion
    conditioning, the aux one on the MIGC model), a sampler other than KSamplerSelect's default, and a
    side output that is the same run with the main guider alone."""
    workflow = load_workflow(GUIDER_WORKFLOW)
    (amdm,) = nodes_of(workflow, "AMDMGuider")
    main, aux = upstream(workflow, amdm, "guider"), upstream(workflow, amdm, "guider_2")
    assert (main["type"], aux["type"]) == ("CFGGuider", "CFGGuider") and main is not aux
    assert upstream(workflow, main, "positive")["type"] == "InteractDiffusionApply"
    assert upstream(workflow, aux, "model")["type"] == "MIGCApply"
    assert upstream(workflow, aux, "positive")["type"] == "CLIPTextEncode"
    settings = widgets(amdm, input_types)
    assert (settings["weight_2"], settings["aggregation_steps"], settings["deviation_step"]) == (0.5, 8, 0.3)

    runs = nodes_of(workflow, "SamplerCustomAdvanced")
    assert sorted(upstream(workflow, run, "guider")["type"] for run in runs) == ["AMDMGuider", "CFGGuider"]
    plain = next(run for run in runs if upstream(workflow, run, "guider") is main)
    amdm_run = next(run for run in runs if upstream(workflow, run, "guider") is amdm)
    for socket in ("noise", "sampler", "sigmas", "latent_image"):
        assert upstream(workflow, plain, socket) is upstream(workflow, amdm_run, socket), socket
    select = upstream(workflow, amdm_run, "sampler")
    default = widget_layout(input_types("KSamplerSelect"))[0][1][0][0]
    assert select["type"] == "KSamplerSelect" and widgets(select, input_types)["sampler_name"] == "dpmpp_2m" != default
    schedule = widgets(upstream(workflow, amdm_run, "sigmas"), input_types)
    assert (schedule["scheduler"], schedule["steps"]) == ("karras", 20)
    assert widgets(upstream(workflow, amdm_run, "noise"), input_types)["noise_seed"] == 1145


def cpu_sized(prompt):
    """The CPU edit of a converted graph: at most CPU_STEPS steps and, where steps were cut, at most
    CPU_AGGREGATION_STEPS merges (on the sampler node or, for AMDM Guider, on the guider node)."""
    long = [node["inputs"] for node in prompt.values()
            if isinstance(node["inputs"].get("steps"), int) and node["inputs"]["steps"] > CPU_STEPS]
    for inputs in long:
        inputs["steps"] = CPU_STEPS
    for node in prompt.values() if long else ():
        if isinstance(node["inputs"].get("aggregation_steps"), int):
            node["inputs"]["aggregation_steps"] = min(node["inputs"]["aggregation_steps"], CPU_AGGREGATION_STEPS)
    return prompt


def run_shipped(name, input_types, run_graph):
    prompt = cpu_sized(ui_to_api(scale_workflow(load_workflow(name), input_types, CPU_SCALE), input_types))
    outputs, _ = run_graph(prompt)
    return prompt, outputs


def saved_image(comfy_base, output):
    (image,) = output["images"]
    with Image.open(os.path.join(comfy_base, "output", image["subfolder"], image["filename"])) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32)


@pytest.mark.parametrize("name", shipped_workflows())
def test_shipped_workflow_runs(name, input_types, workflow_files, run_graph, comfy_base):
    prompt, outputs = run_shipped(name, input_types, run_graph)
    saves = {node_id: node for node_id, node in prompt.items() if node["class_type"] == "SaveImage"}
    assert set(saves) <= set(outputs) and len(saves) == 2
    images = {saves[node_id]["inputs"]["filename_prefix"]: saved_image(comfy_base, outputs[node_id])
              for node_id in saves}
    plain = images.pop("AMDM/without_aggregation")
    (amdm,) = images.values()
    assert amdm.shape == plain.shape == (SIZE_AT_CPU_SCALE, SIZE_AT_CPU_SCALE, 3)
    assert amdm.std() > 1.0 and plain.std() > 1.0, "an output image is flat"
    # the aux branches changed the main branch's result (the side output is the same run without them)
    assert np.abs(amdm - plain).max() > 1.0



def test_converter_follows_frontend_rules(input_types):
    """Reroutes are followed, bypassed nodes pass their input through, muted nodes and notes vanish,
    primitive values are inlined, the seed's control value is skipped."""
    node = lambda id_, type_, inputs=(), outputs=(), values=None, mode=0: {  # noqa: E731
        "id": id_, "type": type_, "mode": mode, "inputs": [dict(name=n, type=t, link=l) for n, t, l in inputs],
        "outputs": [dict(name=n, type=t, links=ls) for n, t, ls in outputs], "widgets_values": values or []}
    workflow = {"nodes": [
        node(1, "EmptyLatentImage", outputs=[("LATENT", "LATENT", [1])], values=[64, 64, 1]),
        node(2, "Reroute", inputs=[("", "*", 1)], outputs=[("", "LATENT", [2])]),
        node(3, "LatentUpscaleBy", inputs=[("samples", "LATENT", 2)], outputs=[("LATENT", "LATENT", [3])],
             values=["nearest-exact", 2.0], mode=4),
        node(4, "PrimitiveNode", outputs=[("INT", "INT", [4])], values=[7, "fixed"]),
        node(5, "KSampler", inputs=[("latent_image", "LATENT", 3), ("seed", "INT", 4), ("model", "MODEL", 5)],
             outputs=[("LATENT", "LATENT", [])], values=[1, "randomize", 3, 8.0, "euler", "normal", 1.0]),
        node(6, "CheckpointLoaderSimple", outputs=[("MODEL", "MODEL", [5])], values=["x.safetensors"], mode=2),
        node(7, "Note", values=["a note"]),
    ], "links": [[1, 1, 0, 2, 0, "LATENT"], [2, 2, 0, 3, 0, "LATENT"], [3, 3, 0, 5, 0, "LATENT"],
                 [4, 4, 0, 5, 1, "INT"], [5, 6, 0, 5, 2, "MODEL"]]}
    prompt = ui_to_api(workflow, input_types)
    assert set(prompt) == {"1", "5"}
    assert prompt["5"]["inputs"] == {"seed": 7, "steps": 3, "cfg": 8.0, "sampler_name": "euler",
                                     "scheduler": "normal", "denoise": 1.0, "latent_image": ["1", 0]}


def test_by_hand_workflow_equals_the_sampler(input_types, workflow_files, run_graph, comfy_base):
    """The by-hand graph does what AMDM Aggregate Sampler does: the test adds the sampler with the same
    settings (s = 2, exact mean, independent noise) to the converted graph and compares final latents.
    Not bit-exact: MIGC seeds its slot order by the step index within a sampling run, and each one-step
    KSamplerAdvanced run is step 0 for it; without MIGC the two agree to ~4e-6 of the latent's std."""
    import safetensors.torch

    prompt = ui_to_api(scale_workflow(load_workflow("amdm_by_hand"), input_types, CPU_SCALE), input_types)
    steps = {k: v for k, v in prompt.items() if v["class_type"] == "KSamplerAdvanced"}
    first = {v["inputs"]["noise_seed"]: v["inputs"] for v in steps.values() if v["inputs"]["start_at_step"] == 0}
    main, aux = first[min(first)], first[max(first)]
    tail = next(k for k, v in steps.items() if v["inputs"]["end_at_step"] == v["inputs"]["steps"])
    (plain,) = [k for k, v in prompt.items() if v["class_type"] == "KSampler"]
    prompt = {k: v for k, v in prompt.items() if v["class_type"] not in ("VAEDecode", "SaveImage")}
    prompt["sampler"] = {"class_type": "AMDMAggregateSampler", "inputs": dict(
        model=main["model"], positive=main["positive"], negative=main["negative"], model_2=aux["model"],
        positive_2=aux["positive"], negative_2=aux["negative"], latent_image=main["latent_image"],
        seed=main["noise_seed"], steps=main["steps"], cfg=main["cfg"], cfg_2=aux["cfg"],
        sampler_name=main["sampler_name"], scheduler=main["scheduler"], denoise=1.0, weight_2=0.5,
        aggregation_steps=2, aggregation="paper", deviation_step=0.3, mean_mode="exact", noise="independent")}
    assert aux["noise_seed"] == main["noise_seed"] + 1
    for name, source in (("hand", tail), ("sampler", "sampler"), ("plain", plain)):
        prompt["save_" + name] = {"class_type": "SaveLatent", "inputs": {"samples": [source, 0],
                                                                          "filename_prefix": "amdm_test/" + name}}
    outputs, _ = run_graph(prompt)
    latents = {}
    for name in ("hand", "sampler", "plain"):
        (entry,) = outputs["save_" + name]["latents"]
        path = os.path.join(comfy_base, "output", entry["subfolder"], entry["filename"])
        latents[name] = safetensors.torch.load_file(path)["latent_tensor"]
    aggregation_effect = (latents["sampler"] - latents["plain"]).abs().max().item()
    assert aggregation_effect > 1.0
    assert (latents["hand"] - latents["sampler"]).abs().max().item() < 0.01 * aggregation_effect
