#!/usr/bin/env python
"""Does AMDM transfer control from an aux model to the main model? A benchmark where the truth is known.

Data: a Gaussian mixture of "images" in a latent-sized space (4 x 32 x 32). Component (p, c) is a blob
at position p (one of P spots) painted in colour c (one of C colours), plus isotropic texture noise of
std TAU:  x0 = AMPLITUDE * colour_c (x) bump_p + TAU * n. The colours share a luminance channel (half
their energy) and differ in chroma (the other three channels), as real colours do.
Model A knows the position only: the EXACT denoiser of the mixture conditioned on p; model B knows the
colour only (conditioned on c). As in the real use, each branch is CFG-combined with the exact
unconditional denoiser, guidance 7.5 (the paper's setting); guidance 1 (the bare conditional denoisers)
is reported as a variant. Alone, A gets the colour right by chance (1/C) and B the position (1/P).
AMDM(main A + aux B) is asked for both: a sample counts as right when its nearest component is
(p*, c*). The quality proxy is the RMS distance (per element) from a sample to its nearest component
mean; on-distribution samples sit at about TAU.

Sampling mirrors the real use: SD1.5's 1000-step sigma table, ComfyUI's ddim_uniform spacing, T = 50
Euler (= DDIM eta 0) steps, independent initial noise per branch, amdm_core.run_lockstep.
Every setting reuses the same targets and the same initial noises (paired comparison).

Run: make bench   (or .venv/bin/python bench/control_transfer.py [--samples N])
Writes bench/results/control_transfer.md and bench/results/control_transfer.png.
"""
import argparse
import os
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import amdm_core  # noqa: E402

POSITIONS = 4  # P: blob centres on a 2 x 2 grid
COLOURS = 4  # C: orthonormal 4-channel colours
SIZE, CHANNELS = 32, 4
AMPLITUDE, RADIUS = 1.0, 6.0  # blob contrast (one latent std) and Gaussian radius: ~20% of the image
LUMINANCE = 0.5  # share of a colour's energy in the common luminance channel
TAU = 1.0  # within-component std: SD latents have roughly unit std per element
GUIDANCE = 7.5
STEPS = 50
S_VALUES = (0, 2, 5, 10, 20)
P_VALUES = (0.0, 0.1, 0.3, 0.5)
W_VALUES = (0.3, 0.5, 0.7)
HEADLINE_W, HEADLINE_P = 0.5, 0.3


def colour_vectors():
    """C unit 4-channel colours: sqrt(LUMINANCE) in channel 0, the rest on tetrahedron vertices in
    channels 1..3 (pairwise chroma cosine -1/3)."""
    tetrahedron = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float32) / 3**0.5
    luminance = torch.full((COLOURS, 1), LUMINANCE**0.5)
    return torch.cat([luminance, (1 - LUMINANCE) ** 0.5 * tetrahedron[:COLOURS]], dim=1)


def component_means():
    """[P * C, D] means, row p * C + c: AMPLITUDE * colour_c[channel] * exp(-|pixel - centre_p|^2 / (2 RADIUS^2))."""
    coords = torch.arange(SIZE, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    centres = [(8.0, 8.0), (8.0, 24.0), (24.0, 8.0), (24.0, 24.0)][:POSITIONS]
    bumps = torch.stack([torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * RADIUS**2)) for cy, cx in centres])
    means = AMPLITUDE * colour_vectors()[None, :, :, None, None] * bumps[:, None, None, :, :]  # [P, C, ch, H, W]
    return means.reshape(POSITIONS * COLOURS, -1)


def mixture_denoiser(means, allowed, guidance=1.0):
    """CFG-combined exact denoiser of the mixture, per sample conditioned on the `allowed` [B, K] components.
    The exact D(x, sigma) = E[x0 | x] of a mixture with isotropic components is
        w_j = softmax_j((<x, mu_j> - |mu_j|^2 / 2) / (TAU^2 + sigma^2))   over the allowed j
        D   = TAU^2 / (TAU^2 + sigma^2) * x + sigma^2 / (TAU^2 + sigma^2) * sum_j w_j mu_j
    and CFG D_u + g (D_c - D_u) only mixes the weights: w = w_u + g (w_c - w_u) (one matmul for both).
    """
    half_sq_norms = 0.5 * (means**2).sum(dim=1)
    log_prior = torch.where(allowed, 0.0, float("-inf"))

    def denoise(x, sigma):
        flat = x.reshape(x.shape[0], -1)
        var = TAU**2 + sigma.reshape(-1, 1) ** 2
        logits = (flat @ means.T - half_sq_norms) / var
        weights = torch.softmax(logits + log_prior, dim=1)
        if guidance != 1.0:
            unconditional = torch.softmax(logits, dim=1)
            weights = unconditional + guidance * (weights - unconditional)
        denoised = (TAU**2 * flat + sigma.reshape(-1, 1) ** 2 * (weights @ means)) / var
        return denoised.reshape(x.shape)

    return denoise


