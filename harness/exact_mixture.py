"""An image distribution with a known answer, and its exact denoiser (plain torch; demo, tests, benchmarks).

Images live in a 4 x 32 x 32 latent space. Component (p, c) of the mixture is a blob at position p (one of
four spots) painted in colour c (one of four colours), plus isotropic texture noise of std TAU:

    x0 = AMPLITUDE * colour_c (x) bump_p + TAU * n,    n ~ N(0, I)

The colours share a luminance channel (half their energy) and differ in chroma (the other three channels),
as real colours do. A model that "knows" an attribute restricts the mixture to the components with the
prompted value of that attribute; what it does not know stays uniform. ``posterior_mean`` is the one
transcription of the exact denoiser E[x0 | x] used by the ComfyUI model family (harness.exact_mixture_comfy)
and by bench/control_transfer.py.
"""
import torch

POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right")  # blob centres on a 2 x 2 grid
COLOURS = ("white", "red", "green", "blue")  # what the decoder renders the four 4-channel colours as
ATTRIBUTES = ("position", "colour")
SIZE, CHANNELS = 32, 4
AMPLITUDE, RADIUS = 1.0, 6.0  # blob contrast (one latent std) and Gaussian radius: ~20% of the image
LUMINANCE = 0.5  # share of a colour's energy in the common luminance channel
TAU = 1.0  # within-component std: SD latents have roughly unit std per element
CENTRES = ((8.0, 8.0), (8.0, 24.0), (24.0, 8.0), (24.0, 24.0))  # (row, column) of each position
TOKEN_DIM = len(POSITIONS) + len(COLOURS)  # a prompt token: position weights, then colour weights


def colour_vectors():
    """[C, 4] unit colours: sqrt(LUMINANCE) in channel 0, the rest on tetrahedron vertices in channels 1..3
    (pairwise chroma cosine -1/3)."""
    tetrahedron = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float32) / 3**0.5
    luminance = torch.full((len(COLOURS), 1), LUMINANCE**0.5)
    return torch.cat([luminance, (1 - LUMINANCE) ** 0.5 * tetrahedron], dim=1)


def component_means():
    """[P * C, 4 * 32 * 32] means, row p * C + c:
    AMPLITUDE * colour_c[channel] * exp(-|pixel - centre_p|^2 / (2 RADIUS^2))."""
    coords = torch.arange(SIZE, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    bumps = torch.stack([torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * RADIUS**2)) for cy, cx in CENTRES])
    means = AMPLITUDE * colour_vectors()[None, :, :, None, None] * bumps[:, None, None, :, :]  # [P, C, ch, H, W]
    return means.reshape(len(POSITIONS) * len(COLOURS), -1)


def component_attributes():
    """(position index, colour index) of every component, each [P * C]."""
    index = torch.arange(len(POSITIONS) * len(COLOURS))
    return index // len(COLOURS), index % len(COLOURS)


def prompt_tokens(positions, colours):
    """[B, 2, TOKEN_DIM] prompt tokens: token 0 one-hot over the positions, token 1 over the colours;
    an index of None leaves that token zero (the attribute is not prompted)."""
    tokens = torch.zeros(len(positions), 2, TOKEN_DIM)
    for row, (p, c) in enumerate(zip(positions, colours)):
        if p is not None:
            tokens[row, 0, p] = 1.0
        if c is not None:
            tokens[row, 1, len(POSITIONS) + c] = 1.0
    return tokens


def log_prior(tokens, knows):
    """[B, P * C] log mixture weights a model that knows the attributes ``knows`` reads from prompt tokens.

    For each known attribute the prompt's weights on its values (summed over tokens, normalised) are the
    prior over that attribute; an attribute that is unknown or not prompted stays uniform. Component (p, c)
    gets log prior_position[p] + log prior_colour[c] (-inf where a weight is 0)."""
    if tokens.ndim != 3 or tokens.shape[-1] != TOKEN_DIM:
        raise ValueError(f"exact-mixture prompt tokens must be [batch, tokens, {TOKEN_DIM}], got {list(tokens.shape)}")
    if (tokens < 0).any():
        raise ValueError("exact-mixture prompt tokens hold attribute weights and must be non-negative")
    weights = tokens.sum(dim=1).double()
    split = {"position": weights[:, : len(POSITIONS)], "colour": weights[:, len(POSITIONS):]}
    component_p, component_c = (index.to(tokens.device) for index in component_attributes())
    total = torch.zeros(tokens.shape[0], len(POSITIONS) * len(COLOURS), dtype=torch.float64, device=tokens.device)
    for attribute, index in (("position", component_p), ("colour", component_c)):
        values = split[attribute]
        prompted = values.sum(dim=1, keepdim=True) > 0
        if attribute in knows:
            prior = torch.where(prompted, values / values.sum(dim=1, keepdim=True).clamp_min(1e-300), 1.0 / values.shape[1])
        else:
            prior = torch.full_like(values, 1.0 / values.shape[1])
        total = total + torch.log(prior)[:, index]
    return total.float()


