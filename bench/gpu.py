#!/usr/bin/env python
"""AMDM vs KSampler on an accelerator: it/s and peak VRAM, side by side in one run.

An SD1.5-size UNet (model_channels 320, the real SD1.5 topology and parameter count) with seeded random
weights is built in-process (no files), fp16, 512x512 (64x64 latent), T = 20, s = 10, ddim / ddim_uniform,
cfg 7.5, random CLIP-shaped conditioning. Runs: KSampler, AMDM Aggregate Sampler with 2 and 3 branches
(aux branches cloned from the main model, i.e. one UNet in memory, as when InteractDiffusion and MIGC
patch the same SD1.5 checkpoint). Every configuration is warmed up, then all run round-robin --repeats
times; the fastest run of each is reported. it/s counts sampling steps (T per run); calls/s counts UNet calls
(cond+uncond batched).

Self-contained: boots ComfyUI through harness.runtime like the tests; needs only torch and ComfyUI.

Run:  .venv/bin/python bench/gpu.py            # accelerator, SD1.5 size, fp16
      .venv/bin/python bench/gpu.py --tiny     # CPU smoke run: tiny UNet (width 32), 64x64, fp32
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny UNet, 64x64, fp32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--window", type=int, default=10, help="aggregation steps s")
    parser.add_argument("--size", type=int, default=None, help="image size in pixels (default 512, tiny 64)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    size = args.size or (64 if args.tiny else 512)
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
    latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}
    calls = [0]

    def counted(patcher):
        clone = patcher.clone()

        def wrapper(apply_model, wrapper_args):
            calls[0] += 1
            return apply_model(wrapper_args["input"], wrapper_args["timestep"], **wrapper_args["c"])

        clone.set_model_unet_function_wrapper(wrapper)
        return clone

    branches = [counted(model), counted(model), counted(model)]
    sampler = pack.NODE_CLASS_MAPPINGS["AMDMAggregateSampler"]()

    def ksampler():
        return nodes.KSampler().sample(branches[0], 1, args.steps, 7.5, "ddim", "ddim_uniform", cond(1), cond(2),
                                       latent)

    def amdm(n):
        optional = {}
        if n == 3:
            optional = {"model_3": branches[2], "positive_3": cond(5), "negative_3": cond(6), "cfg_3": 7.5,
                        "weight_3": 0.6}
        return sampler.sample(branches[0], cond(1), cond(2), branches[1], cond(3), cond(4), latent, 1, args.steps, 7.5,
                              7.5, "ddim", "ddim_uniform", 1.0, 0.5, args.window, "paper", 0.3, "reference",
                              "independent", **optional)

    runs = {"KSampler": ksampler, "AMDM N=2": lambda: amdm(2), "AMDM N=3": lambda: amdm(3)}
    results = {label: {"time": None, "calls": 0, "peak": None} for label in runs}
    with torch.inference_mode():
        for run in runs.values():
            run()  # warm-up (model load, kernels, allocator)
        # Round-robin repeats, so that clock ramps and host noise hit every configuration alike.
        for _ in range(args.repeats):
            for label, run in runs.items():
                if on_cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                calls[0] = 0
                synchronize(device)
                start = time.perf_counter()
                run()
                synchronize(device)
                elapsed = time.perf_counter() - start
                result = results[label]
                result["time"] = elapsed if result["time"] is None else min(result["time"], elapsed)
                result["calls"] = calls[0]
                if on_cuda:
                    peak = torch.cuda.max_memory_allocated(device) / 2**20
                    result["peak"] = peak if result["peak"] is None else max(result["peak"], peak)

    base = results["KSampler"]
    print(f"# AMDM vs KSampler on {name}")
    print()
    print(f"torch {torch.__version__}, ComfyUI {comfyui_version.__version__}, UNet width {channels} "
          f"({params / 1e6:.0f} M parameters, random weights), {str(dtype).replace('torch.', '')}, {size}x{size} "
          f"(latent {size // 8}x{size // 8}), T = {args.steps}, s = {args.window}, ddim / ddim_uniform, cfg 7.5, "
          f"fastest of {args.repeats} round-robin runs after a warm-up.")
    print()
    print("| run | UNet calls | time (s) | it/s | UNet calls/s | time ratio | call ratio | peak VRAM (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, result in results.items():
        peak = f"{result['peak']:.0f}" if result["peak"] is not None else "n/a (CPU)"
        print(f"| {label} | {result['calls']} | {result['time']:.3f} | {args.steps / result['time']:.2f} | "
              f"{result['calls'] / result['time']:.2f} | {result['time'] / base['time']:.3f} | "
              f"{result['calls'] / base['calls']:.3f} | {peak} |")


if __name__ == "__main__":
    main()
