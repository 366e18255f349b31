"""AMDM (Aggregation of Multiple Diffusion Models) as plain torch, with no ComfyUI import.

schedule: sigma space <-> VP space, discrete timesteps; aggregation: per-item slerp and the N-branch
merges; deviation: the pull-back step and its mean; steps: per-branch sampling steps; lockstep: the loop.
The definition of correct is the project's spec (AMDM.md), restated in each function's docstring.
"""
from .aggregation import AGGREGATION_MODES, aggregate, lerp, slerp
from .deviation import MEAN_MODES, deviation_correct, deviation_direction, reference_mean
from .lockstep import LockstepResult, expected_model_calls, run_lockstep
from .schedule import (
    alpha_bar_from_sigma,
    ddim_uniform_sigmas,
    from_vp,
    one_step_alpha,
    scaled_linear_sigma_table,
    sigma_from_alpha_bar,
    timestep_of_sigma,
    to_vp,
)
from .steps import AncestralStep, DPMPP2MStep, EulerStep, ancestral_sigmas

__all__ = [
    "AGGREGATION_MODES",
    "MEAN_MODES",
    "AncestralStep",
    "DPMPP2MStep",
    "EulerStep",
    "LockstepResult",
    "aggregate",
    "alpha_bar_from_sigma",
    "ancestral_sigmas",
    "ddim_uniform_sigmas",
    "deviation_correct",
    "deviation_direction",
    "expected_model_calls",
    "from_vp",
    "lerp",
    "one_step_alpha",
    "reference_mean",
    "run_lockstep",
    "scaled_linear_sigma_table",
    "sigma_from_alpha_bar",
    "slerp",
    "timestep_of_sigma",
    "to_vp",
]