def score(x, means, target_p, target_c):
    """(both right, position right, colour right, mean RMS distance to the nearest component)."""
    flat = x.reshape(x.shape[0], -1)
    dist = torch.cdist(flat, means)
    nearest = dist.argmin(dim=1)
    pos_ok, col_ok = nearest // COLOURS == target_p, nearest % COLOURS == target_c
    rms = dist.min(dim=1).values / flat.shape[1] ** 0.5
    return {
        "both": (pos_ok & col_ok).float().mean().item(),
        "position": pos_ok.float().mean().item(),
        "colour": col_ok.float().mean().item(),
        "rms": rms.mean().item(),
    }


class Bench:
    def __init__(self, samples):
        self.means = component_means()
        self.table = amdm_core.scaled_linear_sigma_table()
        self.sigmas = amdm_core.ddim_uniform_sigmas(self.table, STEPS)
        index = torch.arange(samples)
        self.target_p = index % POSITIONS  # every (p, c) pair equally often
        self.target_c = (index // POSITIONS) % COLOURS
        component_p = torch.arange(POSITIONS * COLOURS) // COLOURS
        component_c = torch.arange(POSITIONS * COLOURS) % COLOURS
        knows_position = component_p[None, :] == self.target_p[:, None]
        knows_colour = component_c[None, :] == self.target_c[:, None]
        self.models = {
            guidance: (mixture_denoiser(self.means, knows_position, guidance), mixture_denoiser(self.means, knows_colour, guidance))
            for guidance in (GUIDANCE, 1.0)
        }
        self.model_a, self.model_b = self.models[GUIDANCE]
        self.unconditional = mixture_denoiser(self.means, torch.ones(samples, POSITIONS * COLOURS, dtype=torch.bool))
        shape = (samples, CHANNELS, SIZE, SIZE)
        # ComfyUI's ddim_uniform starts below sigma_max, so x starts at noise * sigma_0 (as KSampler does)
        self.noise = [torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in (1, 2)]

    def alone(self, model):
        x = self.noise[0] * self.sigmas[0]
        result = amdm_core.run_lockstep([model], [x], self.sigmas, aggregation_steps=0, weights=[])
        return score(result.x, self.means, self.target_p, self.target_c)

    def amdm(self, s, w, p, aggregation="sequential", mean_mode="reference", shared_noise=False, guidance=GUIDANCE):
        aux_noise = self.noise[0] if shared_noise else self.noise[1]
        start = [self.noise[0] * self.sigmas[0], aux_noise * self.sigmas[0]]
        result = amdm_core.run_lockstep(
            list(self.models[guidance]), start, self.sigmas, aggregation_steps=s, weights=[w],
            aggregation=aggregation, deviation_steps=p, mean_mode=mean_mode, sigma_table=self.table,
        )
        return score(result.x, self.means, self.target_p, self.target_c)


def pct(v):
    return f"{100 * v:.1f}"


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def run(samples):
    # One thread: the work is memory-bound elementwise ops on [samples, 4096] tensors, where a second
    # thread only adds synchronisation (measured 10x slower on a loaded 2-core machine).
    torch.set_num_threads(1)
    bench = Bench(samples)
    t0 = time.perf_counter()
    baselines = {
        "unconditional mixture": bench.alone(bench.unconditional),
        "A alone (knows position)": bench.alone(bench.model_a),
        "B alone (knows colour)": bench.alone(bench.model_b),
        "A alone, guidance 1": bench.alone(bench.models[1.0][0]),
    }
    grid = {}  # (aggregation, w, p, s) -> score; s = 0 never aggregates, so it is A alone for every setting
    for aggregation in ("slerp", "linear"):
        mode = "sequential" if aggregation == "slerp" else "linear"
        for w in W_VALUES:
            for p in P_VALUES:
                for s in S_VALUES:
                    grid[aggregation, w, p, s] = (
                        baselines["A alone (knows position)"] if s == 0 else bench.amdm(s, w, p, aggregation=mode)
                    )
    variants = {
        "slerp, guidance 1 (bare exact conditional denoisers)": {
            s: bench.amdm(s, HEADLINE_W, HEADLINE_P, guidance=1.0) for s in S_VALUES[1:]
        },
        "slerp, mean_mode exact": {s: bench.amdm(s, HEADLINE_W, HEADLINE_P, mean_mode="exact") for s in S_VALUES[1:]},
        "slerp, shared initial noise": {s: bench.amdm(s, HEADLINE_W, HEADLINE_P, shared_noise=True) for s in S_VALUES[1:]},
        "linear, shared initial noise": {
            s: bench.amdm(s, HEADLINE_W, HEADLINE_P, aggregation="linear", shared_noise=True) for s in S_VALUES[1:]
        },
    }
    wall = time.perf_counter() - t0
    return bench, baselines, grid, variants, wall


def report(samples, bench, baselines, grid, variants, wall):
    se = 100 * 0.5 / samples**0.5
    sig = bench.sigmas
    lines = [
        "# Control transfer: AMDM on a Gaussian mixture with known truth",
        "",
        "Generated by `bench/control_transfer.py` (`make bench`). Space 4x32x32; component (p, c) = blob at "
        f"position p (P = {POSITIONS}) in colour c (C = {COLOURS}; colours share a luminance channel), blob "
        f"radius {RADIUS:g} px, contrast {AMPLITUDE:g}, texture std {TAU:g}. Model A = exact denoiser conditioned on "
        "the position only, model B = on the colour only, each CFG-combined with the exact unconditional "
        f"denoiser at guidance {GUIDANCE:g} (the paper's cfg). {samples} samples per setting (every (p, c) target "
        f"equally often), T = {STEPS} Euler/DDIM steps on SD1.5's sigma table with ddim_uniform spacing "
        f"(sigma {float(sig[0]):.2f} -> {float(sig[-2]):.4f} -> 0); independent initial noise per branch; the same "
        f"targets and noises in every setting. Rates in %, standard error at most {se:.1f} points. Quality: RMS "
        f"distance per element from a sample to its nearest component mean (on-distribution: about {TAU:g}). "
        "w = weight of the aux branch (B), p = deviation step (VP units), s = aggregation steps "
        "(steps 1..s are aggregated; s = 0 is A alone).",
        "",
        f"Chance levels for 'both right': unconditional 1/{POSITIONS * COLOURS} = {pct(1 / (POSITIONS * COLOURS))}; "
        f"A alone 1/{COLOURS} = {pct(1 / COLOURS)} (colour by chance); B alone 1/{POSITIONS} = {pct(1 / POSITIONS)} "
        "(position by chance).",
        "",
        f"Aggregation step s covers sampling steps 1..s; at s = 20 the window ends at sigma "
        f"{float(sig[21]):.2f}, at s = 10 at {float(sig[11]):.2f}, at s = 5 at {float(sig[6]):.2f}.",
        "",
        f"## Headline (w = {HEADLINE_W}, p = {HEADLINE_P}, main A + aux B)",
        "",
    ]
    rows = [
        [name, pct(r["both"]), pct(r["position"]), pct(r["colour"]), f"{r['rms']:.3f}"]
        for name, r in baselines.items()
        if "guidance 1" not in name
    ]
    for aggregation in ("slerp", "linear"):
        for s in S_VALUES:
            r = grid[aggregation, HEADLINE_W, HEADLINE_P, s]
            rows.append([f"AMDM {aggregation}, s = {s}", pct(r["both"]), pct(r["position"]), pct(r["colour"]), f"{r['rms']:.3f}"])
    headline = markdown_table(["sampler", "both right %", "position right %", "colour right %", "RMS dist"], rows)
    lines += [headline, ""]

    for metric, title, fmt in (
        ("both", "Both attributes right (%)", pct),
        ("position", "Position right (%)", pct),
        ("colour", "Colour right (%)", pct),
        ("rms", "RMS distance to the nearest component", lambda v: f"{v:.3f}"),
    ):
        rows = [
            [aggregation, w, p] + [fmt(grid[aggregation, w, p, s][metric]) for s in S_VALUES]
            for aggregation in ("slerp", "linear")
            for w in W_VALUES
            for p in P_VALUES
        ]
        lines += [f"## {title}, full grid", "", markdown_table(["aggregation", "w", "p"] + [f"s = {s}" for s in S_VALUES], rows), ""]

    rows = [[name] + [f"{pct(v[s]['both'])} / {v[s]['rms']:.3f}" for s in S_VALUES[1:]] for name, v in variants.items()]
    bare = baselines["A alone, guidance 1"]
    lines += [
        f"## Variants (w = {HEADLINE_W}, p = {HEADLINE_P}): both right % / RMS distance",
        "",
        f"With guidance 1, A alone: {pct(bare['both'])} both right, RMS {bare['rms']:.3f}.",
        "",
        markdown_table(["variant"] + [f"s = {s}" for s in S_VALUES[1:]], rows),
        "",
        f"Wall time of all settings: {wall:.0f} s on one CPU thread.",
        "",
        "![control transfer](control_transfer.png)",
        "",
    ]
    return "\n".join(lines), headline


def plot(path, baselines, grid):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=512, help="samples per setting (>= 500 for the published table)")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "results"), help="output folder")
    args = parser.parse_args()
    start = time.perf_counter()
    bench, baselines, grid, variants, wall = run(args.samples)
    text, headline = report(args.samples, bench, baselines, grid, variants, wall)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "control_transfer.md"), "w") as f:
        f.write(text)
    plot(os.path.join(args.out, "control_transfer.png"), baselines, grid)
    print(headline)
    print(f"\nwrote {args.out}/control_transfer.md and .png; total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
