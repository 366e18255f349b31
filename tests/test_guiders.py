"""Every GUIDER as an AMDM branch keeps its own semantics, as the main branch and as an aux branch.

Each guider G is paired with a plain CFGGuider E that predicts the same x0 (DualModelGuider(m, m) = CFG on
m; BasicGuider = CFG at cfg 1; DualCFGGuider with cfg_cond2_negative 1 = CFG of cond1 against cond2;
PerpNegGuider with neg_scale 0 = CFG against the empty prompt; the third-party guiders below = CFG at
twice the scale). AMDM with G in a branch must equal AMDM with E there, through SamplerCustomAdvanced, on
whatever guider nodes the running ComfyUI has; a guider that silently lost its CFG (or its own
preparation) would differ by orders of magnitude more than the tolerance.
"""
import pytest
import torch
from node_calls import STEPS, empty_latent, tame


TOLERANCE = 1e-4  # cond and uncond batched differently (one call vs two) round differently


@pytest.fixture(scope="module")
def conds():
    gen = torch.Generator().manual_seed(21)
    return [[[torch.randn(1, 77, 768, generator=gen), {}]] for _ in range(4)]


@pytest.fixture(scope="module")
def models(tiny_model):
    from harness import tiny_models

    return {"main": tame(tiny_model), "other": tame(tiny_models.tiny_model_patcher(seed=3))}


def third_party_guiders():
    """Guiders written the way other packs write them: one overrides only predict_noise, one also
    prepares state in outer_sample (as DualModelGuider does) that its predict_noise needs."""
    import comfy.samplers

    class DoubledCFGGuider(comfy.samplers.CFGGuider):
        def predict_noise(self, x, timestep, model_options={}, seed=None):
            return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get("negative"),
                                                    self.conds.get("positive"), 2 * self.cfg,
                                                    model_options=model_options, seed=seed)

    class PreparedInOuterSampleGuider(DoubledCFGGuider):
        def outer_sample(self, *args, **kwargs):
            self.run_scale = 2 * self.cfg
            try:
                return super().outer_sample(*args, **kwargs)
            finally:
                del self.run_scale

        def predict_noise(self, x, timestep, model_options={}, seed=None):
            return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get("negative"),
                                                    self.conds.get("positive"), self.run_scale,
                                                    model_options=model_options, seed=seed)

    return DoubledCFGGuider, PreparedInOuterSampleGuider


def cfg_guider(nodes, model, positive, negative, cfg):
    return nodes["CFGGuider"].execute(model=model, positive=positive, negative=negative, cfg=cfg).result[0]


def guider_cases(nodes):
    """{name: (build G, build its CFG equivalent E)}, each a function of (model, conds)."""
    def with_conds(guider_class, cfg):
        def build(model, c):
            guider = guider_class(model)
            guider.set_conds(c[0], c[1])
            guider.set_cfg(cfg)
            return guider
        return build

    doubled, prepared = third_party_guiders()
    cases = {
        "CFGGuider": (lambda m, c: cfg_guider(nodes, m, c[0], c[1], 6.0),
                      lambda m, c: cfg_guider(nodes, m, c[0], c[1], 6.0)),
        "BasicGuider": (lambda m, c: nodes["BasicGuider"].execute(model=m, conditioning=c[0]).result[0],
                        lambda m, c: cfg_guider(nodes, m, c[0], c[1], 1.0)),
        "DualCFGGuider": (lambda m, c: nodes["DualCFGGuider"].execute(
                              model=m, cond1=c[0], cond2=c[1], negative=c[2], cfg_conds=6.0, cfg_cond2_negative=1.0,
                              style="regular").result[0],
                          lambda m, c: cfg_guider(nodes, m, c[0], c[1], 6.0)),
        "PerpNegGuider": (lambda m, c: nodes["PerpNegGuider"].execute(
                              model=m, positive=c[0], negative=c[1], empty_conditioning=c[2], cfg=6.0,
                              neg_scale=0.0).result[0],
                          lambda m, c: cfg_guider(nodes, m, c[0], c[2], 6.0)),
        "third-party predict_noise": (with_conds(doubled, 3.0), lambda m, c: cfg_guider(nodes, m, c[0], c[1], 6.0)),
        "third-party outer_sample": (with_conds(prepared, 3.0), lambda m, c: cfg_guider(nodes, m, c[0], c[1], 6.0)),
    }
    if "DualModelGuider" in nodes:  # ComfyUI 0.33 and later
        cases["DualModelGuider"] = (
            lambda m, c: nodes["DualModelGuider"].execute(model=m, positive=c[0], cfg=6.0, model_negative=m,
                                                          negative=c[1]).result[0],
            lambda m, c: cfg_guider(nodes, m, c[0], c[1], 6.0))
    return cases


def sample_amdm(comfy, pack, main, aux, seed=2, s=2):
    nodes = comfy.NODE_CLASS_MAPPINGS
    amdm = pack.NODE_CLASS_MAPPINGS["AMDMGuider"]().get_guider(main, aux, 0.5, s, "paper", 0.3, "reference",
                                                               "independent")[0]
    sigmas = nodes["BasicScheduler"].execute(main.model_patcher, "ddim_uniform", STEPS, 1.0).result[0]
    noise = nodes["RandomNoise"].execute(seed).result[0]
    sampler = nodes["KSamplerSelect"].execute("ddim").result[0]
    with torch.no_grad():
        return nodes["SamplerCustomAdvanced"].execute(noise, amdm, sampler, sigmas, empty_latent()).result[0]["samples"]


def test_the_guider_list_covers_every_core_guider_node(comfy, pack):
    """Every GUIDER-returning node of the running ComfyUI that applies to image models is a case here."""
    nodes = comfy.NODE_CLASS_MAPPINGS
    guider_nodes = {name for name, cls in nodes.items()
                    if "GUIDER" in tuple(getattr(cls, "RETURN_TYPES", ())) and name not in pack.NODE_CLASS_MAPPINGS}
    video_only = {"LTXVDualCFGGuider"}  # LTX-Video's audio/video guider
    assert guider_nodes - video_only <= set(guider_cases(nodes)), "a guider node of this ComfyUI has no case"


@pytest.mark.parametrize("role", ["main", "aux"])
def test_every_guider_keeps_its_own_semantics_as_an_amdm_branch(comfy, pack, models, conds, role):
    nodes = comfy.NODE_CLASS_MAPPINGS
    other = cfg_guider(nodes, models["other"], conds[3], conds[1], 7.0)

    def run(branch):
        return sample_amdm(comfy, pack, branch, other) if role == "main" else sample_amdm(comfy, pack, other, branch)

    without_cfg = run(cfg_guider(nodes, models["main"], conds[0], conds[1], 1.0))
    failures = []
    for name, (build, build_equivalent) in guider_cases(nodes).items():
        got = run(build(models["main"], conds))
        expected = run(build_equivalent(models["main"], conds))
        difference = float((got - expected).abs().max())
        if not difference <= TOLERANCE * max(1.0, float(expected.abs().max())):
            failures.append(f"{name}: differs from its CFG equivalent by {difference:.3g}")
        if name != "BasicGuider" and not float((without_cfg - expected).abs().max()) > 100 * TOLERANCE:
            failures.append(f"{name}: the comparison cannot see CFG")
    assert not failures, f"as the {role} branch: " + "; ".join(failures)
