"""A newer ComfyUI, simulated in-process (docs/nodes.md, "Samplers"): sampler bodies that compute differently
(DPM++ 2M with its arithmetic in float64; UniPC with its log-SNR steps, hence its coefficients, computed in
float64 and rounded to float32, as ComfyUI 0.35+ computes UniPC's coefficients), a sampler
name registered at run time whose multistep history and noise stream run across every step, and SAMPLERs no
ComfyUI ships (a KSAMPLER over a third-party function with two calls per step, a Sampler that is no KSAMPLER).
With identical branches (shared noise, w = 0.5, p = 0, s > 0) the main branch equals KSampler /
SamplerCustomAdvanced with the same sampler bit for bit; with different branches the merge reaches them.
"""
import pytest
import torch
from node_calls import SIZE, empty_latent

STEPS = 6
NEW_SAMPLER = "amdm_test_multistep"


def sample_dpmpp_2m_float64(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M) with its arithmetic in float64 (the model and the state between steps in float32)."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    previous = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        sigma, sigma_next = sigmas[i].double(), sigmas[i + 1].double()
        h = sigma.log() - sigma_next.log()
        estimate = denoised.double()
        if previous is not None and sigma_next > 0:
            r = (sigmas[i - 1].double().log() - sigma.log()) / h
            estimate = (1 + 1 / (2 * r)) * estimate - previous / (2 * r)
        x = (sigma_next / sigma * x.double() - torch.expm1(-h) * estimate).float()
        previous = denoised.double()
    return x


