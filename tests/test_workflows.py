"""The shipped workflows (workflows/): the paper's settings, the AMDM Guider graph and the Flux and SDXL
graphs, every node of the pack used somewhere, in step with the nodes' current inputs, and executed in the
real ComfyUI after a conversion to API format by code (harness/workflow_api.py; no hand-kept API twin).

Execution runs on tiny generated weights saved under the file names the workflows name, in the key
layouts of the public files (harness/tiny_flux_sdxl.py for Flux and SDXL). For CPU time the test edits
the converted graphs: 128 x 128 instead of 512 x 512 (SD1.5) or 1024 x 1024 (Flux, SDXL) (width/height
and every box divided alike, so the boxes keep their place) and, for the workflows of more than 10 steps,
10 steps with s = 4; every other setting is the shipped one. The shipped files keep their settings.
"""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from harness import tiny_flux_sdxl
from harness.workflow_api import check_workflow, scale_workflow, ui_to_api, widget_layout
from harness.workflow_files import (FLUX_WORKFLOW, GUIDER_WORKFLOW, REQUIRED_WORKFLOWS, SDXL_WORKFLOW, WORKFLOW_DIR,
                                    expected_files, load_workflow, shipped_workflows, stage_files)

CAPTION = "A red hair girl is drinking from a blue bottle of water, oil painting"
CPU_SIZE = 128  # the image side the workflows run at here
CPU_STEPS, CPU_AGGREGATION_STEPS = 10, 4
SAMPLING_WIDGETS = ("seed", "steps", "cfg", "sampler_name", "scheduler", "denoise")
FRONTEND_NODE_TYPES = {"Note", "MarkdownNote"}


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
    assert set(REQUIRED_WORKFLOWS) | {GUIDER_WORKFLOW, FLUX_WORKFLOW, SDXL_WORKFLOW} <= set(shipped_workflows())
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


def conditioning_chain(workflow, node, input_name):
    """The node types a CONDITIONING input passes through on its way from the text encoder, last first."""
    types = []
    source = upstream(workflow, node, input_name)
    while True:
        types.append(source["type"])
        inputs = [s["name"] for s in source["inputs"] if s["type"] == "CONDITIONING" and s.get("link") is not None]
        if not inputs:
            return types
        source = upstream(workflow, source, "positive" if "positive" in inputs else inputs[0])


def amdm_and_side_output(workflow, input_types):
    """(AMDM Aggregate Sampler node, its widgets, the side-output KSampler node, its widgets)."""
    (amdm,) = nodes_of(workflow, "AMDMAggregateSampler")
    (plain,) = nodes_of(workflow, "KSampler")
    return amdm, widgets(amdm, input_types), plain, widgets(plain, input_types)


@pytest.mark.parametrize("name", [FLUX_WORKFLOW, SDXL_WORKFLOW])
def test_flux_and_sdxl_workflows_use_core_and_pack_nodes_only(name, comfy, pack):
    """Nothing but ComfyUI's own nodes and this pack's: a user needs no other node pack."""
    for node_type in {node["type"] for node in load_workflow(name)["nodes"]} - FRONTEND_NODE_TYPES:
        module = getattr(comfy.NODE_CLASS_MAPPINGS[node_type], "RELATIVE_PYTHON_MODULE", "nodes")
        assert node_type in pack.NODE_CLASS_MAPPINGS or not module.startswith("custom_nodes."), (node_type, module)


