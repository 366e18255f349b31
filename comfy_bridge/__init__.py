"""The one place where AMDM meets ComfyUI's sampling internals.

compat: the internals used here, checked when the pack loads; settings: the AMDM settings and their
validation; checks: everything validated before the first step; driving: the user's SAMPLER with its model
calls routed through the lockstep, and the dry run's synthetic model; predictor_correctors: the pack's own
UniPC / SA-Solver, used where a dry run proves them equal to ComfyUI's; branches: the models a branch needs
and the patcher switch between branches that share one UNet; guider: AMDMGuider (a GUIDER) nesting every
branch's own stock sampling path;
latent_ops: the Slerp Latent Merge and Deviation Correct operations on LATENT dicts. The math itself
lives in amdm_core.
"""
from .compat import check_comfyui

check_comfyui()
