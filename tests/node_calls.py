"""How the tests call the sampler nodes on the tiny SD1.5 stand-in: its settings, a tamed model, KSampler and
the AMDM Aggregate Sampler node with the pack's full input list."""
import torch

STEPS = 5  # ddim_uniform gives exactly 5 steps for 5 (1000 // 5 = 200)
SIZE = 8


def tame(patcher):
    """A clone whose x0 estimate is halved: sampled with the random tiny UNet alone, latents end at ~8 std,
    with it at ~1 like real SD1.5 latents, where an absolute tolerance of 1e-5 means what it says."""
    clone = patcher.clone()

    def scaled(apply_model, args):
        return apply_model(args["input"], args["timestep"], **args["c"]) * 0.5

    clone.set_model_unet_function_wrapper(scaled)
    return clone


def empty_latent(batch=1):
    return {"samples": torch.zeros(batch, 4, SIZE, SIZE)}


def ksampler(comfy, model, positive, negative, latent, seed=3, steps=STEPS, cfg=7.5, sampler="ddim",
             scheduler="ddim_uniform", denoise=1.0):
    return comfy.KSampler().sample(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent,
                                   denoise=denoise)[0]["samples"]


def amdm(pack, main, aux, latent, seed=3, steps=STEPS, cfg=7.5, sampler="ddim", scheduler="ddim_uniform",
         denoise=1.0, s=4, weights=None, aggregation="paper", p=0.3, mean_mode="reference", noise="independent"):
    """Run the AMDM Aggregate Sampler node. main = (model, positive, negative); aux = [(model, pos, neg, cfg)]."""
    weights = weights or [0.5, 0.6, 0.5][:len(aux)]
    optional = {}
    for k, ((model, positive, negative, aux_cfg), weight) in enumerate(zip(aux[1:], weights[1:]), start=3):
        optional.update({f"model_{k}": model, f"positive_{k}": positive, f"negative_{k}": negative,
                         f"cfg_{k}": aux_cfg, f"weight_{k}": weight})
    (model_2, positive_2, negative_2, cfg_2) = aux[0]
    node = pack.NODE_CLASS_MAPPINGS["AMDMAggregateSampler"]()
    out, aux_out = node.sample(main[0], main[1], main[2], model_2, positive_2, negative_2, latent, seed, steps, cfg,
                               cfg_2, sampler, scheduler, denoise, weights[0], s, aggregation, p, mean_mode, noise,
                               **optional)
    return out["samples"], aux_out["samples"]
