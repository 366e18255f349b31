"""The exact-mixture model family inside ComfyUI (demo, tests and benchmarks only; never shipped to users).

A MODEL here is a real comfy.model_base.BaseModel in a ModelPatcher, with its own latent format and
ComfyUI's own model_sampling (SD1.5's discrete eps schedule, or SD3's rectified flow with shift 3), whose
denoiser is the exact posterior mean of the blob-position x colour mixture of harness.exact_mixture. It
reads its prompt from an ordinary CONDITIONING (cross-attention tokens [B, 2, 8] + pooled), so positive,
negative, CFG and batching go through ComfyUI exactly as for a real model. The VAE renders latents as
pictures. Import after ComfyUI has booted (harness.runtime.boot); ``load_nodes`` makes the test-only nodes
(harness/exact_mixture_node) available to graphs.
"""
import asyncio
import os

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models_base

from harness import exact_mixture

PREDICTIONS = {"eps": comfy.model_base.ModelType.EPS, "flow": comfy.model_base.ModelType.FLOW}
KNOWLEDGE = {"position": ("position",), "colour": ("colour",), "position and colour": exact_mixture.ATTRIBUTES}
FLOW_SHIFT = 3.0  # SD3's
NODE_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "exact_mixture_node")


class ExactMixtureLatent(comfy.latent_formats.LatentFormat):
    """The mixture's own latent space: 4 channels, no scaling; previews use the decoder's colour map."""

    scale_factor = 1.0
    latent_channels = exact_mixture.CHANNELS

    def __init__(self):
        self.latent_rgb_factors = exact_mixture.rgb_factors().tolist()


class ExactMixtureDenoiser(torch.nn.Module):
    """The "network": the component means and the attributes this model knows; forward is the posterior mean."""

    def __init__(self, knows=(), device=None, dtype=None, operations=None):
        super().__init__()
        self.knows = tuple(knows)
        self.dtype = torch.float32  # ComfyUI reads a diffusion model's dtype attribute
        self.register_buffer("means", exact_mixture.component_means().to(device))

    def forward(self, x, a, b, context):
        return exact_mixture.posterior_mean(x, a, b, self.means, exact_mixture.log_prior(context, self.knows))


class ExactMixtureModel(comfy.model_base.BaseModel):
    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        """D(x, sigma) = E[x0 | x] for the latent x = a(sigma) x0 + b(sigma) eps of this model's own
        model_sampling: a and b are read off its noise_scaling (a = scaling of the clean latent, b of the
        noise), so the eps and the flow variant differ only in model_sampling, as real families do."""
        if c_crossattn is None:
            raise ValueError("the exact-mixture model needs a CONDITIONING from an Exact Mixture Prompt node")
        sigma = t.reshape(-1, 1).float()
        probe = torch.ones_like(sigma)
        a = self.model_sampling.noise_scaling(sigma, torch.zeros_like(probe), probe)
        b = self.model_sampling.noise_scaling(sigma, probe, torch.zeros_like(probe))
        return self.diffusion_model(x.float(), a, b, c_crossattn.float())


class ExactMixtureConfig(comfy.supported_models_base.BASE):
    unet_extra_config = {}
    latent_format = ExactMixtureLatent
    memory_usage_factor = 0.01
    supported_inference_dtypes = [torch.float32]

    def __init__(self, knows, prediction):
        super().__init__({"knows": KNOWLEDGE[knows]})
        self.prediction = prediction
        if prediction == "flow":
            self.sampling_settings = {"shift": FLOW_SHIFT, "multiplier": 1000}

    def get_model(self, state_dict=None, prefix="", device=None):
        return ExactMixtureModel(self, model_type=PREDICTIONS[self.prediction], device=device,
                                 unet_model=ExactMixtureDenoiser)


def exact_mixture_patcher(knows, prediction="eps"):
    """A ModelPatcher of the exact denoiser that knows ``knows`` ("position", "colour" or "position and
    colour") with ``prediction`` "eps" (SD1.5's schedule) or "flow" (rectified flow, shift 3)."""
    if knows not in KNOWLEDGE or prediction not in PREDICTIONS:
        raise ValueError(f"knows must be one of {list(KNOWLEDGE)} and prediction one of {list(PREDICTIONS)}")
    model_config = ExactMixtureConfig(knows, prediction)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model()
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


class ExactMixtureVAE:
    """What VAEDecode needs from a VAE: ``decode(latent) -> [B, H, W, 3]`` (exact_mixture.render)."""

    def decode(self, samples):
        return exact_mixture.render(samples).cpu()


def conditioning(positions, colours):
    """A CONDITIONING with one row per prompt: [[tokens [B, 2, 8], {"pooled_output": [B, 8]}]].
    positions/colours: lists of indices (None: not prompted)."""
    tokens = exact_mixture.prompt_tokens(positions, colours)
    return [[tokens, {"pooled_output": tokens.sum(dim=1)}]]


def load_nodes():
    """Load harness/exact_mixture_node into the booted ComfyUI with its own custom-node loader (linked into
    the base folder's custom_nodes/, as a user's install would be); idempotent."""
    import folder_paths
    import nodes

    if "ExactMixtureLoader" in nodes.NODE_CLASS_MAPPINGS:
        return
    link = os.path.join(folder_paths.get_folder_paths("custom_nodes")[0], "amdm-exact-mixture")
    if not os.path.exists(link):
        os.symlink(NODE_FOLDER, link)
    if not asyncio.run(nodes.load_custom_node(link)):
        raise RuntimeError(f"ComfyUI failed to load the exact-mixture test nodes from {link}; see the log above")
