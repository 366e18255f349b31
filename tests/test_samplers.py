"""Every sampler ComfyUI has, on every family (tiny models from ComfyUI's own SD1.5, SDXL, SD3 and Flux
configs, plus SD1.5 patched to v-prediction):

1. s = 0 is exactly the user's sampler: bit-identical to KSampler for every sampler (SD1.5 and SD3).
2. The samplers AMDM reproduces exactly: one branch stepped by the pack's step objects equals KSampler bit
   for bit (SD1.5 and SD3; the predictor-correctors also at 1 and 8 steps; SAMPLERs with the options the
   custom-sampler nodes set), so the per-branch state (noise stream, multistep history) is the sampler's own.
3. s >= 1 runs and stays finite for every sampler and family, with the model calls docs/nodes.md states.
4. With a window, adaptive-step samplers and non-k-diffusion SAMPLERs are refused by their user-facing name
   before any model call.
5. Every sampler stepped by slices moves a branch in a one-step slice as in the first step of a full run
   (heunpp2, whose order depends on the sigmas ahead, takes a valid lower-order step instead).
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


@pytest.mark.parametrize("family_name", ["sd15", "sd3"])
def test_exact_samplers_step_one_branch_exactly_as_ksampler(comfy, pack, pack_module, families, family_name):
    import comfy.sample
    import comfy.samplers

    guider_module, plan_module = pack_module("comfy_bridge.guider"), pack_module("comfy_bridge.sampler_plan")
    settings = pack_module("comfy_bridge.settings").AggregationSettings(aggregation_steps=0, weights=())
    family = families[family_name]
    exact = plan_module.exact_sampler_names()
    assert {"euler", "ddim", "euler_ancestral", "heun", "lms", "dpmpp_2m", "dpmpp_sde", "dpmpp_2m_sde",
            "dpmpp_3m_sde", "lcm", "res_multistep", "uni_pc", "uni_pc_bh2", "sa_solver", "sa_solver_pece"} <= set(exact)
    mismatches = []
    # The predictor-correctors' orders depend on the schedule's length: also a longer one (UniPC reaches
    # order 3 and slides its history, SA-Solver its order-4 corrector), and one step (UniPC makes no update).
    runs = [(name, STEPS, None) for name in exact]
    runs += [(name, steps, None) for name in PREDICTOR_CORRECTORS for steps in (1, 8)]
    runs += [(name, STEPS, options) for name, options in CUSTOM_SAMPLER_OPTIONS]
    for sampler_name, steps, options in runs:
        guider = comfy.samplers.CFGGuider(family["main"])
        guider.set_conds(family["conds"][0], family["conds"][1])
        guider.set_cfg(4.0)
        if options is None:
            sampler = comfy.samplers.sampler_object(sampler_name)
        else:  # as SamplerEulerAncestral, SamplerLMS, SamplerDPMPP_2M_SDE, SamplerSASolver build theirs
            sampler = comfy.samplers.ksampler(sampler_name, options)
            assert plan_module.plan_sampler(sampler).exact is not None, f"{sampler_name} {options}: not stepped exactly"
        # Each run gets its own copy: uni_pc writes into the sigmas it is given.
        sigmas = comfy.samplers.KSampler(family["main"], steps=steps, device="cpu", sampler=sampler_name,
                                         scheduler="simple").sigmas
        noise = comfy.sample.prepare_noise(family["latent"]["samples"], 5)
        with torch.no_grad():
            reference = guider.sample(noise, family["latent"]["samples"], sampler, sigmas.clone(), seed=5)
            run_sigmas = sigmas.clone()
            run = guider_module._LockstepRun([], [], [], family["latent"]["samples"], run_sigmas, None,
                                             plan_module.plan_sampler(sampler), settings)
            stepped = guider.sample(noise, family["latent"]["samples"],
                                    guider_module.BranchCapture(run, sampler.inpaint_options), run_sigmas, seed=5)
        if not torch.equal(stepped, reference):
            mismatches.append(f"{sampler_name} {options or ''}, {steps} steps "
                              f"({float((stepped - reference).abs().max()):.2g})")
    assert not mismatches, f"{family_name}: the pack's steps differ from ComfyUI's sampler: {', '.join(mismatches)}"


def documented_calls():
    """{sampler: model calls of one step to a nonzero sigma} from the table in docs/nodes.md; samplers whose
    count depends on the step's position are marked there with "varies"."""
    with open(DOCS, encoding="utf-8") as handle:
        text = handle.read()
    rows = re.findall(r"^\| `([a-z0-9_]+)` \| (exact|slices|refused) \| ([0-9]+|varies|-) \|", text, flags=re.M)
    return {name: (how, int(calls) if calls.isdigit() else None) for name, how, calls in rows}


