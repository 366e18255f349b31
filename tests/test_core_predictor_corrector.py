"""The predictor-correctors' aggregation rule (docs/algorithm.md, "Predictor-correctors"), in plain torch: the
corrected latent moves by exactly the displacement aggregation gave the predicted one, and an unaggregated
branch is not moved at all. (Bit-identity with ComfyUI's uni_pc and sa_solver: tests/test_samplers.py.)"""
import pytest
import torch

from amdm_core import SASolverStep, UniPCStep, expected_model_calls, run_lockstep

SIGMAS = torch.tensor([14.6, 6.0, 2.5, 0.9, 0.0])


def fixed_denoiser(target):
    """D(x, sigma) = target whatever the latent: the corrector's model term is the same with and without
    aggregation, so only the displacement can move the corrected latent."""
    return lambda x, sigma: target.expand_as(x).clone()


def sa_solver_step():
    lambdas = -SIGMAS.clamp(min=1e-4).log()
    return SASolverStep(lambda s, t: torch.zeros(1, 4, 8, 8), SIGMAS, lambdas, tau=lambda sigma: 0.0,
                        adams_coefficients=lambda sigma, ls, s, t, tau, simple, is_corrector_step:
                        torch.full((len(ls),), 0.5 / len(ls)))


@pytest.mark.parametrize("make, vp", [(lambda: UniPCStep(SIGMAS), True), (lambda: UniPCStep(SIGMAS, "bh2"), True),
                                      (sa_solver_step, False)])
def test_the_corrected_latent_moves_by_the_aggregation_displacement(make, vp):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 8, 8, generator=gen) * SIGMAS[0]
    denoise = fixed_denoiser(torch.randn(1, 4, 8, 8, generator=gen))
    displacement = 0.3 * torch.randn(1, 4, 8, 8, generator=gen)
    plain, aggregated = make(), make()
    predicted, _ = plain(x0, denoise, SIGMAS[0], SIGMAS[1])
    predicted_too, _ = aggregated(x0, denoise, SIGMAS[0], SIGMAS[1])
    assert torch.equal(predicted, predicted_too)
    plain(predicted, denoise, SIGMAS[1], SIGMAS[2])
    aggregated(predicted + displacement, denoise, SIGMAS[1], SIGMAS[2])
    expected = displacement / (1 + SIGMAS[1] ** 2) ** 0.5 if vp else displacement  # UniPC corrects in VP
    torch.testing.assert_close(aggregated.corrected - plain.corrected, expected, atol=1e-5, rtol=1e-4)


def test_a_zero_displacement_leaves_the_corrected_latent_where_it_was():
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 4, 8, 8, generator=gen) * SIGMAS[0]
    denoise = fixed_denoiser(torch.randn(1, 4, 8, 8, generator=gen))
    step, twin = UniPCStep(SIGMAS), UniPCStep(SIGMAS)
    x, _ = step(x0, denoise, SIGMAS[0], SIGMAS[1])
    twin(x0, denoise, SIGMAS[0], SIGMAS[1])
    step(x, denoise, SIGMAS[1], SIGMAS[2])
    twin(x.clone(), denoise, SIGMAS[1], SIGMAS[2])  # equal values, but handed in from outside: "aggregated"
    torch.testing.assert_close(twin.corrected, step.corrected, atol=1e-6, rtol=0)


def test_unipc_refuses_an_unknown_variant():
    with pytest.raises(ValueError, match="unknown UniPC variant 'bh3'"):
        UniPCStep(SIGMAS, "bh3")


@pytest.mark.parametrize("pece", [False, True])
def test_model_calls_of_a_lockstep_run_are_the_steps_own_count(pece):
    sigmas = torch.tensor([14.6, 6.0, 2.5, 0.9, 0.3, 0.0])
    lambdas = -sigmas.clamp(min=1e-4).log()
    makers = {
        "uni_pc": lambda k: UniPCStep(sigmas),
        "sa_solver": lambda k: SASolverStep(lambda s, t: torch.zeros(1, 4, 8, 8), sigmas, lambdas, tau=lambda sigma: 0.0,
                                            adams_coefficients=lambda sigma, ls, s, t, tau, simple, is_corrector_step:
                                            torch.full((len(ls),), 0.5 / len(ls)), pece=pece),
    }
    gen = torch.Generator().manual_seed(2)
    denoisers = [fixed_denoiser(torch.randn(1, 4, 8, 8, generator=gen)) for _ in range(2)]
    init = [torch.randn(1, 4, 8, 8, generator=gen) * sigmas[0] for _ in range(2)]
    for name, make in makers.items():
        result = run_lockstep(denoisers, init, sigmas, aggregation_steps=2, weights=[0.5], mean_mode="exact",
                              make_step=make)
        assert torch.isfinite(result.x).all()
        assert result.model_calls == expected_model_calls(sigmas, 2, 2, make(0).model_calls), name
