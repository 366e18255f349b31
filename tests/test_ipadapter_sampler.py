"""The AMDM Aggregate Sampler with IP-Adapter branches: this pack's IP-Adapter (Apply (AMDM)) and a test
patch of the shape ComfyUI_IPAdapter_plus installs (an Attn2Replace-like callable per block, keyed
("input", i) / ("output", i) / ("middle", 1) as that pack does, with a ``to`` that returns itself)."""
import os

import pytest
import torch

from harness import tiny_clip_vision, tiny_ipadapter

SD15_BLOCKS = {("input", i) for i in (1, 2, 4, 5, 7, 8)} | {("output", i) for i in range(3, 12)} | {("middle", 0)}
# keys as the other pack writes them: its middle block key ("middle", 1) is never called by ComfyUI
OTHER_PACK_KEYS = sorted(SD15_BLOCKS - {("middle", 0)}) + [("middle", 1)]


class CallLog(list):
    """Shared by every copy: ModelPatcher.clone deep-copies model_options and the patches in it."""

    def __deepcopy__(self, memo):
        return self


class OtherPackLikeAttn2Replace:
    """Same call shape as ComfyUI_IPAdapter_plus's Attn2Replace: out = attn(q, k, v) + weight * attn(q, K, V)
    over fixed extra tokens, sigma-gated from extra_options["sigmas"]; records where it ran."""

    def __init__(self, tokens, calls, weight=1.0):
        self.tokens, self.calls, self.weight = tokens, calls, weight

    def __call__(self, q, k, v, extra_options):
        import comfy.ldm.modules.attention as attention

        self.calls.append((extra_options["block"], float(extra_options["sigmas"][0])))
        out = attention.optimized_attention(q, k, v, extra_options["n_heads"])
        width = q.shape[-1]
        extra = self.tokens[..., :width].expand(q.shape[0], -1, -1).to(q)
        return out + self.weight * attention.optimized_attention(q, extra, extra, extra_options["n_heads"])

    def to(self, device):
        return self


def other_pack_patched(model, calls, seed=0):
    patched = model.clone()
    tokens = torch.randn(1, 4, 128, generator=torch.Generator().manual_seed(seed))
    patch = OtherPackLikeAttn2Replace(tokens, calls)
    for block, index in OTHER_PACK_KEYS:
        patched.set_model_attn2_replace(patch, block, index)
    return patched


def sampler_inputs(comfy, **overrides):
    """Every input of AMDMAggregateSampler at its declared default, then the overrides."""
    declared = comfy.NODE_CLASS_MAPPINGS["AMDMAggregateSampler"].INPUT_TYPES()["required"]
    inputs = {}
    for name, spec in declared.items():
        options = spec[1] if len(spec) > 1 else {}
        if isinstance(spec[0], list):
            inputs[name] = options.get("default", spec[0][0])
        elif "default" in options:
            inputs[name] = options["default"]
    inputs.update(overrides)
    return inputs


def run_sampler(comfy, main, aux, conds, seed=3, steps=3, aggregation_steps=1):
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    inputs = sampler_inputs(comfy, model=main, positive=conds[0], negative=conds[1], model_2=aux,
                            positive_2=conds[0], negative_2=conds[1], latent_image=latent, seed=seed, steps=steps,
                            aggregation_steps=aggregation_steps, sampler_name="euler", scheduler="normal")
    node = comfy.NODE_CLASS_MAPPINGS["AMDMAggregateSampler"]()
    return getattr(node, node.FUNCTION)(**inputs)[0]["samples"]


def bf16_copy(patcher):
    """A ModelPatcher over a copy of ``patcher``'s model with every UNet weight cast to bfloat16 (the
    dtype a bf16 UNet is loaded in; apply_model then feeds it bf16 inputs)."""
    import comfy.model_patcher

    # A fresh model of the same config with the same weights (ComfyUI 0.33's BaseModel cannot be deep-copied).
    model = patcher.model.model_config.get_model({})
    model.load_state_dict(patcher.model.state_dict())
    model = model.to(torch.bfloat16)
    model.diffusion_model.dtype = torch.bfloat16
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


def styled_model(comfy, model, weight=0.8):
    import folder_paths

    models = folder_paths.models_dir
    clip_file = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
    tiny_clip_vision.write_tiny_clip_vision(os.path.join(models, "clip_vision", clip_file))
    tiny_ipadapter.write_tiny_ipadapter(os.path.join(models, "ipadapter", "ip-adapter_sd15.safetensors"))
    clip_vision = comfy.CLIPVisionLoader().load_clip(clip_file)[0]
    adapter = comfy.NODE_CLASS_MAPPINGS["AMDMIPAdapterLoader"]().load("ip-adapter_sd15.safetensors")[0]
    picture = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(4))
    return comfy.NODE_CLASS_MAPPINGS["AMDMIPAdapterApply"]().apply(model, adapter, picture, weight, 0.0, 1.0,
                                                                   clip_vision)[0]


