"""The exact-mixture model family (demo and benchmark models with a known answer): its denoiser is the
exact posterior mean of the stated mixture, checked against a brute-force float64 computation written
here from Bayes' rule, and it is wired like a real model through ComfyUI's own KSampler (positive and
negative CONDITIONING, CFG, batches), in the eps and the rectified-flow variant."""
import math

import pytest
import torch

from harness import exact_mixture

PREDICTIONS = ("eps", "flow")


@pytest.fixture(scope="module")
def family(comfy):
    from harness import exact_mixture_comfy

    exact_mixture_comfy.load_nodes()
    return exact_mixture_comfy


def signal_and_noise(prediction, sigma):
    """The stated forward process: eps x = x0 + sigma eps; rectified flow x = (1 - sigma) x0 + sigma eps."""
    return (1.0, sigma) if prediction == "eps" else (1.0 - sigma, sigma)


def allowed_components(knows, position, colour):
    """Indices p * 4 + c of the mixture components a model that knows `knows` keeps for the prompt."""
    return [p * 4 + c for p in range(4) for c in range(4)
            if ("position" not in knows or position is None or p == position)
            and ("colour" not in knows or colour is None or c == colour)]


def brute_force_posterior_mean(x, a, b, allowed):
    """E[x0 | x] in float64 by Bayes' rule over the allowed components (equal prior weights): the
    likelihood of x under component j is N(a mu_j, (a^2 tau^2 + b^2) I); given j, x0 | x is the Gaussian
    with precision 1/tau^2 + a^2/b^2 and mean (mu_j/tau^2 + a x/b^2) / precision (x0 = x / a at b = 0)."""
    means = exact_mixture.component_means().double()
    tau2 = exact_mixture.TAU ** 2
    x = x.double().reshape(-1)
    var = a * a * tau2 + b * b
    log_likelihoods = torch.stack([
        -((x - a * means[j]) ** 2).sum() / (2 * var) - 0.5 * x.numel() * math.log(2 * math.pi * var) for j in allowed])
    responsibilities = torch.softmax(log_likelihoods, dim=0)
    if b == 0:
        return x / a
    precision = 1 / tau2 + a * a / (b * b)
    conditional = torch.stack([(means[j] / tau2 + a * x / (b * b)) / precision for j in allowed])
    return (responsibilities[:, None] * conditional).sum(dim=0)


def mixture_samples(count, seed):
    gen = torch.Generator().manual_seed(seed)
    components = torch.randint(0, 16, (count,), generator=gen)
    x0 = exact_mixture.component_means()[components] + exact_mixture.TAU * torch.randn(count, 4096, generator=gen)
    return x0.reshape(count, 4, 32, 32), torch.randn(count, 4, 32, 32, generator=gen)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("knows", ["position", "colour", "position and colour"])
