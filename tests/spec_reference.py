"""The tests' one independent transcription of the spec (docs/algorithm.md): float64 numpy, written from
the formulas, never from amdm_core. Every test that needs an expected value of slerp, the N-branch merge,
the SD1.5 training table or the AMDM loop takes it from here.
"""
import numpy as np
import torch


def sd15_training_table():
    """float64 (betas, alphas, alphas_cumprod) of SD1.x: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    return betas, alphas, np.cumprod(alphas)


def sd15_sigmas_float32():
    """The table as ComfyUI's model_sampling holds it: sqrt((1 - abar) / abar) stored in float32."""
    _, _, abar = sd15_training_table()
    return torch.tensor(np.sqrt((1.0 - abar) / abar), dtype=torch.float32)


def reference_slerp(a, b, w):
    """Spherical interpolation per batch item (dim 0) over the flattened item:
    sin((1-w)t)/sin t * A + sin(w t)/sin t * B, cos t = <A, B> / (|A| |B|) clamped to [-1, 1], linear
    (1-w) A + w B when 1 - cos t < 1e-6. Takes arrays or CPU tensors, returns a float64 array."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    out = np.empty_like(a)
    for i in range(a.shape[0]):
        x, y = a[i].ravel(), b[i].ravel()
        cos = np.clip(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)), -1.0, 1.0)
        if 1.0 - cos < 1e-6:
            mixed = (1 - w) * x + w * y
        else:
            t = np.arccos(cos)
            mixed = np.sin((1 - w) * t) / np.sin(t) * x + np.sin(w * t) / np.sin(t) * y
        out[i] = mixed.reshape(a[i].shape)
    return out


def reference_aggregate(ys, weights, mode):
    """The merge of branch latents ys[0] (main), ys[1:] (aux): "paper" with three branches nests
    slerp(slerp(aux1, main; w1), slerp(main, aux2; w2); w2); otherwise a fold over the aux branches,
    xbar = slerp(xbar, y_j; w_j) ("linear": (1 - w_j) xbar + w_j y_j)."""
    ys = [np.asarray(y, dtype=np.float64) for y in ys]
    if mode == "paper" and len(ys) == 3:
        return reference_slerp(reference_slerp(ys[1], ys[0], weights[0]), reference_slerp(ys[0], ys[2], weights[1]),
                               weights[1])
    merged = ys[0]
    for y, w in zip(ys[1:], weights):
        merged = (1 - w) * merged + w * y if mode == "linear" else reference_slerp(merged, y, w)
    return merged


FAMILY_SCALES = {  # (a(sigma), b(sigma)) of x = a x0 + b eps
    "eps": lambda sigma: (1.0, sigma),
    "flow": lambda sigma: (1.0 - sigma, sigma),
}


def reference_loop(denoisers, init, sigmas, s, weights, mode, p, mean_mode, table, family="eps", sampler="ddim"):
    """The AMDM loop in the family's space x = a x0 + b eps, every branch by DDIM eta 0
    (y = a' D + b' eps, eps = (x - a D) / b), aggregated in steps 1 .. s on the VP latent x / sqrt(a^2 + b^2):

        xbar = aggregate(y);  y_k = xbar_vp - p_k (xbar_vp - mu_k) / |xbar_vp - mu_k|   (back to x scale)
        mu_k: "reference": (x_vp - (1 - alpha_tau) / sqrt(1 - abar_tau) eps_prev) / sqrt(alpha_tau), tau the
              table's timestep nearest to sigma_{i-1} in log sigma; "exact": the branch's DDIM y_k in VP.

    denoisers[k](x float64 tensor, sigma [batch] float64 tensor) -> D; init: the start latents; p: one
    value or one per branch; sampler "heun" (eps family): instead of DDIM, Heun's step
    y = x + (sigma' - sigma)(eps + eps(y_euler, sigma')) / 2 (the Euler step y_euler into sigma' = 0), eps
    and the means still from the step's first evaluation D(x, sigma) ("exact": the DDIM y_k). Returns
    every branch's final latent (float64 arrays)."""
    sig = np.asarray(sigmas, dtype=np.float64)
    tab = None if table is None else np.asarray(table, dtype=np.float64)
    scales = FAMILY_SCALES[family]
    n = len(denoisers)
    p = list(p) if isinstance(p, (list, tuple)) else [p] * n
    x = [np.asarray(t, dtype=np.float64) for t in init]
    prev_eps = [None] * n
    batch = x[0].shape[0]
    per_item = lambda v: v.reshape(batch, -1)  # noqa: E731

    def denoise(k, latent, sigma):
        return np.asarray(denoisers[k](torch.from_numpy(latent), torch.full((batch,), sigma, dtype=torch.float64)),
                          dtype=np.float64)

    for i in range(len(sig) - 1):
        active = range(n) if i <= s else [0]
        y, eps, ddim = list(x), list(prev_eps), list(x)
        a, b = scales(sig[i])
        a_next, b_next = scales(sig[i + 1])
        vp_scale, vp_scale_next = np.hypot(a, b), np.hypot(a_next, b_next)
        for k in active:
            d = denoise(k, x[k], sig[i])
            eps[k] = (x[k] - a * d) / b
            y[k] = ddim[k] = a_next * d + b_next * eps[k]
            if sampler == "heun" and sig[i + 1] > 0:
                second = (y[k] - denoise(k, y[k], sig[i + 1])) / sig[i + 1]
                y[k] = x[k] + (sig[i + 1] - sig[i]) * (eps[k] + second) / 2
        if 1 <= i <= s:
            xbar_vp = reference_aggregate(y, weights, mode) / vp_scale_next
            corrected = []
            for k in range(n):
                if mean_mode == "reference":
                    tau = int(np.argmin(np.abs(np.log(tab) - np.log(sig[i - 1]))))
                    ab_tau = 1 / (1 + tab[tau] ** 2)
                    alpha = ab_tau / (1.0 if tau == 0 else 1 / (1 + tab[tau - 1] ** 2))
                    mu = (x[k] / vp_scale - (1 - alpha) / np.sqrt(1 - ab_tau) * prev_eps[k]) / np.sqrt(alpha)
                else:
                    mu = ddim[k] / vp_scale_next
                diff = per_item(xbar_vp - mu)
                unit = diff / np.linalg.norm(diff, axis=1, keepdims=True)
                corrected.append((per_item(xbar_vp) - p[k] * unit).reshape(xbar_vp.shape) * vp_scale_next)
            y = corrected
        for k in active:
            x[k], prev_eps[k] = y[k], eps[k]
    return x
