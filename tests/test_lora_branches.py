"""Branches with their own LoRAs on clones of one UNet: the weight cache of PatcherSwitch
(comfy_bridge/branches.py) against exact re-patching at every switch, separate UNets and KSampler.

LoRAs are kohya-layout files (harness/tiny_lora.py) loaded by ComfyUI's LoraLoaderModelOnly. Exact
re-patching (ComfyUI's `partially_load` at every switch) is what the switch falls back to when its extra
copies do not fit ComfyUI's free-memory estimate; the tests get it the way a user would, with ComfyUI's
reserved memory (what --reserve-vram sets) raised above all free memory.
"""
import os

import pytest
import torch
from node_calls import amdm, empty_latent, ksampler

from harness import tiny_clip_vision, tiny_ipadapter, tiny_lora, tiny_models

WINDOW = 3  # s, with node_calls.STEPS = 5 sampling steps


@pytest.fixture
def conds(random_cond):
    """Positive and negative conditioning for up to three branches."""
    return [random_cond(seed) for seed in range(31, 37)]


@pytest.fixture(scope="module")
def lora_names(comfy):
    """Two different kohya-layout LoRA files in models/loras (a style and a character LoRA)."""
    import folder_paths

    folder = os.path.join(folder_paths.models_dir, "loras")
    return [tiny_lora.write_sd15_lora(os.path.join(folder, f"amdm_test_{kind}.safetensors"), seed=seed, strength=0.3)
            for seed, kind in ((11, "style"), (12, "character"))]


def raise_reserve(monkeypatch):
    """ComfyUI's reserved memory raised above all free memory: no kept copy fits, every switch re-patches."""
    import comfy.model_management

    monkeypatch.setattr(comfy.model_management, "EXTRA_RESERVED_VRAM", 2 ** 50)


def with_lora(comfy, patcher, name):
    patched = comfy.LoraLoaderModelOnly().load_lora_model_only(patcher, name, 1.0)[0]
    assert len(patched.patches) - len(patcher.patches) == len(tiny_lora.sd15_lora_layers()), \
        "ComfyUI did not map every layer of the kohya layout"
    return patched


def with_ipadapter(comfy, pack_module, patcher):
    """`patcher` + this pack's IP-Adapter (per-call attn2 replacements) fed by the tiny CLIP vision model."""
    import folder_paths

    clip_file = "amdm_test_clip_vision.safetensors"
    tiny_clip_vision.write_tiny_clip_vision(os.path.join(folder_paths.models_dir, "clip_vision", clip_file))
    load, patch = pack_module("adapters.ipadapter.load"), pack_module("adapters.ipadapter.patch")
    adapter = load.ipadapter_from_state_dict(tiny_ipadapter.ipadapter_state_dict(seed=7), "tiny ip-adapter")
    reference = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(8))
    return patch.apply_ipadapter(patcher, adapter, comfy.CLIPVisionLoader().load_clip(clip_file)[0], reference,
                                 0.8, 0.0, 1.0)


def unet_weights(patcher):
    return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}


def run(pack, branches, conds, **settings):
    """AMDM over branches = [model, ...], main first, each with its own pair of conds."""
    with torch.no_grad():
        aux = [(model, conds[2 * k], conds[2 * k + 1], 6.0) for k, model in enumerate(branches[1:], start=1)]
        return amdm(pack, (branches[0], conds[0], conds[1]), aux, empty_latent(), s=WINDOW, **settings)[0]


def ksampler_outputs(comfy, models, conds):
    with torch.no_grad():
        return [ksampler(comfy, model, conds[0], conds[1], empty_latent()) for model in models]


class LoadCounter:
    """Counts ComfyUI's whole-model (re-)patches, `ModelPatcher.load` (the method stays ComfyUI's)."""

    def __init__(self, monkeypatch):
        import comfy.model_patcher

        self.calls = 0
        load = comfy.model_patcher.ModelPatcher.load

        def counted(patcher, *args, **kwargs):
            self.calls += 1
            return load(patcher, *args, **kwargs)

        monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "load", counted)


BRANCH_SETUPS = {
    "LoRA on the main branch only": lambda comfy, pack_module, model, loras: [
        with_lora(comfy, model, loras[0]), model.clone()],
    "LoRA on the aux branch only": lambda comfy, pack_module, model, loras: [
        model.clone(), with_lora(comfy, model, loras[0])],
    "different LoRAs on each branch": lambda comfy, pack_module, model, loras: [
        with_lora(comfy, model, loras[1]), with_lora(comfy, model, loras[0])],
    "LoRA and IP-Adapter on the aux branch": lambda comfy, pack_module, model, loras: [
        model.clone(), with_ipadapter(comfy, pack_module, with_lora(comfy, model, loras[0]))],
}


