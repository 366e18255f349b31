#!/usr/bin/env python
"""What AMDM costs on top of ComfyUI's KSampler, measured side by side in one run (CPU).

1. Time: AMDM Aggregate Sampler with N = 2 and 3 branches vs KSampler, T = 20 steps, s = 10, ddim /
   ddim_uniform, the tiny SD1.5-shaped UNet (harness/tiny_models.py), aux branches cloned from the main
   model with their own conditioning. AMDM makes T + (N - 1)(s + 1) UNet calls (counted here with a
   model wrapper), so the time ratio should equal that call ratio; the target is
   time ratio <= 1.05 x call ratio. The reference implementation runs every branch for all T steps
   (N * T calls); its ratio N is printed for comparison. Ratios use the fastest of --repeats
   interleaved runs (the least disturbed by other processes) and, for reference, the medians.
2. Weight sharing: three branches cloned from ONE checkpoint (CheckpointLoaderSimple on a generated
   tiny SD1.5 file), each with its own attn2 patch: the distinct parameter storages of the three
   branches' UNets are counted after an AMDM run (1 x one UNet's = one copy of the weights).
3. Peak memory: two child processes, each booting ComfyUI, building a wider random UNet
   (model_channels --probe-channels, weights dominate) and running either KSampler or AMDM with 3 branches
   cloned from it; the growth of the peak RSS over the boot peak is compared (target <= 1.2 x).

Run: .venv/bin/python bench/sampler_overhead.py [--repeats 3] [--size 32]
Writes bench/results/sampler_overhead.md.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from harness import runtime, tiny_models  # noqa: E402

STEPS, WINDOW = 20, 10
TIME_TARGET, MEMORY_TARGET = 1.05, 1.2


def boot(threads=1):
    base = tempfile.mkdtemp(prefix="amdm_bench_")
    runtime.boot(base, threads=threads)
    tiny_models.register_tiny_sd15()
    import nodes

    return nodes, runtime.load_pack(), base


def cond(seed):
    return [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(seed)), {}]]


def ksampler(nodes, model, latent, steps=STEPS):
    return nodes.KSampler().sample(model, 1, steps, 7.5, "ddim", "ddim_uniform", cond(1), cond(2), latent)[0]


def amdm(pack, models, latent, steps=STEPS, window=WINDOW):
    """models[0] is the main branch; 2 or 3 branches."""
    optional = {}
    if len(models) > 2:
        optional = {"model_3": models[2], "positive_3": cond(5), "negative_3": cond(6), "cfg_3": 7.5, "weight_3": 0.6}
    node = pack.NODE_CLASS_MAPPINGS["AMDMAggregateSampler"]()
    return node.sample(models[0], cond(1), cond(2), models[1], cond(3), cond(4), latent, 1, steps, 7.5, 7.5, "ddim",
                       "ddim_uniform", 1.0, 0.5, window, "paper", 0.3, "reference", "independent", **optional)[0]


def counting_clone(patcher, counter):
    """counter = [UNet calls, seconds inside UNet calls]."""
    clone = patcher.clone()

    def wrapper(apply_model, args):
        start = time.perf_counter()
        try:
            return apply_model(args["input"], args["timestep"], **args["c"])
        finally:
            counter[0] += 1
            counter[1] += time.perf_counter() - start

    clone.set_model_unet_function_wrapper(wrapper)
    return clone


def measure_time(nodes, pack, size, repeats):
    model = tiny_models.tiny_model_patcher(seed=0)
    counter = [0, 0.0]
    main = counting_clone(model, counter)
    branches = [main, counting_clone(model, counter), counting_clone(model, counter)]
    latent = {"samples": torch.zeros(1, 4, size, size)}
    runs = {"KSampler": lambda: ksampler(nodes, main, latent),
            "AMDM N=2": lambda: amdm(pack, branches[:2], latent),
            "AMDM N=3": lambda: amdm(pack, branches, latent)}
    times = {name: [] for name in runs}
    outside = {name: [] for name in runs}  # wall time not spent in UNet calls
    calls = {}
    with torch.inference_mode():
        for run in runs.values():  # warm-up: first loads, allocator growth
            run()
        for _ in range(repeats):
            for name, run in runs.items():
                counter[0], counter[1] = 0, 0.0
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
                outside[name].append(times[name][-1] - counter[1])
                calls[name] = counter[0]
    rows = []
    for name, branch_count in (("AMDM N=2", 2), ("AMDM N=3", 3)):
        call_ratio = (STEPS + (branch_count - 1) * (WINDOW + 1)) / STEPS
        assert calls[name] == STEPS * call_ratio and calls["KSampler"] == STEPS, calls
        best = min(times[name]) / min(times["KSampler"])
        median = statistics.median(times[name]) / statistics.median(times["KSampler"])
        rows.append({"run": name, "calls": calls[name], "call_ratio": call_ratio, "time_ratio": best,
                     "median_ratio": median, "margin": best / call_ratio, "reference_ratio": branch_count,
                     "outside_ms": 1000 * min(outside[name]) / STEPS})
    return times, calls, rows, 1000 * min(outside["KSampler"]) / STEPS


def count_storages(nodes, pack, base):
    """Three branches cloned from one loaded checkpoint, each with its own attn2 patch."""
    name = "tiny_sd15.safetensors"
    tiny_models.write_tiny_checkpoint(os.path.join(base, "models", "checkpoints", name))
    model = nodes.CheckpointLoaderSimple().load_checkpoint(name)[0]
    patch_calls = []

    def recording_patch(tag):
        def attn2(q, k, v, extra_options):
            patch_calls.append(tag)
            return q, k, v
        return attn2

    branches = []
    for tag in range(3):
        clone = model.clone()
        clone.set_model_attn2_patch(recording_patch(tag))
        branches.append(clone)
    with torch.inference_mode():
        amdm(pack, branches, {"samples": torch.zeros(1, 4, 8, 8)}, steps=4, window=2)
    assert sorted(set(patch_calls)) == [0, 1, 2], "not every branch ran its patch"

    def storages(patchers):
        return {p.untyped_storage().data_ptr() for b in patchers for p in b.model.diffusion_model.parameters()}

    return len(storages(branches)), len(storages(branches[:1]))


class PeakRSS:
    """Samples this process's resident set size (/proc/self/statm) every 2 ms; `growth` = peak - start, MiB."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self.current()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def current(self):
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.current())
            time.sleep(0.002)

    def stop(self):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.current())
        return (self.peak - self.start) / 2**20


