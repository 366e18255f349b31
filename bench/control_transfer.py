#!/usr/bin/env python
"""Does AMDM transfer control from an aux model to the main model? A benchmark where the truth is known.

Data: the exact-mixture family (harness/exact_mixture.py): "images" in a latent-sized space (4 x 32 x 32),
component (p, c) = a blob at position p (one of 4 spots) painted in colour c (one of 4 colours) plus
isotropic texture noise of std 1. Model A is the EXACT denoiser of the mixture conditioned on the position
only, model B on the colour only; each is CFG-combined with the exact unconditional denoiser at guidance
7.5 (the paper's setting; guidance 1 is a variant). Alone, A gets the colour right by chance (1/4) and B
the position (1/4). AMDM(main A + aux B) is asked for both: a sample counts as right when its nearest
component is (p*, c*). Quality proxy: RMS distance (per element) from a sample to its nearest component
mean; on-distribution samples sit at about 1.

Three parts, every one with the same targets (every (p, c) equally often) and the same initial noises
(seed 0 for the main branch, seed 1 for the aux branch: what KSampler and the AMDM node draw):
1. core: amdm_core.run_lockstep directly on SD1.5's sigma table, ddim_uniform spacing, T = 50 steps of
   ComfyUI's own Euler sampler (= DDIM eta 0) per branch; the full (aggregation, w, p, s) grid.
2. node vs core: the same settings through ComfyUI, i.e. the exact-mixture models as ComfyUI MODELs
   (harness/exact_mixture_comfy.py), their prompts as CONDITIONING, sampled by KSampler and the AMDM
   Aggregate Sampler node, next to amdm_core on the same sigmas, for the eps variant (SD1.5 schedule,
   ddim) and the rectified-flow variant (SD3's shift 3, simple schedule, euler).
3. samplers: every sampler of ComfyUI's KSampler at one setting (the demo's: s = 20, w = 0.5, p = 0)
   through the node, eps and flow; a sampler the node refuses is listed with its message.

Run: make bench   (or .venv/bin/python bench/control_transfer.py [--samples N] [--parts core,node,samplers])
Writes bench/results/control_transfer.{md,json,png} and control_transfer_samplers.png.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import amdm_core  # noqa: E402
from harness import exact_mixture, runtime  # noqa: E402

GUIDANCE = 7.5
STEPS = 50
S_VALUES = (0, 2, 5, 10, 20)
P_VALUES = (0.0, 0.1, 0.3, 0.5)
W_VALUES = (0.3, 0.5, 0.7)
HEADLINE_W, HEADLINE_P = 0.5, 0.3
NODE_SETTINGS = [(aggregation, s, p) for aggregation in ("sequential", "linear") for s in (5, 20) for p in (0.0, 0.3)]
SWEEP_W, SWEEP_P, SWEEP_S = 0.5, 0.0, 20  # the demo's setting
# Per family: the sampler and schedule of the node-vs-core comparison, and the mean mode (the paper's
# "reference" needs the 1000-step DDPM table that only the eps model has).
VARIANTS = {
    "eps": {"sampler": "ddim", "scheduler": "ddim_uniform", "mean_mode": "reference"},
    "flow": {"sampler": "euler", "scheduler": "simple", "mean_mode": "exact"},
}
MAIN_SEED, AUX_SEED = 0, 1  # the AMDM node's 'independent' noise: aux branch 2 draws seed + 1


def pct(v):
    return f"{100 * v:.1f}"


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


class Problem:
    """Targets, prompts and initial noises shared by every path."""

    def __init__(self, samples):
        self.samples = samples
        index = torch.arange(samples)
        self.target_p = index % len(exact_mixture.POSITIONS)
        self.target_c = (index // len(exact_mixture.POSITIONS)) % len(exact_mixture.COLOURS)
        self.means = exact_mixture.component_means()
        self.tokens = exact_mixture.prompt_tokens(self.target_p.tolist(), self.target_c.tolist())
        self.empty = exact_mixture.prompt_tokens([None] * samples, [None] * samples)
        shape = (samples, exact_mixture.CHANNELS, exact_mixture.SIZE, exact_mixture.SIZE)
        # what comfy.sample.prepare_noise draws for a batch from one seed
        self.noise = [torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in (MAIN_SEED, AUX_SEED)]

    def score(self, x):
        return exact_mixture.score(x, self.means, self.target_p, self.target_c)


def core_denoiser(problem, knows, scales, guidance=GUIDANCE):
    """The CFG-combined exact denoiser D_u + g (D_c - D_u) of a model knowing `knows`, for amdm_core;
    scales(sigma) -> (a, b) of the family (x = a x0 + b eps)."""
    conditional = exact_mixture.log_prior(problem.tokens, knows)
    unconditional = exact_mixture.log_prior(problem.empty, knows)

    def denoise(x, sigma):
        a, b = scales(sigma)
        d_c = exact_mixture.posterior_mean(x, a, b, problem.means, conditional)
        if guidance == 1.0:
            return d_c
        d_u = exact_mixture.posterior_mean(x, a, b, problem.means, unconditional)
        return d_u + guidance * (d_c - d_u)

    return denoise


FAMILY_SCALES = {"eps": lambda sigma: (torch.ones_like(sigma), sigma), "flow": lambda sigma: (1 - sigma, sigma)}
FAMILY_SPACES = {"eps": amdm_core.EPS_SPACE, "flow": amdm_core.FLOW_SPACE}


def euler_run(denoise, x, sigmas):
    """One branch for amdm_core.run_lockstep: ComfyUI's own Euler sampler (DDIM eta 0 in sigma space) with
    its model calls routed through the lockstep's hooks."""
    from comfy.k_diffusion import sampling

    def sample(hooks):
        def model(latent, sigma):
            return hooks.model(latent, sigma, denoise)

        def report(step):
            hooks.report(step["i"], step["denoised"])

        return hooks.returned(sampling.sample_euler(model, x, sigmas, callback=report, disable=True))

    return sample


