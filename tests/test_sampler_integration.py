"""AMDM sampler nodes inside ComfyUI: per-branch patches on shared UNets (4), interruption (5), bad inputs
(6), the AMDM Guider with SamplerCustomAdvanced, masks, batches, progress and previews."""
import copy
import threading

import pytest
import torch
from node_calls import amdm, empty_latent, ksampler


STEPS = 5
SIZE = 8
TRANSFORMER_BLOCKS = 16  # SD1.5: input 1,2,4,5,7,8 + middle + output 3..11


@pytest.fixture(scope="module")
def conds():
    gen = torch.Generator().manual_seed(21)
    return [[[torch.randn(1, 77, 768, generator=gen), {}]] for _ in range(8)]


def unet_snapshot(patcher):
    return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}


def same_weights(patcher, snapshot):
    return all(torch.equal(v, snapshot[k]) for k, v in patcher.model.diffusion_model.state_dict().items())


def tiny_lora(model, seed=5, rank=4):
    """A kohya-format LoRA state dict for some attention/projection layers of the tiny UNet."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    state = model.model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    lora, targets = {}, set()
    for lora_key, model_key in key_map.items():
        if not lora_key.startswith("lora_unet_") or not any(n in lora_key for n in ("attn2_to_k", "proj_in")):
            continue
        if model_key in targets:  # the map also lists diffusers-style aliases of the same layer
            continue
        targets.add(model_key)
        out_features, in_features = state[model_key].shape[:2]
        lora[f"{lora_key}.lora_up.weight"] = torch.randn(out_features, rank, generator=gen) * 0.3
        lora[f"{lora_key}.lora_down.weight"] = torch.randn(rank, in_features, generator=gen) / in_features**0.5
        lora[f"{lora_key}.alpha"] = torch.tensor(float(rank))
    assert len(lora) >= 30, "the LoRA reaches too few layers to matter"
    return lora


def with_lora(patcher, lora):
    import comfy.sd

    patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
    assert len(patched.patches) == len(lora) // 3, "not every LoRA layer was applied"
    return patched


# --- 4. patches on clones that share one UNet ---------------------------------------------------------

def test_each_branch_attn2_patch_runs_on_its_own_rows_only(pack, tiny_model, conds):
    """Three clones of one UNet share one forward per window step; each one's attn2 patch sees its own two
    rows (cond, uncond) and the options it would see alone, never another branch's."""
    patch_calls, model_calls = {}, {}

    def tagged(name):
        clone = tiny_model.clone()

        def wrapper(apply_model, args):
            model_calls[name] = model_calls.get(name, 0) + 1
            return apply_model(args["input"], args["timestep"], **args["c"])

        def attn2(q, k, v, extra_options):
            rows = (q.shape[0], len(extra_options["cond_or_uncond"]), extra_options["original_shape"][0])
            assert rows == (2, 2, 2), f"{name}'s attn2 patch saw rows {rows}"
            patch_calls[name] = patch_calls.get(name, 0) + 1
            return q, k * 1.5, v

        clone.set_model_unet_function_wrapper(wrapper)
        clone.set_model_attn2_patch(attn2)
        return clone

    with torch.no_grad():
        amdm(pack, (tagged("main"), conds[0], conds[1]),
             [(tagged("b2"), conds[2], conds[3], 7.5), (tagged("b3"), conds[4], conds[5], 7.5)],
             empty_latent(), steps=STEPS, s=2)
    assert model_calls == {"main": STEPS, "b2": 3, "b3": 3}
    assert patch_calls == {name: calls * TRANSFORMER_BLOCKS for name, calls in model_calls.items()}, \
        "an attn2 patch did not run in every transformer block of its branch"
    assert tiny_model.model.current_patcher is None