def step_calls(per_step, sigmas, steps):
    """Calls of steps 0 .. steps-1: per_step each, 1 for a step into sigma 0."""
    return sum(per_step if float(sigmas[i + 1]) > 0 else 1 for i in range(steps))


def test_the_docs_table_covers_every_sampler_and_says_how_it_is_stepped(comfy, pack, pack_module):
    import comfy.samplers

    table = documented_calls()  # the samplers of every ComfyUI version the pack is tested on
    running = set(comfy.samplers.KSampler.SAMPLERS)
    assert running <= set(table), f"undocumented samplers: {sorted(running - set(table))}"
    plan = pack_module("comfy_bridge.sampler_plan")
    assert {name for name, (how, _) in table.items() if how == "exact" and name in running} == \
        set(plan.exact_sampler_names())
    assert {name for name, (how, _) in table.items() if how == "refused"} == set(plan.REFUSED) == set(REFUSED)


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
        how, per_step = table[sampler]
        total = len(sigmas) - 1
        if per_step is not None:
            expected = step_calls(per_step, sigmas, total) + step_calls(per_step, sigmas, s + 1)
            if len(family["calls"]) != expected:
                problems.append(f"{sampler}: {len(family['calls'])} model calls, documented {expected}")
    assert not problems, f"{family_name}: " + "; ".join(problems)


def test_a_one_step_slice_of_each_slices_sampler_is_its_first_step(comfy, pack, pack_module, families):
    """The slices path is only sound where ComfyUI's function, given [sigma_0, sigma_1], takes the step it
    takes first in a full run (the refused predictor-correctors do not: they return an uncorrected latent)."""
    import comfy.samplers

    table = documented_calls()
    family = families["sd15"]
    guider = comfy.samplers.CFGGuider(family["main"])
    guider.set_conds(family["conds"][0], family["conds"][1])
    guider.set_cfg(4.0)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    wrong = []
    for name in all_samplers(refused=False):
        if table[name][0] != "slices" or name == "heunpp2":
            continue
        sigmas = comfy.samplers.KSampler(family["main"], steps=5, device="cpu", sampler=name, scheduler="karras").sigmas
        first = {}

        def second_input(step, x0, x, total):
            if step == 1:
                first["x"] = x.clone()

        with torch.no_grad():
            guider.sample(noise, family["latent"]["samples"], comfy.samplers.sampler_object(name), sigmas,
                          callback=second_input, seed=3)
            one_step = guider.sample(noise, family["latent"]["samples"], comfy.samplers.sampler_object(name),
                                     sigmas[:2].clone(), seed=3)
        if not torch.equal(one_step, family["main"].model.process_latent_out(first["x"])):
            wrong.append(name)
    assert not wrong, f"a one-step slice is not the sampler's first step: {wrong}"


def test_merging_changes_the_result_for_exact_and_slice_samplers(comfy, pack, families):
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


def test_a_sampler_that_is_not_k_diffusion_is_refused_by_name(comfy, pack, families):
    import comfy.samplers

    class OwnSampler(comfy.samplers.Sampler):
        def sample(self, *args, **kwargs):
            raise AssertionError("must not run")

    family = families["sd15"]
    guider = comfy.samplers.CFGGuider(family["main"])
    guider.set_conds(family["conds"][0], family["conds"][1])
    aux = comfy.samplers.CFGGuider(family["aux"])
    aux.set_conds(family["conds"][2], family["conds"][3])
    amdm_guider = pack.NODE_CLASS_MAPPINGS["AMDMGuider"]().get_guider(guider, aux, 0.5, 1, "paper", 0.3, "auto",
                                                                      "independent")[0]
    sigmas = comfy.samplers.KSampler(family["main"], steps=STEPS, device="cpu", sampler="euler",
                                     scheduler="simple").sigmas
    with pytest.raises(ValueError, match="OwnSampler' is not a k-diffusion sampler"):
        amdm_guider.sample(torch.randn(1, 4, 8, 8), family["latent"]["samples"], OwnSampler(), sigmas, seed=1)


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
