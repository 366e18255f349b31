#!/usr/bin/env python
"""What AMDM costs on top of ComfyUI's KSampler, measured side by side in one run (CPU).

1. Time: AMDM Aggregate Sampler with N = 2 and 3 branches vs KSampler, T = 20 steps, s = 10, ddim /
   ddim_uniform, the tiny SD1.5-shaped UNet (harness/tiny_models.py), aux branches cloned from the main
   model with their own conditioning; each run with the branches sharing one UNet forward per step
   (the default) and with every branch's calls run apart (comfy_bridge.batching.SHARED_FORWARDS off).
   AMDM makes T + (N - 1)(s + 1) model calls (counted per branch with a model wrapper) in T forwards when
   they share one (counted with harness.runtime.UNetForwards). Driving every branch's sampler in lockstep
   should cost nothing beyond its calls: target time / call ratio <= 1.05 with the calls apart. On a CPU a
   forward over N branches' rows costs about N forwards; on a GPU it costs about one (bench/gpu.py). Ratios
   use the fastest of --repeats interleaved runs (the least disturbed by other processes) and, for
   reference, the medians.
2. The shipped InteractDiffusion + MIGC workflow (workflows/amdm_interactdiffusion_migc.json, 50 steps,
   s = 20, at 1/4 of its image size on tiny stand-ins of its model files): its UNet forwards and wall time,
   shared and apart.
3. Weight sharing: three branches cloned from ONE checkpoint (CheckpointLoaderSimple on a generated
   tiny SD1.5 file), each with its own attn2 patch: the distinct parameter storages of the three
   branches' UNets are counted after an AMDM run (1 x one UNet's = one copy of the weights).
4. Peak memory: two child processes, each booting ComfyUI, building a wider random UNet
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
WORKFLOW = "amdm_interactdiffusion_migc.json"


def boot(threads=1):
    base = tempfile.mkdtemp(prefix="amdm_bench_")
    runtime.boot(base, threads=threads)
    tiny_models.register_tiny_sd15()
    import nodes

    return nodes, runtime.load_pack(), base


def shared_forwards(on):
    """Turn the branches' shared forwards on or off (comfy_bridge.batching.SHARED_FORWARDS)."""
    runtime.pack_module("comfy_bridge.batching").SHARED_FORWARDS = on


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
    """A clone whose model calls (one per branch and evaluation, cond and uncond together) are counted."""
    clone = patcher.clone()

    def wrapper(apply_model, args):
        counter[0] += 1
        return apply_model(args["input"], args["timestep"], **args["c"])

    clone.set_model_unet_function_wrapper(wrapper)
    return clone


def measure_time(nodes, pack, size, repeats):
    model = tiny_models.tiny_model_patcher(seed=0)
    calls = [0]
    branches = [counting_clone(model, calls) for _ in range(3)]
    latent = {"samples": torch.zeros(1, 4, size, size)}
    runs = {"KSampler": (True, lambda: ksampler(nodes, branches[0], latent))}
    for n in (2, 3):
        for shared in (True, False):
            runs[f"AMDM N={n}, {'shared forwards' if shared else 'calls apart'}"] = (
                shared, lambda n=n: amdm(pack, branches[:n], latent))
    times = {name: [] for name in runs}
    counts = {}
    with torch.inference_mode():
        for shared, run in runs.values():  # warm-up: first loads, allocator growth
            shared_forwards(shared)
            run()
        for _ in range(repeats):
            for name, (shared, run) in runs.items():
                shared_forwards(shared)
                calls[0] = 0
                with runtime.UNetForwards() as forwards:
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
                counts[name] = (calls[0], forwards.calls)
    shared_forwards(True)
    rows = []
    for name in runs:
        if name == "KSampler":
            continue
        branch_count = int(name.split("N=")[1][0])
        call_ratio = (STEPS + (branch_count - 1) * (WINDOW + 1)) / STEPS
        model_calls, unet_forwards = counts[name]
        assert model_calls == STEPS * call_ratio, (name, counts[name])
        assert unet_forwards == (STEPS if "shared" in name else model_calls), (name, counts[name])
        best = min(times[name]) / min(times["KSampler"])
        median = statistics.median(times[name]) / statistics.median(times["KSampler"])
        rows.append({"run": name, "calls": model_calls, "forwards": unet_forwards, "call_ratio": call_ratio,
                     "time_ratio": best, "median_ratio": median, "margin": best / call_ratio,
                     "reference_ratio": branch_count})
    return times, counts, rows