def test_the_first_load_models_gpu_loads_every_branch(pack, tiny_model, conds, monkeypatch):
    """The main branch's stock path loads every branch in one call; the nested calls of the aux branches'
    own stock paths then ask only for models that are already loaded (nothing is unloaded or re-loaded)."""
    from comfy import model_management
    from harness import tiny_models

    loads = []
    real_load = model_management.load_models_gpu

    def is_loaded(model):
        return any(loaded.model is model for loaded in model_management.current_loaded_models)

    def recording_load(models, *args, **kwargs):
        models = list(models)
        loads.append((models, all(is_loaded(m) for m in models)))
        return real_load(models, *args, **kwargs)

    monkeypatch.setattr(model_management, "load_models_gpu", recording_load)
    model_management.unload_all_models()
    aux_same, aux_other = tiny_model.clone(), tiny_models.tiny_model_patcher(seed=2)
    aux = [(aux_same, conds[2], conds[3], 7.5), (aux_other, conds[4], conds[5], 7.5)]
    with torch.no_grad():
        amdm(pack, (tiny_model, conds[0], conds[1]), aux, empty_latent(), steps=3, s=1)
    assert len(loads) == 3, "one load for the run, then one per aux branch's own stock path"
    first, already_loaded = loads[0]
    assert not already_loaded
    assert any(m is aux_same for m in first) and any(m is aux_other for m in first)
    assert any(m.model is tiny_model.model and m is not aux_same for m in first), "the main branch was not loaded"
    assert all(already for _, already in loads[1:]), "a nested branch asked for a model the first call had not loaded"


def test_lora_on_one_clone_equals_running_that_branch_on_a_separate_unet(comfy, pack, tiny_model, conds):
    from harness import tiny_models

    lora = tiny_lora(tiny_model)
    snapshot = unet_snapshot(tiny_model)
    shared = with_lora(tiny_model, lora)
    twin = tiny_models.tiny_model_patcher(seed=0)  # a second UNet with the same weights
    assert twin.model is not tiny_model.model and same_weights(twin, snapshot)
    separate = with_lora(twin, lora)
    main = (tiny_model, conds[0], conds[1])

    def run(aux_model, **settings):
        with torch.no_grad():
            return amdm(pack, main, [(aux_model, conds[2], conds[3], 7.5)], empty_latent(), steps=STEPS,
                        **settings)[0]

    on_shared_unet = run(shared, s=3)
    on_separate_unet = run(separate, s=3)
    assert torch.equal(on_shared_unet, on_separate_unet)
    assert (on_shared_unet - run(tiny_model.clone(), s=3)).abs().max() > 1e-3, "the LoRA had no effect"
    # The main branch gets its own (unpatched) weights back for every call in between the LoRA branch's calls.
    silent = run(shared, s=3, weights=[0.0], p=0.0)
    assert torch.equal(silent, ksampler(comfy, *main, empty_latent(), steps=STEPS))
    assert same_weights(tiny_model, snapshot), "the LoRA outlived the run in the shared UNet"


def test_differently_patched_clones_under_dynamic_vram_are_refused_before_any_step(comfy, pack, tiny_model, conds):
    """ComfyUI 0.33 makes ModelPatcherDynamic the default on NVIDIA GPUs. No CPU can build one (it falls back
    to ModelPatcher there), so a clone whose class reports is_dynamic() stands in for it."""
    import comfy.samplers

    class DynamicPatcher(type(tiny_model)):
        def is_dynamic(self):
            return True

    def guider(model, positive, negative):
        g = comfy.samplers.CFGGuider(model)
        g.set_conds(positive, negative)
        return g

    node = pack.NODE_CLASS_MAPPINGS["AMDMGuider"]()
    with_a_lora = with_lora(tiny_model, tiny_lora(tiny_model))
    with_a_lora.__class__ = DynamicPatcher
    with pytest.raises(ValueError, match="different weight patches .* dynamic VRAM.*--disable-dynamic-vram"):
        node.get_guider(guider(tiny_model, conds[0], conds[1]), guider(with_a_lora, conds[2], conds[3]), 0.5, 2,
                        "paper", 0.3, "auto", "independent")
    plain = tiny_model.clone()
    plain.__class__ = DynamicPatcher
    node.get_guider(guider(tiny_model, conds[0], conds[1]), guider(plain, conds[2], conds[3]), 0.5, 2, "paper", 0.3,
                    "auto", "independent")  # same patches: nothing to switch, accepted


# --- 5. interruption -----------------------------------------------------------------------------------

