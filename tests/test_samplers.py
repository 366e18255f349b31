"""Every sampler ComfyUI has, on every family (tiny models from ComfyUI's own SD1.5, SDXL, SD3 and Flux
configs, plus SD1.5 patched to v-prediction):

1. s = 0 is exactly the user's sampler: bit-identical to KSampler for every sampler (SD1.5 and SD3).
2. Driven in lockstep, every branch runs the sampler's own code: with identical branches (shared noise,
   w = 0.5, p = 0, s > 0) the main branch equals KSampler bit for bit for every sampler (SD1.5 and SD3; the
   predictor-correctors also at 2 and 8 steps; SAMPLERs with the options the custom-sampler nodes set), so
   nothing of the sampler's state (noise stream, multistep history) is lost between steps.
3. s >= 1 runs and stays finite for every sampler and family, with the model calls docs/nodes.md states for
   the samplers it lists (a sampler it does not list runs as well).
4. With a window, adaptive-step samplers are refused by their user-facing name before any model call.
5. On this ComfyUI the pack's own UniPC / SA-Solver steps are proven equal to ComfyUI's (no log line says
   otherwise).
"""
import os
import re

import pytest
import torch


STEPS = 3
REFUSED = ("dpm_fast", "dpm_adaptive")  # s = 0 runs them
PREDICTOR_CORRECTORS = ("uni_pc", "uni_pc_bh2", "sa_solver", "sa_solver_pece")
CUSTOM_SAMPLER_OPTIONS = [  # SAMPLERs with the options the custom-sampler nodes set
    ("euler_ancestral", {"eta": 0.7, "s_noise": 0.9}),
    ("lms", {"order": 3}),
    ("dpmpp_2m_sde", {"eta": 0.8, "s_noise": 1.0, "solver_type": "heun"}),
    ("sa_solver", {"predictor_order": 2, "corrector_order": 3, "s_noise": 0.8}),
]
FAMILIES = ("sd15", "sd15_v", "sdxl", "sd3", "flux")
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "nodes.md")


def all_samplers(refused=True):
    import comfy.samplers

    return [name for name in comfy.samplers.KSampler.SAMPLERS if refused or name not in REFUSED]


@pytest.fixture(scope="module")
def families(comfy):
    from harness import tiny_models

    models = {}
    for family in FAMILIES:
        calls = []

        def counting(apply_model, args, calls=calls):
            calls.append(1)
            return apply_model(args["input"], args["timestep"], **args["c"])

        main = tiny_models.tiny_family_patcher(family, seed=0).clone()
        main.set_model_unet_function_wrapper(counting)
        aux = tiny_models.tiny_family_patcher(family, seed=1).clone()
        aux.set_model_unet_function_wrapper(counting)
        conds = [tiny_models.family_conditioning(family, seed) for seed in range(4)]
        channels = main.get_model_object("latent_format").latent_channels
        models[family] = {"main": main, "aux": aux, "conds": conds, "calls": calls,
                          "latent": {"samples": torch.zeros(1, channels, 8, 8)}}
    return models


def ksampler(comfy, family, sampler, seed=1):
    f = family
    return comfy.KSampler().sample(f["main"], seed, STEPS, 4.0, sampler, "simple", f["conds"][0], f["conds"][1],
                                   f["latent"])[0]["samples"]


def amdm(pack, family, sampler, s, seed=1, weight=0.5, p=0.3):
    f = family
    node = pack.NODE_CLASS_MAPPINGS["AMDMAggregateSampler"]()
    return node.sample(f["main"], f["conds"][0], f["conds"][1], f["aux"], f["conds"][2], f["conds"][3], f["latent"],
                       seed, STEPS, 4.0, 4.0, sampler, "simple", 1.0, weight, s, "paper", p, "auto",
                       "independent")


def test_the_aggregate_sampler_offers_every_ksampler_sampler(comfy, pack):
    import comfy.samplers

    offered = pack.NODE_CLASS_MAPPINGS["AMDMAggregateSampler"].INPUT_TYPES()["required"]["sampler_name"][0]
    assert list(offered) == list(comfy.samplers.KSampler.SAMPLERS)


@pytest.mark.parametrize("family_name", ["sd15", "sd3"])
def test_s0_and_silent_settings_are_the_users_sampler_bit_for_bit(comfy, pack, families, family_name):
    family = families[family_name]
    mismatches = []
    with torch.no_grad():
        for sampler in all_samplers():
            reference = ksampler(comfy, family, sampler)
            if not torch.equal(amdm(pack, family, sampler, s=0)[0]["samples"], reference):
                mismatches.append(f"{sampler} (s = 0)")
            if not torch.equal(amdm(pack, family, sampler, s=2, weight=0.0, p=0.0)[0]["samples"], reference):
                mismatches.append(f"{sampler} (weight 0, p 0)")
    assert not mismatches, f"{family_name}: differs from KSampler: {', '.join(mismatches)}"


