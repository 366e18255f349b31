"""One UNet forward for the branches that share it (docs/nodes.md, "One forward for branches of one model").

Three branches of one checkpoint, each with its own patches: InteractDiffusion (main; fusers as middle_patch),
MIGC (aux; attn2 patch, attn2 replacements in its blocks, attn2 output patch) and IP-Adapter (aux; attn2
replacements in every block) plus a third-party attn2 patch on the IP-Adapter branch. With a window the
diffusion model runs T times in all (one forward per step), and the result equals the same run with every
branch on its own copy of the weights, where nothing is shared, within TOLERANCE. Where the branches' weights
differ (a LoRA on one of them) nothing is shared and the run is exact.
"""
import os

import pytest
import torch
from harness import tiny_clip_vision, tiny_ipadapter
from harness.tiny_interactdiffusion import write_tiny_interactdiffusion
from harness.tiny_migc import write_tiny_migc

STEPS, WINDOW, SIZE = 4, 2, 128
# Relative to the latents' size: rows computed in one batch instead of several run the same float32
# operations on other matrix shapes, whose sums may round in another order (about 1e-7 relative per operation,
# 3e-6 measured after 4 steps of the random tiny UNet, whose latents grow to a few hundred); a patch of one
# branch reaching another's rows moves them by far more (checked below with the third-party patch).
TOLERANCE = 1e-5
INTERACTION = "a person | holds | a cup | 16, 40, 120, 100 | 60, 50, 110, 110"
INSTANCES = "a red apple | 0, 0, 64, 128\na green pear | 64, 32, 128, 96"


@pytest.fixture(scope="module")
def adapters(comfy, pack, comfy_base, checkpoint):
    """The InteractDiffusion, MIGC and IP-Adapter inputs (tiny files in the public layouts), the reference
    picture and the CLIP encodes."""
    import folder_paths

    models = folder_paths.models_dir
    nodes = comfy.NODE_CLASS_MAPPINGS
    write_tiny_interactdiffusion(os.path.join(models, "interactdiffusion", "ext_interactdiff_v1.2.pth"), seed=3)
    write_tiny_migc(os.path.join(models, "migc", "MIGC_SD14.ckpt"), seed=1)
    clip_file = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
    tiny_clip_vision.write_tiny_clip_vision(os.path.join(models, "clip_vision", clip_file))
    tiny_ipadapter.write_tiny_ipadapter(os.path.join(models, "ipadapter", "ip-adapter_sd15.safetensors"))
    _, clip, _ = checkpoint
    positive = comfy.CLIPTextEncode().encode(clip, "a person holding a cup next to an apple and a pear")[0]
    negative = comfy.CLIPTextEncode().encode(clip, "")[0]
    interactdiffusion = nodes["InteractDiffusionLoader"]().load("ext_interactdiff_v1.2.pth")[0]
    grounded = nodes["InteractDiffusionApply"]().apply(positive, clip, interactdiffusion, INTERACTION, SIZE, SIZE,
                                                       1.0, 1.0)[0]
    return {"clip": clip, "positive": positive, "negative": negative, "grounded": grounded,
            "migc": nodes["MIGCLoader"]().load("MIGC_SD14.ckpt")[0],
            "ipadapter": nodes["AMDMIPAdapterLoader"]().load("ip-adapter_sd15.safetensors")[0],
            "clip_vision": comfy.CLIPVisionLoader().load_clip(clip_file)[0],
            "picture": torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(4))}


def separate_copy(patcher):
    """A ModelPatcher over a model of its own with the same weights: nothing is shared with `patcher`."""
    import comfy.model_patcher

    model = patcher.model.model_config.get_model({})
    model.load_state_dict(patcher.model.state_dict())
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


def third_party_attn2(q, k, v, extra_options):
    """A plain attn2 patch of another pack: scales its branch's keys."""
    return q, k * 1.5, v


def branches(comfy, adapters, models):
    """(model, positive, negative) of the three branches, each on models[k]."""
    nodes = comfy.NODE_CLASS_MAPPINGS
    migc = nodes["MIGCApply"]().apply(models[1], adapters["clip"], adapters["migc"], INSTANCES, SIZE, SIZE, 1, -1)[0]
    styled = nodes["AMDMIPAdapterApply"]().apply(models[2], adapters["ipadapter"], adapters["picture"], 0.8, 0.0,
                                                  1.0, adapters["clip_vision"])[0].clone()
    styled.set_model_attn2_patch(third_party_attn2)
    return [(models[0], adapters["grounded"], adapters["negative"]), (migc, adapters["positive"], adapters["negative"]),
            (styled, adapters["positive"], adapters["negative"])]


@pytest.fixture
def forwards(monkeypatch):
    """The diffusion model's forwards (BaseModel.apply_model calls), by model."""
    from comfy import model_base

    counted = []
    apply_model = model_base.BaseModel.apply_model

    def counting(model, *args, **kwargs):
        counted.append(model)
        return apply_model(model, *args, **kwargs)

    monkeypatch.setattr(model_base.BaseModel, "apply_model", counting)
    return counted