def posterior_mean(x, a, b, means, log_prior_weights, tau=TAU):
    """Exact E[x0 | x] for x = a x0 + b eps, eps ~ N(0, I), x0 ~ sum_j pi_j N(mu_j, tau^2 I):

        V   = a^2 tau^2 + b^2
        w_j = softmax_j(log pi_j + (a <x, mu_j> - a^2 |mu_j|^2 / 2) / V)
        D   = (a tau^2 x + b^2 sum_j w_j mu_j) / V

    x: [B, ...] (flattened per row); a, b: numbers or [B] / [B, 1] tensors; means: [K, D];
    log_prior_weights: [B, K] (log pi, -inf for excluded components). Returns D in x's shape and dtype.
    """
    flat = x.reshape(x.shape[0], -1).to(means.dtype)
    a = torch.as_tensor(a, dtype=means.dtype).reshape(-1, 1)
    b = torch.as_tensor(b, dtype=means.dtype).reshape(-1, 1)
    var = a**2 * tau**2 + b**2
    logits = log_prior_weights.to(means.dtype) + (a * (flat @ means.T) - a**2 * 0.5 * (means**2).sum(dim=1)) / var
    weights = torch.softmax(logits, dim=1)
    denoised = (a * tau**2 * flat + b**2 * (weights @ means)) / var
    return denoised.reshape(x.shape).to(x.dtype)


def nearest_components(x, means):
    """(position index, colour index, RMS distance per element) of each sample's nearest component mean."""
    flat = x.reshape(x.shape[0], -1).to(means.dtype)
    dist = torch.cdist(flat, means)
    nearest = dist.argmin(dim=1)
    component_p, component_c = component_attributes()
    return component_p[nearest], component_c[nearest], dist.min(dim=1).values / flat.shape[1] ** 0.5


def score(x, means, target_p, target_c):
    """Rates over a batch: both attributes right, position right, colour right, mean RMS distance to the
    nearest component (on-distribution samples sit at about TAU)."""
    position, colour, rms = nearest_components(x, means)
    pos_ok, col_ok = position == target_p, colour == target_c
    return {
        "both": (pos_ok & col_ok).float().mean().item(),
        "position": pos_ok.float().mean().item(),
        "colour": col_ok.float().mean().item(),
        "rms": rms.mean().item(),
    }


# The decoder: luminance to grey, the three chroma channels to R, G, B (so the colours render white, red,
# green, blue on a dark background), after a Gaussian low-pass that shows the blob through the texture.
BACKGROUND = 0.15
LUMINANCE_GAIN = 0.49 / LUMINANCE**0.5  # peak luminance of a blob -> +0.49
CHROMA_GAIN = 0.7 / ((1 - LUMINANCE) / 3) ** 0.5  # peak chroma of a blob -> +-0.7 per channel
BLUR = 4.0  # px: the blob's radius is 6, the texture is per-pixel
UPSCALE = 2  # pixels per latent cell in the decoded image


def rgb_factors():
    """[4, 3] linear map from the latent channels to RGB offsets."""
    return torch.tensor([[LUMINANCE_GAIN] * 3, [CHROMA_GAIN, 0, 0], [0, CHROMA_GAIN, 0], [0, 0, CHROMA_GAIN]])


def render(latent):
    """[B, 4, H, W] latent -> [B, H * UPSCALE, W * UPSCALE, 3] image in 0..1: Gaussian blur (std BLUR px,
    reflected borders), rgb = BACKGROUND + latent channels @ rgb_factors(), clamped, nearest upsampling."""
    radius = int(3 * BLUR)
    taps = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2 / (2 * BLUR**2))
    taps = (taps / taps.sum()).to(latent.device)
    x = latent.float()
    channels = x.shape[1]
    x = torch.nn.functional.pad(x, (radius, radius, 0, 0), mode="reflect")
    x = torch.nn.functional.conv2d(x, taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    x = torch.nn.functional.pad(x, (0, 0, radius, radius), mode="reflect")
    x = torch.nn.functional.conv2d(x, taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    rgb = BACKGROUND + torch.einsum("bchw,cr->bhwr", x, rgb_factors().to(x.device))
    rgb = rgb.clamp(0.0, 1.0)
    return rgb.repeat_interleave(UPSCALE, dim=1).repeat_interleave(UPSCALE, dim=2)