def identical_branches(pack_module, family, s):
    """An AMDM Guider whose two branches are the same CFG guider's twins, sharing the main noise, merged at
    w = 0.5 with p = 0 (the merge of identical latents is the latent itself), and the main guider."""
    import comfy.samplers

    guiders = []
    for _ in range(2):
        guider = comfy.samplers.CFGGuider(family["main"])
        guider.set_conds(family["conds"][0], family["conds"][1])
        guider.set_cfg(4.0)
        guiders.append(guider)
    settings = pack_module("comfy_bridge.settings").AggregationSettings(
        aggregation_steps=s, weights=(0.5,), aggregation="paper", deviation_step=0.0, mean_mode="auto", noise="shared")
    return pack_module("comfy_bridge.guider").AMDMGuider(guiders[0], guiders[1:], settings), guiders[0]


@pytest.mark.parametrize("family_name", ["sd15", "sd3"])
def test_identical_branches_leave_every_sampler_bit_identical_to_ksampler(comfy, pack, pack_module, families,
                                                                         family_name):
    import comfy.sample
    import comfy.samplers

    family = families[family_name]
    # The predictor-correctors' orders depend on the schedule's length: also a longer one (UniPC reaches order
    # 3 and slides its history, SA-Solver its order-4 corrector) and two steps (the window's merge is the last).
    runs = [(name, STEPS, None) for name in all_samplers(refused=False)]
    runs += [(name, steps, None) for name in PREDICTOR_CORRECTORS for steps in (2, 8)]
    runs += [(name, STEPS, options) for name, options in CUSTOM_SAMPLER_OPTIONS]
    mismatches = []
    for sampler_name, steps, options in runs:
        if options is None:
            sampler = comfy.samplers.sampler_object(sampler_name)
        else:  # as SamplerEulerAncestral, SamplerLMS, SamplerDPMPP_2M_SDE, SamplerSASolver build theirs
            sampler = comfy.samplers.ksampler(sampler_name, options)
        sigmas = comfy.samplers.KSampler(family["main"], steps=steps, device="cpu", sampler=sampler_name,
                                         scheduler="simple").sigmas
        noise = comfy.sample.prepare_noise(family["latent"]["samples"], 5)
        amdm_guider, guider = identical_branches(pack_module, family, min(2, steps - 1))
        with torch.no_grad():  # each run its own sigmas: uni_pc writes into them
            reference = guider.sample(noise, family["latent"]["samples"], sampler, sigmas.clone(), seed=5)
            driven = amdm_guider.sample(noise, family["latent"]["samples"], sampler, sigmas.clone(), seed=5)
        if not torch.equal(driven, reference):
            mismatches.append(f"{sampler_name} {options or ''}, {steps} steps "
                              f"({float((driven - reference).abs().max()):.2g})")
    assert not mismatches, f"{family_name}: the driven main branch differs from the sampler: {', '.join(mismatches)}"


def documented_calls():
    """{sampler: model calls of one step to a nonzero sigma, None where it varies, "refused"} from the table in
    docs/nodes.md, written for the ComfyUI versions the pack is tested on."""
    with open(DOCS, encoding="utf-8") as handle:
        text = handle.read()
    rows = re.findall(r"^\| `([a-z0-9_]+)` \| ([0-9]+|varies|refused) \|", text, flags=re.M)
    return {name: int(calls) if calls.isdigit() else (None if calls == "varies" else calls) for name, calls in rows}


def step_calls(per_step, sigmas, steps):
    """Calls of steps 0 .. steps-1: per_step each, 1 for a step into sigma 0."""
    return sum(per_step if float(sigmas[i + 1]) > 0 else 1 for i in range(steps))


def test_the_docs_table_lists_the_tested_samplers_and_its_refusals(comfy):
    import comfy.samplers

    table = documented_calls()
    assert {name for name, calls in table.items() if calls == "refused"} == set(REFUSED)
    assert {"euler", "ddim", "heun", "dpmpp_2m", "uni_pc", "sa_solver_pece", "seeds_3"} <= set(table)
    assert set(REFUSED) <= set(comfy.samplers.KSampler.SAMPLERS)


