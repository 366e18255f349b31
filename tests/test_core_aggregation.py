"""amdm_core.aggregation: per-item slerp and the N-branch merges, against docs/algorithm.md, section 4.

The expected values come from spec_reference (`reference_slerp`, `reference_aggregate`), the tests' float64
transcription of its formulas, never from the code under test.
"""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from spec_reference import reference_aggregate, reference_slerp

import amdm_core
from amdm_core import aggregate, lerp, slerp

FAST = settings(max_examples=40, deadline=None)


def latents(seed, shape=(3, 4, 8, 8), dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype)


shapes = st.sampled_from([(1, 4, 8, 8), (3, 4, 6, 5), (2, 16), (4, 4, 2, 3, 3)])


@FAST
@given(seed=st.integers(0, 10_000), shape=shapes, dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_slerp_endpoints_are_exact(seed, shape, dtype):
    a, b = latents(seed, shape, dtype), latents(seed + 1, shape, dtype)
    assert torch.equal(slerp(a, b, 0.0), a)
    assert torch.equal(slerp(a, b, 1.0), b)


@FAST
@given(seed=st.integers(0, 10_000), shape=shapes, w=st.floats(0.0, 1.0))
def test_slerp_matches_the_spec_formula(seed, shape, w):
    a, b = latents(seed, shape), latents(seed + 1, shape)
    expected = reference_slerp(a.numpy(), b.numpy(), w)
    np.testing.assert_allclose(slerp(a, b, w).numpy(), expected, rtol=1e-4, atol=1e-5)


@FAST
@given(seed=st.integers(0, 10_000), shape=shapes, w=st.floats(0.0, 1.0), scale=st.floats(0.1, 50.0))
def test_slerp_keeps_the_norm_of_equal_norm_inputs(seed, shape, w, scale):
    a = latents(seed, shape) * scale
    b = latents(seed + 1, shape)
    flat_a, flat_b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    b = (flat_b * (flat_a.norm(dim=1) / flat_b.norm(dim=1))[:, None]).reshape(shape)
    out = slerp(a, b, w).reshape(a.shape[0], -1)
    torch.testing.assert_close(out.norm(dim=1), flat_a.norm(dim=1), rtol=1e-5, atol=0)


def test_linear_blend_shrinks_nearly_orthogonal_latents_and_slerp_does_not():
    # Why AMDM uses slerp: independent latents are almost orthogonal, a linear average loses ~29%.
    a, b = latents(0, (2, 4, 32, 32)), latents(1, (2, 4, 32, 32))
    norm = a.reshape(2, -1).norm(dim=1)
    lin = lerp(a, b, 0.5).reshape(2, -1).norm(dim=1) / norm
    sph = slerp(a, b, 0.5).reshape(2, -1).norm(dim=1) / norm
    assert torch.all((lin - 0.5**0.5).abs() < 0.03)
    assert torch.all((sph - 1.0).abs() < 0.03)


@FAST
@given(seed=st.integers(0, 10_000), w=st.floats(0.0, 1.0), other=st.integers(0, 10_000))
def test_slerp_treats_batch_items_independently(seed, w, other):
    a, b = latents(seed), latents(seed + 1)
    base = slerp(a, b, w)
    b_changed = b.clone()
    b_changed[1:] = latents(other, (b.shape[0] - 1,) + tuple(b.shape[1:])) * 7.0
    changed = slerp(a, b_changed, w)
    assert torch.equal(changed[0], base[0])
    for i in range(a.shape[0]):  # each item equals the item slerped alone
        torch.testing.assert_close(changed[i : i + 1], slerp(a[i : i + 1], b_changed[i : i + 1], w), rtol=0, atol=1e-6)


def test_slerp_per_item_weights():
    a, b = latents(3), latents(4)
    w = torch.tensor([0.0, 0.3, 1.0])
    out = slerp(a, b, w)
    assert torch.equal(out[0], a[0]) and torch.equal(out[2], b[2])
    np.testing.assert_allclose(out[1:2].numpy(), reference_slerp(a[1:2].numpy(), b[1:2].numpy(), 0.3), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(dtype):
    # Values whose squared norm overflows float16 (> 65504): float32 math keeps them finite.
    a, b = latents(5, (2, 4, 16, 16)) * 100, latents(6, (2, 4, 16, 16)) * 100
    a, b = a.to(dtype), b.to(dtype)
    out = slerp(a, b, 0.5)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert torch.equal(out, slerp(a.float(), b.float(), 0.5).to(dtype))
    expected = reference_slerp(a.float().numpy(), b.float().numpy(), 0.5)
    np.testing.assert_allclose(out.float().numpy(), expected, rtol=1e-2, atol=1e-1)


@FAST
@given(seed=st.integers(0, 10_000), w=st.floats(0.0, 1.0))
def test_slerp_guards_anti_parallel_zero_and_parallel_items(seed, w):
    a = latents(seed, (5, 4, 4, 4))
    b = latents(seed + 1, (5, 4, 4, 4))
    b[0] = -a[0]  # anti-parallel: the great circle is undefined
    a[1] = 0.0  # zero item
    a[2], b[2] = 0.0, 0.0  # both zero
    b[3] = a[3] * (1 + 1e-7)  # parallel
    b[4] = -3.0 * a[4]  # anti-parallel, other norm
    out = slerp(a, b, w)
    assert torch.isfinite(out).all()
    linear = (1 - w) * a + w * b  # the documented fallback for all of these items
    torch.testing.assert_close(out, linear, rtol=1e-5, atol=1e-6)


def test_slerp_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="different shapes"):
        slerp(latents(0, (1, 4, 8, 8)), latents(1, (1, 4, 8, 4)), 0.5)
    with pytest.raises(ValueError, match="per batch item"):
        slerp(latents(0), latents(1), torch.tensor([0.1, 0.2]))


@FAST
@given(seed=st.integers(0, 10_000), w1=st.floats(0.0, 1.0), w2=st.floats(0.0, 1.0))
def test_paper_mode_three_branches_is_the_reference_nested_formula(seed, w1, w2):
    main, aux1, aux2 = (latents(seed + k).numpy() for k in range(3))
    expected = reference_aggregate([main, aux1, aux2], [w1, w2], "paper")
    out = aggregate([torch.from_numpy(main), torch.from_numpy(aux1), torch.from_numpy(aux2)], [w1, w2], mode="paper")
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4)