def test_flux_workflow_aggregates_a_controlnet_branch_and_a_redux_branch(input_types):
    """Main branch: the caption with Flux guidance and a Canny ControlNet; aux branch: the same Flux model
    (one loader) with the caption plus Redux tokens of a reference image. The side output is the main
    branch alone with the AMDM run's sampling settings (cfg 1: Flux dev is guidance-distilled)."""
    workflow = load_workflow(FLUX_WORKFLOW)
    (loader,) = nodes_of(workflow, "CheckpointLoaderSimple")
    amdm, settings, plain, plain_settings = amdm_and_side_output(workflow, input_types)
    assert model_source(workflow, amdm) is model_source(workflow, amdm, "model_2") is loader
    assert conditioning_chain(workflow, amdm, "positive") == [
        "ControlNetApplyAdvanced", "FluxGuidance", "CLIPTextEncode"]
    assert conditioning_chain(workflow, amdm, "positive_2") == ["StyleModelApply", "FluxGuidance", "CLIPTextEncode"]
    control = upstream(workflow, amdm, "positive")
    assert upstream(workflow, amdm, "negative") is control
    assert upstream(workflow, control, "image")["type"] == "Canny"
    assert upstream(workflow, control, "control_net")["type"] == "ControlNetLoader"
    style = upstream(workflow, amdm, "positive_2")
    encode = upstream(workflow, style, "clip_vision_output")
    assert encode["type"] == "CLIPVisionEncode"
    assert upstream(workflow, style, "style_model")["type"] == "StyleModelLoader"
    assert upstream(workflow, encode, "image") is not upstream(workflow, upstream(workflow, control, "image"), "image")
    assert upstream(workflow, amdm, "latent_image")["type"] == "EmptySD3LatentImage"
    for key in SAMPLING_WIDGETS:
        assert settings[key] == plain_settings[key], key
    assert upstream(workflow, plain, "positive") is control
    assert (settings["cfg"], settings["cfg_2"]) == (1.0, 1.0)
    assert (settings["sampler_name"], settings["scheduler"]) == ("euler", "simple")
    assert (settings["steps"], settings["aggregation_steps"], settings["mean_mode"]) == (20, 8, "auto")
    assert len(nodes_of(workflow, "Note")) >= 3 and len(workflow["groups"]) >= 4


def test_sdxl_workflow_aggregates_a_controlnet_branch_and_a_finetune_branch(input_types):
    """Main branch: SDXL base with a Canny ControlNet; aux branch: a second SDXL checkpoint (a fine-tune)
    whose own text encoders encode its prompts. The side output is the main branch alone."""
    workflow = load_workflow(SDXL_WORKFLOW)
    amdm, settings, plain, plain_settings = amdm_and_side_output(workflow, input_types)
    base, finetune = model_source(workflow, amdm), model_source(workflow, amdm, "model_2")
    assert base["type"] == finetune["type"] == "CheckpointLoaderSimple" and base is not finetune
    assert widgets(base, input_types)["ckpt_name"] != widgets(finetune, input_types)["ckpt_name"]
    assert conditioning_chain(workflow, amdm, "positive") == ["ControlNetApplyAdvanced", "CLIPTextEncode"]
    assert conditioning_chain(workflow, amdm, "positive_2") == ["CLIPTextEncode"]
    for prompt in ("positive_2", "negative_2"):
        assert upstream(workflow, upstream(workflow, amdm, prompt), "clip") is finetune
    control = upstream(workflow, amdm, "positive")
    assert upstream(workflow, upstream(workflow, control, "positive"), "clip") is base
    assert upstream(workflow, control, "image")["type"] == "Canny"
    for key in SAMPLING_WIDGETS:
        assert settings[key] == plain_settings[key], key
    assert model_source(workflow, plain) is base and upstream(workflow, plain, "positive") is control
    assert (settings["steps"], settings["aggregation_steps"], settings["cfg"], settings["cfg_2"]) == (30, 10, 6.5, 6.5)
    assert (settings["sampler_name"], settings["scheduler"], settings["mean_mode"]) == ("dpmpp_2m", "karras", "auto")
    assert len(nodes_of(workflow, "Note")) >= 3 and len(workflow["groups"]) >= 4


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