def ksample(comfy, model, conds, cfg=5.0):
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    return comfy.KSampler().sample(model, 3, 2, cfg, "euler", "normal", conds[0], conds[1],
                                   latent)[0]["samples"].float()


@pytest.fixture
def conds(random_cond):
    return random_cond(1), random_cond(2)


def test_sampler_runs_an_aux_branch_patched_like_the_other_pack(comfy, pack, tiny_model, conds):
    calls = CallLog()
    aux = other_pack_patched(tiny_model, calls)
    result = run_sampler(comfy, tiny_model, aux, conds)
    ran = {block for block, _ in calls}
    assert ran == SD15_BLOCKS - {("middle", 0)}, f"aux-branch patches that ran: {sorted(ran)}"
    assert torch.isfinite(result).all()
    plain_aux = run_sampler(comfy, tiny_model, tiny_model.clone(), conds)
    assert (result - plain_aux).abs().max() > 1e-4, "the patched aux branch did not change the aggregate"
    assert not tiny_model.model_options["transformer_options"], "the sampler left a patch on the shared model"


def test_sampler_runs_this_packs_ipadapter_as_main_and_aux_branch(comfy, pack, tiny_model, conds):
    styled = styled_model(comfy, tiny_model)
    assert styled.model is tiny_model.model  # one UNet for both branches

    ran = CallLog()
    replace = styled.model_options["transformer_options"]["patches_replace"]["attn2"]
    for key, patch in list(replace.items()):
        replace[key] = lambda q, k, v, extra, patch=patch: ran.append(extra["block"]) or patch(q, k, v, extra)
    calls = CallLog()
    other = other_pack_patched(tiny_model, calls, seed=5)
    as_aux = run_sampler(comfy, other, styled, conds)
    assert set(ran) == SD15_BLOCKS and set(block for block, _ in calls) == SD15_BLOCKS - {("middle", 0)}
    ran.clear()
    as_main = run_sampler(comfy, styled, other, conds)
    assert set(ran) == SD15_BLOCKS
    assert torch.isfinite(as_aux).all() and torch.isfinite(as_main).all()
    assert (as_aux - as_main).abs().max() > 1e-4


def test_one_batched_pass_per_step_at_cfg_and_the_two_pass_result(comfy, pack, tiny_model, conds):
    from test_interactdiffusion import record_sigmas, split_passes

    styled = styled_model(comfy, tiny_model)
    recorded, passes = record_sigmas(styled)
    batched = ksample(comfy, recorded, conds)
    assert [sorted(kinds) for _, kinds in passes] == [[0, 1], [0, 1]], "expected ONE cond+uncond pass per step"
    split, calls = split_passes(styled)
    two_pass = ksample(comfy, split, conds)
    assert sorted(calls) == [(0,), (0,), (1,), (1,)]
    batching_noise = (ksample(comfy, split_passes(tiny_model)[0], conds) - ksample(comfy, tiny_model, conds)).abs().max()
    assert (two_pass - batched).abs().max().item() <= 4 * batching_noise.item() + 1e-5
    assert (batched - ksample(comfy, tiny_model, conds)).abs().max() > 1e-3  # the adapter acted


def test_bf16_unet_matches_fp32_within_bf16_precision(comfy, pack, tiny_model, conds):
    """The image K/V follow the UNet's dtype: with the tiny UNet cast to bf16 the IP-Adapter result differs
    from fp32 by at most twice what bf16 does to the plain model, plus 1% (relative L2), while the adapter
    itself changes the output by more than 3 times that."""
    bf16 = bf16_copy(tiny_model)
    fp32_out, bf16_out = ksample(comfy, styled_model(comfy, tiny_model), conds), ksample(comfy, styled_model(comfy, bf16), conds)
    plain_fp32, plain_bf16 = ksample(comfy, tiny_model, conds), ksample(comfy, bf16, conds)
    error = ((bf16_out - fp32_out).norm() / fp32_out.norm()).item()
    plain_error = ((plain_bf16 - plain_fp32).norm() / plain_fp32.norm()).item()
    effect = ((plain_bf16 - bf16_out).norm() / fp32_out.norm()).item()
    assert error <= 2 * plain_error + 0.01 and effect > 3 * error, (error, plain_error, effect)
