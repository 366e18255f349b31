"""amdm_core.lockstep.run_lockstep against spec section 3.

The expected values come from `spec_reference.reference_loop`, the tests' float64 transcription of spec
section 3 (DDIM, its own slerp, timestep lookup and posterior mean), written independently of amdm_core.
"""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from spec_reference import reference_loop, sd15_sigmas_float32

from amdm_core import (
    AncestralStep,
    DPMPP2MSDEStep,
    DPMPPSDEStep,
    FLOW_SPACE,
    EulerStep,
    HeunStep,
    ddim_uniform_sigmas,
    expected_model_calls,
    run_lockstep,
)

SHAPE = (2, 4, 6, 6)
TABLE = sd15_sigmas_float32()


def make_denoiser(k):
    """A smooth nonlinear toy denoiser D(x, sigma), different per branch, dtype-agnostic."""
    gen = torch.Generator().manual_seed(100 + k)
    mean = torch.randn(SHAPE[1:], generator=gen)
    gain = 0.5 + torch.rand(SHAPE[1:], generator=gen)

    def denoise(x, sigma):
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        m, g = mean.to(x.dtype), gain.to(x.dtype)
        return (g * x + s**2 * m) / (1 + s**2) + 0.2 * torch.tanh(x) * s / (1 + s)

    return denoise


class Counted:
    """Wraps a denoiser and records the sigmas it was called with."""

    def __init__(self, fn):
        self.fn, self.sigmas = fn, []

    def __call__(self, x, sigma):
        assert sigma.shape == (x.shape[0],)
        self.sigmas.append(float(sigma[0]))
        return self.fn(x, sigma)


def initial_latents(n, sigma0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=gen) * sigma0 for _ in range(n)]


CONFIGS = [
    # (branches, s, aggregation, mean_mode, p, weights)
    (2, 5, "sequential", "reference", [0.3, 0.3], [0.5]),
    (2, 5, "linear", "reference", [0.3, 0.3], [0.5]),
    (2, 3, "sequential", "exact", [0.1, 0.6], [0.7]),
    (3, 4, "paper", "reference", [0.3, 0.2, 0.4], [0.5, 0.6]),
    (3, 4, "sequential", "exact", [0.3, 0.3, 0.3], [0.4, 0.3]),
    (4, 2, "sequential", "reference", [0.3] * 4, [0.5, 0.3, 0.6]),
    (2, 11, "sequential", "reference", [0.3, 0.3], [0.5]),  # window covers every step (s >= T - 1)
    (2, 1, "sequential", "reference", [0.0, 0.0], [0.5]),
]


@pytest.mark.parametrize("n, s, mode, mean_mode, p, weights", CONFIGS)
def test_loop_matches_a_transcription_of_the_spec(n, s, mode, mean_mode, p, weights):
    sigmas = ddim_uniform_sigmas(TABLE, 10)
    denoisers = [make_denoiser(k) for k in range(n)]
    init = initial_latents(n, float(sigmas[0]), seed=n + s)
    result = run_lockstep(
        denoisers, init, sigmas, aggregation_steps=s, weights=weights, aggregation=mode,
        deviation_steps=p, mean_mode=mean_mode, sigma_table=TABLE,
    )
    expected = reference_loop(denoisers, init, sigmas, s, weights, mode, p, mean_mode, TABLE)
    np.testing.assert_allclose(result.x.numpy(), expected[0], rtol=1e-4, atol=2e-4)
    if s < 9:  # aux branches stopped after step s; their latents are those of the window's end
        stopped = reference_loop(denoisers, init, sigmas[: s + 2], s, weights, mode, p, mean_mode, TABLE)
        for k in range(1, n):
            np.testing.assert_allclose(result.branch_latents[k].numpy(), stopped[k], rtol=1e-4, atol=2e-4)
    assert result.steps_done == 10
    # the transcription is sensitive to what the window does: without it the result is far away
    plain = reference_loop(denoisers[:1], init[:1], sigmas, 0, [], mode, p, mean_mode, TABLE)[0]
    if s >= 1 and any(w > 0 for w in weights):
        assert np.abs(plain - expected[0]).max() > 1e-2


def randn_sampler(seed):
    gen = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(SHAPE, generator=gen)


