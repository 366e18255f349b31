"""AMDM Aggregate Sampler / AMDM Guider against the real ComfyUI samplers (tiny models, CPU).

1. s = 0, or every weight 0 with p = 0: bit-identical to KSampler (ddim, euler, euler_ancestral, dpmpp_2m).
2. Two and three branches against `spec_reference.reference_loop`, the tests' float64 transcription of spec
   section 3, calling the same ComfyUI guiders: max abs difference <= 1e-5.
3. Model calls counted with a model wrapper: exactly T + (N - 1)(s + 1).
"""
import pytest
import torch
from node_calls import SIZE, STEPS, amdm, empty_latent, ksampler, tame
from spec_reference import reference_loop


@pytest.fixture(scope="module")
def models(tiny_model):
    """main: the tiny UNet; same: a clone of it (shares the UNet); other: a second UNet with other weights."""
    from harness import tiny_models

    return {"main": tiny_model, "same": tiny_model.clone(), "other": tiny_models.tiny_model_patcher(seed=1)}


@pytest.fixture(scope="module")
def conds():
    gen = torch.Generator().manual_seed(7)
    return [[[torch.randn(1, 77, 768, generator=gen), {}]] for _ in range(8)]


# --- 1. bit-identity with KSampler --------------------------------------------------------------------

SAMPLERS = [("ddim", "ddim_uniform"), ("euler", "normal"), ("euler_ancestral", "karras"), ("dpmpp_2m", "karras")]


@pytest.mark.parametrize("sampler,scheduler", SAMPLERS)
def test_s0_and_zero_weights_with_p0_are_bit_identical_to_ksampler(comfy, pack, models, conds, sampler, scheduler):
    main = (models["main"], conds[0], conds[1])
    reference = ksampler(comfy, *main, empty_latent(), sampler=sampler, scheduler=scheduler)
    aux = [(models["same"], conds[2], conds[3], 5.0), (models["other"], conds[4], conds[5], 7.5)]

    no_window, aux_x0 = amdm(pack, main, aux, empty_latent(), sampler=sampler, scheduler=scheduler, s=0)
    assert torch.equal(no_window, reference), f"{sampler}: s = 0 differs from KSampler"
    assert aux_x0.shape[0] == 2 and torch.isfinite(aux_x0).all(), "the aux branches did not run step 0"

    silent = amdm(pack, main, aux, empty_latent(), sampler=sampler, scheduler=scheduler, s=4, weights=[0.0, 0.0],
                  aggregation="sequential", p=0.0)[0]
    assert torch.equal(silent, reference), f"{sampler}: weights 0 and p = 0 differ from KSampler"

    merged = amdm(pack, main, aux, empty_latent(), sampler=sampler, scheduler=scheduler, s=3)[0]
    assert (merged - reference).abs().max() > 1e-3, "with default weights the aux branches had no effect"


@pytest.mark.parametrize("sampler,scheduler", [("ddim", "ddim_uniform"), ("euler_ancestral", "normal")])
def test_bit_identity_holds_for_batches_img2img_and_denoise(comfy, pack, models, conds, sampler, scheduler):
    gen = torch.Generator().manual_seed(11)
    image_latent = {"samples": torch.randn(2, 4, SIZE, SIZE, generator=gen)}
    main = (models["main"], conds[0], conds[1])
    reference = ksampler(comfy, *main, image_latent, seed=5, sampler=sampler, scheduler=scheduler, denoise=0.6)
    aux = [(models["other"], conds[2], conds[3], 7.5)]
    got = amdm(pack, main, aux, image_latent, seed=5, sampler=sampler, scheduler=scheduler, denoise=0.6, s=0)[0]
    assert torch.equal(got, reference)


# --- 2. against a transcription of the spec ------------------------------------------------------------

def prepared_denoiser(guider, noise, seed):
    """D(x, sigma) of a stock guider, set up by hand the way CFGGuider.sample does before its sampler runs."""
    import comfy.model_management
    import comfy.samplers

    patcher = guider.model_patcher
    comfy.model_management.load_models_gpu([patcher])
    guider.inner_model = patcher.model
    conds = {k: [c.copy() for c in v] for k, v in guider.original_conds.items()}
    guider.conds = comfy.samplers.process_conds(patcher.model, noise, conds, patcher.load_device,
                                                torch.zeros_like(noise), None, seed)

    def denoise(x, sigma):
        comfy.model_management.load_models_gpu([patcher])  # this branch's own patches live
        patcher.pre_run()
        try:
            return guider(x.float(), torch.full((x.shape[0],), float(sigma)), model_options=guider.model_options,
                          seed=seed).double()
        finally:
            patcher.cleanup()

    return denoise


def reference_run(denoisers, noises, sigmas, s, weights, mode, p, mean_mode, table):
    """The main branch's final latent by the spec transcription, from noise * sigma_0 (ddim_uniform starts
    below sigma_max, so no extra noise scaling)."""
    init = [noise.double() * float(sigmas[0]) for noise in noises]
    return torch.from_numpy(reference_loop(denoisers, init, sigmas, s, weights, mode, p, mean_mode, table)[0])


CASES = [  # (branches, aggregation, mean_mode, weights, p)
    (2, "paper", "reference", [0.5], 0.3),
    (3, "paper", "reference", [0.5, 0.6], 0.3),
    (3, "sequential", "exact", [0.4, 0.3], 0.5),
]


