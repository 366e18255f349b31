"""amdm_core against the real ComfyUI it is built for: the SD1.5 sigma table, ddim_uniform schedule and
timestep lookup of a real model_sampling, and every exact step object against ComfyUI's own sampler
function. Each sampler runs twice through ComfyUI's real sampling path (CFGGuider.sample with a tiny
seeded SD1.5 UNet, eps, and the same UNet under a rectified-flow model sampling as ComfyUI's
ModelSamplingSD3 node builds it): once with `comfy.k_diffusion.sampling.sample_<name>`, once with a
KSAMPLER whose function loops amdm_core's step over the same sigmas through run_lockstep, beside an aux
branch of weight 0 and p = 0. The results must be equal bit for bit (torch.equal).

The per-sampler set-up below (noise sampler, sigma offset, s_noise, family flag) is what ComfyUI's
sampler function does before its loop; it is written here from ComfyUI's behaviour, independently of
the pack's bridge.
"""
import pytest
import torch

from amdm_core import (
    AncestralRFStep,
    AncestralStep,
    DDPMStep,
    DEISStep,
    DPM2AncestralRFStep,
    DPM2AncestralStep,
    DPM2Step,
    DPMPP2MSDEStep,
    DPMPP2MStep,
    DPMPP2SAncestralRFStep,
    DPMPP2SAncestralStep,
    DPMPP3MSDEStep,
    DPMPPSDEStep,
    ERSDEStep,
    EulerStep,
    GradientEstimationStep,
    HeunStep,
    IPNDMStep,
    IPNDMVStep,
    LCMStep,
    LMSStep,
    ResMultistepStep,
    ddim_uniform_sigmas,
    expected_model_calls,
    run_lockstep,
    scaled_linear_sigma_table,
    timestep_of_sigma,
)

STEPS = 5
LATENT = (1, 4, 8, 8)


def test_sigma_table_schedule_and_timesteps_match_comfyui(tiny_model):
    import comfy.samplers

    model_sampling = tiny_model.get_model_object("model_sampling")
    table = model_sampling.sigmas
    assert table.shape == (1000,)
    torch.testing.assert_close(scaled_linear_sigma_table(), table.float(), rtol=0, atol=0)
    for steps in (10, 20, 50, 12):
        expected = comfy.samplers.calculate_sigmas(model_sampling, "ddim_uniform", steps)
        assert torch.equal(ddim_uniform_sigmas(table, steps), expected.float())
    for sigma in comfy.samplers.calculate_sigmas(model_sampling, "karras", 30)[:-1]:
        assert timestep_of_sigma(sigma, table) == int(model_sampling.timestep(sigma.reshape(1)))


def flow_patcher(model, shift=3.0):
    """The model under a rectified-flow sampling, exactly as ComfyUI's ModelSamplingSD3 node builds it."""
    import comfy.model_sampling

    class FlowSampling(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    sampling = FlowSampling(model.model.model_config)
    sampling.set_parameters(shift=shift, multiplier=1000)
    patched = model.clone()
    patched.add_object_patch("model_sampling", sampling)
    return patched


def s_noise_of(model_sampling, applies_noise_scale):
    """s_noise as the sampler uses it: ComfyUI 0.33 multiplies it by the model's noise scale in the
    samplers marked here; 0.3.75 has no noise scale (1.0)."""
    return 1.0 * getattr(model_sampling, "noise_scale", 1.0) if applies_noise_scale else 1.0


def brownian(x, sigmas, seed, cpu):
    from comfy.k_diffusion import sampling as kd

    sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
    return kd.BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=seed, cpu=cpu)


def default_noise(x, seed):
    from comfy.k_diffusion import sampling as kd

    return kd.default_noise_sampler(x, seed=seed)


def _rf(ms):
    import comfy.model_sampling

    return isinstance(ms, comfy.model_sampling.CONST)


def _deis_coefficients(sigmas):
    from comfy.k_diffusion import deis

    return deis.get_deis_coeff_list(sigmas, 3, deis_mode="tab")


def _er_lambdas(ms, sigmas):
    """e^{-lambda} of the offset schedule, computed as one vector as sample_er_sde does."""
    from comfy.k_diffusion import sampling as kd

    return kd.sigma_to_half_log_snr(kd.offset_first_sigma_for_snr(sigmas, ms), ms).neg().exp()


def _lms_coefficient():
    from comfy.k_diffusion import sampling as kd

    return kd.linear_multistep_coeff


def brownian_step(step_class, cpu=True, **options):
    """An SDE step on a Brownian tree seeded with the branch's seed over the original sigma range."""
    return lambda ms, x, sigmas, seed: step_class(brownian(x, sigmas, seed, cpu), s_noise=s_noise_of(ms, True),
                                                  rectified_flow=_rf(ms), **options)


def ancestral_step(eps_class, flow_class):
    """An ancestral step: ComfyUI switches to the rectified-flow formula on CONST model samplings (and
    only that one takes the 0.33 noise scale)."""
    return lambda ms, x, sigmas, seed: (flow_class(default_noise(x, seed), s_noise=s_noise_of(ms, True)) if _rf(ms)
                                        else eps_class(default_noise(x, seed)))


