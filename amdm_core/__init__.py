"""AMDM (Aggregation of Multiple Diffusion Models) as plain torch, with no ComfyUI import.

schedule: every family's noise space <-> VP space, discrete timesteps; aggregation: per-item slerp and the N-branch
merges; deviation: the pull-back step and its mean; steps: per-branch sampling steps; lockstep: the loop.
The definition of correct is the project's spec (AMDM.md), restated in each function's docstring.
"""
from .aggregation import AGGREGATION_MODES, aggregate, lerp, slerp
from .deviation import MEAN_MODES, deviation_correct, deviation_direction, reference_mean, resolve_mean_mode
from .lockstep import LockstepResult, expected_model_calls, run_lockstep
from .schedule import (
    EPS_SPACE,
    FLOW_SPACE,
    NoiseSpace,
    alpha_bar_from_sigma,
    ddim_uniform_sigmas,
    from_vp,
    one_step_alpha,
    scaled_linear_sigma_table,
    sigma_from_alpha_bar,
    timestep_of_sigma,
    to_vp,
)
from .steps import (
    AncestralRFStep,
    AncestralStep,
    DPMPP2MSDEStep,
    DPMPP2MStep,
    DPMPP3MSDEStep,
    DPMPPSDEStep,
    EulerStep,
    HeunStep,
    LCMStep,
    LMSStep,
    ResMultistepStep,
    ancestral_sigmas,
    half_log_snr,
    lms_coefficient,
    sigma_of_half_log_snr,
)

__all__ = [
    "AGGREGATION_MODES",
    "EPS_SPACE",
    "FLOW_SPACE",
    "MEAN_MODES",
    "AncestralRFStep",
    "AncestralStep",
    "DPMPP2MSDEStep",
    "DPMPP2MStep",
    "DPMPP3MSDEStep",
    "DPMPPSDEStep",
    "EulerStep",
    "HeunStep",
    "LCMStep",
    "LMSStep",
    "LockstepResult",
    "NoiseSpace",
    "ResMultistepStep",
    "aggregate",
    "alpha_bar_from_sigma",
    "ancestral_sigmas",
    "ddim_uniform_sigmas",
    "deviation_correct",
    "deviation_direction",
    "expected_model_calls",
    "from_vp",
    "half_log_snr",
    "lerp",
    "lms_coefficient",
    "one_step_alpha",
    "reference_mean",
    "resolve_mean_mode",
    "run_lockstep",
    "scaled_linear_sigma_table",
    "sigma_from_alpha_bar",
    "sigma_of_half_log_snr",
    "slerp",
    "timestep_of_sigma",
    "to_vp",
]
