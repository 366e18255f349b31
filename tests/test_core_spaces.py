"""amdm_core's noise spaces (x = a x0 + b eps for every family), mean modes and latent shapes, against
docs/algorithm.md "One space for every family", re-derived here in float64 from the definitions."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from driven_samplers import lockstep
from hypothesis import strategies as st
from spec_reference import reference_slerp

from amdm_core import (
    EPS_SPACE,
    FLOW_SPACE,
    NoiseSpace,
    deviation_correct,
    from_vp,
    resolve_mean_mode,
    slerp,
    to_vp,
)

FAST = settings(max_examples=40, deadline=None)


def eps_noise_scaling(sigma, noise, latent):
    """The eps family's noise scaling (latent + sigma * noise), in the shape convention of ComfyUI's."""
    return noise * sigma.reshape(-1) + latent


def flow_noise_scaling(noise_scale):
    """A rectified-flow noise scaling: sigma * (s * noise) + (1 - sigma) * latent."""
    return lambda sigma, noise, latent: sigma.reshape(-1) * (noise_scale * noise) + (1.0 - sigma.reshape(-1)) * latent


@FAST
@given(seed=st.integers(0, 10_000), sigma=st.floats(0.01, 0.99), family=st.sampled_from(["eps", "flow", "flow_scaled"]))
def test_vp_latent_has_the_same_snr_and_unit_variance_weights(seed, sigma, family):
    gen = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(2, 4, 5, 5, generator=gen, dtype=torch.float64), torch.randn(2, 4, 5, 5, generator=gen, dtype=torch.float64)
    a, b = {"eps": (1.0, sigma), "flow": (1.0 - sigma, sigma), "flow_scaled": (1.0 - sigma, 2.5 * sigma)}[family]
    space = {"eps": EPS_SPACE, "flow": FLOW_SPACE,
             "flow_scaled": NoiseSpace.from_noise_scaling(flow_noise_scaling(2.5))}[family]
    x = a * x0 + b * eps
    abar = a * a / (a * a + b * b)
    s = torch.tensor(sigma, dtype=torch.float64)
    expected_vp = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps
    torch.testing.assert_close(to_vp(x, s, space), expected_vp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(from_vp(expected_vp, s, space), x, rtol=1e-12, atol=1e-12)
    assert space.alpha_bar(sigma) == pytest.approx(abar, rel=1e-12)
    torch.testing.assert_close(space.eps(x, x0, s), eps, rtol=1e-9, atol=1e-9)


def test_spaces_read_off_a_noise_scaling_equal_the_closed_forms_bit_for_bit():
    x = torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    from_eps = NoiseSpace.from_noise_scaling(eps_noise_scaling)
    from_flow = NoiseSpace.from_noise_scaling(flow_noise_scaling(1.0))
    for sigma in (torch.tensor(0.7), torch.tensor(14.6), torch.tensor([0.2, 0.5, 0.9])):
        assert torch.equal(to_vp(x, sigma, from_eps), to_vp(x, sigma, EPS_SPACE))
        assert torch.equal(to_vp(x, sigma, from_eps), x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2) ** 0.5)
        if float(sigma.max()) < 1:
            assert torch.equal(to_vp(x, sigma, from_flow), to_vp(x, sigma, FLOW_SPACE))
    per_item = torch.tensor([0.2, 0.5, 0.9])
    vp = to_vp(x, per_item, FLOW_SPACE)
    for i, s in enumerate(per_item.tolist()):
        torch.testing.assert_close(vp[i], x[i] / ((1 - s) ** 2 + s**2) ** 0.5)


def test_a_space_without_noise_is_refused():
    latent_only = NoiseSpace.from_noise_scaling(lambda sigma, noise, latent: latent + 0 * sigma.reshape(-1), "img2img")
    with pytest.raises(ValueError, match="the noise space 'img2img' gives .* b > 0"):
        latent_only.check(0.5)
    FLOW_SPACE.check(0.5)


def test_mean_modes():
    table = torch.linspace(0.03, 14.6, 1000)
    assert resolve_mean_mode("auto", table) == "reference"
    assert resolve_mean_mode("auto", None) == "exact"
    assert resolve_mean_mode("exact", table) == "exact"
    assert resolve_mean_mode("reference", table) == "reference"
    with pytest.raises(ValueError, match="'reference' needs sigma_table.*'auto' or 'exact'"):
        resolve_mean_mode("reference", None)
    with pytest.raises(ValueError, match="unknown mean_mode"):
        resolve_mean_mode("posterior", table)
    # the loop refuses an explicit reference without a table even where the window would not use it
    with pytest.raises(ValueError, match="'reference' needs sigma_table"):
        lockstep("euler", [lambda x, s: x], [torch.zeros(1, 2)], torch.tensor([1.0, 0.0]), aggregation_steps=0,
                 weights=[], mean_mode="reference")


def test_flow_exact_mean_is_the_ddim_mean_of_the_flow_parameterisation():
    """x + (sigma' - sigma)(x - D)/sigma == a' D + b' (x - a D)/b for a = 1 - sigma, b = sigma (float64)."""
    gen = torch.Generator().manual_seed(3)
    x, d = torch.randn(2, 16, generator=gen, dtype=torch.float64), torch.randn(2, 16, generator=gen, dtype=torch.float64)
    for sigma, nxt in [(0.99, 0.9), (0.6, 0.2), (0.3, 0.0)]:
        euler = x + (nxt - sigma) * (x - d) / sigma
        ddim = (1 - nxt) * d + nxt * (x - (1 - sigma) * d) / sigma
        torch.testing.assert_close(euler, ddim, rtol=1e-12, atol=1e-12)


VIDEO = (2, 4, 3, 5, 6)  # [B, C, T, H, W]


def test_slerp_and_deviation_work_per_item_over_5d_video_latents():
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(VIDEO, generator=gen), torch.randn(VIDEO, generator=gen)
    out = slerp(a, b, torch.tensor([0.3, 0.8]))
    for i, w in enumerate((0.3, 0.8)):
        np.testing.assert_allclose(out[i].numpy(), reference_slerp(a[i : i + 1].double().numpy(), b[i : i + 1].double().numpy(), w)[0],
                                   rtol=1e-5, atol=1e-5)
    mu = torch.randn(VIDEO, generator=gen) * 5
    moved = deviation_correct(a, mu, 0.3) - a
    torch.testing.assert_close(moved.reshape(2, -1).norm(dim=1), torch.full((2,), 0.3), rtol=1e-5, atol=1e-6)
    sigma = torch.tensor([0.2, 0.7])
    vp = to_vp(a, sigma, FLOW_SPACE)
    for i, s in enumerate(sigma.tolist()):
        torch.testing.assert_close(vp[i], a[i] / ((1 - s) ** 2 + s**2) ** 0.5)


def test_the_lockstep_runs_5d_flow_latents_and_moves_each_item_p_in_vp():
    sigmas = torch.linspace(1.0, 0.0, 7)
    gen = torch.Generator().manual_seed(5)
    means = [torch.randn(VIDEO[1:], generator=gen) for _ in range(2)]

    def denoiser(mean):  # the exact flow denoiser of N(mean, I) data: E[x0 | x] at this sigma
        def denoise(x, sigma):
            s = sigma.reshape(-1, 1, 1, 1, 1)
            a, b = 1 - s, s
            return mean + a * (x - a * mean) / (a * a + b * b)
        return denoise

    init = [torch.randn(VIDEO, generator=gen) for _ in range(2)]
    denoisers = [denoiser(m) for m in means]
    result, _ = lockstep("euler", denoisers, init, sigmas, aggregation_steps=3, weights=[0.5], deviation_steps=0.3,
                         space=FLOW_SPACE)
    p0, _ = lockstep("euler", denoisers, init, sigmas, aggregation_steps=3, weights=[0.5], deviation_steps=0.0,
                     space=FLOW_SPACE)
    assert torch.isfinite(result.x).all()
    # in a one-step window both runs aggregate the same xbar; with p = 0.3 every branch then sits a VP
    # distance 0.3 from it, per item (the latents the stopped branches would have entered step 2 with)
    moved, _ = lockstep("euler", denoisers, init, sigmas, aggregation_steps=1, weights=[0.5], deviation_steps=0.3,
                        space=FLOW_SPACE)
    merged, _ = lockstep("euler", denoisers, init, sigmas, aggregation_steps=1, weights=[0.5], deviation_steps=0.0,
                         space=FLOW_SPACE)
    step_vp = to_vp(moved.latents[1] - merged.latents[1], sigmas[2], FLOW_SPACE)
    torch.testing.assert_close(step_vp.reshape(2, -1).norm(dim=1), torch.full((2,), 0.3), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(result.x, p0.x)
