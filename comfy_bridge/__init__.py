"""The one place where AMDM meets ComfyUI's sampling internals.

checks: everything validated before the first step; branches: per-branch guider preparation and the
patcher switch between branches that share one UNet; guider: AMDMGuider (a GUIDER) and the lockstep
sampler it runs on the main branch's stock sampling path; latent_ops: the Slerp Latent Merge and
Deviation Correct operations on LATENT dicts. The math itself lives in amdm_core.
"""