def test_denoiser_is_the_exact_posterior_mean(family, prediction, knows):
    import nodes

    model, _ = nodes.NODE_CLASS_MAPPINGS["ExactMixtureLoader"]().load(knows, prediction)
    prompt = nodes.NODE_CLASS_MAPPINGS["ExactMixturePrompt"]()
    sampling = model.get_model_object("model_sampling")
    table = sampling.sigmas
    sigmas = [float(table[0]), float(table[len(table) // 4]), float(table[len(table) // 2]), float(table[-1])]
    sigmas += [0.0] if prediction == "eps" else [1.0]  # no noise at all / nothing but noise
    x0, noise = mixture_samples(len(sigmas), seed=7)
    for position, colour in ((1, 2), (None, 3), (0, None), (None, None)):
        (cond,) = prompt.encode(exact_mixture.POSITIONS[position] if position is not None else "any",
                                exact_mixture.COLOURS[colour] if colour is not None else "any")
        allowed = allowed_components(family.KNOWLEDGE[knows], position, colour)
        for row, sigma in enumerate(sigmas):
            a, b = signal_and_noise(prediction, sigma)
            x = a * x0[row:row + 1] + b * noise[row:row + 1]
            got = model.model.apply_model(x, torch.tensor([sigma]), c_crossattn=cond[0][0])
            want = brute_force_posterior_mean(x, a, b, allowed).reshape(got.shape)
            scale = 1.0 + want.abs().max().item()
            assert (got.double() - want).abs().max().item() < 2e-5 * scale, (knows, position, colour, sigma)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ksampler_step_is_the_cfg_combination_of_exact_posterior_means(family, prediction):
    """One Euler step of KSampler from sigma_1 to 0 returns the CFG-combined denoiser at the start latent:
    D_negative + cfg (D_positive - D_negative). Positive and negative name different attributes, the
    latent is a batch of 3 and the positive holds one prompt per batch row."""
    import comfy.sample
    import comfy.samplers
    import nodes

    model, _ = nodes.NODE_CLASS_MAPPINGS["ExactMixtureLoader"]().load("position and colour", prediction)
    rows = [(1, 2), (3, None), (None, 0)]
    positive = family.conditioning([p for p, _ in rows], [c for _, c in rows])
    (negative,) = nodes.NODE_CLASS_MAPPINGS["ExactMixturePrompt"]().encode("any", "red")
    latent = {"samples": torch.zeros(3, 4, 32, 32)}
    cfg, seed = 3.0, 11
    (out,) = nodes.KSampler().sample(model, seed, 1, cfg, "euler", "simple", positive, negative, latent, denoise=0.5)
    sigma = float(comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 2)[1])
    start = sigma * comfy.sample.prepare_noise(latent["samples"], seed)  # the latent is zero
    a, b = signal_and_noise(prediction, sigma)
    for row, (position, colour) in enumerate(rows):
        cond = brute_force_posterior_mean(start[row], a, b, allowed_components(("position", "colour"), position, colour))
        uncond = brute_force_posterior_mean(start[row], a, b, allowed_components(("position", "colour"), None, 1))
        want = (uncond + cfg * (cond - uncond)).reshape(4, 32, 32)
        assert (out["samples"][row].double() - want).abs().max().item() < 1e-4 * (1 + want.abs().max().item())


def test_a_sampled_batch_keeps_the_known_attribute_and_draws_the_other_by_chance(family):
    """Model A (knows position) through KSampler at the paper's settings: every sample's nearest component
    has the prompted position; its colour is spread over the four."""
    import nodes

    model, _ = nodes.NODE_CLASS_MAPPINGS["ExactMixtureLoader"]().load("position", "eps")
    prompt = nodes.NODE_CLASS_MAPPINGS["ExactMixturePrompt"]()
    (positive,), (negative,) = prompt.encode("bottom-left", "red"), prompt.encode("any", "any")
    (out,) = nodes.KSampler().sample(model, 0, 20, 7.5, "ddim", "ddim_uniform", positive, negative,
                                     {"samples": torch.zeros(32, 4, 32, 32)})
    position, colour, rms = exact_mixture.nearest_components(out["samples"], exact_mixture.component_means())
    assert (position == 2).all()
    assert len(set(colour.tolist())) == 4
    assert 0.8 < rms.mean().item() < 1.1  # on the distribution: about the texture std


def test_decoder_draws_each_component_where_and_in_the_colour_it_names(family):
    import nodes

    means = exact_mixture.component_means().reshape(16, 4, 32, 32)
    _, vae = nodes.NODE_CLASS_MAPPINGS["ExactMixtureLoader"]().load("position", "eps")
    (images,) = nodes.VAEDecode().decode(vae, {"samples": means})
    size = 32 * exact_mixture.UPSCALE
    assert images.shape == (16, size, size, 3) and 0 <= images.min() and images.max() <= 1
    expected = {"white": (1, 1, 1), "red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1)}
    for index, image in enumerate(images):
        p, c = divmod(index, 4)
        brightness = image.sum(dim=-1)
        row, col = divmod(int(brightness.argmax()), size)
        assert (row < size // 2, col < size // 2) == (p < 2, p % 2 == 0), (p, c)
        centre = image[row, col]
        for channel, on in enumerate(expected[exact_mixture.COLOURS[c]]):
            assert (centre[channel] > 0.6) if on else (centre[channel] < 0.4), (exact_mixture.COLOURS[c], centre)
        assert (image[size - 1 - row, size - 1 - col] < 0.3).all()  # the opposite corner is background