def run(pack, branch_list, s=WINDOW):
    node = pack.NODE_CLASS_MAPPINGS["AMDMAggregateSampler"]()
    (main, positive, negative), (model_2, positive_2, negative_2), (model_3, positive_3, negative_3) = branch_list
    latent = {"samples": torch.zeros(1, 4, SIZE // 8, SIZE // 8)}
    with torch.no_grad():
        return node.sample(main, positive, negative, model_2, positive_2, negative_2, latent, 5, STEPS, 5.0, 5.0,
                           "euler", "normal", 1.0, 0.5, s, "sequential", 0.3, "auto", "independent",
                           model_3=model_3, positive_3=positive_3, negative_3=negative_3, cfg_3=5.0,
                           weight_3=0.5)[0]["samples"]


def test_three_differently_patched_branches_of_one_unet_share_one_forward_per_step(comfy, pack, checkpoint, adapters,
                                                                                  forwards):
    model = checkpoint[0]
    shared = run(pack, branches(comfy, adapters, [model, model, model]))
    assert len(forwards) == STEPS, f"{len(forwards)} forwards for {STEPS} steps"
    forwards.clear()
    apart = run(pack, branches(comfy, adapters, [model, separate_copy(model), separate_copy(model)]))
    assert len(forwards) == STEPS + 2 * (WINDOW + 1)
    scale = float(apart.abs().max())
    difference = float((shared - apart).abs().max()) / scale
    assert difference <= TOLERANCE, f"shared forwards differ from separate ones by {difference:.3g} (relative)"
    without_third_party = branches(comfy, adapters, [model, model, model])
    without_third_party[2][0].model_options["transformer_options"]["patches"].pop("attn2_patch")
    unpatched = run(pack, without_third_party)
    assert float((unpatched - shared).abs().max()) > 100 * TOLERANCE * scale, "the third-party patch had no effect"


def test_a_shared_forward_that_does_not_fit_in_memory_is_split(comfy, pack, checkpoint, adapters, forwards,
                                                              monkeypatch):
    from comfy import model_base

    model = checkpoint[0]
    shared = run(pack, branches(comfy, adapters, [model, model, model]))
    forwards.clear()
    # a model that needs more memory than any device has: one branch per forward, as calc_cond_batch would
    monkeypatch.setattr(model_base.BaseModel, "memory_required", lambda self, *args, **kwargs: 2.0**60)
    split = run(pack, branches(comfy, adapters, [model, model, model]))
    assert len(forwards) > STEPS + 2 * (WINDOW + 1) - 1
    assert float((split - shared).abs().max()) <= TOLERANCE * float(shared.abs().max())


def with_weight_patch(patcher):
    """A clone with a weight patch (a difference added to one attention weight, as a LoRA adds one)."""
    key = next(k for k in patcher.model.state_dict() if k.endswith("attn2.to_k.weight"))
    weight = patcher.model.state_dict()[key]
    patched = patcher.clone()
    patched.add_patches({key: (torch.randn(weight.shape, generator=torch.Generator().manual_seed(5)) * 0.05,)}, 1.0)
    return patched


def test_branches_with_other_weights_run_apart_and_exact(comfy, pack, tiny_model, forwards):
    gen = torch.Generator().manual_seed(9)
    conds = [[[torch.randn(1, 77, 768, generator=gen), {}]] for _ in range(4)]
    node = pack.NODE_CLASS_MAPPINGS["AMDMAggregateSampler"]()

    def sample(aux):
        with torch.no_grad():
            return node.sample(tiny_model, conds[0], conds[1], aux, conds[2], conds[3],
                               {"samples": torch.zeros(1, 4, 8, 8)}, 5, STEPS, 5.0, 5.0, "euler", "normal", 1.0, 0.5,
                               WINDOW, "paper", 0.3, "auto", "independent")[0]["samples"]

    shared_unet = sample(with_weight_patch(tiny_model))
    assert len(forwards) == STEPS + WINDOW + 1, "branches with other weights shared a forward"
    assert torch.equal(shared_unet, sample(with_weight_patch(separate_copy(tiny_model))))



@pytest.mark.parametrize("family, padded", [("sd15", True), ("sd3", False), ("flux", False)])
def test_text_of_other_lengths_shares_a_forward_only_where_the_model_pads_it(comfy, pack, forwards, family, padded):
    """SD1.x cross-attention text (CONDCrossAttn) is repeated to a common length as calc_cond_batch does; the
    joint-attention text of SD3 and Flux (CONDRegular), where repeating tokens would change the result,
    runs apart."""
    from harness import tiny_models

    model = tiny_models.tiny_family_patcher(family, seed=0)
    short = tiny_models.family_conditioning(family, 1)
    long = [[torch.cat([tokens, tokens.flip(1)], dim=1), dict(options)]
            for tokens, options in tiny_models.family_conditioning(family, 2)]
    channels = model.get_model_object("latent_format").latent_channels
    node = pack.NODE_CLASS_MAPPINGS["AMDMAggregateSampler"]()

    def sample(aux):
        with torch.no_grad():
            return node.sample(model, short, short, aux, long, long, {"samples": torch.zeros(1, channels, 8, 8)}, 5,
                               STEPS, 4.0, 4.0, "euler", "simple", 1.0, 0.5, WINDOW, "paper", 0.0, "auto",
                               "independent")[0]["samples"]

    shared = sample(model)
    assert len(forwards) == (STEPS if padded else STEPS + WINDOW + 1)
    apart = sample(separate_copy(model))
    assert float((shared - apart).abs().max()) <= TOLERANCE * float(apart.abs().max())
