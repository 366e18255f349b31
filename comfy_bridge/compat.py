"""The ComfyUI internals the seam relies on, checked once when the pack loads.

Tested on ComfyUI 0.3.75 and 0.33.0 (pyproject.toml `requires-comfyui`). A ComfyUI that lacks one of
these gets one error at load time naming its version and what is missing, never a traceback in the middle
of sampling. Each entry: (module, attribute, the members the seam uses on it).
"""
import importlib
import inspect

REQUIRED = (
    # guider.py: every branch runs its guider's own sample() with a capturing SAMPLER
    ("comfy.samplers", "CFGGuider", ("sample", "outer_sample", "inner_sample", "set_conds", "set_cfg",
                                     "predict_noise")),
    ("comfy.samplers", "Sampler", ("sample", "max_denoise")),
    ("comfy.samplers", "KSAMPLER", ("sample", "max_denoise")),
    ("comfy.samplers", "KSampler", ("SAMPLERS", "SCHEDULERS")),
    ("comfy.samplers", "sampler_object", ()),
    ("comfy.sample", "prepare_noise", ()),
    ("comfy.sample", "prepare_noise_inner", ()),
    ("comfy.sample", "fix_empty_latent_channels", ()),
    ("comfy.sampler_helpers", "get_additional_models", ()),
    ("comfy.model_patcher", "ModelPatcher", ("clone", "set_additional_models", "partially_load",
                                             "get_model_object")),
    ("comfy.model_management", "throw_exception_if_processing_interrupted", ()),
    ("comfy.model_management", "intermediate_device", ()),
    ("latent_preview", "prepare_callback", ()),
    # branches.py: the switch between clones with different weight patches
    ("comfy.model_patcher", "get_key_weight", ()),
    ("comfy.model_management", "get_free_memory", ()),
    ("comfy.model_management", "minimum_inference_memory", ()),
    ("comfy.utils", "get_attr", ()),
    # batching.py: one forward for the branches that share it
    ("comfy.model_base", "BaseModel", ("apply_model", "memory_required")),
    ("comfy.conds", "CONDCrossAttn", ("can_concat", "concat")),
    ("comfy.ldm.modules.attention", "optimized_attention", ()),
    # predictor_correctors.py: what the pack's own UniPC / SA-Solver set up as ComfyUI's functions do
    ("comfy.k_diffusion.sampling", "trange", ()),
    ("comfy.k_diffusion.sampling", "default_noise_sampler", ()),
    ("comfy.k_diffusion.sampling", "offset_first_sigma_for_snr", ()),
    ("comfy.k_diffusion.sampling", "sigma_to_half_log_snr", ()),
    # checks.py: families and schedules
    ("comfy.model_sampling", "ModelSamplingDiscrete", ("percent_to_sigma",)),
    ("comfy.model_sampling", "CONST", ()),
    ("comfy.model_sampling", "EPS", ("noise_scaling",)),
)
# A guider's inner_sample calls sampler.sample(guider, sigmas, extra_args, callback, noise, latent_image,
# denoise_mask, disable_pbar) positionally; a KSAMPLER's sample then calls its sampler_function(model, x, sigmas,
# extra_args=, callback=, disable=, **extra_options): the capture and the driving rely on this order.
KSAMPLER_SAMPLE_PARAMETERS = ("model_wrap", "sigmas", "extra_args", "callback", "noise", "latent_image",
                              "denoise_mask", "disable_pbar")


class ComfyUIIncompatible(RuntimeError):
    """This ComfyUI lacks an internal the pack needs."""


def comfyui_version():
    try:
        return importlib.import_module("comfyui_version").__version__
    except (ImportError, AttributeError):
        return "unknown"


def missing_internals(required=REQUIRED):
    """The `module.attribute[.member]` names of `required` that this ComfyUI lacks."""
    missing = []
    for module_name, attribute, members in required:
        try:
            owner = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError):
            missing.append(f"{module_name}.{attribute}")
            continue
        missing += [f"{module_name}.{attribute}.{m}" for m in members if not hasattr(owner, m)]
    return missing


def check_comfyui(required=REQUIRED):
    """Raise ComfyUIIncompatible naming the ComfyUI version and every missing internal."""
    missing = missing_internals(required)
    if not missing:
        import comfy.samplers

        parameters = tuple(inspect.signature(comfy.samplers.KSAMPLER.sample).parameters)[1:]
        if parameters[:len(KSAMPLER_SAMPLE_PARAMETERS)] != KSAMPLER_SAMPLE_PARAMETERS:
            missing.append(f"comfy.samplers.KSAMPLER.sample{KSAMPLER_SAMPLE_PARAMETERS} (found {parameters})")
    if missing:
        raise ComfyUIIncompatible(
            f"comfyui-amdm cannot run on this ComfyUI (version {comfyui_version()}): it lacks "
            f"{', '.join(missing)}. The pack is tested on ComfyUI 0.3.75 and 0.33.0: on an older ComfyUI, update "
            "ComfyUI; on a newer one, update comfyui-amdm, or report this message with your ComfyUI version.")
