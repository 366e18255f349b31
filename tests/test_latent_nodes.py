"""Slerp Latent Merge and Deviation Correct: properties against independent float64 formulas, bad inputs,
and AMDM built by hand from KSamplerAdvanced + these two nodes matching the AMDM Aggregate Sampler."""
import math

import pytest
import torch
from node_calls import amdm, empty_latent, tame
from spec_reference import reference_slerp


STEPS, S, SEED = 5, 3, 3


@pytest.fixture(scope="module")
def merge_node(pack):
    return pack.NODE_CLASS_MAPPINGS["AMDMSlerpLatentMerge"]()


@pytest.fixture(scope="module")
def correct_node(pack):
    return pack.NODE_CLASS_MAPPINGS["AMDMDeviationCorrect"]()


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_slerp_merge_per_item_with_broadcast_and_exact_ends(merge_node):
    a, b = randn(3, 4, 8, 8, seed=1), randn(3, 4, 8, 8, seed=2)
    mask = torch.ones(3, 1, 8, 8)
    merged = merge_node.merge({"samples": a, "noise_mask": mask}, {"samples": b}, 0.3)[0]
    assert float((merged["samples"].double() - torch.from_numpy(reference_slerp(a, b, 0.3))).abs().max()) < 1e-5
    assert merged["noise_mask"] is mask, "latent_a's other keys (noise_mask) were dropped"
    assert torch.equal(merge_node.merge({"samples": a}, {"samples": b}, 0.0)[0]["samples"], a)
    assert torch.equal(merge_node.merge({"samples": a}, {"samples": b}, 1.0)[0]["samples"], b)

    half = merge_node.merge({"samples": a}, {"samples": b}, 0.5)[0]["samples"]
    norms = half.flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.ones(3), atol=0.05), "slerp of near-orthogonal latents must keep the norm"

    single = randn(1, 4, 8, 8, seed=3)
    broadcast = merge_node.merge({"samples": single}, {"samples": b}, 0.5)[0]["samples"]
    assert broadcast.shape == b.shape
    assert float((broadcast.double() - torch.from_numpy(reference_slerp(single.expand_as(b), b, 0.5))).abs().max()) < 1e-5


def test_slerp_merge_rejects_mismatches_without_touching_inputs(merge_node):
    a, b = randn(1, 4, 8, 8, seed=1), randn(1, 4, 8, 10, seed=2)
    before = (a.clone(), b.clone())
    with pytest.raises(ValueError, match=r"latent_a has shape \(1, 4, 8, 8\) and latent_b \(1, 4, 8, 10\)"):
        merge_node.merge({"samples": a}, {"samples": b}, 0.5)
    with pytest.raises(ValueError, match="batch sizes 2 and 3 differ"):
        merge_node.merge({"samples": randn(2, 4, 8, 8)}, {"samples": randn(3, 4, 8, 8)}, 0.5)
    with pytest.raises(ValueError, match=r"weight is 1.5; weights must lie in \[0, 1\]"):
        merge_node.merge({"samples": a}, {"samples": a}, 1.5)
    with pytest.raises(ValueError, match="not a LATENT"):
        merge_node.merge({"samples": a}, {"latent": a}, 0.5)
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])


def test_deviation_correct_moves_p_toward_the_branch_in_vp_space(correct_node, tiny_model):
    sigmas = torch.tensor([6.0, 3.0, 1.0, 0.0])
    scale = tiny_model.model.latent_format.scale_factor
    merged, branch_in, branch_out = (randn(2, 4, 8, 8, seed=s) * 3 for s in (1, 2, 3))
    out = correct_node.correct(tiny_model, {"samples": merged}, {"samples": branch_in}, {"samples": branch_out},
                               sigmas, 1, 0.3, "exact")[0]["samples"]
    to_vp = lambda latent: latent.double() * scale / math.sqrt(1 + 1.0**2)  # noqa: E731  (step 1 ends at sigma 1)
    moved = (to_vp(out) - to_vp(merged)).flatten(1)
    toward = (to_vp(branch_out) - to_vp(merged)).flatten(1)
    assert torch.allclose(moved.norm(dim=1), torch.full((2,), 0.3, dtype=torch.float64), atol=1e-5)
    cosine = (moved * toward).sum(dim=1) / (moved.norm(dim=1) * toward.norm(dim=1))
    assert torch.allclose(cosine, torch.ones(2, dtype=torch.float64), atol=1e-5)
    unchanged = correct_node.correct(tiny_model, {"samples": merged}, {"samples": branch_in}, {"samples": merged},
                                     sigmas, 1, 0.3, "exact")[0]["samples"]
    assert torch.allclose(unchanged, merged, atol=1e-5), "at the branch's mean there is no direction to move in"