def lockstep(denoisers, starts, sigmas, **settings):
    """amdm_core.run_lockstep over one Euler run per branch; returns the main branch's result."""
    runs = [euler_run(denoise, x, sigmas) for denoise, x in zip(denoisers, starts)]
    step_map = amdm_core.map_steps(runs[0], len(sigmas) - 1, lambda x, sigma, call: x)
    return amdm_core.run_lockstep(runs, step_map, final_sigma=sigmas[-1], **settings).x


class Core:
    """amdm_core.run_lockstep on the exact denoisers of one family."""

    def __init__(self, problem, family, sigmas, sigma_table=None):
        self.problem, self.family, self.sigmas, self.table = problem, family, sigmas, sigma_table
        scales = FAMILY_SCALES[family]
        self.models = {g: (core_denoiser(problem, ("position",), scales, g), core_denoiser(problem, ("colour",), scales, g))
                       for g in (GUIDANCE, 1.0)}

    def start(self, noise):
        return noise * self.sigmas[0]  # as KSampler: b(sigma_0) noise on a zero latent (below sigma_max for eps)

    def alone(self, branch, guidance=GUIDANCE):
        model = self.models[guidance][branch]
        return lockstep([model], [self.start(self.problem.noise[0])], self.sigmas, aggregation_steps=0, weights=[],
                        space=FAMILY_SPACES[self.family], mean_mode="exact")

    def amdm(self, s, w, p, aggregation="sequential", mean_mode=None, shared_noise=False, guidance=GUIDANCE):
        aux_noise = self.problem.noise[0] if shared_noise else self.problem.noise[1]
        return lockstep(list(self.models[guidance]), [self.start(self.problem.noise[0]), self.start(aux_noise)],
                        self.sigmas, aggregation_steps=s, weights=[w], aggregation=aggregation, deviation_steps=p,
                        mean_mode=mean_mode or VARIANTS[self.family]["mean_mode"], sigma_table=self.table,
                        space=FAMILY_SPACES[self.family])


