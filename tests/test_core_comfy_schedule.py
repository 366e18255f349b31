"""amdm_core against the real ComfyUI it is built for: the SD1.5 sigma table, ddim_uniform schedule and
timestep lookup of a real model_sampling."""
import torch

from amdm_core import ddim_uniform_sigmas, scaled_linear_sigma_table, timestep_of_sigma


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
