"""MIGC in real graphs: the Loader/Apply nodes with KSampler (ComfyUI's executor), cfg 1, node-level input
errors, and MIGC as the main and as the aux branch of the AMDM Aggregate Sampler. A spy on MIGC.forward
counts the fusion runs (and their batch rows), so each test asserts that MIGC really ran."""
import os

import pytest
import torch

from harness.tiny_migc import write_tiny_migc

INSTANCES = "a red apple | 0, 0, 64, 128\na green pear | 64, 32, 128, 96"


@pytest.fixture(scope="module")
def migc_file(comfy, pack, comfy_base):
    path = os.path.join(comfy_base, "models", "migc", "MIGC_SD14.ckpt")
    if not os.path.exists(path):
        write_tiny_migc(path, seed=1)
    return "MIGC_SD14.ckpt"


@pytest.fixture
def migc_runs(pack_module, monkeypatch):
    """Every MIGC fusion run as (batch rows, instance count)."""
    model = pack_module("adapters.migc.model")
    runs = []
    forward = model.MIGC.forward

    def spy(self, ca_x, *args, **kwargs):
        runs.append((ca_x.shape[0], ca_x.shape[1] - 1))
        return forward(self, ca_x, *args, **kwargs)

    monkeypatch.setattr(model.MIGC, "forward", spy)
    return runs


@pytest.fixture(scope="module")
def encoded(checkpoint, comfy):
    _model, clip, _vae = checkpoint
    positive = comfy.CLIPTextEncode().encode(clip, "a red apple and a green pear on a table")[0]
    negative = comfy.CLIPTextEncode().encode(clip, "blurry")[0]
    return positive, negative


def _apply(pack_module, checkpoint, migc_file, migc_steps, naive_fuser_steps=-1, instances=INSTANCES):
    nodes = pack_module("adapters.migc.nodes")
    model, clip, _vae = checkpoint
    migc = nodes.MIGCLoader().load(migc_file)[0]
    return nodes.MIGCApply().apply(model, clip, migc, instances, 128, 128, migc_steps, naive_fuser_steps)[0]


@pytest.fixture(scope="module")
def patched(pack_module, checkpoint, migc_file):
    """The tiny checkpoint's model with MIGC (2 instances) active on steps 0 and 1."""
    return _apply(pack_module, checkpoint, migc_file, migc_steps=1)


def test_graph_with_ksampler_batch_two_and_cfg(run_graph, tiny_checkpoint, migc_file, migc_runs):
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint}},
        "2": {"class_type": "MIGCLoader", "inputs": {"migc_name": migc_file}},
        "3": {"class_type": "MIGCApply", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "migc": ["2", 0], "instances": INSTANCES, "width": 128,
            "height": 128, "migc_steps": 0, "naive_fuser_steps": 1}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red apple and a green pear"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 2}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["3", 0], "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0], "seed": 3,
            "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    outputs, _executor = run_graph(graph)
    assert len(outputs["9"]["images"]) == 2
    # step 0 (migc_steps = 0) on the 4 MIGC blocks, both images' cond rows in one run
    assert migc_runs == [(2, 2)] * 4


def test_ksampler_cfg_one_skips_uncond(comfy, patched, encoded, migc_runs):
    positive, negative = encoded
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    out = comfy.KSampler().sample(patched, 5, 2, 1.0, "euler", "normal", positive, negative, latent)[0]["samples"]
    assert migc_runs == [(1, 2)] * 8  # steps 0 and 1 on the 4 blocks, one cond row and no uncond row
    assert torch.isfinite(out).all()


def test_apply_node_input_errors(pack_module, checkpoint, migc_file):
    boxes = pack_module("adapters.boxes")
    cases = {
        "a cat | 64, 0, 64, 32": "empty or inverted",
        "a cat | 0, 0, 256, 32": "outside the 128x128 image",
        "# only a comment\n\n": "no instance given",
        "a cat 0, 0, 32, 32": "expected 2 fields",
        "a cat | 0, 0, 32": "is not a box",
    }
    for text, problem in cases.items():
        with pytest.raises(boxes.BoxFormatError, match=problem):
            _apply(pack_module, checkpoint, migc_file, 5, instances=text)
    assert "patches_replace" not in checkpoint[0].model_options["transformer_options"]