def test_interrupt_propagates_and_leaves_nothing_behind(comfy, pack, tiny_model, conds):
    from comfy import model_management

    main = (tiny_model, conds[0], conds[1])
    with torch.no_grad():
        before = ksampler(comfy, *main, empty_latent(), steps=STEPS)
    snapshot = unet_snapshot(tiny_model)
    options_before = copy.deepcopy(tiny_model.model_options)
    aux = with_lora(tiny_model, tiny_lora(tiny_model))
    aux_calls = []

    def interrupt_on_second_call(apply_model, args):
        aux_calls.append(1)
        if len(aux_calls) == 2:
            model_management.interrupt_current_processing(True)
        return apply_model(args["input"], args["timestep"], **args["c"])

    aux.set_model_unet_function_wrapper(interrupt_on_second_call)
    aux_options_before = copy.deepcopy(aux.model_options)
    try:
        with torch.no_grad(), pytest.raises(model_management.InterruptProcessingException):
            amdm(pack, main, [(aux, conds[2], conds[3], 7.5)], empty_latent(), steps=STEPS, s=3)
    finally:
        model_management.interrupt_current_processing(False)
    assert len(aux_calls) == 2, "the run went on after the interrupt"
    assert not [t for t in threading.enumerate() if t.name.startswith("amdm-branch-")], "a branch thread is left"
    assert tiny_model.model.current_patcher is None
    assert same_weights(tiny_model, snapshot), "the aux branch's LoRA is still patched into the shared UNet"
    assert tiny_model.model_options == options_before and aux.model_options == aux_options_before
    assert aux.hook_mode == tiny_model.hook_mode and not aux.additional_models
    with torch.no_grad():
        after = ksampler(comfy, *main, empty_latent(), steps=STEPS)
    assert torch.equal(before, after)


# --- 6. bad inputs: a clear error before any model call -------------------------------------------------

def counted(patcher, calls):
    clone = patcher.clone()

    def wrapper(apply_model, args):
        calls.append(1)
        return apply_model(args["input"], args["timestep"], **args["c"])

    clone.set_model_unet_function_wrapper(wrapper)
    return clone


def test_bad_inputs_fail_before_the_first_step(comfy, pack, tiny_model, conds):
    from comfy import hooks, latent_formats

    calls = []
    main = (counted(tiny_model, calls), conds[0], conds[1])
    ok_aux = (counted(tiny_model, calls), conds[2], conds[3], 7.5)
    sd3_like = counted(tiny_model, calls)
    sd3_like.add_object_patch("latent_format", latent_formats.SD3())
    zsnr = counted(comfy.NODE_CLASS_MAPPINGS["ModelSamplingDiscrete"]().patch(tiny_model, "eps", True)[0], calls)

    def error_of(aux=(ok_aux,), latent=None, **settings):
        with pytest.raises(ValueError) as failure:
            amdm(pack, main, list(aux), latent or empty_latent(), steps=STEPS, **settings)
        return str(failure.value)

    message = error_of(aux=[(sd3_like, conds[2], conds[3], 7.5)])
    assert "branch 2" in message and "SD3 (16 channels)" in message and "SD15 (4 channels)" in message
    message = error_of(aux=[(zsnr, conds[2], conds[3], 7.5)])
    assert "branch 2" in message and "noise schedule" in message
    message = error_of(s=7)
    assert "aggregation_steps s = 7" in message and f"{STEPS} sampling steps" in message
    message = error_of(aux=[ok_aux, ok_aux], weights=[0.5, 1.5])
    assert "branch 3" in message and "[0, 1]" in message
    message = error_of(aux=[ok_aux] * 3, weights=[0.5] * 3, aggregation="paper")
    assert "'paper'" in message and "sequential" in message
    message = error_of(latent={"samples": torch.ones(1, 16, SIZE, SIZE)})
    assert "16 channels" in message and "expects 4" in message
    message = error_of(aux=[(ok_aux[0], None, conds[3], 7.5)])
    assert "branch 2 needs a model, a positive and a negative" in message
    hooked = [[conds[2][0][0], {"hooks": hooks.HookGroup()}]]
    message = error_of(aux=[(ok_aux[0], hooked, conds[3], 7.5)])
    assert "branch 2 carries hooks" in message
    # where ComfyUI's own KSampler fails with a raw exception, the pack names the input and what to do
    message = error_of(denoise=float("nan"))
    assert "denoise is nan" in message
    message = error_of(denoise=1.5)
    assert "denoise is 1.5" in message and "[0, 1]" in message
    message = error_of(seed=2**64 - 1)  # ddim re-seeds with seed + 1
    assert "the seed is 18446744073709551615" in message and "'ddim'" in message
    message = error_of(seed=2**64 - 2)
    assert "branch 2's noise seed (seed + 1) is 18446744073709551615" in message
    message = error_of(latent={"samples": torch.zeros(0, 4, SIZE, SIZE)})
    assert "empty batch" in message
    for shape in ((1, 4, SIZE), (1, 4, 2, SIZE, SIZE)):
        message = error_of(latent={"samples": torch.zeros(shape)})
        assert f"{len(shape)}-D" in message and "[batch, channels, height, width]" in message
    assert calls == [], "a model call ran before the bad input was reported"


