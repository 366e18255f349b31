"""amdm_core.lockstep: N sampler runs driven in lockstep (docs/algorithm.md, "The loop").

The samplers here are the tests' own (driven_samplers.py); the expected values come from
`spec_reference.reference_loop`, the tests' float64 transcription of the spec, written independently of
amdm_core.
"""
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from driven_samplers import SAMPLERS, dry, euler, heun, lockstep
from spec_reference import reference_loop, sd15_sigmas_float32

from amdm_core import (
    FLOW_SPACE,
    LockstepError,
    NotSteppable,
    StepMap,
    ddim_uniform_sigmas,
    map_steps,
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
    (2, 9, "sequential", "reference", [0.3, 0.3], [0.5]),  # the window covers every step (s = T - 1)
    (2, 1, "sequential", "reference", [0.0, 0.0], [0.5]),
]


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("n, s, mode, mean_mode, p, weights", CONFIGS)
def test_loop_matches_a_transcription_of_the_spec(sampler, n, s, mode, mean_mode, p, weights):
    sigmas = ddim_uniform_sigmas(TABLE, 10)
    denoisers = [make_denoiser(k) for k in range(n)]
    init = initial_latents(n, float(sigmas[0]), seed=n + s)
    result, _ = lockstep(sampler, denoisers, init, sigmas, aggregation_steps=s, weights=weights, aggregation=mode,
                         deviation_steps=p, mean_mode=mean_mode, sigma_table=TABLE)
    reference = "heun" if sampler == "heun" else "ddim"
    expected = reference_loop(denoisers, init, sigmas, s, weights, mode, p, mean_mode, TABLE, sampler=reference)
    np.testing.assert_allclose(result.x.numpy(), expected[0], rtol=1e-4, atol=2e-4)
    if s < 9:  # aux branches stopped after step s, with the latent they would have entered step s + 1 with
        stopped = reference_loop(denoisers, init, sigmas[: s + 2], s, weights, mode, p, mean_mode, TABLE,
                                 sampler=reference)
        for k in range(1, n):
            np.testing.assert_allclose(result.latents[k].numpy(), stopped[k], rtol=1e-4, atol=2e-4)
    # the transcription is sensitive to what the window does: without it the result is far away
    plain = reference_loop(denoisers[:1], init[:1], sigmas, 0, [], mode, p, mean_mode, TABLE, sampler=reference)[0]
    if s >= 1 and any(w > 0 for w in weights):
        assert np.abs(plain - expected[0]).max() > 1e-2


def flow_sigmas(steps, shift=3.0):
    """A rectified-flow schedule from sigma 1 (pure noise) to 0, time-shifted as SD3 does."""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


@pytest.mark.parametrize("n, s, mode, p, weights", [(2, 4, "sequential", [0.3, 0.3], [0.5]),
                                                    (3, 3, "paper", [0.3, 0.2, 0.4], [0.5, 0.6]),
                                                    (2, 9, "linear", [0.1, 0.6], [0.7])])
@pytest.mark.parametrize("mean_mode", ["exact", "auto"])  # a flow model has no DDPM table: auto is exact
def test_flow_loop_matches_a_transcription_of_the_spec(n, s, mode, p, weights, mean_mode):
    sigmas = flow_sigmas(10)
    denoisers = [make_denoiser(k) for k in range(n)]
    init = initial_latents(n, 1.0, seed=20 + n + s)
    result, _ = lockstep("euler", denoisers, init, sigmas, aggregation_steps=s, weights=weights, aggregation=mode,
                         deviation_steps=p, mean_mode=mean_mode, space=FLOW_SPACE)
    expected = reference_loop(denoisers, init, sigmas, s, weights, mode, p, "exact", None, family="flow")
    np.testing.assert_allclose(result.x.numpy(), expected[0], rtol=1e-4, atol=2e-4)
    # sensitive to the space: the same run transcribed in the eps space is far away
    eps_space = reference_loop(denoisers, init, sigmas, s, weights, mode, p, "exact", None, family="eps")
    assert np.abs(eps_space[0] - expected[0]).max() > 1e-2


def test_the_step_map_is_read_off_the_dry_run():
    sigmas = ddim_uniform_sigmas(TABLE, 5)
    x = initial_latents(1, float(sigmas[0]))[0]
    assert map_steps(euler(None, x, sigmas), 5, dry) == StepMap((0, 1, 2, 3, 4), 5)
    # Heun evaluates the end of each step too (not into sigma 0): step j begins with the call it reports
    assert map_steps(heun(None, x, sigmas), 5, dry) == StepMap((0, 2, 4, 6, 8), 9)

    def transformed_report(hooks):  # reports a new tensor: step j begins with its first call after step j - 1
        latent = x
        for i in range(5):
            first = hooks.model(latent, sigmas[i].expand(2), None)
            second = hooks.model(latent * 0.5, sigmas[i].expand(2), None)
            hooks.report(i, (first + second) / 2)
            latent = latent * 0.9
        return hooks.returned(latent)

    assert map_steps(transformed_report, 5, dry).boundaries == (0, 2, 4, 6, 8)