@pytest.mark.parametrize("setup", sorted(BRANCH_SETUPS))
def test_kept_weights_equal_exact_repatching_and_leave_every_model_as_before(
        comfy, pack, pack_module, tiny_model, conds, lora_names, monkeypatch, setup):
    branches = BRANCH_SETUPS[setup](comfy, pack_module, tiny_model, lora_names)
    assert all(b.model is tiny_model.model for b in branches)
    original_weights = unet_weights(tiny_model)
    before = ksampler_outputs(comfy, branches, conds)

    kept = run(pack, branches, conds)
    with monkeypatch.context() as reserved:
        raise_reserve(reserved)
        repatched = run(pack, branches, conds)
    assert torch.equal(kept, repatched), "the kept weights differ from exact re-patching"
    assert (kept - run(pack, [tiny_model.clone(), tiny_model.clone()], conds)).abs().max() > 1e-3, \
        "the LoRA had no effect"

    assert all(torch.equal(a, b) for a, b in zip(before, ksampler_outputs(comfy, branches, conds))), \
        "KSampler on a branch's model changed after the AMDM run"
    ksampler_outputs(comfy, [tiny_model], conds)
    after = unet_weights(tiny_model)
    assert all(torch.equal(v, original_weights[k]) for k, v in after.items()), "a patch outlived the run"


def test_one_run_repatches_once_per_branch_at_most_and_falls_back_when_memory_is_short(
        comfy, pack, pack_module, tiny_model, conds, lora_names, monkeypatch):
    """Counted from a state no branch has (another patcher's weights live): ComfyUI's `load_models_gpu`
    loads each branch once and the switch adds at most one exact re-patch per branch, keeping one more
    version of every LoRA'd weight; when that does not fit ComfyUI's free-memory estimate it keeps
    nothing and re-patches at every switch (twice per window step)."""
    patcher_switch = pack_module("comfy_bridge.branches").PatcherSwitch
    branches = [with_lora(comfy, tiny_model, lora_names[1]), with_lora(comfy, tiny_model, lora_names[0])]
    elsewhere = with_lora(comfy, tiny_model, lora_names[0]).clone()
    elsewhere.add_patches({}, 1.0)  # the same patches under another uuid: another patcher's weights
    counter = LoadCounter(monkeypatch)

    def loads_of_one_run():
        ksampler_outputs(comfy, [elsewhere], conds)
        counter.calls = 0
        run(pack, branches, conds)
        return counter.calls

    lora_weights = sum(tiny_model.model.get_parameter(k).nbytes for k in branches[1].patches)
    assert patcher_switch(branches).kept_bytes == lora_weights
    kept = loads_of_one_run()
    raise_reserve(monkeypatch)
    assert patcher_switch(branches).kept_bytes == 0
    repatched = loads_of_one_run()
    assert kept <= 2 * len(branches), f"{kept} whole-model loads in one run"
    assert repatched >= 2 * WINDOW, f"exact re-patching made only {repatched} loads"


def test_a_reload_by_someone_else_between_two_calls_is_noticed(comfy, pack, tiny_model, conds, lora_names):
    """Another clone's patches made live between two calls of the run (here by ComfyUI's own clone switch
    from a model wrapper): the switch drops its kept weights and takes them again from ComfyUI's loader.
    The intruder also patches a weight no branch patches, which no kept version would put back."""
    branches = [tiny_model.clone(), with_lora(comfy, tiny_model, lora_names[0])]
    undisturbed = run(pack, branches, conds)
    intruder = with_lora(comfy, tiny_model, lora_names[1])
    out_conv = "diffusion_model.out.2.weight"
    intruder.add_patches({out_conv: (torch.full_like(tiny_model.model.get_parameter(out_conv), 0.05),)}, 1.0)
    disturbed_aux = branches[1].clone()
    aux_calls = []

    def load_another_clone_after_the_call(apply_model, args):
        out = apply_model(args["input"], args["timestep"], **args["c"])
        aux_calls.append(1)
        if len(aux_calls) == 2:
            intruder.partially_load(intruder.load_device, 1e32)
        return out

    disturbed_aux.set_model_unet_function_wrapper(load_another_clone_after_the_call)
    disturbed = run(pack, [branches[0], disturbed_aux], conds)
    assert len(aux_calls) > 2 and torch.equal(disturbed, undisturbed)


def test_clones_that_patch_in_place_are_repatched_exactly(comfy, pack, tiny_model, conds, lora_names):
    """A patcher made with weight_inplace_update writes patched values into the weight tensors themselves
    (and puts the originals back into them), so no version can be kept by reference: the switch
    re-patches, with the same result."""
    from comfy.model_patcher import ModelPatcher

    twin = tiny_models.tiny_model_patcher(seed=0)
    in_place = ModelPatcher(twin.model, twin.load_device, twin.offload_device,
                                                weight_inplace_update=True)
    original_weights = unet_weights(in_place)
    kept = run(pack, [with_lora(comfy, tiny_model, loras) for loras in lora_names], conds)
    patched_in_place = run(pack, [with_lora(comfy, in_place, loras) for loras in lora_names], conds)
    assert torch.equal(kept, patched_in_place)
    ksampler_outputs(comfy, [in_place], conds)
    assert all(torch.equal(v, original_weights[k]) for k, v in unet_weights(in_place).items())


def test_three_branches_on_one_unet_equal_three_separate_unets(comfy, pack, tiny_model, conds, lora_names):
    shared = [with_lora(comfy, tiny_model, lora_names[0]), tiny_model.clone(),
              with_lora(comfy, tiny_model, lora_names[1])]
    separate = [with_lora(comfy, tiny_models.tiny_model_patcher(seed=0), lora_names[0]),
                tiny_models.tiny_model_patcher(seed=0),
                with_lora(comfy, tiny_models.tiny_model_patcher(seed=0), lora_names[1])]
    assert len({id(b.model) for b in separate}) == 3
    assert torch.equal(run(pack, shared, conds), run(pack, separate, conds))