# (step factory, calls of a step into sigma > 0, calls of the step into sigma 0): docs/algorithm.md
STEP_CALLS = {
    "euler": (lambda k: EulerStep(), 1, 1),
    "heun": (lambda k: HeunStep(), 2, 1),
    "dpmpp_sde": (lambda k: DPMPPSDEStep(randn_sampler(k)), 2, 1),
    "dpmpp_2m_sde": (lambda k: DPMPP2MSDEStep(randn_sampler(k)), 1, 1),
}


def flow_sigmas(steps, shift=3.0):
    """A rectified-flow schedule from sigma 1 (pure noise) to 0, time-shifted as SD3 does."""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


FLOW_CONFIGS = [
    # (branches, s, aggregation, p, weights)
    (2, 4, "sequential", [0.3, 0.3], [0.5]),
    (3, 3, "paper", [0.3, 0.2, 0.4], [0.5, 0.6]),
    (2, 9, "linear", [0.1, 0.6], [0.7]),  # window covers every step
]


@pytest.mark.parametrize("n, s, mode, p, weights", FLOW_CONFIGS)
@pytest.mark.parametrize("mean_mode", ["exact", "auto"])  # a flow model has no DDPM table: auto is exact
def test_flow_loop_matches_a_transcription_of_the_spec(n, s, mode, p, weights, mean_mode):
    sigmas = flow_sigmas(10)
    denoisers = [make_denoiser(k) for k in range(n)]
    init = initial_latents(n, 1.0, seed=20 + n + s)
    result = run_lockstep(denoisers, init, sigmas, aggregation_steps=s, weights=weights, aggregation=mode,
                          deviation_steps=p, mean_mode=mean_mode, space=FLOW_SPACE)
    expected = reference_loop(denoisers, init, sigmas, s, weights, mode, p, "exact", None, family="flow")
    np.testing.assert_allclose(result.x.numpy(), expected[0], rtol=1e-4, atol=2e-4)
    if s < 9:
        stopped = reference_loop(denoisers, init, sigmas[: s + 2], s, weights, mode, p, "exact", None, family="flow")
        for k in range(1, n):
            np.testing.assert_allclose(result.branch_latents[k].numpy(), stopped[k], rtol=1e-4, atol=2e-4)
    # sensitive to the space: the same run transcribed in the eps space is far away
    eps_space = reference_loop(denoisers, init, sigmas, s, weights, mode, p, "exact", None, family="eps")
    assert np.abs(eps_space[0] - expected[0]).max() > 1e-2
    plain = reference_loop(denoisers[:1], init[:1], sigmas, 0, [], mode, p, "exact", None, family="flow")[0]
    assert np.abs(plain - expected[0]).max() > 1e-2


@settings(max_examples=30, deadline=None)
@given(steps=st.integers(1, 10), n=st.integers(1, 4), s=st.integers(0, 14), sampler=st.sampled_from(sorted(STEP_CALLS)))
def test_model_calls_are_counted_and_match_the_per_sampler_formula(steps, n, s, sampler):
    make_step, per_step, to_zero = STEP_CALLS[sampler]
    sigmas = torch.linspace(10.0, 0.0, steps + 1)
    denoisers = [Counted(make_denoiser(k)) for k in range(n)]
    result = run_lockstep(denoisers, initial_latents(n, float(sigmas[0])), sigmas, aggregation_steps=s,
                          weights=[0.5] * (n - 1), sigma_table=TABLE, make_step=make_step)
    window = min(s, steps - 1)
    main_calls = (steps - 1) * per_step + to_zero
    aux_calls = (window + 1) * per_step - (per_step - to_zero) * (window == steps - 1)
    step_type = type(make_step(0))
    assert result.model_calls == main_calls + (n - 1) * aux_calls == expected_model_calls(steps, n, s, step_type.model_calls)
    assert sum(len(d.sigmas) for d in denoisers) == result.model_calls
    if per_step == 1:
        assert denoisers[0].sigmas == pytest.approx(sigmas[:-1].tolist(), rel=0, abs=0)
        for aux in denoisers[1:]:  # aux branches run steps 0 .. s and then stop
            assert aux.sigmas == pytest.approx(sigmas[: window + 1].tolist(), rel=0, abs=0)
    if sampler == "heun":  # the extra call is at the step's end, sigma_{i+1}
        expected = [v for i in range(steps) for v in ([sigmas[i]] + ([sigmas[i + 1]] if i < steps - 1 else []))]
        assert denoisers[0].sigmas == pytest.approx([float(v) for v in expected], rel=0, abs=0)