def test_samplers_whose_steps_cannot_be_followed_are_named_by_what_they_do():
    sigmas = ddim_uniform_sigmas(TABLE, 5)
    x = initial_latents(1, float(sigmas[0]))[0]

    def steps_of_its_own(hooks):  # an adaptive sampler: its own number of steps
        for i in range(4):
            hooks.report(i, hooks.model(x, sigmas[i].expand(2), None))
        return hooks.returned(x)

    def silent(hooks):
        for i in range(5):
            hooks.model(x, sigmas[i].expand(2), None)
        return hooks.returned(x)

    def broken(hooks):
        raise KeyError("needs a real model")

    with pytest.raises(NotSteppable, match="chooses its own step sizes \\(it took 4 steps where the schedule has 5"):
        map_steps(steps_of_its_own, 5, dry)
    with pytest.raises(NotSteppable, match="does not report its steps"):
        map_steps(silent, 5, dry)
    with pytest.raises(NotSteppable, match="dry run on a synthetic model failed \\(KeyError"):
        map_steps(broken, 5, dry)


def test_the_dry_run_leaves_torch_s_random_state_alone():
    sigmas = ddim_uniform_sigmas(TABLE, 4)
    x = initial_latents(1, float(sigmas[0]))[0]
    state = torch.get_rng_state()
    map_steps(euler(None, x, sigmas, noise=lambda: torch.randn(SHAPE)), 4, dry)
    assert torch.equal(torch.get_rng_state(), state)


@settings(max_examples=30, deadline=None)
@given(steps=st.integers(1, 10), n=st.integers(1, 4), s=st.integers(0, 14), sampler=st.sampled_from(sorted(SAMPLERS)))
def test_model_calls_are_the_step_map_s_count(steps, n, s, sampler):
    sigmas = torch.linspace(10.0, 0.0, steps + 1)
    seen = []

    def counted(k):
        denoise = make_denoiser(k)
        return lambda x, sigma: seen.append((k, float(sigma[0]))) or denoise(x, sigma)

    result, step_map = lockstep(sampler, [counted(k) for k in range(n)], initial_latents(n, float(sigmas[0])), sigmas,
                                aggregation_steps=s, weights=[0.5] * (n - 1), sigma_table=TABLE)
    window = min(s, steps - 1)
    per_step = 1 if sampler == "euler" else 2
    main_calls = (steps - 1) * per_step + 1
    aux_calls = (window + 1) * per_step - (per_step - 1) * (window == steps - 1)
    assert result.model_calls == len(seen) == main_calls + (n - 1) * aux_calls == step_map.run_calls(n, s)
    if sampler == "euler":  # aux branches run steps 0 .. s and then stop
        assert [sigma for k, sigma in seen if k == 0] == pytest.approx(sigmas[:-1].tolist(), rel=0, abs=0)
        for k in range(1, n):
            assert [sigma for b, sigma in seen if b == k] == pytest.approx(sigmas[: window + 1].tolist(), rel=0, abs=0)


def test_identical_branches_with_p0_leave_the_main_branch_bit_identical():
    """The merge of identical latents is the latent itself: the lockstep changes nothing of the sampler's run,
    its history (Heun's two calls) and its noise included."""
    sigmas = ddim_uniform_sigmas(TABLE, 12)
    denoise = make_denoiser(0)
    init = initial_latents(1, float(sigmas[0]), seed=3)[0]
    for sampler in SAMPLERS:
        alone, _ = lockstep(sampler, [denoise], [init], sigmas, aggregation_steps=0, weights=[])
        for mean_mode in ("reference", "exact"):
            joint, _ = lockstep(sampler, [denoise, denoise, denoise], [init] * 3, sigmas, aggregation_steps=8,
                                weights=[0.5, 0.6], aggregation="paper", deviation_steps=0.0, mean_mode=mean_mode,
                                sigma_table=TABLE)
            assert torch.equal(joint.x, alone.x), (sampler, mean_mode)


def test_each_branch_draws_from_its_own_copy_of_torch_s_global_random_stream():
    """A sampler that draws noise from torch's global generator draws in the main branch exactly what it draws
    alone, however the aux branches' draws interleave with it."""
    sigmas = ddim_uniform_sigmas(TABLE, 8)
    denoisers = [make_denoiser(0), make_denoiser(1)]
    init = initial_latents(2, float(sigmas[0]), seed=9)

    def run(branches, s):
        torch.manual_seed(123)
        runs = [euler(d, x, sigmas, noise=lambda: torch.randn(SHAPE)) for d, x in zip(denoisers, init)][:branches]
        step_map = map_steps(runs[0], 8, dry)
        return run_lockstep(runs, step_map, aggregation_steps=s, weights=[0.5] * (branches - 1), sigma_table=TABLE)

    alone = run(1, 0).x
    assert torch.equal(run(2, 0).x, alone)
    assert torch.equal(run(2, 5).x, run(2, 5).x)
    assert not torch.allclose(run(2, 5).x, alone, atol=1e-3)


