#!/usr/bin/env python
"""LoRAs on AMDM branches under ComfyUI 0.33's dynamic VRAM (its default loader on NVIDIA GPUs) against the
same runs with --disable-dynamic-vram: results and times side by side, one markdown table (CUDA).

The check behind lifting the refusal of comfy_bridge/branches.py (DYNAMIC_VRAM_SWITCH_VERIFIED): each
leg is a child process that starts ComfyUI as `python main.py` does (harness/runtime.py `boot_main`:
main.py's own startup, so the dynamic leg gets ModelPatcherDynamic exactly where a user gets it, and the
classic leg passes --disable-dynamic-vram), lifts the refusal for its own run, loads one SD1.5-size UNet
with seeded random weights through UNETLoader (fp16 on the GPU) and two kohya-layout LoRAs
(harness/tiny_lora.py, rank 16) through LoraLoaderModelOnly, and runs the AMDM Aggregate Sampler (N = 2,
T = 20, s = 10, euler / normal, 512x512) with:
- equal patches (two clones, no LoRA),
- a LoRA on one branch (the aux branch),
- different LoRAs on both branches,
warmed up, then --repeats round-robin runs, the fastest reported. Per leg and case: time, time ratio to
equal patches, ComfyUI `partially_load` calls per run, peak VRAM, whether the repeats gave identical
latents. Checked on the dynamic leg: the switch that marks only the LoRA'd layers stale gives the same
latents as ComfyUI's own whole-model switch (every layer stale), run in the same process; and KSampler
on each branch's model gives the same latent before and after the AMDM runs (nothing left patched or
stale). Across legs: dynamic vs classic latents, within fp16 tolerance: for a LoRA case the difference
must stay under 5 % of the LoRA's effect (the classic leg's difference to equal patches), for equal
patches under 1e-3 of the latent's largest value. Pinned host memory growth over the runs is printed.

Run (about 3 minutes on an H100; needs ComfyUI 0.33.0 at COMFYUI_PATH with its Python requirements,
comfy-aimdo included; writes the UNet file, 1.7 GB, to a temp folder):
    COMFYUI_PATH=.runtimes/comfyui-0.33.0 python3 bench/gpu_dynamic_vram.py --out bench/results/gpu_dynamic_vram.md
    COMFYUI_PATH=.runtimes/comfyui-0.33.0 .venv-0.33/bin/python bench/gpu_dynamic_vram.py --tiny
        # CPU smoke run of the whole script: tiny UNet, both legs the classic loader (no CPU has the other)
Exit status 0 only when every check passed.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from harness import runtime  # noqa: E402  (imports no torch: each leg starts ComfyUI before torch loads)

LEG_ARGS = {"classic": ["--disable-dynamic-vram"], "dynamic": []}
CASES = ("equal patches", "LoRA on one branch", "different LoRAs on both")
STEPS, WINDOW, SEED = 20, 10, 1
LORA_RANK, LORA_STRENGTH = 16, 0.1
EFFECT_SHARE, EQUAL_SHARE, SAME_SWITCH_SHARE = 0.05, 1e-3, 1e-3


def write_models(folder_paths, channels):
    """The UNet (models/diffusion_models) and two LoRAs (models/loras) of width `channels`, once."""
    import safetensors.torch
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    import comfy.ops

    from harness import tiny_lora, tiny_models

    unet_file = f"amdm_sd15_random_{channels}.safetensors"
    path = os.path.join(folder_paths.models_dir, "diffusion_models", unet_file)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        unet = UNetModel(**tiny_models.tiny_unet_config(model_channels=channels), dtype=torch.float32,
                         operations=comfy.ops.disable_weight_init)
        state = tiny_models.init_weights_(unet, seed=0).state_dict()
        safetensors.torch.save_file({k: v.half().contiguous() for k, v in state.items()}, path + ".partial")
        os.replace(path + ".partial", path)
    folder = os.path.join(folder_paths.models_dir, "loras")
    loras = [tiny_lora.write_sd15_lora(os.path.join(folder, f"amdm_{kind}_{channels}.safetensors"), seed=seed,
                                       model_channels=channels, rank=LORA_RANK, strength=LORA_STRENGTH)
             for seed, kind in ((1, "style"), (2, "character"))]
    return unet_file, loras


class CallCounter:
    """Counts `partially_load` calls of every ModelPatcher class (ModelPatcherDynamic overrides it)."""

    def __init__(self, classes):
        self.calls = 0
        for cls in classes:
            original = cls.__dict__["partially_load"]
            setattr(cls, "partially_load", self._counting(original))

    def _counting(self, original):
        def counted(patcher, *args, **kwargs):
            self.calls += 1
            return original(patcher, *args, **kwargs)
        return counted


def run_leg(leg, base, args):
    """One ComfyUI process: the runs of every case; writes latents and measurements to args.result."""
    runtime.boot_main(base, LEG_ARGS[leg] + (["--cpu"] if args.tiny else []))
    import comfy.model_management
    import comfy.model_patcher
    import comfyui_version
    import folder_paths
    import nodes
    import torch

    from harness import tiny_models

    pack = runtime.load_pack()
    branches = runtime.pack_module("comfy_bridge.branches")
    branches.DYNAMIC_VRAM_SWITCH_VERIFIED = True  # this check's own process; users keep the refusal
    channels, size = (tiny_models.TINY_MODEL_CHANNELS, 64) if args.tiny else (320, 512)
    if args.tiny:
        tiny_models.register_tiny_sd15()
    unet_file, loras = write_models(folder_paths, channels)
    model = nodes.UNETLoader().load_unet(unet_file, "default")[0]
    if not hasattr(model, "is_dynamic"):
        raise SystemExit(f"ComfyUI {comfyui_version.__version__} has no dynamic VRAM: run this check on 0.33.0")
    if leg == "dynamic" and not args.tiny and not model.is_dynamic():
        raise SystemExit(f"dynamic VRAM is not active (UNETLoader gave a {type(model).__name__}): this check needs "
                         "an NVIDIA GPU, torch >= 2.8 and a working comfy-aimdo")
    device = comfy.model_management.get_torch_device()

    def lora(patcher, name):
        return nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, name, 1.0)[0]

    def cond(seed):
        return [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(seed)), {}]]

    def latent():
        return {"samples": torch.zeros(1, 4, size // 8, size // 8)}

    sampler = pack.NODE_CLASS_MAPPINGS["AMDMAggregateSampler"]()

    def amdm(main, aux):
        return sampler.sample(main, cond(1), cond(2), aux, cond(3), cond(4), latent(), SEED, STEPS, 7.5, 7.5, "euler",
                              "normal", 1.0, 0.5, WINDOW, "paper", 0.3, "auto", "independent")[0]["samples"].float()

    def ksampler(patcher):
        return nodes.KSampler().sample(patcher, SEED, STEPS, 7.5, "euler", "normal", cond(1), cond(2),
                                       latent())[0]["samples"].float()

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    style, character = lora(model, loras[0]), lora(model, loras[1])
    setups = {"equal patches": (model, model.clone()), "LoRA on one branch": (model, style),
              "different LoRAs on both": (character, style)}
    counter = CallCounter({cls for cls in (comfy.model_patcher.ModelPatcher, type(model))
                           if "partially_load" in cls.__dict__})
    report = {"leg": leg, "patcher": type(model).__name__, "comfyui": comfyui_version.__version__,
              "torch": str(torch.__version__), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "CPU", "unet_width": channels, "size": size, "dtype": str(model.model_dtype()), "cases": {}}
    latents = {}
    with torch.inference_mode():
        before = {name: ksampler(m) for name, m in (("main", model), ("style", style), ("character", character))}
        pinned_before = comfy.model_management.TOTAL_PINNED_MEMORY
        for case, (main, aux) in setups.items():
            latents[case] = amdm(main, aux)  # warm-up
            report["cases"][case] = {"time": float("inf"), "repeatable": True, "peak_mib": None}
        for _ in range(args.repeats):
            for case, (main, aux) in setups.items():
                measured = report["cases"][case]
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                counter.calls = 0
                synchronize()
                start = time.perf_counter()
                result = amdm(main, aux)
                synchronize()
                measured["time"] = min(measured["time"], time.perf_counter() - start)
                measured["partially_load"] = counter.calls
                measured["repeatable"] &= bool(torch.equal(result, latents[case]))
                if device.type == "cuda":
                    measured["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        report["pinned_growth_mib"] = (comfy.model_management.TOTAL_PINNED_MEMORY - pinned_before) / 2**20
        if model.is_dynamic():
            # ComfyUI's own clone switch at every switch (every layer stale) as the reference of _DynamicSwitch.
            targeted = branches._DynamicSwitch
            branches._DynamicSwitch = lambda keys: branches._Repatching()
            try:
                for case in CASES[1:]:
                    whole = amdm(*setups[case])
                    report["cases"][case]["vs_whole_model_switch"] = float((whole - latents[case]).abs().max())
            finally:
                branches._DynamicSwitch = targeted
        after = {name: ksampler(m) for name, m in (("main", model), ("style", style), ("character", character))}
        report["ksampler_change"] = max(float((before[k] - after[k]).abs().max()) for k in before)
    torch.save({"report": report, "latents": latents}, args.result)


def compare(results, out_path):
    """The markdown table over both legs; returns whether every check passed."""
    classic, dynamic = results["classic"], results["dynamic"]
    equal = classic["latents"]["equal patches"]
    lines = [
        f"# LoRAs on AMDM branches: dynamic VRAM vs --disable-dynamic-vram on {dynamic['report']['device']}",
        "",
        f"ComfyUI {dynamic['report']['comfyui']}, torch {dynamic['report']['torch']}; loaders: dynamic leg "
        f"{dynamic['report']['patcher']}, classic leg {classic['report']['patcher']}. SD1.5-topology UNet of width "
        f"{dynamic['report']['unet_width']} (random weights, {dynamic['report']['dtype']}), "
        f"{dynamic['report']['size']}x{dynamic['report']['size']}, kohya-layout LoRAs (192 layers, rank "
        f"{LORA_RANK}), N = 2, T = {STEPS}, s = {WINDOW}, euler / normal; fastest of the round-robin runs after "
        "a warm-up.",
        "",
        "| case | leg | time (s) | time ratio to equal patches | `partially_load` per run | torch peak VRAM (MiB) | "
        "repeats identical | max abs diff dynamic vs classic | tolerance | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    passed = True
    for case in CASES:
        difference = float((dynamic["latents"][case] - classic["latents"][case]).abs().max())
        if case == "equal patches":
            tolerance = EQUAL_SHARE * float(equal.abs().max())
        else:
            tolerance = EFFECT_SHARE * float((classic["latents"][case] - equal).abs().max())
        for leg, result in (("dynamic", dynamic), ("classic", classic)):
            measured = result["report"]["cases"][case]
            base = result["report"]["cases"]["equal patches"]["time"]
            peak = "n/a" if measured["peak_mib"] is None else f"{measured['peak_mib']:.0f}"
            ok = measured["repeatable"] and (leg == "classic" or (0 < tolerance and difference <= tolerance))
            passed &= ok
            cells = (f"{difference:.3g}", f"{tolerance:.3g}") if leg == "dynamic" else ("", "")
            lines.append(f"| {case} | {leg} | {measured['time']:.3f} | {measured['time'] / base:.3f} | "
                         f"{measured['partially_load']} | {peak} | {'yes' if measured['repeatable'] else 'NO'} | "
                         f"{cells[0]} | {cells[1]} | {'ok' if ok else 'FAILED'} |")
    lines.append("")
    for leg, result in (("dynamic", dynamic), ("classic", classic)):
        report = result["report"]
        unchanged = report["ksampler_change"] == 0
        passed &= unchanged
        lines.append(f"- {leg} leg: KSampler on each branch's model after the AMDM runs "
                     f"{'unchanged' if unchanged else 'CHANGED by up to %.3g' % report['ksampler_change']}; "
                     f"pinned host memory grew by {report['pinned_growth_mib']:.0f} MiB.")
    for case in CASES[1:]:
        whole = dynamic["report"]["cases"][case].get("vs_whole_model_switch")
        if whole is None:
            lines.append(f"- {case}: no dynamic patcher in this run (CPU smoke run), nothing to compare with "
                         "ComfyUI's whole-model switch.")
            continue
        limit = SAME_SWITCH_SHARE * float((classic["latents"][case] - equal).abs().max())
        passed &= whole <= limit
        lines.append(f"- {case}: LoRA'd layers marked stale vs ComfyUI's whole-model switch, same process: max abs "
                     f"diff {whole:.3g} (limit {limit:.3g}) {'ok' if whole <= limit else 'FAILED'}.")
    lines += ["", f"All checks {'passed' if passed else 'FAILED'}."]
    print("\n".join(lines))
    if out_path:
        with open(out_path, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return passed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="also write the table to this file (e.g. bench/results/gpu_dynamic_vram.md)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny UNet, 64x64, both legs classic")
    parser.add_argument("--leg-timeout", type=int, default=240, help="seconds each leg may run")
    parser.add_argument("--leg", choices=sorted(LEG_ARGS), help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.leg:
        return run_leg(args.leg, args.base, args)

    import torch

    base = tempfile.mkdtemp(prefix="amdm_dynamic_vram_")
    results = {}
    for leg in ("classic", "dynamic"):  # classic first: it writes the model files the other leg reads
        result = os.path.join(base, f"{leg}.pt")
        log = os.path.join(base, f"{leg}.log")
        command = [sys.executable, os.path.abspath(__file__), "--leg", leg, "--base", base, "--result", result,
                   "--repeats", str(args.repeats)] + (["--tiny"] if args.tiny else [])
        start = time.perf_counter()
        with open(log, "w") as fh:
            try:
                status = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT,
                                        timeout=args.leg_timeout).returncode
            except subprocess.TimeoutExpired:
                status = f"timeout after {args.leg_timeout} s"
        with open(log) as fh:
            tail = fh.read()[-4000:]
        if status != 0:
            print(tail)
            raise SystemExit(f"the {leg} leg failed ({status}); its log: {log}")
        print(f"{leg} leg: {time.perf_counter() - start:.0f} s", flush=True)
        results[leg] = torch.load(result)
    return 0 if compare(results, args.out) else 1


if __name__ == "__main__":
    sys.exit(main())
