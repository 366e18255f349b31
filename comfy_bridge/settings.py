"""The AMDM settings taken by both sampler nodes and the latent nodes, and their validation: the one place
where a setting's allowed values are stated and checked (ComfyUI's own validator lets NaN and inf through)."""
import math
from dataclasses import dataclass

from ..amdm_core import AGGREGATION_MODES, MEAN_MODES

NOISE_MODES = ("independent", "shared")
LATENT_MEAN_MODES = ("exact", "reference")  # Deviation Correct works on LATENTs of any one step
MAX_BRANCHES = 4


class AMDMInputError(ValueError):
    """A bad AMDM input, found before any model call."""


def branch_name(index):
    """Branch 0 is the main branch; aux branch k is named after its node inputs (model_2, guider_2 ...)."""
    return "the main branch" if index == 0 else f"branch {index + 1}"


def _finite(value, name):
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise AMDMInputError(f"{name} must be a number, got {str(value)[:200]!r}") from None
    if not math.isfinite(number):
        raise AMDMInputError(f"{name} is {number}; give a finite number")
    return number


def check_weight(value, name):
    """A slerp weight: finite, in [0, 1] (0 keeps the first latent, 1 takes the second)."""
    weight = _finite(value, name)
    if not 0.0 <= weight <= 1.0:
        raise AMDMInputError(f"{name} is {weight}; weights must lie in [0, 1] (0 keeps the main latent, 1 takes "
                             "the other one)")
    return weight


def check_deviation_step(value, name="deviation_step"):
    """p: a finite length >= 0 in VP latent units."""
    p = _finite(value, name)
    if p < 0.0:
        raise AMDMInputError(f"{name} must be >= 0 (a length in VP latent units), got {p}")
    return p


def check_denoise(denoise):
    """denoise: a finite fraction of the schedule in [0, 1] (ComfyUI's validator lets NaN through)."""
    value = _finite(denoise, "denoise")
    if not 0.0 <= value <= 1.0:
        raise AMDMInputError(f"denoise is {value}; it must lie in [0, 1] (1 = the whole schedule, below 1 for img2img)")
    return value


def check_cfg(value, name):
    return _finite(value, name)


def check_choice(value, choices, name):
    if value not in choices:
        raise AMDMInputError(f"unknown {name} {str(value)[:200]!r}; choose one of {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class AggregationSettings:
    """The AMDM parameters shared by both sampler nodes (docs/algorithm.md, sections 2-5)."""
    aggregation_steps: int  # s: steps 1 .. s are aggregated; aux branches run steps 0 .. s
    weights: tuple  # one per aux branch, in [0, 1]
    aggregation: str = "paper"
    deviation_step: float = 0.3  # p, in VP latent units
    mean_mode: str = "auto"
    noise: str = "independent"

    @property
    def is_no_op(self):
        """True where aggregation changes nothing: s = 0, or every weight 0 with p = 0 (docs/algorithm.md,
        section 2)."""
        return int(self.aggregation_steps) == 0 or (
            all(float(w) == 0.0 for w in self.weights) and float(self.deviation_step) == 0.0)

    def validate(self, branch_count):
        if not 2 <= branch_count <= MAX_BRANCHES:
            raise AMDMInputError(
                f"AMDM needs 2 to {MAX_BRANCHES} branches (a main one and aux ones), got {branch_count}")
        if len(self.weights) != branch_count - 1:
            raise AMDMInputError(f"{branch_count} branches need {branch_count - 1} weights, got {len(self.weights)}")
        for index, weight in enumerate(self.weights, start=1):
            check_weight(weight, f"the weight of {branch_name(index)}")
        if int(self.aggregation_steps) < 0:
            raise AMDMInputError(f"aggregation_steps must be >= 0, got {self.aggregation_steps}")
        check_deviation_step(self.deviation_step)
        check_choice(self.aggregation, AGGREGATION_MODES, "aggregation")
        if self.aggregation == "paper" and branch_count > 3:
            raise AMDMInputError(
                f"aggregation 'paper' (the reference code's nested formula) is defined for 2 or 3 branches, "
                f"this run has {branch_count}; choose 'sequential'")
        check_choice(self.mean_mode, MEAN_MODES, "mean_mode")
        check_choice(self.noise, NOISE_MODES, "noise mode")