def probe(kind, channels, size, threads):
    """Child process: peak RSS growth (MiB) from just before the UNet is built to the end of one run."""
    nodes, pack, _ = boot(threads)
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    rss = PeakRSS()
    config = comfy.supported_models.SD15(tiny_models.tiny_unet_config(model_channels=channels))
    config.set_inference_dtype(torch.float32, None)
    base_model = config.get_model({})
    tiny_models.init_weights_(base_model.diffusion_model, seed=0)
    device = comfy.model_management.get_torch_device()
    model = comfy.model_patcher.ModelPatcher(base_model, load_device=device, offload_device=device)
    latent = {"samples": torch.zeros(1, 4, size, size)}
    with torch.inference_mode():
        if kind == "ksampler":
            ksampler(nodes, model, latent, steps=4)
        else:
            amdm(pack, [model, model.clone(), model.clone()], latent, steps=4, window=2)
    growth = rss.stop()
    weights = sum(p.numel() * p.element_size() for p in base_model.diffusion_model.parameters())
    print(json.dumps({"growth_mib": growth, "weights_mib": weights / 2**20}))


def measure_memory(channels, size, threads):
    results = {}
    for kind in ("ksampler", "amdm3"):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--probe", kind, "--probe-channels",
                              str(channels), "--size", str(size), "--threads", str(threads)],
                             capture_output=True, text=True, check=True)
        results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least disturbed by other load)")
    parser.add_argument("--size", type=int, default=32, help="latent size (pixels / 8)")
    parser.add_argument("--probe-channels", type=int, default=128, help="UNet width of the memory probes")
    parser.add_argument("--probe", choices=["ksampler", "amdm3"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        return probe(args.probe, args.probe_channels, args.size, args.threads)

    nodes, pack, base = boot(args.threads)
    times, calls, rows, ksampler_outside = measure_time(nodes, pack, args.size, args.repeats)
    shared, single = count_storages(nodes, pack, base)
    memory = measure_memory(args.probe_channels, args.size, args.threads)
    memory_ratio = memory["amdm3"]["growth_mib"] / memory["ksampler"]["growth_mib"]

    lines = [
        "# AMDM sampler overhead (CPU)",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); tiny SD1.5-shaped UNet, latent "
        f"{args.size}x{args.size}, T = {STEPS}, s = {WINDOW}, ddim / ddim_uniform; {args.repeats} interleaved repeats.",
        "",
        f"KSampler: {calls['KSampler']} UNet calls, fastest {min(times['KSampler']):.3f} s "
        f"(median {statistics.median(times['KSampler']):.3f} s)",
        "",
        "| run | UNet calls | call ratio (T+(N-1)(s+1))/T | time ratio (fastest) | time ratio (median) | "
        "time / call ratio (target <= 1.05) | reference code's ratio (N*T)/T | time outside UNet calls per step |",
        "|---|---|---|---|---|---|---|---|",
        f"| KSampler | {calls['KSampler']} | 1.00 | 1.000 | 1.000 | - | 1.00 | {ksampler_outside:.2f} ms |",
    ]
    for row in rows:
        verdict = "ok" if row["margin"] <= TIME_TARGET else "OVER"
        lines.append(f"| {row['run']} | {row['calls']} | {row['call_ratio']:.2f} | {row['time_ratio']:.3f} | "
                     f"{row['median_ratio']:.3f} | {row['margin']:.3f} {verdict} | {row['reference_ratio']:.2f} | "
                     f"{row['outside_ms']:.2f} ms |")
    lines += [
        "",
        f"Weight sharing: three branches cloned from one checkpoint use {shared} parameter storages; one UNet has "
        f"{single} -> {shared / single:.2f} copies of the UNet weights.",
        "",
        f"Peak memory (child processes, UNet width {args.probe_channels}, weights "
        f"{memory['ksampler']['weights_mib']:.0f} MiB): KSampler +{memory['ksampler']['growth_mib']:.0f} MiB, "
        f"AMDM with 3 branches +{memory['amdm3']['growth_mib']:.0f} MiB -> ratio {memory_ratio:.3f} "
        f"({'ok' if memory_ratio <= MEMORY_TARGET else 'OVER'}, target <= {MEMORY_TARGET}).",
    ]
    report = "\n".join(lines)
    print(report)
    os.makedirs(os.path.join(REPO_ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(REPO_ROOT, "bench", "results", "sampler_overhead.md"), "w") as fh:
        fh.write(report + "\n")


if __name__ == "__main__":
    main()
