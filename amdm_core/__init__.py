"""AMDM (Aggregation of Multiple Diffusion Models) as plain torch, with no ComfyUI import.

schedule: every family's noise space <-> VP space, discrete timesteps; aggregation: per-item slerp and the N-branch
merges; deviation: the pull-back step and its mean; lockstep: N sampler runs driven in lockstep and merged between
their steps, and the dry run that maps where a sampler's steps begin; predictor_corrector: UniPC and SA-Solver as
steps that carry a merge through their corrector.
The definition of correct is docs/algorithm.md (the paper's equations), restated in each function's docstring.
"""
from .aggregation import AGGREGATION_MODES, aggregate, lerp, slerp
from .deviation import MEAN_MODES, deviation_correct, deviation_direction, reference_mean, resolve_mean_mode
from .lockstep import LockstepError, LockstepResult, NotSteppable, StepMap, Turns, dry_run, map_steps, run_lockstep
from .predictor_corrector import SASolverStep, UniPCStep
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

__all__ = [
    "AGGREGATION_MODES",
    "EPS_SPACE",
    "FLOW_SPACE",
    "MEAN_MODES",
    "LockstepError",
    "LockstepResult",
    "NoiseSpace",
    "NotSteppable",
    "SASolverStep",
    "StepMap",
    "Turns",
    "UniPCStep",
    "aggregate",
    "alpha_bar_from_sigma",
    "ddim_uniform_sigmas",
    "deviation_correct",
    "deviation_direction",
    "dry_run",
    "from_vp",
    "lerp",
    "map_steps",
    "one_step_alpha",
    "reference_mean",
    "resolve_mean_mode",
    "run_lockstep",
    "scaled_linear_sigma_table",
    "sigma_from_alpha_bar",
    "slerp",
    "timestep_of_sigma",
    "to_vp",
]