@FAST
@given(seed=st.integers(0, 10_000), w=st.floats(0.0, 1.0))
def test_paper_equals_sequential_for_two_branches(seed, w):
    main, aux = latents(seed), latents(seed + 1)
    paper = aggregate([main, aux], [w], mode="paper")
    assert torch.equal(paper, aggregate([main, aux], [w], mode="sequential"))
    np.testing.assert_allclose(paper.numpy(), reference_slerp(main.numpy(), aux.numpy(), w), rtol=1e-4, atol=1e-5)


@FAST
@given(seed=st.integers(0, 10_000), weights=st.lists(st.floats(0.0, 1.0), min_size=0, max_size=4))
def test_sequential_and_linear_modes_fold_over_the_aux_branches(seed, weights):
    branches = [latents(seed + k) for k in range(len(weights) + 1)]
    expected = reference_aggregate([b.numpy() for b in branches], weights, "sequential")
    expected_linear = reference_aggregate([b.numpy() for b in branches], weights, "linear")
    np.testing.assert_allclose(aggregate(branches, weights).numpy(), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(aggregate(branches, weights, mode="linear").numpy(), expected_linear, rtol=1e-5, atol=1e-5)


def test_aggregate_rejects_bad_arguments():
    x = [latents(0), latents(1), latents(2)]
    with pytest.raises(ValueError, match="one weight per aux branch"):
        aggregate(x, [0.5])
    with pytest.raises(ValueError, match="unknown aggregation mode"):
        aggregate(x, [0.5, 0.5], mode="mean")
    with pytest.raises(ValueError, match="2 or 3 branches"):
        aggregate(x + [latents(3)], [0.5, 0.5, 0.5], mode="paper")
    assert amdm_core.AGGREGATION_MODES == ("sequential", "paper", "linear")