def test_expected_model_calls_without_a_final_zero_sigma():
    assert expected_model_calls(torch.linspace(10, 1, 11), 2, 3, HeunStep.model_calls) == 20 + 8
    assert expected_model_calls(10, 2, 20, HeunStep.model_calls) == 19 + 19
    assert expected_model_calls(10, 3, 20) == 30


def ddim_vp(denoise, x, sigmas):
    """Plain DDIM (eta 0) in VP form, float64: x_vp' = sqrt(abar') x0 + sqrt(1 - abar') eps."""
    x = x.double()
    for sigma, nxt in zip(sigmas[:-1].double(), sigmas[1:].double()):
        d = denoise(x, sigma.expand(x.shape[0]))
        eps = (x - d) / sigma
        abar_next = 1 / (1 + nxt**2)
        x = (abar_next.sqrt() * d + (1 - abar_next).sqrt() * eps) / abar_next.sqrt()
    return x


def test_s0_is_a_plain_ddim_run_of_the_main_branch():
    sigmas = ddim_uniform_sigmas(TABLE, 20)
    denoisers = [make_denoiser(0), make_denoiser(1), make_denoiser(2)]
    init = initial_latents(3, float(sigmas[0]), seed=7)
    result = run_lockstep(denoisers, init, sigmas, aggregation_steps=0, weights=[0.5, 0.6], sigma_table=TABLE)
    torch.testing.assert_close(result.x.double(), ddim_vp(denoisers[0], init[0], sigmas), rtol=1e-5, atol=1e-5)
    alone = run_lockstep(denoisers[:1], init[:1], sigmas, aggregation_steps=0, weights=[])
    assert torch.equal(result.x, alone.x)
    assert result.model_calls == 20 + 2


def test_zero_weights_and_zero_p_leave_the_main_branch_bit_identical():
    sigmas = ddim_uniform_sigmas(TABLE, 15)
    denoisers = [make_denoiser(0), make_denoiser(1)]
    init = initial_latents(2, float(sigmas[0]), seed=3)
    alone = run_lockstep(denoisers[:1], init[:1], sigmas, aggregation_steps=0, weights=[])
    for mean_mode in ("reference", "exact"):
        joint = run_lockstep(denoisers, init, sigmas, aggregation_steps=10, weights=[0.0], deviation_steps=0.0,
                             mean_mode=mean_mode, sigma_table=TABLE)
        assert torch.equal(joint.x, alone.x)


def test_step_0_is_never_aggregated_and_step_1_is():
    sigmas = ddim_uniform_sigmas(TABLE, 10)
    denoisers = [make_denoiser(0), make_denoiser(1)]
    init = initial_latents(2, float(sigmas[0]), seed=4)
    seen = []
    run_lockstep(denoisers, init, sigmas, aggregation_steps=5, weights=[0.5], sigma_table=TABLE,
                 callback=lambda i, d, x: seen.append((i, d.clone(), x.clone())))
    alone = []
    run_lockstep(denoisers[:1], init[:1], sigmas, aggregation_steps=0, weights=[],
                 callback=lambda i, d, x: alone.append((i, d.clone(), x.clone())))
    assert [i for i, _, _ in seen] == list(range(10))
    assert torch.equal(seen[0][2], alone[0][2])  # step 0: the main branch's own step
    assert torch.equal(seen[1][1], alone[1][1])  # step 1 starts from the same x ...
    assert not torch.allclose(seen[1][2], alone[1][2], atol=1e-3)  # ... and ends aggregated


def test_with_p0_every_branch_continues_from_the_same_aggregate():
    sigmas = ddim_uniform_sigmas(TABLE, 10)
    denoisers = [make_denoiser(k) for k in range(3)]
    result = run_lockstep(denoisers, initial_latents(3, float(sigmas[0]), seed=5), sigmas, aggregation_steps=3,
                          weights=[0.5, 0.6], deviation_steps=0.0, sigma_table=TABLE, stop_after_window=True)
    assert torch.equal(result.branch_latents[0], result.branch_latents[1])
    assert torch.equal(result.branch_latents[0], result.branch_latents[2])


