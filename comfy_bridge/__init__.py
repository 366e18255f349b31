"""The one place where AMDM meets ComfyUI's sampling internals.

compat: the internals used here, checked when the pack loads; settings: the AMDM settings and their
validation; checks: everything validated before the first step; sampler_plan: how each branch is stepped
for the user's SAMPLER; branches: the models a branch needs and the patcher switch between branches that
share one UNet; guider: AMDMGuider (a GUIDER) nesting every branch's own stock sampling path;
latent_ops: the Slerp Latent Merge and Deviation Correct operations on LATENT dicts. The math itself
lives in amdm_core.
"""
from .compat import check_comfyui

check_comfyui()