class Node:
    """The same problem through ComfyUI: exact-mixture MODELs, CONDITIONING, KSampler / AMDM node."""

    def __init__(self, problem, family):
        import nodes

        from harness import exact_mixture_comfy

        self.nodes = nodes
        self.model_a = exact_mixture_comfy.exact_mixture_patcher("position", family)
        self.model_b = exact_mixture_comfy.exact_mixture_patcher("colour", family)
        self.positive = [[problem.tokens, {"pooled_output": problem.tokens.sum(dim=1)}]]
        self.negative = exact_mixture_comfy.conditioning([None], [None])
        self.latent = {"samples": torch.zeros_like(problem.noise[0])}

    def sigmas(self, scheduler):
        import comfy.samplers

        return comfy.samplers.calculate_sigmas(self.model_a.get_model_object("model_sampling"), scheduler, STEPS).cpu()

    def alone(self, branch, sampler, scheduler):
        model = (self.model_a, self.model_b)[branch]
        (out,) = self.nodes.KSampler().sample(model, MAIN_SEED, STEPS, GUIDANCE, sampler, scheduler, self.positive,
                                              self.negative, self.latent)
        return out["samples"]

    def amdm(self, s, w, p, aggregation, sampler, scheduler, mean_mode):
        node = self.nodes.NODE_CLASS_MAPPINGS["AMDMAggregateSampler"]()
        out = getattr(node, node.FUNCTION)(
            model=self.model_a, positive=self.positive, negative=self.negative, model_2=self.model_b,
            positive_2=self.positive, negative_2=self.negative, latent_image=self.latent, seed=MAIN_SEED, steps=STEPS,
            cfg=GUIDANCE, cfg_2=GUIDANCE, sampler_name=sampler, scheduler=scheduler, denoise=1.0, weight_2=w,
            aggregation_steps=s, aggregation=aggregation, deviation_step=p, mean_mode=mean_mode, noise="independent")
        return out[0]["samples"]


def refusal(error):
    return f"refused: {str(error).splitlines()[0][:200]}"


def run_core(problem):
    table = amdm_core.scaled_linear_sigma_table()
    core = Core(problem, "eps", amdm_core.ddim_uniform_sigmas(table, STEPS), table)
    baselines = {
        "unconditional mixture": problem.score(lockstep(
            [core_denoiser(problem, (), FAMILY_SCALES["eps"], 1.0)], [core.start(problem.noise[0])], core.sigmas,
            aggregation_steps=0, weights=[], mean_mode="exact")),
        "A alone (knows position)": problem.score(core.alone(0)),
        "B alone (knows colour)": problem.score(core.alone(1)),
        "A alone, guidance 1": problem.score(core.alone(0, guidance=1.0)),
    }
    grid = {}  # (aggregation, w, p, s) -> score; s = 0 never aggregates, so it is A alone for every setting
    for aggregation in ("slerp", "linear"):
        mode = "sequential" if aggregation == "slerp" else "linear"
        for w in W_VALUES:
            for p in P_VALUES:
                for s in S_VALUES:
                    grid[aggregation, w, p, s] = (baselines["A alone (knows position)"] if s == 0
                                                  else problem.score(core.amdm(s, w, p, aggregation=mode)))
    variants = {
        "slerp, guidance 1 (bare exact conditional denoisers)": {
            s: problem.score(core.amdm(s, HEADLINE_W, HEADLINE_P, guidance=1.0)) for s in S_VALUES[1:]},
        "slerp, mean_mode exact": {
            s: problem.score(core.amdm(s, HEADLINE_W, HEADLINE_P, mean_mode="exact")) for s in S_VALUES[1:]},
        "slerp, shared initial noise": {
            s: problem.score(core.amdm(s, HEADLINE_W, HEADLINE_P, shared_noise=True)) for s in S_VALUES[1:]},
        "linear, shared initial noise": {
            s: problem.score(core.amdm(s, HEADLINE_W, HEADLINE_P, aggregation="linear", shared_noise=True))
            for s in S_VALUES[1:]},
    }
    return {"sigmas": core.sigmas, "baselines": baselines, "grid": grid, "variants": variants}