def sample_amdm_test_multistep(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """A multistep sampler no ComfyUI has: Adams-Bashforth 2 on the ODE derivative plus a little seeded noise;
    its history (the last derivative) and its noise stream run across every step."""
    import comfy.k_diffusion.sampling

    extra_args = extra_args or {}
    noise = comfy.k_diffusion.sampling.default_noise_sampler(x, seed=extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    previous = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        d = (x - denoised) / sigmas[i]
        x = x + (sigmas[i + 1] - sigmas[i]) * (d if previous is None else 1.5 * d - 0.5 * previous)
        if sigmas[i + 1] > 0:
            x = x + 0.05 * sigmas[i + 1] * noise(sigmas[i], sigmas[i + 1])
        previous = d
    return x


def sample_midpoint(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """A third-party second-order sampler: the midpoint method, its second call on a derived latent."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        d = (x - denoised) / sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        middle = (sigmas[i] * sigmas[i + 1]) ** 0.5
        x_middle = x + d * (middle - sigmas[i])
        d_middle = (x_middle - model(x_middle, middle * s_in, **extra_args)) / middle
        x = x + d_middle * (sigmas[i + 1] - sigmas[i])
    return x


@pytest.fixture(scope="module")
def future(comfy):
    """The simulated newer ComfyUI, for this module's tests only."""
    import comfy.k_diffusion.sampling
    import comfy.samplers
    from comfy.extra_samplers import uni_pc

    unipc_lambda = uni_pc.SigmaConvert.marginal_lambda

    def unipc_lambda_in_float64(self, t):  # the step sizes and coefficients follow in other digits
        return unipc_lambda(self, t.double()).to(t.dtype)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(comfy.k_diffusion.sampling, "sample_dpmpp_2m", sample_dpmpp_2m_float64)
        patch.setattr(uni_pc.SigmaConvert, "marginal_lambda", unipc_lambda_in_float64)
        patch.setattr(comfy.k_diffusion.sampling, f"sample_{NEW_SAMPLER}", sample_amdm_test_multistep, raising=False)
        patch.setattr(comfy.samplers, "KSAMPLER_NAMES", comfy.samplers.KSAMPLER_NAMES + [NEW_SAMPLER])
        patch.setattr(comfy.samplers.KSampler, "SAMPLERS", comfy.samplers.KSampler.SAMPLERS + [NEW_SAMPLER])
        yield


@pytest.fixture(scope="module")
def conds():
    gen = torch.Generator().manual_seed(31)
    return [[[torch.randn(1, 77, 768, generator=gen), {}]] for _ in range(4)]


def node_run(pack, model, conds, sampler, aux_conds, s, noise="shared", weight=0.5, p=0.0):
    node = pack.NODE_CLASS_MAPPINGS["AMDMAggregateSampler"]()
    return node.sample(model, conds[0], conds[1], model, aux_conds[0], aux_conds[1], empty_latent(), 4, STEPS, 5.0,
                       5.0, sampler, "karras", 1.0, weight, s, "paper", p, "auto", noise)[0]["samples"]


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "uni_pc", NEW_SAMPLER])
def test_identical_branches_equal_ksampler_with_the_newer_samplers(comfy, pack, future, tiny_model, conds, sampler,
                                                                   caplog):
    with torch.no_grad(), caplog.at_level("WARNING"):
        reference = comfy.KSampler().sample(tiny_model, 4, STEPS, 5.0, sampler, "karras", conds[0], conds[1],
                                            empty_latent())[0]["samples"]
        for s in (1, 3, STEPS - 1):
            assert torch.equal(node_run(pack, tiny_model, conds, sampler, conds, s), reference), f"s = {s}"
        merged = node_run(pack, tiny_model, conds, sampler, conds[2:], 3, noise="independent", p=0.3)
    assert torch.isfinite(merged).all() and (merged - reference).abs().max() > 1e-3, "the merge did not reach it"
    differs = [r for r in caplog.records if "differs from the pack's predictor-corrector" in r.getMessage()]
    if sampler == "uni_pc":  # the pack's own UniPC step no longer equals this ComfyUI's: said once, not used
        assert len(differs) == 1 and "'uni_pc'" in differs[0].getMessage()
    else:
        assert not differs


def custom_advanced(comfy, guider, sampler, sigmas, latent):
    noise = comfy.NODE_CLASS_MAPPINGS["RandomNoise"].execute(8).result[0]
    with torch.no_grad():
        return comfy.NODE_CLASS_MAPPINGS["SamplerCustomAdvanced"].execute(noise, guider, sampler, sigmas,
                                                                          latent).result[0]["samples"]


def own_loop_sampler():
    """A SAMPLER that is no KSAMPLER: its own noise scaling and loop over the guider, the midpoint method."""
    from comfy import samplers as comfy_samplers

    class OwnLoopSampler(comfy_samplers.Sampler):
        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            sampling = model_wrap.inner_model.model_sampling
            x = sampling.noise_scaling(sigmas[0], noise, latent_image, self.max_denoise(model_wrap, sigmas))

            def model(latent, sigma, **ignored):
                return model_wrap(latent, sigma, model_options=extra_args["model_options"], seed=extra_args.get("seed"))

            def report(step):
                callback(step["i"], step["denoised"], step["x"], len(sigmas) - 1)

            return sampling.inverse_noise_scaling(sigmas[-1], sample_midpoint(model, x, sigmas, callback=report))

    return OwnLoopSampler()


@pytest.mark.parametrize("kind", ["ksampler", "sampler"])
def test_the_guider_drives_samplers_no_comfyui_ships(comfy, pack, future, tiny_model, conds, kind):
    from comfy import samplers as comfy_samplers

    nodes = comfy.NODE_CLASS_MAPPINGS
    sampler = comfy_samplers.KSAMPLER(sample_midpoint) if kind == "ksampler" else own_loop_sampler()
    sigmas = nodes["BasicScheduler"].execute(tiny_model, "karras", STEPS, 1.0).result[0]

    def guider(c):
        return nodes["CFGGuider"].execute(tiny_model, c[0], c[1], 5.0).result[0]

    def amdm(aux, noise, p, s=3):
        return pack.NODE_CLASS_MAPPINGS["AMDMGuider"]().get_guider(guider(conds), guider(aux), 0.5, s, "paper", p,
                                                                   "auto", noise)[0]

    reference = custom_advanced(comfy, guider(conds), sampler, sigmas, empty_latent())
    assert torch.equal(custom_advanced(comfy, amdm(conds, "shared", 0.0), sampler, sigmas, empty_latent()), reference)
    merged = custom_advanced(comfy, amdm(conds[2:], "independent", 0.3), sampler, sigmas, empty_latent())
    assert torch.isfinite(merged).all() and (merged - reference).abs().max() > 1e-3
    assert merged.shape == (1, 4, SIZE, SIZE)
