"""The ComfyUI internals the seam needs are checked when the pack loads, with one clear error."""
import re

import pytest


def test_the_running_comfyui_has_every_internal_the_seam_needs(pack, pack_module):
    compat = pack_module("comfy_bridge.compat")
    assert compat.missing_internals() == []
    compat.check_comfyui()
    assert re.fullmatch(r"\d+\.\d+\.\d+", compat.comfyui_version())


def test_a_missing_internal_is_one_error_naming_the_version_and_what_is_missing(pack, pack_module):
    compat = pack_module("comfy_bridge.compat")
    required = compat.REQUIRED + (("comfy.samplers", "CFGGuider", ("sample", "amdm_no_such_method")),
                                  ("comfy.amdm_no_such_module", "Anything", ()))
    with pytest.raises(compat.ComfyUIIncompatible) as failure:
        compat.check_comfyui(required)
    message = str(failure.value)
    assert f"version {compat.comfyui_version()}" in message
    assert "comfy.samplers.CFGGuider.amdm_no_such_method" in message
    assert "comfy.amdm_no_such_module.Anything" in message
    assert "tested on ComfyUI 0.3.75 and 0.33.0" in message
