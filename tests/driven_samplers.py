"""The tests' own sampler runs for amdm_core.lockstep, written in the k-diffusion convention: one model call
per evaluation through `hooks.model`, one report per step right after the step's first evaluation (Heun's
second call at the step's end), the result through `hooks.returned`."""
from amdm_core import map_steps, run_lockstep


def euler(denoise, x, sigmas, noise=None):
    """A sampler run: Euler (= DDIM eta 0); with `noise` () -> tensor, an ancestral-style draw added each step."""
    def sample(hooks):
        latent = x
        s_in = latent.new_ones([latent.shape[0]])
        for i in range(len(sigmas) - 1):
            denoised = hooks.model(latent, sigmas[i] * s_in, denoise)
            hooks.report(i, denoised)
            latent = latent + (latent - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
            if noise is not None and sigmas[i + 1] > 0:
                latent = latent + 0.1 * noise()
        return hooks.returned(latent)
    return sample


def heun(denoise, x, sigmas):
    """A sampler run: Heun, its second evaluation at the end of the step (none into sigma 0)."""
    def sample(hooks):
        latent = x
        s_in = latent.new_ones([latent.shape[0]])
        for i in range(len(sigmas) - 1):
            denoised = hooks.model(latent, sigmas[i] * s_in, denoise)
            hooks.report(i, denoised)
            d = (latent - denoised) / sigmas[i]
            dt = sigmas[i + 1] - sigmas[i]
            if sigmas[i + 1] == 0:
                latent = latent + d * dt
            else:
                end = latent + d * dt
                d_end = (end - hooks.model(end, sigmas[i + 1] * s_in, denoise)) / sigmas[i + 1]
                latent = latent + (d + d_end) / 2 * dt
        return hooks.returned(latent)
    return sample


def dry(x, sigma, call):
    """The dry run's synthetic model: the x0 estimate of unit-variance data."""
    return x / (1 + sigma[0] ** 2)


SAMPLERS = {"euler": euler, "heun": heun}


def lockstep(sampler, denoisers, init, sigmas, **kwargs):
    """run_lockstep over one `sampler` run per branch (denoisers[k] from init[k]); returns (result, step map)."""
    runs = [SAMPLERS[sampler](d, x, sigmas) for d, x in zip(denoisers, init)]
    step_map = map_steps(runs[0], len(sigmas) - 1, dry)
    return run_lockstep(runs, step_map, final_sigma=sigmas[-1], **kwargs), step_map