# name -> (make_step(model_sampling, x, original sigmas, seed), offsets the first sigma like the SDE samplers)
SAMPLERS = {
    "euler": (lambda ms, x, sigmas, seed: EulerStep(), False),
    "euler_ancestral": (ancestral_step(AncestralStep, AncestralRFStep), False),
    "heun": (lambda ms, x, sigmas, seed: HeunStep(), False),
    "lms": (lambda ms, x, sigmas, seed: LMSStep(coefficient=_lms_coefficient()), False),
    "dpmpp_2m": (lambda ms, x, sigmas, seed: DPMPP2MStep(), False),
    "dpmpp_sde": (brownian_step(DPMPPSDEStep), True),
    "dpmpp_sde_gpu": (brownian_step(DPMPPSDEStep, cpu=False), True),
    "dpmpp_2m_sde": (brownian_step(DPMPP2MSDEStep), True),
    "dpmpp_2m_sde_gpu": (brownian_step(DPMPP2MSDEStep, cpu=False), True),
    "dpmpp_2m_sde_heun": (brownian_step(DPMPP2MSDEStep, solver_type="heun"), True),
    "dpmpp_3m_sde": (brownian_step(DPMPP3MSDEStep), True),
    "dpmpp_3m_sde_gpu": (brownian_step(DPMPP3MSDEStep, cpu=False), True),
    "lcm": (lambda ms, x, sigmas, seed: LCMStep(default_noise(x, seed), ms.noise_scaling), False),
    "dpm_2": (lambda ms, x, sigmas, seed: DPM2Step(), False),
    "dpm_2_ancestral": (ancestral_step(DPM2AncestralStep, DPM2AncestralRFStep), False),
    "dpmpp_2s_ancestral": (ancestral_step(DPMPP2SAncestralStep, DPMPP2SAncestralRFStep), False),
    "ddpm": (lambda ms, x, sigmas, seed: DDPMStep(default_noise(x, seed)), False),
    "ipndm": (lambda ms, x, sigmas, seed: IPNDMStep(), False),
    "ipndm_v": (lambda ms, x, sigmas, seed: IPNDMVStep(), False),
    "deis": (lambda ms, x, sigmas, seed: DEISStep(_deis_coefficients(sigmas)), False),
    "gradient_estimation": (lambda ms, x, sigmas, seed: GradientEstimationStep(), False),
    "er_sde": (
        lambda ms, x, sigmas, seed: ERSDEStep(default_noise(x, seed), _er_lambdas(ms, sigmas), s_noise=s_noise_of(ms, True)),
        True,
    ),
    "res_multistep": (lambda ms, x, sigmas, seed: ResMultistepStep(), False),
    "res_multistep_ancestral": (
        lambda ms, x, sigmas, seed: ResMultistepStep(default_noise(x, seed), eta=1.0, s_noise=s_noise_of(ms, True)),
        False,
    ),
}


def lockstep_sampler(name, record):
    """A KSAMPLER whose function runs amdm_core's step for `name` over the sigmas ComfyUI hands it: the
    main branch and an aux branch (its own noise, seed and denoiser) of weight 0 and p = 0 in a window of
    3 steps; record gets the counted model calls."""
    import comfy.samplers
    from comfy.k_diffusion import sampling as kd

    make_step, offsets_first_sigma = SAMPLERS[name]

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        seeds = [extra_args.get("seed"), extra_args.get("seed") + 1]
        model_sampling = model.inner_model.model_patcher.get_model_object("model_sampling")
        run_sigmas = kd.offset_first_sigma_for_snr(sigmas, model_sampling) if offsets_first_sigma else sigmas
        latents = [x, torch.randn(x.shape, generator=torch.Generator().manual_seed(seeds[1])) * sigmas[0]]
        denoisers = [lambda x_in, sigma: model(x_in, sigma, **extra_args),
                     lambda x_in, sigma: model(x_in, sigma, **extra_args) * 0.5]
        result = run_lockstep(denoisers, latents, run_sigmas, aggregation_steps=3, weights=[0.0], deviation_steps=0.0,
                              mean_mode="exact",
                              make_step=lambda k: make_step(model_sampling, latents[k], sigmas, seeds[k]))
        record.append(result.model_calls)
        return result.x

    return comfy.samplers.KSAMPLER(sample)


@pytest.fixture(scope="module")
def guiders(tiny_model):
    import comfy.samplers

    gen = torch.Generator().manual_seed(11)
    positive = [[torch.randn(1, 77, 768, generator=gen), {}]]
    negative = [[torch.randn(1, 77, 768, generator=gen), {}]]
    out = {}
    for family, patcher in (("eps", tiny_model), ("flow", flow_patcher(tiny_model))):
        guider = comfy.samplers.CFGGuider(patcher)
        guider.set_conds(positive, negative)
        guider.set_cfg(2.5)
        out[family] = guider
    return out


def family_sigmas(guider, family):
    import comfy.samplers

    model_sampling = guider.model_patcher.get_model_object("model_sampling")
    return comfy.samplers.calculate_sigmas(model_sampling, "karras" if family == "eps" else "simple", STEPS)


@pytest.mark.parametrize("family", ["eps", "flow"])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_the_main_branch_reproduces_comfyui_sampler_bit_for_bit(guiders, family, name):
    """The lockstep's main branch, beside an aux branch of weight 0 and p = 0 in a window of 3 steps
    (slerp with weight 0 returns the main latent exactly, so this is also the one-branch identity)."""
    import comfy.samplers

    guider = guiders[family]
    sigmas = family_sigmas(guider, family)
    if family == "flow":
        assert float(sigmas[0]) == 1.0  # the SDE samplers' first-sigma offset is exercised
    noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(3))
    latent = torch.zeros(LATENT)
    expected = guider.sample(noise, latent, comfy.samplers.sampler_object(name), sigmas, seed=42)
    calls = []
    ours = guider.sample(noise, latent, lockstep_sampler(name, calls), sigmas, seed=42)
    assert torch.isfinite(expected).all()
    assert torch.equal(ours, expected)
    step_type = type(SAMPLERS[name][0](guider.model_patcher.get_model_object("model_sampling"), noise, sigmas, 0))
    assert calls == [expected_model_calls(sigmas, 2, 3, step_type.model_calls)]
