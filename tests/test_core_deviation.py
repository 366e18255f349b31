"""amdm_core.deviation and amdm_core.schedule, against docs/algorithm.md, sections 3 and 5.

The SD1.5 training table comes from spec_reference, re-derived from its definition (scaled-linear betas
0.00085..0.012) independently of amdm_core.scaled_linear_sigma_table.
"""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from spec_reference import sd15_sigmas_float32, sd15_training_table

from amdm_core import (
    MEAN_MODES,
    alpha_bar_from_sigma,
    ddim_uniform_sigmas,
    deviation_correct,
    from_vp,
    one_step_alpha,
    reference_mean,
    scaled_linear_sigma_table,
    sigma_from_alpha_bar,
    timestep_of_sigma,
    to_vp,
)

FAST = settings(max_examples=40, deadline=None)


def latents(seed, shape=(3, 4, 8, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def item_norms(x):
    return x.reshape(x.shape[0], -1).norm(dim=1)


@FAST
@given(seed=st.integers(0, 10_000), p=st.floats(0.0, 3.0), spread=st.floats(0.01, 10.0))
def test_deviation_step_has_length_p_toward_mu(seed, p, spread):
    xbar, mu = latents(seed), latents(seed + 1) * spread
    out = deviation_correct(xbar, mu, p)
    step = (out - xbar).reshape(3, -1).double()
    torch.testing.assert_close(step.norm(dim=1), torch.full((3,), p, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    if p > 1e-3:  # below that the float32 step is too short to have a measurable direction
        toward = (mu - xbar).reshape(3, -1).double()
        cos = (step * toward).sum(1) / (step.norm(dim=1) * toward.norm(dim=1))
        torch.testing.assert_close(cos, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-6)


def test_deviation_does_not_move_an_item_already_at_mu():
    xbar, mu = latents(0), latents(1)
    mu[1] = xbar[1]
    out = deviation_correct(xbar, mu, 0.3)
    assert torch.equal(out[1], xbar[1])
    torch.testing.assert_close(item_norms(out - xbar)[[0, 2]], torch.tensor([0.3, 0.3]), rtol=1e-5, atol=1e-6)
    assert torch.equal(deviation_correct(xbar, xbar.clone(), 0.3), xbar)
    assert torch.isfinite(deviation_correct(xbar, xbar + 1e-30, 0.3)).all()


def test_deviation_works_per_batch_item_not_over_the_whole_batch():
    # The reference code divides by the norm over the whole batch; docs/algorithm.md (and amdm_core) per item.
    xbar, mu = latents(2), latents(3)
    mu[0] = xbar[0] + 100.0 * (mu[0] - xbar[0])  # item 0 far away must not shrink the others' steps
    out = deviation_correct(xbar, mu, 0.5)
    torch.testing.assert_close(item_norms(out - xbar), torch.full((3,), 0.5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_deviation_half_precision_in_float32(dtype):
    xbar, mu = (latents(4) * 300).to(dtype), (latents(5) * 300).to(dtype)  # |xbar - mu|^2 overflows float16
    out = deviation_correct(xbar, mu, 0.3)
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_schedule_conversions():
    sigma = torch.tensor([0.0292, 1.0, 14.6146])
    abar = alpha_bar_from_sigma(sigma)
    torch.testing.assert_close(abar, 1.0 / (1.0 + sigma**2))
    torch.testing.assert_close(sigma_from_alpha_bar(abar), sigma)
    x = latents(6)
    torch.testing.assert_close(to_vp(x, 2.0), x / 5**0.5)
    per_item = torch.tensor([0.5, 2.0, 7.0])
    vp = to_vp(x, per_item)
    for i, s in enumerate(per_item.tolist()):
        torch.testing.assert_close(vp[i], x[i] / (1 + s * s) ** 0.5)
    torch.testing.assert_close(from_vp(vp, per_item), x)
    with pytest.raises(ValueError, match="one value per batch item"):
        to_vp(x, torch.tensor([1.0, 2.0]))


def test_sigma_table_and_ddim_uniform_match_the_sd15_definition():
    torch.testing.assert_close(scaled_linear_sigma_table(), sd15_sigmas_float32(), rtol=0, atol=0)
    table = sd15_sigmas_float32()
    sigmas = ddim_uniform_sigmas(table, 50)
    assert sigmas.shape == (51,) and sigmas[-1] == 0
    steps = [timestep_of_sigma(s, table) for s in sigmas[:-1]]
    assert steps == list(range(981, 0, -20))  # timesteps 981, 961, ..., 1 (DDIM with steps_offset 1)


@FAST
@given(t=st.integers(0, 999), jitter=st.floats(-0.3, 0.3))
def test_timestep_of_sigma_is_the_nearest_table_entry_in_log_space(t, jitter):
    table = sd15_sigmas_float32()
    log_table = np.log(table.numpy().astype(np.float64))
    # a sigma between table entries: nearest in log space, as ComfyUI's model_sampling.timestep
    lo, hi = log_table[max(t - 1, 0)], log_table[min(t + 1, 999)]
    log_sigma = log_table[t] + jitter * (hi - lo) / 2
    expected = int(np.argmin(np.abs(log_table - log_sigma)))
    assert timestep_of_sigma(float(np.exp(log_sigma)), table) == expected
    assert timestep_of_sigma(torch.full((2,), float(table[t])), table) == t


def test_timestep_of_sigma_rejects_differing_batch_sigmas():
    with pytest.raises(ValueError, match="differs across the batch"):
        timestep_of_sigma(torch.tensor([1.0, 2.0]), sd15_sigmas_float32())


@pytest.mark.parametrize("t", [0, 1, 21, 500, 981, 999])
def test_one_step_alpha_is_one_minus_beta_of_the_training_table(t):
    betas, _, abar = sd15_training_table()
    alpha, alpha_bar = one_step_alpha(t, sd15_sigmas_float32())
    assert abs(alpha_bar - abar[t]) < 1e-7 * max(abar[t], 1e-3) * 10
    assert abs((1 - alpha) - betas[t]) < 1e-5 * betas[t] + 1e-9


@FAST
@given(seed=st.integers(0, 10_000), t=st.integers(0, 999))
def test_reference_mean_matches_the_ddpm_posterior_mean_on_the_sd15_table(seed, t):
    betas, alphas, abar = sd15_training_table()
    x_vp, eps = latents(seed), latents(seed + 1)
    # mu = (X - beta_t / sqrt(1 - abar_t) * E) / sqrt(alpha_t), float64
    expected = (x_vp.double().numpy() - betas[t] / np.sqrt(1 - abar[t]) * eps.double().numpy()) / np.sqrt(alphas[t])
    out = reference_mean(x_vp, eps, t, sd15_sigmas_float32())
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=2e-6)


def test_reference_mean_validates_its_inputs():
    table = sd15_sigmas_float32()
    with pytest.raises(ValueError, match="outside the table"):
        reference_mean(latents(0), latents(1), 1000, table)
    with pytest.raises(ValueError, match="differ in shape"):
        reference_mean(latents(0), latents(1, (3, 4, 8, 4)), 10, table)
    with pytest.raises(ValueError, match="sigma_table"):
        reference_mean(latents(0), latents(1), 10, table[None])
    assert MEAN_MODES == ("auto", "reference", "exact")
