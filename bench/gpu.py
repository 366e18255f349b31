#!/usr/bin/env python
"""AMDM vs KSampler on an accelerator: time ratio and peak VRAM, with the branches sharing one UNet forward per
step and with their calls apart, side by side in one run.

An SD1.5-size UNet (model_channels 320, the real SD1.5 topology and parameter count) with seeded random
weights is built in-process (no files), fp16, ddim / ddim_uniform, cfg 7.5, random CLIP-shaped conditioning.
For every size (--sizes, default 512 and 1024) and schedule (--schedules, default T = 20 / s = 10 and
T = 50 / s = 20): KSampler, and the AMDM Aggregate Sampler with 2 and 3 branches (aux branches cloned from
the main model, i.e. one UNet in memory, as when InteractDiffusion and MIGC patch the same SD1.5 checkpoint),
each with shared forwards (the default) and with comfy_bridge.batching.SHARED_FORWARDS off. Every
configuration is warmed up, then all of a size and schedule run round-robin --repeats times; the fastest run
of each is reported. Model calls: per branch (cond+uncond batched); forwards: UNet forwards
(harness.runtime.UNetForwards). Goal: <= 1.15 x KSampler for N = 2, T = 20, s = 10 with shared forwards.

Self-contained: boots ComfyUI through harness.runtime like the tests; needs only torch and ComfyUI.

Run:  .venv/bin/python bench/gpu.py [--out bench/results/gpu_<card>.md]   # accelerator, SD1.5 size, fp16
      .venv/bin/python bench/gpu.py --tiny                                 # CPU smoke run: tiny UNet, fp32
"""
import argparse
import os
import sys
import tempfile
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from harness import runtime, tiny_models  # noqa: E402


def build_unet(channels, dtype, seed=0):
    """A ModelPatcher around an SD1.5 BaseModel of the given width with seeded random weights."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD15(tiny_models.tiny_unet_config(model_channels=channels))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({})
    tiny_models.init_weights_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def cond(seed):
    return [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(seed)), {}]]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_configuration(nodes, pack, branches, calls, size, steps, window, repeats, device):
    """{label: (fastest seconds, model calls, UNet forwards, peak MiB or None)} for one size and schedule."""
    on_cuda = device.type == "cuda"
    latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}
    sampler = pack.NODE_CLASS_MAPPINGS["AMDMAggregateSampler"]()
    batching = runtime.pack_module("comfy_bridge.batching")

    def ksampler():
        return nodes.KSampler().sample(branches[0], 1, steps, 7.5, "ddim", "ddim_uniform", cond(1), cond(2), latent)

    def amdm(n):
        optional = {}
        if n == 3:
            optional = {"model_3": branches[2], "positive_3": cond(5), "negative_3": cond(6), "cfg_3": 7.5,
                        "weight_3": 0.6}
        return sampler.sample(branches[0], cond(1), cond(2), branches[1], cond(3), cond(4), latent, 1, steps, 7.5,
                              7.5, "ddim", "ddim_uniform", 1.0, 0.5, window, "paper", 0.3, "reference",
                              "independent", **optional)

    runs = {"KSampler": (True, ksampler)}
    for n in (2, 3):
        for shared in (True, False):
            runs[f"AMDM N={n}, {'shared forwards' if shared else 'calls apart'}"] = (shared, lambda n=n: amdm(n))
    results = {label: [None, 0, 0, None] for label in runs}
    with torch.inference_mode():
        for shared, run in runs.values():
            batching.SHARED_FORWARDS = shared
            run()  # warm-up (model load, kernels, allocator)
        # Round-robin repeats, so that clock ramps and host noise hit every configuration alike.
        for _ in range(repeats):
            for label, (shared, run) in runs.items():
                batching.SHARED_FORWARDS = shared
                if on_cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                calls[0] = 0
                synchronize(device)
                with runtime.UNetForwards() as forwards:
                    start = time.perf_counter()
                    run()
                    synchronize(device)
                    elapsed = time.perf_counter() - start
                result = results[label]
                result[0] = elapsed if result[0] is None else min(result[0], elapsed)
                result[1], result[2] = calls[0], forwards.calls
                if on_cuda:
                    peak = torch.cuda.max_memory_allocated(device) / 2**20
                    result[3] = peak if result[3] is None else max(result[3], peak)
    batching.SHARED_FORWARDS = True
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny UNet, 64x64, fp32, T = 6 / s = 3")
    parser.add_argument("--sizes", default=None, help="image sizes in pixels (default 512,1024; tiny 64)")
    parser.add_argument("--schedules", default=None, help="T/s pairs (default 20/10,50/20; tiny 6/3)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", help="also write the report to this file")
    args = parser.parse_args()
    sizes = [int(v) for v in (args.sizes or ("64" if args.tiny else "512,1024")).split(",")]
    schedules = [tuple(int(v) for v in pair.split("/"))
                 for pair in (args.schedules or ("6/3" if args.tiny else "20/10,50/20")).split(",")]
    channels = 32 if args.tiny else 320

    runtime.boot(tempfile.mkdtemp(prefix="amdm_gpu_bench_"), cpu=args.tiny or not torch.cuda.is_available())
    import comfy.model_management
    import comfyui_version
    import nodes

    pack = runtime.load_pack()
    device = comfy.model_management.get_torch_device()
    on_cuda = device.type == "cuda"
    dtype = torch.float16 if on_cuda else torch.float32
    name = torch.cuda.get_device_name(device) if on_cuda else f"CPU ({torch.get_num_threads()} threads)"

    model = build_unet(channels, dtype)
    params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    calls = [0]

    def counted(patcher):
        clone = patcher.clone()

        def wrapper(apply_model, wrapper_args):
            calls[0] += 1
            return apply_model(wrapper_args["input"], wrapper_args["timestep"], **wrapper_args["c"])

        clone.set_model_unet_function_wrapper(wrapper)
        return clone

    branches = [counted(model), counted(model), counted(model)]
    lines = [f"# AMDM vs KSampler on {name}", "",
             f"torch {torch.__version__}, ComfyUI {comfyui_version.__version__}, UNet width {channels} "
             f"({params / 1e6:.0f} M parameters, random weights), {str(dtype).replace('torch.', '')}, ddim / "
             f"ddim_uniform, cfg 7.5, fastest of {args.repeats} round-robin runs after a warm-up.", "",
             "| size | T / s | run | model calls | UNet forwards | time (s) | time ratio | call ratio | "
             "peak VRAM (MiB) |", "|---|---|---|---|---|---|---|---|---|"]
    for size in sizes:
        for steps, window in schedules:
            results = run_configuration(nodes, pack, branches, calls, size, steps, window, args.repeats, device)
            base_time, base_calls = results["KSampler"][0], results["KSampler"][1]
            for label, (elapsed, model_calls, forwards, peak) in results.items():
                peak = f"{peak:.0f}" if peak is not None else "n/a (CPU)"
                lines.append(f"| {size}x{size} | {steps} / {window} | {label} | {model_calls} | {forwards} | "
                             f"{elapsed:.3f} | {elapsed / base_time:.3f} | {model_calls / base_calls:.3f} | {peak} |")
            print("\n".join(lines[-len(results):]), flush=True)
    report = "\n".join(lines)
    print()
    print(report)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(report + "\n")


if __name__ == "__main__":
    main()