@pytest.mark.parametrize("family_name", FAMILIES)
def test_every_sampler_aggregates_finite_latents_with_the_documented_model_calls(comfy, pack, families,
                                                                                   family_name):
    import comfy.samplers

    family, s = families[family_name], 2
    table = documented_calls()
    problems = []
    for sampler in all_samplers(refused=False):
        sigmas = comfy.samplers.KSampler(family["main"], steps=STEPS, device="cpu", sampler=sampler,
                                         scheduler="simple").sigmas
        family["calls"].clear()
        with torch.no_grad():
            out, aux = amdm(pack, family, sampler, s=s)
        if not (torch.isfinite(out["samples"]).all() and torch.isfinite(aux["samples"]).all()):
            problems.append(f"{sampler}: not finite")
        per_step = table.get(sampler)  # a sampler the table does not list runs too
        total = len(sigmas) - 1
        if isinstance(per_step, int):
            expected = step_calls(per_step, sigmas, total) + step_calls(per_step, sigmas, s + 1)
            if len(family["calls"]) != expected:
                problems.append(f"{sampler}: {len(family['calls'])} model calls, documented {expected}")
    assert not problems, f"{family_name}: " + "; ".join(problems)


def test_merging_changes_the_result_of_every_kind_of_sampler(comfy, pack, families):
    family = families["sd3"]
    with torch.no_grad():
        for sampler in ("dpmpp_2m", "seeds_2", "uni_pc", "sa_solver_pece"):
            alone = ksampler(comfy, family, sampler)
            merged = amdm(pack, family, sampler, s=2)[0]["samples"]
            assert (merged - alone).abs().max() > 1e-3, f"{sampler}: the aux branch had no effect"


@pytest.mark.parametrize("sampler", REFUSED)
def test_samplers_that_cannot_step_in_lockstep_are_refused_by_name_before_any_call(comfy, pack, families, sampler):
    family = families["sd15"]
    family["calls"].clear()
    with pytest.raises(ValueError, match=rf"sampler {sampler!r} chooses its own step sizes"):
        amdm(pack, family, sampler, s=2)
    assert family["calls"] == []


@pytest.mark.parametrize("family_name", ["sd15", "sd3"])
def test_this_comfyuis_predictor_correctors_run_as_the_packs_proven_steps(comfy, pack, pack_module, families,
                                                                         family_name):
    """On this ComfyUI the pack's own steps are proven equal and used: a merge then moves the corrected latent
    (not only the model's answer), so the result differs from ComfyUI's same function driven as any sampler
    (wrapped, so that the pack does not recognise it)."""
    import comfy.sample
    import comfy.samplers

    family = families[family_name]
    sigmas = comfy.samplers.KSampler(family["main"], steps=6, device="cpu", sampler="uni_pc", scheduler="simple").sigmas
    noise = comfy.sample.prepare_noise(family["latent"]["samples"], 5)
    for name in PREDICTOR_CORRECTORS:
        stock = comfy.samplers.sampler_object(name)
        function = stock.sampler_function
        as_any_sampler = comfy.samplers.KSAMPLER(lambda *args, **kwargs: function(*args, **kwargs),
                                                 stock.extra_options, stock.inpaint_options)
        results = []
        for sampler in (stock, as_any_sampler):
            amdm_guider, _ = identical_branches(pack_module, family, 3)
            amdm_guider.aux_guiders[0].set_conds(family["conds"][2], family["conds"][3])
            with torch.no_grad():
                results.append(amdm_guider.sample(noise, family["latent"]["samples"], sampler, sigmas.clone(), seed=5))
        assert torch.isfinite(results[0]).all()
        assert (results[0] - results[1]).abs().max() > 1e-4, f"{name}: the pack's own step was not used"


def test_an_explicit_reference_mean_on_a_flow_model_is_refused(comfy, pack, families):
    family = families["sd3"]
    node = pack.NODE_CLASS_MAPPINGS["AMDMAggregateSampler"]()
    with pytest.raises(ValueError, match="mean_mode 'reference' needs"):
        node.sample(family["main"], family["conds"][0], family["conds"][1], family["aux"], family["conds"][2],
                    family["conds"][3], family["latent"], 1, STEPS, 4.0, 4.0, "euler", "simple", 1.0, 0.5, 2, "paper",
                    0.3, "reference", "independent")


def test_branches_of_different_families_are_refused(comfy, pack, families):
    sd15, sd3 = families["sd15"], families["sd3"]
    node = pack.NODE_CLASS_MAPPINGS["AMDMAggregateSampler"]()
    with pytest.raises(ValueError, match="latent format"):
        node.sample(sd15["main"], sd15["conds"][0], sd15["conds"][1], sd3["aux"], sd3["conds"][2], sd3["conds"][3],
                    sd15["latent"], 1, STEPS, 4.0, 4.0, "euler", "simple", 1.0, 0.5, 2, "paper", 0.3, "auto",
                    "independent")
    v_pred = families["sd15_v"]
    with pytest.raises(ValueError, match="predicts"):
        node.sample(sd15["main"], sd15["conds"][0], sd15["conds"][1], v_pred["aux"], sd15["conds"][2],
                    sd15["conds"][3], sd15["latent"], 1, STEPS, 4.0, 4.0, "euler", "simple", 1.0, 0.5, 2, "paper",
                    0.3, "auto", "independent")