def test_main_and_aux_branch_of_the_amdm_sampler(pack, patched, checkpoint, encoded, migc_runs):
    sampler = pack.NODE_CLASS_MAPPINGS["AMDMAggregateSampler"]()
    plain = checkpoint[0]
    positive, negative = encoded
    latent = {"samples": torch.zeros(1, 4, 16, 16)}

    def run(main, aux):
        return sampler.sample(main, positive, negative, aux, positive, negative, latent, seed=2, steps=3, cfg=4.0,
                              cfg_2=4.0, sampler_name="ddim", scheduler="ddim_uniform", denoise=1.0, weight_2=0.5,
                              aggregation_steps=1, aggregation="paper", deviation_step=0.3, mean_mode="reference",
                              noise="independent")[0]["samples"]

    as_aux = run(plain, patched)  # aux: steps 0..s (s = 1), MIGC on both
    assert migc_runs == [(1, 2)] * 8
    migc_runs.clear()
    as_main = run(patched, plain)  # main: all 3 steps, MIGC on steps 0 and 1
    assert migc_runs == [(1, 2)] * 8
    assert torch.isfinite(as_aux).all() and torch.isfinite(as_main).all() and (as_aux - as_main).abs().max() > 1e-4


def test_one_batched_pass_per_step_at_cfg_and_the_two_pass_result(comfy, patched, checkpoint, encoded, migc_runs):
    from test_interactdiffusion import record_sigmas, split_passes

    positive, negative = encoded
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    recorded, passes = record_sigmas(patched)
    batched = comfy.KSampler().sample(recorded, 5, 2, 5.0, "euler", "normal", positive, negative, latent)[0]["samples"]
    assert [sorted(kinds) for _, kinds in passes] == [[0, 1], [0, 1]], "expected ONE cond+uncond pass per step"
    assert migc_runs == [(1, 2)] * 8  # MIGC ran on the cond row of each batched pass
    split, calls = split_passes(patched)
    two_pass = comfy.KSampler().sample(split, 5, 2, 5.0, "euler", "normal", positive, negative, latent)[0]["samples"]
    assert sorted(calls) == [(0,), (0,), (1,), (1,)]
    plain = checkpoint[0]
    plain_batched = comfy.KSampler().sample(plain, 5, 2, 5.0, "euler", "normal", positive, negative, latent)[0]["samples"]
    plain_split = comfy.KSampler().sample(split_passes(plain)[0], 5, 2, 5.0, "euler", "normal", positive, negative,
                                          latent)[0]["samples"]
    batching_noise = (plain_split - plain_batched).abs().max().item()
    assert (two_pass - batched).abs().max().item() <= 4 * batching_noise + 1e-5


def test_bf16_unet_matches_fp32_within_bf16_precision(pack_module, comfy, checkpoint, migc_file, encoded, migc_runs):
    """MIGC's layers follow the UNet's dtype (comfy.ops manual_cast): with the tiny UNet cast to bf16 the
    MIGC result differs from fp32 by at most twice what bf16 does to the plain model, plus 1% (relative L2),
    while MIGC itself changes the output by more than 3 times that."""
    from test_ipadapter_sampler import bf16_copy

    positive, negative = encoded
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    nodes = pack_module("adapters.migc.nodes")
    migc = nodes.MIGCLoader().load(migc_file)[0]

    def sample(model, with_migc):
        if with_migc:
            model = nodes.MIGCApply().apply(model, checkpoint[1], migc, INSTANCES, 128, 128, 1, -1)[0]
        return comfy.KSampler().sample(model, 5, 2, 5.0, "euler", "normal", positive, negative,
                                       latent)[0]["samples"].float()

    bf16 = bf16_copy(checkpoint[0])
    fp32_out, bf16_out = sample(checkpoint[0], True), sample(bf16, True)
    assert migc_runs and all(rows == 1 for rows, _ in migc_runs)
    plain_fp32, plain_bf16 = sample(checkpoint[0], False), sample(bf16, False)
    error = ((bf16_out - fp32_out).norm() / fp32_out.norm()).item()
    plain_error = ((plain_bf16 - plain_fp32).norm() / plain_fp32.norm()).item()
    effect = ((plain_bf16 - bf16_out).norm() / fp32_out.norm()).item()
    assert error <= 2 * plain_error + 0.01 and effect > 3 * error, (error, plain_error, effect)


@pytest.mark.parametrize("setting", ["ca_scale", "ea_scale", "sac_scale"])
def test_apply_refuses_non_finite_scales_by_name(pack_module, checkpoint, migc_file, setting):
    nodes = pack_module("adapters.migc.nodes")
    migc = nodes.MIGCLoader().load(migc_file)[0]
    scales = {"ca_scale": 1.0, "ea_scale": 1.0, "sac_scale": 1.0, setting: float("nan")}
    with pytest.raises(ValueError, match=rf"MIGC Apply: {setting} is nan; give a finite number"):
        nodes.MIGCApply().apply(checkpoint[0], checkpoint[1], migc, INSTANCES, 128, 128, 1, -1, **scales)