# --- the AMDM Guider ----------------------------------------------------------------------------------

def custom_advanced(comfy, guider, sampler, sigmas, seed, latent):
    noise = comfy.NODE_CLASS_MAPPINGS["RandomNoise"].execute(seed).result[0]
    with torch.no_grad():
        return comfy.NODE_CLASS_MAPPINGS["SamplerCustomAdvanced"].execute(noise, guider, sampler, sigmas,
                                                                          latent).result[0]["samples"]


def guider_node(pack, main, aux, s=3, weights=(0.5,), aggregation="paper", p=0.3, mean_mode="reference"):
    optional = {f"guider_{k}": g for k, g in enumerate(aux[1:], start=3)}
    optional.update({f"weight_{k}": w for k, w in enumerate(weights[1:], start=3)})
    return pack.NODE_CLASS_MAPPINGS["AMDMGuider"]().get_guider(main, aux[0], weights[0], s, aggregation, p, mean_mode,
                                                               "independent", **optional)[0]


def test_guider_with_sampler_custom_advanced_equals_the_aggregate_sampler(comfy, pack, tiny_model, conds):
    nodes = comfy.NODE_CLASS_MAPPINGS
    main_guider = nodes["CFGGuider"].execute(tiny_model, conds[0], conds[1], 7.5).result[0]
    aux_guider = nodes["CFGGuider"].execute(tiny_model, conds[2], conds[3], 6.0).result[0]
    sigmas = nodes["BasicScheduler"].execute(tiny_model, "ddim_uniform", STEPS, 1.0).result[0]
    sampler = nodes["KSamplerSelect"].execute("ddim").result[0]
    got = custom_advanced(comfy, guider_node(pack, main_guider, [aux_guider]), sampler, sigmas, 9, empty_latent())
    with torch.no_grad():
        expected = amdm(pack, (tiny_model, conds[0], conds[1]), [(tiny_model, conds[2], conds[3], 6.0)],
                        empty_latent(), seed=9, steps=STEPS, s=3)[0]
    assert torch.equal(got, expected)


def test_guider_keeps_the_wired_samplers_settings_and_refuses_unsupported_ones(comfy, pack, tiny_model, conds):
    nodes = comfy.NODE_CLASS_MAPPINGS
    main_guider = nodes["DualCFGGuider"].execute(tiny_model, conds[0], conds[1], conds[2], 6.0, 3.0,
                                                 "regular").result[0]
    aux_guider = nodes["PerpNegGuider"].execute(tiny_model, conds[3], conds[4], conds[5], 7.0, 1.0).result[0]
    sigmas = nodes["BasicScheduler"].execute(tiny_model, "karras", STEPS, 1.0).result[0]
    ancestral = nodes["SamplerEulerAncestral"].execute(0.7, 0.9).result[0]
    stock = custom_advanced(comfy, main_guider, ancestral, sigmas, 2, empty_latent())
    alone = custom_advanced(comfy, guider_node(pack, main_guider, [aux_guider], s=0), ancestral, sigmas, 2,
                            empty_latent())
    assert torch.equal(alone, stock), "s = 0 through the AMDM Guider differs from the wired sampler alone"
    merged = custom_advanced(comfy, guider_node(pack, main_guider, [aux_guider], s=3), ancestral, sigmas, 2,
                             empty_latent())
    assert torch.isfinite(merged).all() and (merged - stock).abs().max() > 1e-3

    lms = nodes["SamplerLMS"].execute(3).result[0]
    stock_lms = custom_advanced(comfy, main_guider, lms, sigmas, 2, empty_latent())
    alone_lms = custom_advanced(comfy, guider_node(pack, main_guider, [aux_guider], s=0), lms, sigmas, 2,
                                empty_latent())
    assert torch.equal(alone_lms, stock_lms), "s = 0 with SamplerLMS(order 3) differs from the sampler alone"
    adaptive = nodes["KSamplerSelect"].execute("dpm_adaptive").result[0]
    with pytest.raises(ValueError, match="sampler 'dpm_adaptive' chooses its own step sizes"):
        custom_advanced(comfy, guider_node(pack, main_guider, [aux_guider]), adaptive, sigmas, 2, empty_latent())