@pytest.mark.parametrize("branches,aggregation,mean_mode,weights,p", CASES)
def test_matches_a_transcription_of_the_spec_loop(comfy, pack, models, conds, branches, aggregation, mean_mode,
                                                  weights, p):
    from comfy import sample as comfy_sample
    from comfy import samplers as comfy_samplers

    seed, s = 4, 3
    specs = [(tame(models["main"]), conds[0], conds[1], 7.5), (tame(models["same"]), conds[2], conds[3], 6.0),
             (tame(models["other"]), conds[4], conds[5], 8.0)][:branches]
    with torch.no_grad():
        got = amdm(pack, specs[0][:3], specs[1:], empty_latent(), seed=seed, s=s, weights=weights,
                   aggregation=aggregation, p=p, mean_mode=mean_mode)[0]

    model_sampling = models["main"].get_model_object("model_sampling")
    sigmas = comfy_samplers.calculate_sigmas(model_sampling, "ddim_uniform", STEPS)
    assert len(sigmas) == STEPS + 1 and float(sigmas[0]) < float(model_sampling.sigma_max)
    noises = [comfy_sample.prepare_noise(torch.zeros(1, 4, SIZE, SIZE), seed + k) for k in range(branches)]
    denoisers = []
    for k, (model, positive, negative, cfg) in enumerate(specs):
        guider = comfy_samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        denoisers.append(prepared_denoiser(guider, noises[k], seed + k))
    with torch.no_grad():
        expected = reference_run(denoisers, noises, sigmas, s, weights, aggregation, p, mean_mode, model_sampling.sigmas)
    # Compared in the model's latent space (LATENT * 0.18215), where real SD1.5 latents are of order 1.
    got = models["main"].model.process_latent_in(got).double()
    difference = float((got - expected).abs().max())
    assert difference <= 1e-5, f"max abs difference {difference:.3g} from the spec transcription"
    assert 0.1 < float(expected.abs().max()) < 20, "the comparison is not at the scale of real latents"
    with torch.no_grad():
        solo = models["main"].model.process_latent_in(ksampler(comfy, *specs[0][:3], empty_latent(), seed=seed))
    assert (got - solo).abs().max() > 1e-2, "the aggregation had no visible effect"


def test_dual_cfg_and_perp_neg_guiders_as_branches_match_the_transcription(comfy, pack, models, conds):
    """AMDM Guider + SamplerCustomAdvanced with a DualCFGGuider main and a PerpNegGuider aux branch."""
    nodes = comfy.NODE_CLASS_MAPPINGS
    seed, s = 6, 3
    main = nodes["DualCFGGuider"].execute(tame(models["main"]), conds[0], conds[1], conds[2], 6.0, 3.0,
                                          "regular").result[0]
    aux = nodes["PerpNegGuider"].execute(tame(models["other"]), conds[3], conds[4], conds[5], 7.0, 1.0).result[0]
    amdm_guider = pack.NODE_CLASS_MAPPINGS["AMDMGuider"]().get_guider(main, aux, 0.5, s, "paper", 0.3, "reference",
                                                                      "independent")[0]
    sigmas = nodes["BasicScheduler"].execute(models["main"], "ddim_uniform", STEPS, 1.0).result[0]
    noise = nodes["RandomNoise"].execute(seed).result[0]
    ddim = nodes["KSamplerSelect"].execute("ddim").result[0]
    with torch.no_grad():
        got = nodes["SamplerCustomAdvanced"].execute(noise, amdm_guider, ddim, sigmas,
                                                     empty_latent()).result[0]["samples"]
    from comfy import sample as comfy_sample

    noises = [comfy_sample.prepare_noise(torch.zeros(1, 4, SIZE, SIZE), seed + k) for k in range(2)]
    denoisers = [prepared_denoiser(main, noises[0], seed), prepared_denoiser(aux, noises[1], seed + 1)]
    table = models["main"].get_model_object("model_sampling").sigmas
    with torch.no_grad():
        expected = reference_run(denoisers, noises, sigmas, s, [0.5], "paper", 0.3, "reference", table)
    difference = float((models["main"].model.process_latent_in(got).double() - expected).abs().max())
    assert difference <= 1e-5, f"max abs difference {difference:.3g} from the spec transcription"


# --- 3. model calls ----------------------------------------------------------------------------------

def counting(patcher, calls, name):
    """A clone of patcher whose UNet calls are counted (one per cond+uncond batch, checked)."""
    clone = patcher.clone()

    def wrapper(apply_model, args):
        assert args["input"].shape[0] == 2, "cond and uncond were not batched into one call"
        calls.append(name)
        return apply_model(args["input"], args["timestep"], **args["c"])

    clone.set_model_unet_function_wrapper(wrapper)
    return clone


@pytest.mark.parametrize("branches,s", [(2, 0), (2, 2), (3, 4)])
def test_model_calls_are_T_plus_aux_times_window(pack, models, conds, branches, s):
    calls = []
    main = (counting(models["main"], calls, "main"), conds[0], conds[1])
    aux = [(counting(models["same"], calls, "b2"), conds[2], conds[3], 7.5),
           (counting(models["other"], calls, "b3"), conds[4], conds[5], 7.5)][:branches - 1]
    amdm(pack, main, aux, empty_latent(), s=s, weights=[0.5, 0.6][:branches - 1])
    assert len(calls) == STEPS + (branches - 1) * (s + 1)
    assert calls.count("main") == STEPS
    for name in ("b2", "b3")[:branches - 1]:
        assert calls.count(name) == s + 1
