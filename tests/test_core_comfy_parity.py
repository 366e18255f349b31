"""amdm_core against the real ComfyUI it is built for: the SD1.5 sigma table and ddim_uniform schedule
of a real SD1.5 model_sampling, its timestep lookup, and k-diffusion's own Euler / Euler-ancestral
/ DPM++ 2M samplers (a single branch of run_lockstep must reproduce them bit for bit)."""
import torch

from amdm_core import (
    AncestralStep,
    DPMPP2MStep,
    ddim_uniform_sigmas,
    scaled_linear_sigma_table,
    run_lockstep,
    timestep_of_sigma,
)


def toy_denoiser(k):
    gen = torch.Generator().manual_seed(k)
    mean = torch.randn(4, 8, 8, generator=gen)

    def denoise(x, sigma):
        s = sigma.reshape(-1, 1, 1, 1)
        return (x + s**2 * mean) / (1 + s**2) + 0.1 * torch.tanh(x)

    return denoise


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


class _KDiffusionModel:
    """The call shape k-diffusion samplers expect: model(x, sigma[batch]); euler_ancestral also looks up
    model.inner_model.inner_model.model_sampling to pick its eps (not flow) branch."""

    def __init__(self, denoise, model_sampling):
        self.denoise = denoise
        self.inner_model = type("Inner", (), {"inner_model": type("Base", (), {"model_sampling": model_sampling})})

    def __call__(self, x, sigma, **_):
        return self.denoise(x, sigma)


def test_one_branch_reproduces_comfyui_euler_and_ancestral_bit_for_bit(tiny_model):
    import comfy.k_diffusion.sampling as kd
    import comfy.samplers

    model_sampling = tiny_model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, "ddim_uniform", 20).float()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    denoise = toy_denoiser(0)

    expected = kd.sample_euler(_KDiffusionModel(denoise, model_sampling), x.clone(), sigmas, disable=True)
    ours = run_lockstep([denoise], [x], sigmas, aggregation_steps=0, weights=[])
    assert torch.equal(ours.x, expected)
    # an aux branch with weight 0 and p = 0 inside a 10-step window changes nothing
    joint = run_lockstep([denoise, toy_denoiser(1)], [x, x.flip(0)], sigmas, aggregation_steps=10, weights=[0.0],
                         deviation_steps=0.0, sigma_table=model_sampling.sigmas)
    assert torch.equal(joint.x, expected)

    def noise_sampler(seed):
        gen = torch.Generator().manual_seed(seed)
        return lambda sigma, sigma_next: torch.randn(x.shape, generator=gen)

    expected = kd.sample_euler_ancestral(_KDiffusionModel(denoise, model_sampling), x.clone(), sigmas, disable=True,
                                         noise_sampler=noise_sampler(5))
    ours = run_lockstep([denoise], [x], sigmas, aggregation_steps=0, weights=[],
                        make_step=lambda k: AncestralStep(noise_sampler(5)))
    assert torch.equal(ours.x, expected)


def test_one_branch_reproduces_comfyui_dpmpp_2m_and_keeps_history_per_branch(tiny_model):
    import comfy.k_diffusion.sampling as kd
    import comfy.samplers

    model_sampling = tiny_model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, "karras", 12).float()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    denoise = toy_denoiser(2)
    expected = kd.sample_dpmpp_2m(_KDiffusionModel(denoise, model_sampling), x.clone(), sigmas, disable=True)
    ours = run_lockstep([denoise], [x], sigmas, aggregation_steps=0, weights=[], make_step=lambda k: DPMPP2MStep())
    assert torch.equal(ours.x, expected)
    # with an aux branch at weight 0 and p = 0 the main branch's history is its own: still identical
    joint = run_lockstep([denoise, toy_denoiser(3)], [x, x.flip(0)], sigmas, aggregation_steps=6, weights=[0.0],
                         deviation_steps=0.0, sigma_table=model_sampling.sigmas, make_step=lambda k: DPMPP2MStep())
    assert torch.equal(joint.x, expected)