def _branch_threads():
    return [t for t in threading.enumerate() if t.name.startswith("amdm-branch-")]


def test_an_error_or_interrupt_in_any_branch_stops_every_branch():
    sigmas = ddim_uniform_sigmas(TABLE, 10)
    init = initial_latents(3, float(sigmas[0]), seed=4)

    class Failed(Exception):
        pass

    def failing_after(calls):
        count = []
        denoise = make_denoiser(1)

        def call(x, sigma):
            count.append(1)
            if len(count) > calls:
                raise Failed
            return denoise(x, sigma)
        return call

    def run(denoisers, **kwargs):
        runs = [euler(d, x, sigmas) for d, x in zip(denoisers, init)]
        step_map = map_steps(runs[0], 10, dry)
        return run_lockstep(runs, step_map, aggregation_steps=6, weights=[0.5, 0.5], aggregation="sequential",
                            sigma_table=TABLE, **kwargs)

    with pytest.raises(Failed):  # a model call of an aux branch
        run([make_denoiser(0), failing_after(3), make_denoiser(2)])
    assert not _branch_threads()

    def broken_sampler(hooks):  # an aux branch's own sampler code
        hooks.model(init[1], sigmas[0].expand(2), make_denoiser(1))
        raise Failed

    runs = [euler(make_denoiser(0), init[0], sigmas), broken_sampler]
    with pytest.raises(Failed):
        run_lockstep(runs, map_steps(runs[0], 10, dry), aggregation_steps=6, weights=[0.5],
                     sigma_table=TABLE)
    assert not _branch_threads()

    checks = []

    def interrupt():
        checks.append(1)
        if len(checks) == 4:
            raise Failed

    seen = []
    counted = [lambda x, sigma, k=k: seen.append(k) or make_denoiser(k)(x, sigma) for k in range(3)]
    with pytest.raises(Failed):
        run(counted, check_interrupt=interrupt)
    assert seen.count(0) == seen.count(1) == seen.count(2) == 3, "a branch went on after the interrupt"
    assert not _branch_threads()


def test_branches_that_fall_out_of_step_are_reported():
    sigmas = ddim_uniform_sigmas(TABLE, 5)
    init = initial_latents(2, float(sigmas[0]), seed=5)
    main = euler(make_denoiser(0), init[0], sigmas)
    step_map = map_steps(main, 5, dry)
    shifted = euler(make_denoiser(1), init[1], sigmas * 1.5)
    with pytest.raises(LockstepError, match="branch 2's sampler evaluates .* at sigma"):
        run_lockstep([main, shifted], step_map, aggregation_steps=3, weights=[0.5], sigma_table=TABLE)
    short = euler(make_denoiser(1), init[1], sigmas[:3])
    with pytest.raises(LockstepError, match="branch 2's sampler ended after 2 model calls"):
        run_lockstep([main, short], step_map, aggregation_steps=3, weights=[0.5], sigma_table=TABLE)
    assert not _branch_threads()


def test_bad_arguments_are_reported():
    sigmas = ddim_uniform_sigmas(TABLE, 5)
    init = initial_latents(2, float(sigmas[0]))
    runs = [euler(make_denoiser(k), init[k], sigmas) for k in range(2)]
    step_map = map_steps(runs[0], 5, dry)
    ok = dict(aggregation_steps=2, weights=[0.5], sigma_table=TABLE)
    with pytest.raises(ValueError, match="needs sigma_table"):
        run_lockstep(runs, step_map, aggregation_steps=2, weights=[0.5], mean_mode="reference")
    with pytest.raises(ValueError, match="one value per aux branch"):
        run_lockstep(runs, step_map, aggregation_steps=2, weights=[0.5, 0.5], sigma_table=TABLE)
    with pytest.raises(ValueError, match="one value per branch"):
        run_lockstep(runs, step_map, deviation_steps=[0.3], **ok)
    with pytest.raises(ValueError, match=">= 0"):
        run_lockstep(runs, step_map, aggregation_steps=-1, weights=[0.5], sigma_table=TABLE)
    with pytest.raises(ValueError, match="unknown mean_mode"):
        run_lockstep(runs, step_map, mean_mode="posterior", **ok)
    with pytest.raises(ValueError, match="'paper' is defined for 2 or 3 branches"):
        run_lockstep(runs * 2, step_map, aggregation_steps=2, weights=[0.5] * 3, aggregation="paper",
                     sigma_table=TABLE)
    assert not _branch_threads()