def measure_workflow(base):
    """The shipped workflow at 1/4 of its size on tiny stand-ins: (UNet forwards, wall seconds), shared and
    apart, each the faster of two runs."""
    import nodes

    from harness.executor import run_graph
    from harness.workflow_api import scale_workflow, ui_to_api
    from harness.workflow_files import expected_files, stage_files

    def input_types(class_type):
        return nodes.NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()

    with open(os.path.join(REPO_ROOT, "workflows", WORKFLOW)) as fh:
        workflow = scale_workflow(json.load(fh), input_types, 4)
    stage_files(base, expected_files([workflow], input_types),
                tiny_models.write_tiny_checkpoint(os.path.join(base, "tiny_sd15.safetensors")))
    prompt = ui_to_api(workflow, input_types)
    results = {}
    for shared in (True, False, True, False):
        shared_forwards(shared)
        for node in prompt.values():  # a new seed each run: the executor would replay a cached graph
            if "seed" in node["inputs"]:
                node["inputs"]["seed"] += 1
        with runtime.UNetForwards() as forwards:
            start = time.perf_counter()
            run_graph(prompt)
            wall = time.perf_counter() - start
        best = results.get(shared, (forwards.calls, wall))
        results[shared] = (forwards.calls, min(wall, best[1]))
    shared_forwards(True)
    return results


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
    times, counts, rows = measure_time(nodes, pack, args.size, args.repeats)
    workflow = measure_workflow(base)
    shared, single = count_storages(nodes, pack, base)
    memory = measure_memory(args.probe_channels, args.size, args.threads)
    memory_ratio = memory["amdm3"]["growth_mib"] / memory["ksampler"]["growth_mib"]

    lines = [
        "# AMDM sampler overhead (CPU)",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); tiny SD1.5-shaped UNet, latent "
        f"{args.size}x{args.size}, T = {STEPS}, s = {WINDOW}, ddim / ddim_uniform; {args.repeats} interleaved repeats.",
        "",
        f"KSampler: {counts['KSampler'][0]} model calls, {counts['KSampler'][1]} UNet forwards, fastest "
        f"{min(times['KSampler']):.3f} s (median {statistics.median(times['KSampler']):.3f} s)",
        "",
        "| run | model calls | UNet forwards | call ratio (T+(N-1)(s+1))/T | time ratio (fastest) | time ratio (median) "
        "| time / call ratio (target <= 1.05 apart) | reference code's ratio (N*T)/T |",
        "|---|---|---|---|---|---|---|---|",
        f"| KSampler | {counts['KSampler'][0]} | {counts['KSampler'][1]} | 1.00 | 1.000 | 1.000 | - | 1.00 |",
    ]
    for row in rows:
        verdict = "" if "shared" in row["run"] else (" ok" if row["margin"] <= TIME_TARGET else " OVER")
        lines.append(f"| {row['run']} | {row['calls']} | {row['forwards']} | {row['call_ratio']:.2f} | "
                     f"{row['time_ratio']:.3f} | {row['median_ratio']:.3f} | {row['margin']:.3f}{verdict} | "
                     f"{row['reference_ratio']:.2f} |")
    (shared_forwards_count, shared_wall), (apart_count, apart_wall) = workflow[True], workflow[False]
    lines += [
        "",
        f"Shipped workflow `{WORKFLOW}` (main InteractDiffusion + aux MIGC, T = 50, s = 20, plus a side-output "
        f"KSampler of the main branch; 1/4 size, tiny stand-ins): {shared_forwards_count} UNet forwards with shared "
        f"forwards, {apart_count} apart; wall {shared_wall:.2f} s vs {apart_wall:.2f} s (ratio "
        f"{shared_wall / apart_wall:.3f}).",
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