def nearest_index(problem, x):
    position, colour, _ = exact_mixture.nearest_components(x, problem.means)
    return position * len(exact_mixture.COLOURS) + colour


def compare(problem, core_x, node_x):
    same = nearest_index(problem, core_x) == nearest_index(problem, node_x)
    return {"core": problem.score(core_x), "node": problem.score(node_x), "same_component": same.float().mean().item(),
            "max_abs_diff": (core_x - node_x).abs().max().item()}


def run_node_vs_core(problem):
    rows = {}
    for family, setting in VARIANTS.items():
        node = Node(problem, family)
        sigmas = node.sigmas(setting["scheduler"])
        table = amdm_core.scaled_linear_sigma_table() if family == "eps" else None
        core = Core(problem, family, sigmas, table)
        for branch, name in ((0, "A alone"), (1, "B alone")):
            rows[family, name] = compare(problem, core.alone(branch), node.alone(branch, setting["sampler"], setting["scheduler"]))
        for aggregation, s, p in NODE_SETTINGS:
            name = f"AMDM {aggregation}, s = {s}, p = {p}"
            core_x = core.amdm(s, HEADLINE_W, p, aggregation=aggregation)
            try:
                node_x = node.amdm(s, HEADLINE_W, p, aggregation, setting["sampler"], setting["scheduler"], setting["mean_mode"])
            except Exception as error:  # the node refuses this family: report it, keep the core number
                rows[family, name] = {"core": problem.score(core_x), "node": refusal(error)}
                continue
            rows[family, name] = compare(problem, core_x, node_x)
        if family == "eps":
            rows[family, "sigmas"] = float((sigmas - amdm_core.ddim_uniform_sigmas(table, STEPS)).abs().max())
    return rows


def run_samplers(problem):
    import comfy.samplers

    results = {}
    for family, setting in VARIANTS.items():
        node = Node(problem, family)
        for sampler in comfy.samplers.KSampler.SAMPLERS:
            entry = {}
            try:
                entry["alone"] = problem.score(node.alone(0, sampler, setting["scheduler"]))
            except Exception as error:
                entry["alone"] = refusal(error)
            try:
                entry["amdm"] = problem.score(node.amdm(SWEEP_S, SWEEP_W, SWEEP_P, "sequential", sampler,
                                                        setting["scheduler"], setting["mean_mode"]))
            except Exception as error:
                entry["amdm"] = refusal(error)
            results[family, sampler] = entry
            print(f"  {family} {sampler}: " + ", ".join(
                f"{k} {pct(v['both']) if isinstance(v, dict) else v}" for k, v in entry.items()), flush=True)
    return results


def both(value):
    return pct(value["both"]) if isinstance(value, dict) else value