def test_stop_after_window_then_the_tail_equals_the_full_run():
    sigmas = ddim_uniform_sigmas(TABLE, 20)
    denoisers = [make_denoiser(0), make_denoiser(1)]
    init = initial_latents(2, float(sigmas[0]), seed=6)
    kwargs = dict(aggregation_steps=4, weights=[0.5], sigma_table=TABLE)
    full = run_lockstep(denoisers, init, sigmas, **kwargs)
    window = run_lockstep(denoisers, init, sigmas, stop_after_window=True, **kwargs)
    assert window.steps_done == 5 and window.model_calls == 10
    assert len(window.branch_eps) == 2 and all(e is not None for e in window.branch_eps)
    tail = run_lockstep(denoisers[:1], [window.x], sigmas[5:], aggregation_steps=0, weights=[])
    assert torch.equal(tail.x, full.x)


def test_interrupt_hook_stops_before_the_next_step():
    sigmas = ddim_uniform_sigmas(TABLE, 10)
    counted = [Counted(make_denoiser(0)), Counted(make_denoiser(1))]
    checks = []

    class Interrupted(Exception):
        pass

    def check():
        checks.append(1)
        if len(checks) == 4:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_lockstep(counted, initial_latents(2, float(sigmas[0])), sigmas, aggregation_steps=5, weights=[0.5],
                     sigma_table=TABLE, check_interrupt=check)
    assert len(counted[0].sigmas) == 3 and len(counted[1].sigmas) == 3


def test_ancestral_steps_use_each_branch_s_own_noise():
    sigmas = ddim_uniform_sigmas(TABLE, 10)
    denoisers = [make_denoiser(0), make_denoiser(1)]
    init = initial_latents(2, float(sigmas[0]), seed=8)

    def sampler(seed):
        gen = torch.Generator().manual_seed(seed)
        return lambda sigma, sigma_next: torch.randn(SHAPE, generator=gen)

    def run(seeds, s):
        return run_lockstep(denoisers, init, sigmas, aggregation_steps=s, weights=[0.5], sigma_table=TABLE,
                            make_step=lambda k: AncestralStep(sampler(seeds[k]))).x

    # s = 0: the main result depends only on the main branch's noise
    assert torch.equal(run([1, 2], 0), run([1, 3], 0))
    assert not torch.equal(run([1, 2], 0), run([4, 2], 0))
    # inside the window the aux branch's noise reaches the main result
    assert not torch.allclose(run([1, 2], 3), run([1, 3], 3), atol=1e-3)
    # eta = 0 is the deterministic Euler step
    euler = run_lockstep(denoisers, init, sigmas, aggregation_steps=3, weights=[0.5], sigma_table=TABLE).x
    eta0 = run_lockstep(denoisers, init, sigmas, aggregation_steps=3, weights=[0.5], sigma_table=TABLE,
                        make_step=lambda k: AncestralStep(sampler(k), eta=0.0)).x
    torch.testing.assert_close(eta0, euler, rtol=0, atol=1e-6)


def test_bad_arguments_are_reported():
    sigmas = ddim_uniform_sigmas(TABLE, 5)
    dens = [make_denoiser(0), make_denoiser(1)]
    init = initial_latents(2, float(sigmas[0]))
    ok = dict(aggregation_steps=2, weights=[0.5], sigma_table=TABLE)
    with pytest.raises(ValueError, match="one latent per branch"):
        run_lockstep(dens, init[:1], sigmas, **ok)
    with pytest.raises(ValueError, match="share one latent format"):
        run_lockstep(dens, [init[0], init[1][:, :, :4]], sigmas, **ok)
    with pytest.raises(ValueError, match="needs sigma_table"):
        run_lockstep(dens, init, sigmas, aggregation_steps=2, weights=[0.5], mean_mode="reference")
    with pytest.raises(ValueError, match="one value per aux branch"):
        run_lockstep(dens, init, sigmas, aggregation_steps=2, weights=[0.5, 0.5], sigma_table=TABLE)
    with pytest.raises(ValueError, match="one value per branch"):
        run_lockstep(dens, init, sigmas, deviation_steps=[0.3], **ok)
    with pytest.raises(ValueError, match=">= 0"):
        run_lockstep(dens, init, sigmas, aggregation_steps=-1, weights=[0.5], sigma_table=TABLE)
    with pytest.raises(ValueError, match="unknown mean_mode"):
        run_lockstep(dens, init, sigmas, mean_mode="posterior", **ok)
    with pytest.raises(ValueError, match="T \\+ 1 >= 2"):
        run_lockstep(dens, init, sigmas[:1], **ok)