def test_deviation_correct_reports_bad_inputs(correct_node, tiny_model):
    sigmas = torch.tensor([6.0, 3.0, 1.0, 0.0])
    latent = {"samples": randn(1, 4, 8, 8)}
    with pytest.raises(ValueError, match="reference needs previous_in and previous_out"):
        correct_node.correct(tiny_model, latent, latent, latent, sigmas, 1, 0.3, "reference")
    with pytest.raises(ValueError, match=r"step 3 is not a step of these sigmas \(0 .. 2\)"):
        correct_node.correct(tiny_model, latent, latent, latent, sigmas, 3, 0.3, "exact")
    with pytest.raises(ValueError, match=r"branch_out has shape \(1, 4, 8, 6\)"):
        correct_node.correct(tiny_model, latent, latent, {"samples": randn(1, 4, 8, 6)}, sigmas, 1, 0.3, "exact")


@pytest.mark.parametrize("mean_mode", ["exact", "reference"])
def test_amdm_by_hand_matches_the_aggregate_sampler(comfy, pack, tiny_model, merge_node, correct_node, mean_mode):
    """RandomNoise + AddNoise for each branch's start latent, then KSamplerAdvanced one step at a time per
    branch + Slerp Latent Merge + Deviation Correct, then the main branch alone."""
    gen = torch.Generator().manual_seed(31)
    conds = [[[torch.randn(1, 77, 768, generator=gen), {}]] for _ in range(4)]
    branches = [(tame(tiny_model), conds[0], conds[1], 7.5, SEED),
                (tame(tiny_model), conds[2], conds[3], 6.0, SEED + 1)]
    sigmas = comfy.NODE_CLASS_MAPPINGS["BasicScheduler"].execute(branches[0][0], "ddim_uniform", STEPS, 1.0).result[0]

    def one_step(k, latent, i, add_noise="disable", leftover="enable"):
        model, positive, negative, cfg, seed = branches[k]
        return comfy.KSamplerAdvanced().sample(model, add_noise, seed, STEPS, cfg, "ddim", "ddim_uniform", positive,
                                               negative, latent, i, i + 1, leftover)[0]

    def noised_start(k):
        noise = comfy.NODE_CLASS_MAPPINGS["RandomNoise"].execute(branches[k][4]).result[0]
        return comfy.NODE_CLASS_MAPPINGS["AddNoise"].execute(branches[k][0], noise, sigmas, empty_latent()).result[0]

    with torch.no_grad():
        start = [noised_start(k) for k in range(2)]
        x = [one_step(k, start[k], 0) for k in range(2)]
        previous = [(start[k], x[k]) for k in range(2)]
        for i in range(1, S + 1):
            y = [one_step(k, x[k], i) for k in range(2)]
            merged = merge_node.merge(y[0], y[1], 0.5)[0]
            x_next = [correct_node.correct(branches[k][0], merged, x[k], y[k], sigmas, i, 0.3, mean_mode,
                                           *previous[k])[0] for k in range(2)]
            previous = [(x[k], y[k]) for k in range(2)]
            x = x_next
        for i in range(S + 1, STEPS):
            x[0] = one_step(0, x[0], i, leftover="disable")
        by_hand = x[0]["samples"]
        sampler = amdm(pack, branches[0][:3], [branches[1][:4]], empty_latent(), seed=SEED, steps=STEPS, s=S,
                       weights=[0.5], mean_mode=mean_mode)[0]
    difference = float((tiny_model.model.process_latent_in(by_hand - sampler)).abs().max())
    assert difference <= 1e-5, f"by hand and the sampler differ by {difference:.3g} (model latent space)"