def report(samples, sweep_samples, core, node_rows, sampler_rows, walls):
    se = 100 * 0.5 / samples**0.5
    lines = [
        "# Control transfer: AMDM on a Gaussian mixture with known truth",
        "",
        "Generated by `bench/control_transfer.py` (`make bench`). The exact-mixture family of "
        "`harness/exact_mixture.py`: space 4x32x32; component (p, c) = blob at position p (4) in colour c (4; "
        f"colours share a luminance channel), blob radius {exact_mixture.RADIUS:g} px, contrast "
        f"{exact_mixture.AMPLITUDE:g}, texture std {exact_mixture.TAU:g}. Model A = exact denoiser conditioned on the "
        "position only, model B = on the colour only, each CFG-combined with the exact unconditional denoiser at "
        f"guidance {GUIDANCE:g} (the paper's cfg). {samples} samples per setting (every (p, c) target equally "
        f"often; {sweep_samples} in the sampler sweep), T = {STEPS} steps; main branch noise from seed {MAIN_SEED}, "
        f"aux branch from seed {AUX_SEED} (the AMDM node's 'independent' noise); the same targets and noises in "
        f"every setting. Rates in %, standard error at most {se:.1f} points. Quality: RMS distance per element "
        f"from a sample to its nearest component mean (on-distribution: about {exact_mixture.TAU:g}). w = weight of "
        "the aux branch (B), p = deviation step (VP units), s = aggregation steps (steps 1..s are aggregated; "
        "s = 0 is A alone).",
        "",
        "Chance levels for 'both right': unconditional 1/16 = 6.2; A alone 1/4 = 25.0 (colour by chance); "
        "B alone 1/4 = 25.0 (position by chance).",
        "",
    ]
    if node_rows:
        lines += [
            "## Through the ComfyUI node vs amdm_core",
            "",
            "The models as ComfyUI MODELs with CONDITIONING prompts, sampled by KSampler (alone) and the AMDM "
            "Aggregate Sampler node, next to `amdm_core.run_lockstep` on the same sigmas, noises and targets "
            f"(w = {HEADLINE_W}). eps: SD1.5's schedule, ddim + ddim_uniform, mean mode reference; flow: rectified "
            f"flow with shift 3, euler + simple, mean mode exact. 'same component': share of samples whose nearest "
            "component is the same on both paths.",
            "",
        ]
        rows = []
        for (family, name), r in node_rows.items():
            if name == "sigmas":
                continue
            if isinstance(r["node"], str):
                rows.append([family, name, pct(r["core"]["both"]), r["node"], "", ""])
            else:
                rows.append([family, name, pct(r["core"]["both"]), pct(r["node"]["both"]), pct(r["same_component"]),
                             f"{r['max_abs_diff']:.1e}"])
        lines += [markdown_table(["family", "sampler", "core: both right %", "node: both right %",
                                  "same component %", "max abs latent diff"], rows), ""]
        if ("eps", "sigmas") in node_rows:
            lines += [f"ComfyUI's ddim_uniform sigmas vs amdm_core's: max difference {node_rows['eps', 'sigmas']:.1e}.", ""]
    if sampler_rows:
        lines += [
            f"## Every sampler (through the node; s = {SWEEP_S}, w = {SWEEP_W}, p = {SWEEP_P})",
            "",
            "Both attributes right (%), A alone (KSampler with that sampler) and AMDM (main A + aux B, slerp). "
            "eps: ddim_uniform schedule; flow: simple schedule.",
            "",
        ]
        samplers = list(dict.fromkeys(sampler for _, sampler in sampler_rows))
        rows = [[sampler] + [both(sampler_rows[family, sampler][k]) for family in VARIANTS for k in ("alone", "amdm")]
                for sampler in samplers]
        lines += [markdown_table(["sampler", "eps: A alone", "eps: AMDM", "flow: A alone", "flow: AMDM"], rows), "",
                  "![samplers](control_transfer_samplers.png)", ""]
    if core:
        lines += core_report(core)
    lines += ["Wall time: " + ", ".join(f"{part} {sec:.0f} s" for part, sec in walls.items()) + " (one CPU thread).", ""]
    return "\n".join(lines)


