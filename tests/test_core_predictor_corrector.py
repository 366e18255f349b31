"""The predictor-correctors' aggregation rule (docs/algorithm.md, "Predictor-correctors"), in plain torch: the
corrected latent moves by exactly the displacement aggregation gave the predicted one, whether the merged
latent is handed in or written into the handed-out latent during the step's first model call (as the
lockstep does), and an unaggregated branch is not moved at all. (Equality with ComfyUI's uni_pc and
sa_solver on the running ComfyUI: tests/test_samplers.py.)"""
import pytest
import torch

from amdm_core import SASolverStep, UniPCStep

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


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("make, vp", [(lambda: UniPCStep(SIGMAS), True), (lambda: UniPCStep(SIGMAS, "bh2"), True),
                                      (sa_solver_step, False)])
def test_the_corrected_latent_moves_by_the_aggregation_displacement(make, vp, in_place):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 8, 8, generator=gen) * SIGMAS[0]
    denoise = fixed_denoiser(torch.randn(1, 4, 8, 8, generator=gen))
    displacement = 0.3 * torch.randn(1, 4, 8, 8, generator=gen)
    plain, aggregated = make(), make()
    predicted, _ = plain(x0, denoise, SIGMAS[0], SIGMAS[1])
    predicted_too, _ = aggregated(x0, denoise, SIGMAS[0], SIGMAS[1])
    assert torch.equal(predicted, predicted_too)
    plain(predicted, denoise, SIGMAS[1], SIGMAS[2])
    if in_place:
        def merging(x, sigma):  # the lockstep writes the merged latent in before the model sees it
            x.add_(displacement)
            return denoise(x, sigma)

        aggregated(predicted_too, merging, SIGMAS[1], SIGMAS[2])
    else:
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
    twin(x.clone(), denoise, SIGMAS[1], SIGMAS[2])  # equal values handed in from outside: not moved
    assert torch.equal(twin.corrected, step.corrected)


def test_unipc_refuses_an_unknown_variant():
    with pytest.raises(ValueError, match="unknown UniPC variant 'bh3'"):
        UniPCStep(SIGMAS, "bh3")