def test_guider_draws_aux_noise_at_the_latents_batch_positions(comfy, pack, tiny_model, conds):
    """A latent with a batch_index (Latent From Batch) gets the seed's noise of those positions from the NOISE
    node; the AMDM Guider draws each aux branch's noise (seed + 1) at the same positions, as the Aggregate
    Sampler does from the latent itself."""
    from comfy import sample as comfy_sample

    nodes = comfy.NODE_CLASS_MAPPINGS
    batch = {"samples": torch.zeros(6, 4, SIZE, SIZE)}
    picked = nodes["LatentFromBatch"]().frombatch(batch, 3, 2)[0]
    assert picked["batch_index"] == [3, 4]
    seen = []

    def record_noise(apply_model, args):
        seen.append(args["input"].clone())
        return apply_model(args["input"], args["timestep"], **args["c"])

    recorded = tiny_model.clone()
    recorded.set_model_unet_function_wrapper(record_noise)
    main_guider = nodes["CFGGuider"].execute(tiny_model, conds[0], conds[1], 7.5).result[0]
    aux_guider = nodes["CFGGuider"].execute(recorded, conds[2], conds[3], 7.5).result[0]
    sigmas = nodes["BasicScheduler"].execute(tiny_model, "karras", STEPS, 1.0).result[0]
    euler = nodes["KSamplerSelect"].execute("euler").result[0]
    custom_advanced(comfy, guider_node(pack, main_guider, [aux_guider], s=2), euler, sigmas, 9, picked)
    # the aux branch's first model input (two rows of one cond): its noise scaled to sigma_max (karras)
    first_aux_input, scale = seen[0][:2], (1 + float(sigmas[0]) ** 2) ** 0.5
    expected = comfy_sample.prepare_noise(picked["samples"], 10, [3, 4]) * scale
    torch.testing.assert_close(first_aux_input, expected, rtol=1e-5, atol=1e-5)
    unpositioned = comfy_sample.prepare_noise(picked["samples"], 10) * scale
    assert (first_aux_input - unpositioned).abs().max() > 0.1
    with torch.no_grad():
        node_out = amdm(pack, (tiny_model, conds[0], conds[1]), [(tiny_model, conds[2], conds[3], 7.5)], picked, seed=9,
                        steps=STEPS, sampler="euler", scheduler="karras", s=2)[0]
    guider_out = custom_advanced(comfy, guider_node(pack, main_guider, [
        nodes["CFGGuider"].execute(tiny_model, conds[2], conds[3], 7.5).result[0]], s=2), euler, sigmas, 9, picked)
    assert torch.equal(node_out, guider_out)


# --- masks, batches, progress and previews ------------------------------------------------------------

def test_inpaint_mask_batch_progress_and_previews(pack, tiny_model, conds):
    import comfy.utils
    from comfy.cli_args import LatentPreviewMethod, args

    gen = torch.Generator().manual_seed(4)
    image = torch.randn(2, 4, SIZE, SIZE, generator=gen)
    mask = torch.zeros(2, 1, SIZE, SIZE)
    mask[:, :, 2:6, 2:6] = 1.0
    updates = []
    previous_hook, previous_method = comfy.utils.PROGRESS_BAR_HOOK, args.preview_method
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append(
        (value, total, preview is not None)))
    args.preview_method = LatentPreviewMethod.Latent2RGB
    try:
        with torch.no_grad():
            out, aux_x0 = amdm(pack, (tiny_model, conds[0], conds[1]), [(tiny_model, conds[2], conds[3], 7.5)],
                               {"samples": image, "noise_mask": mask}, steps=STEPS, s=3)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous_hook)
        args.preview_method = previous_method
    assert [(value, total) for value, total, _ in updates] == [(i, STEPS) for i in range(1, STEPS + 1)]
    assert all(has_preview for _, _, has_preview in updates), "no live preview of the main branch"
    keep = mask.expand_as(image) == 0
    assert torch.allclose(out[keep], image[keep], atol=1e-4), "the unmasked region changed"
    assert (out - image)[~keep].abs().max() > 1e-2, "the masked region was not sampled"
    assert out.shape == image.shape and aux_x0.shape == image.shape