def core_report(core):
    sig, baselines, grid, variants = core["sigmas"], core["baselines"], core["grid"], core["variants"]
    lines = [
        "## amdm_core alone (eps, SD1.5's table, ddim_uniform, Euler = DDIM eta 0)",
        "",
        f"Aggregation step s covers sampling steps 1..s; at s = 20 the window ends at sigma {float(sig[21]):.2f}, "
        f"at s = 10 at {float(sig[11]):.2f}, at s = 5 at {float(sig[6]):.2f}.",
        "",
        f"### Headline (w = {HEADLINE_W}, p = {HEADLINE_P}, main A + aux B)",
        "",
    ]
    rows = [[name, pct(r["both"]), pct(r["position"]), pct(r["colour"]), f"{r['rms']:.3f}"]
            for name, r in baselines.items() if "guidance 1" not in name]
    for aggregation in ("slerp", "linear"):
        for s in S_VALUES:
            r = grid[aggregation, HEADLINE_W, HEADLINE_P, s]
            rows.append([f"AMDM {aggregation}, s = {s}", pct(r["both"]), pct(r["position"]), pct(r["colour"]), f"{r['rms']:.3f}"])
    lines += [markdown_table(["sampler", "both right %", "position right %", "colour right %", "RMS dist"], rows), ""]
    for metric, title, fmt in (
        ("both", "Both attributes right (%)", pct),
        ("position", "Position right (%)", pct),
        ("colour", "Colour right (%)", pct),
        ("rms", "RMS distance to the nearest component", lambda v: f"{v:.3f}"),
    ):
        rows = [[aggregation, w, p] + [fmt(grid[aggregation, w, p, s][metric]) for s in S_VALUES]
                for aggregation in ("slerp", "linear") for w in W_VALUES for p in P_VALUES]
        lines += [f"### {title}, full grid", "", markdown_table(["aggregation", "w", "p"] + [f"s = {s}" for s in S_VALUES], rows), ""]
    rows = [[name] + [f"{pct(v[s]['both'])} / {v[s]['rms']:.3f}" for s in S_VALUES[1:]] for name, v in variants.items()]
    bare = baselines["A alone, guidance 1"]
    lines += [
        f"### Variants (w = {HEADLINE_W}, p = {HEADLINE_P}): both right % / RMS distance",
        "",
        f"With guidance 1, A alone: {pct(bare['both'])} both right, RMS {bare['rms']:.3f}.",
        "",
        markdown_table(["variant"] + [f"s = {s}" for s in S_VALUES[1:]], rows),
        "",
        "![control transfer](control_transfer.png)",
        "",
    ]
    return lines