def cpu_prompt(name, input_types):
    """The workflow converted to API format, at CPU_SIZE and at most CPU_STEPS steps."""
    workflow = load_workflow(name)
    size = max(value for node in workflow["nodes"] if node["type"].startswith("Empty")
               for value in widgets(node, input_types).values() if isinstance(value, int) and value > 64)
    return cpu_sized(ui_to_api(scale_workflow(workflow, input_types, size // CPU_SIZE), input_types))


def run_shipped(name, input_types, run_graph):
    prompt = cpu_prompt(name, input_types)
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
    assert amdm.shape == plain.shape == (CPU_SIZE, CPU_SIZE, 3)
    assert amdm.std() > 1.0 and plain.std() > 1.0, "an output image is flat"
    # the aux branches changed the main branch's result (the side output is the same run without them)
    assert np.abs(amdm - plain).max() > 1.0



def final_latents(run_graph, comfy_base, prompt, sources):
    """Run ``prompt`` without its decoders and image savers; {name: the LATENT of node id} for ``sources``."""
    import safetensors.torch

    prompt = {k: v for k, v in prompt.items() if v["class_type"] not in ("VAEDecode", "SaveImage")}
    for name, source in sources.items():
        prompt["save_" + name] = {"class_type": "SaveLatent",
                                  "inputs": {"samples": [source, 0], "filename_prefix": "amdm_test/" + name}}
    outputs, _ = run_graph(prompt)
    latents = {}
    for name in sources:
        (entry,) = outputs["save_" + name]["latents"]
        path = os.path.join(comfy_base, "output", entry["subfolder"], entry["filename"])
        latents[name] = safetensors.torch.load_file(path)["latent_tensor"]
    return latents


def node_id(prompt, class_type):
    (found,) = [k for k, v in prompt.items() if v["class_type"] == class_type]
    return found


@pytest.mark.parametrize("name", [FLUX_WORKFLOW, SDXL_WORKFLOW])
def test_each_branch_control_reaches_the_result(name, input_types, workflow_files, run_graph, comfy_base):
    """The ControlNet acts on the main branch (strength 0 changes the side output, the main branch alone),
    and the aux branch's control reaches the AMDM result only: on Flux the Redux tokens (strength 0), on
    SDXL the fine-tune (the aux branch on the base model instead) change the AMDM result and leave the
    side output bit for bit."""
    import copy

    prompt = cpu_prompt(name, input_types)
    sources = {"amdm": node_id(prompt, "AMDMAggregateSampler"), "plain": node_id(prompt, "KSampler")}
    shipped = final_latents(run_graph, comfy_base, prompt, sources)

    without_control = copy.deepcopy(prompt)
    without_control[node_id(prompt, "ControlNetApplyAdvanced")]["inputs"]["strength"] = 0.0
    uncontrolled = final_latents(run_graph, comfy_base, without_control, sources)
    assert (uncontrolled["plain"] - shipped["plain"]).abs().max() > 1e-3

    without_aux_control = copy.deepcopy(prompt)
    amdm = without_aux_control[sources["amdm"]]["inputs"]
    if name == FLUX_WORKFLOW:
        without_aux_control[node_id(prompt, "StyleModelApply")]["inputs"]["strength"] = 0.0
    else:
        amdm["model_2"] = amdm["model"]
    changed = final_latents(run_graph, comfy_base, without_aux_control, sources)
    assert torch.equal(changed["plain"], shipped["plain"])
    assert (changed["amdm"] - shipped["amdm"]).abs().max() > 1e-3


def test_tiny_stand_ins_have_the_public_files_key_layouts(workflow_files, comfy_base):
    """Keys every public file has, spelled out here from those files' formats (independently of the
    generator): the all-in-one Flux checkpoint and the SDXL checkpoints as ComfyUI's CheckpointSave writes
    them, XLabs' Flux ControlNet, Redux, SigLIP, and the diffusers SDXL ControlNet."""
    import safetensors

    def keys(folder, name):
        with safetensors.safe_open(os.path.join(comfy_base, "models", folder, name), "pt") as fh:
            return set(fh.keys())

    flux = keys("checkpoints", tiny_flux_sdxl.FLUX_CHECKPOINT)
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in flux} == {
        "model.diffusion_model", "text_encoders.clip_l", "text_encoders.t5xxl", "vae.encoder", "vae.decoder"}
    assert {"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale",
            "model.diffusion_model.single_blocks.0.linear1.weight", "model.diffusion_model.guidance_in.in_layer.weight",
            "model.diffusion_model.vector_in.in_layer.weight", "model.diffusion_model.final_layer.linear.weight",
            "text_encoders.clip_l.transformer.text_model.encoder.layers.1.mlp.fc1.weight",
            "text_encoders.t5xxl.transformer.shared.weight",
            "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "text_encoders.t5xxl.transformer.encoder.block.1.layer.1.DenseReluDense.wi_1.weight",
            "vae.decoder.conv_in.weight", "vae.encoder.down.3.block.1.conv2.weight"} <= flux
    assert not any("quant_conv" in k for k in flux)  # Flux's autoencoder has none
    controlnet = keys("controlnet", tiny_flux_sdxl.FLUX_CONTROLNET)
    assert {"controlnet_blocks.0.weight", "pos_embed_input.weight", "input_hint_block.0.weight", "img_in.weight",
            "double_blocks.0.img_attn.norm.key_norm.scale", "guidance_in.in_layer.weight"} <= controlnet
    assert not any(k.startswith("single_blocks.") for k in controlnet)
    assert keys("style_models", tiny_flux_sdxl.FLUX_REDUX) == {
        "redux_up.weight", "redux_up.bias", "redux_down.weight", "redux_down.bias"}
    siglip = keys("clip_vision", tiny_flux_sdxl.SIGCLIP_VISION)
    assert {"vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.position_embedding.weight",
            "vision_model.encoder.layers.0.self_attn.q_proj.weight", "vision_model.post_layernorm.weight"} <= siglip
    assert not any("class_embedding" in k for k in siglip)  # SigLIP has no class token
    for name in (tiny_flux_sdxl.SDXL_CHECKPOINT, tiny_flux_sdxl.SDXL_FINETUNE):
        sdxl = keys("checkpoints", name)
        assert {"model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.input_blocks.4.1.proj_in.weight",
                "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
                "conditioner.embedders.1.model.text_projection", "conditioner.embedders.1.model.token_embedding.weight",
                "first_stage_model.quant_conv.weight", "first_stage_model.post_quant_conv.weight",
                "first_stage_model.decoder.up.3.block.2.conv2.weight"} <= sdxl
    sdxl_controlnet = keys("controlnet", tiny_flux_sdxl.SDXL_CONTROLNET)
    assert {"conv_in.weight", "time_embedding.linear_1.weight", "add_embedding.linear_1.weight",
            "controlnet_cond_embedding.conv_in.weight", "controlnet_cond_embedding.blocks.0.weight",
            "controlnet_cond_embedding.conv_out.weight", "controlnet_down_blocks.0.weight",
            "controlnet_mid_block.weight",
            "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight", "mid_block.resnets.1.conv2.weight"
            } <= sdxl_controlnet
    assert not any(k.startswith(("input_blocks.", "zero_convs.", "class_embedding.")) for k in sdxl_controlnet)


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

    prompt = ui_to_api(scale_workflow(load_workflow("amdm_by_hand"), input_types, 512 // CPU_SIZE), input_types)
    steps = {k: v for k, v in prompt.items() if v["class_type"] == "KSamplerAdvanced"}
    first = {v["inputs"]["noise_seed"]: v["inputs"] for v in steps.values() if v["inputs"]["start_at_step"] == 0}
    main, aux = first[min(first)], first[max(first)]
    tail = next(k for k, v in steps.items() if v["inputs"]["end_at_step"] == v["inputs"]["steps"])
    (plain,) = [k for k, v in prompt.items() if v["class_type"] == "KSampler"]
    prompt["sampler"] = {"class_type": "AMDMAggregateSampler", "inputs": dict(
        model=main["model"], positive=main["positive"], negative=main["negative"], model_2=aux["model"],
        positive_2=aux["positive"], negative_2=aux["negative"], latent_image=main["latent_image"],
        seed=main["noise_seed"], steps=main["steps"], cfg=main["cfg"], cfg_2=aux["cfg"],
        sampler_name=main["sampler_name"], scheduler=main["scheduler"], denoise=1.0, weight_2=0.5,
        aggregation_steps=2, aggregation="paper", deviation_step=0.3, mean_mode="exact", noise="independent")}
    assert aux["noise_seed"] == main["noise_seed"] + 1
    latents = final_latents(run_graph, comfy_base, prompt, {"hand": tail, "sampler": "sampler", "plain": plain})
    aggregation_effect = (latents["sampler"] - latents["plain"]).abs().max().item()
    assert aggregation_effect > 1.0
    assert (latents["hand"] - latents["sampler"]).abs().max().item() < 0.01 * aggregation_effect