def plot_core(path, core):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baselines, grid = core["baselines"], core["grid"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    s = list(S_VALUES)
    alone = 100 * baselines["A alone (knows position)"]["both"]
    ax = axes[0]
    for aggregation, style in (("slerp", "-o"), ("linear", "--s")):
        ax.plot(s, [100 * grid[aggregation, HEADLINE_W, HEADLINE_P, k]["both"] for k in s], style, label=f"AMDM {aggregation}")
    ax.axhline(alone, color="grey", linestyle=":", linewidth=1, label="A alone (colour by chance)")
    ax.set(xlabel="aggregation steps s", ylabel="both attributes right (%)", ylim=(0, 100), xticks=s,
           title=f"Control transfer, main A + aux B (w = {HEADLINE_W}, p = {HEADLINE_P})")
    ax.legend(fontsize=8)
    ax = axes[1]
    for w in W_VALUES:
        for p, style in ((0.0, ":x"), (HEADLINE_P, "-o")):
            ax.plot(s, [100 * grid["slerp", w, p, k]["both"] for k in s], style, label=f"w = {w}, p = {p}")
    ax.axhline(alone, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="aggregation steps s", ylabel="both attributes right (%)", ylim=(0, 100), xticks=s,
           title="slerp: aux weight w and deviation step p")
    ax.legend(fontsize=8)
    ax = axes[2]
    for aggregation, colour in (("slerp", "C0"), ("linear", "C1")):
        for p, style in ((HEADLINE_P, "-o"), (0.0, ":x")):
            ax.plot(s, [grid[aggregation, HEADLINE_W, p, k]["rms"] for k in s], style, color=colour, label=f"{aggregation}, p = {p}")
    ax.axhline(baselines["A alone (knows position)"]["rms"], color="grey", linestyle=":", linewidth=1, label="A alone")
    ax.set(xlabel="aggregation steps s", ylabel="RMS distance to nearest component", xticks=s,
           title=f"Quality proxy (w = {HEADLINE_W}; lower = texture lost)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_samplers(path, sampler_rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samplers = list(dict.fromkeys(sampler for _, sampler in sampler_rows))
    fig, axes = plt.subplots(len(VARIANTS), 1, figsize=(15, 3.6 * len(VARIANTS)), sharex=True)
    for ax, family in zip(axes, VARIANTS):
        for offset, key, label in ((-0.2, "alone", "A alone"), (0.2, "amdm", "AMDM (A + aux B)")):
            values = [sampler_rows[family, name][key] for name in samplers]
            heights = [100 * v["both"] if isinstance(v, dict) else 0 for v in values]
            ax.bar([i + offset for i in range(len(samplers))], heights, width=0.4, label=label)
        for i, name in enumerate(samplers):
            if isinstance(sampler_rows[family, name]["amdm"], str):
                ax.text(i + 0.2, 2, "refused", rotation=90, fontsize=7, ha="center", va="bottom")
        ax.axhline(25, color="grey", linestyle=":", linewidth=1)
        ax.set(ylabel="both right (%)", ylim=(0, 100), title=f"{family}: s = {SWEEP_S}, w = {SWEEP_W}, p = {SWEEP_P}")
        ax.legend(fontsize=8, loc="upper right")
    axes[-1].set_xticks(range(len(samplers)), samplers, rotation=70, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def to_json(core, node_rows, sampler_rows):
    out = {}
    if core:
        out["core"] = {"baselines": core["baselines"],
                       "grid": {f"{a} w={w} p={p} s={s}": r for (a, w, p, s), r in core["grid"].items()}}
    if node_rows:
        out["node_vs_core"] = {f"{family}: {name}": r for (family, name), r in node_rows.items()}
    if sampler_rows:
        out["samplers"] = {f"{family}: {sampler}": r for (family, sampler), r in sampler_rows.items()}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=512, help="samples per setting (>= 500 for the published table)")
    parser.add_argument("--sweep-samples", type=int, default=256, help="samples per sampler in the sampler sweep")
    parser.add_argument("--parts", default="core,node,samplers", help="comma-separated: core, node, samplers")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "results"), help="output folder")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    # One thread: the work is small matmuls and elementwise ops, where a second thread only adds
    # synchronisation on a loaded 2-core machine.
    runtime.boot(tempfile.mkdtemp(prefix="amdm_bench_"), threads=1)
    runtime.load_pack()
    problem = Problem(args.samples)
    walls, core, node_rows, sampler_rows = {}, None, None, None
    if "core" in parts:
        t0 = time.perf_counter()
        core = run_core(problem)
        walls["core"] = time.perf_counter() - t0
    if "node" in parts:
        t0 = time.perf_counter()
        node_rows = run_node_vs_core(problem)
        walls["node vs core"] = time.perf_counter() - t0
    if "samplers" in parts:
        t0 = time.perf_counter()
        sampler_rows = run_samplers(Problem(args.sweep_samples))
        walls["samplers"] = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    text = report(args.samples, args.sweep_samples, core, node_rows, sampler_rows, walls)
    with open(os.path.join(args.out, "control_transfer.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "control_transfer.json"), "w") as f:
        json.dump(to_json(core, node_rows, sampler_rows), f, indent=1)
    if core:
        plot_core(os.path.join(args.out, "control_transfer.png"), core)
    if sampler_rows:
        plot_samplers(os.path.join(args.out, "control_transfer_samplers.png"), sampler_rows)
    print(text.split("## amdm_core alone")[0])
    print(f"wrote {args.out}/control_transfer.md, .json and plots")


if __name__ == "__main__":
    main()
