"""Guard tests: the runtime is the real ComfyUI, the tiny models are not degenerate, the pack loads, the
server serves each frontend of the matrix."""
import os
import urllib.request

import pytest
import torch


def test_comfyui_is_real_and_the_legs_version(comfy):
    """The matrix runner names each leg's version in AMDM_COMFYUI_VERSION; with neither it nor COMFYUI_PATH
    set the pinned 0.3.75 runs."""
    import comfyui_version

    expected = os.environ.get("AMDM_COMFYUI_VERSION") or (None if os.environ.get("COMFYUI_PATH") else "0.3.75")
    assert expected is None or comfyui_version.__version__ == expected, \
        f"this leg should run ComfyUI {expected}, the runtime is {comfyui_version.__version__}"
    assert comfy.__file__.endswith("nodes.py") and "KSampler" in comfy.NODE_CLASS_MAPPINGS


def test_tiny_unet_output_is_finite_varied_and_conditioned(tiny_model, random_cond):
    model = tiny_model.model
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([2.0])
    out_a = model.apply_model(x, sigma, c_crossattn=random_cond(1)[0][0])
    out_b = model.apply_model(x, sigma, c_crossattn=random_cond(2)[0][0])
    assert torch.isfinite(out_a).all()
    assert out_a.std() > 1e-3, "the tiny UNet's output is constant: weights were not initialised"
    assert (out_a - out_b).abs().max() > 1e-3, "the tiny UNet ignores its conditioning"


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_tiny_family_weights_are_all_set_by_the_seed(comfy, family):
    """ComfyUI allocates weights and checkpoint buffers (SD3's pos_embed) with torch.empty: whatever the
    memory held, NaN included, must not survive the harness's initialisation."""
    from harness import tiny_models

    fresh = tiny_models.tiny_family_patcher(family, seed=0).model.diffusion_model
    garbage = tiny_models.tiny_family_patcher(family, seed=0).model.diffusion_model
    with torch.no_grad():
        for tensor in garbage.state_dict().values():
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))
    state = tiny_models.init_weights_(garbage, seed=0).state_dict()
    unset = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    assert not unset, f"{family}: left uninitialised by init_weights_: {unset}"
    differs = [name for name, tensor in fresh.state_dict().items() if not torch.equal(tensor, state[name])]
    assert not differs, f"{family}: not determined by the seed: {differs}"


def test_tiny_checkpoint_loads_through_real_loader(checkpoint, comfy):
    model, clip, vae = checkpoint
    assert type(model.model).__name__ == "BaseModel"
    assert model.model.latent_format.latent_channels == 4
    cond = comfy.CLIPTextEncode().encode(clip, "a red hair girl")[0]
    other = comfy.CLIPTextEncode().encode(clip, "a blue bottle")[0]
    assert torch.isfinite(cond[0][0]).all() and (cond[0][0] - other[0][0]).abs().max() > 1e-3
    image = vae.decode(torch.randn(1, 4, 8, 8))
    assert image.shape[-1] == 3 and image.std() > 1e-3


def test_every_pack_node_is_registered(pack, comfy):
    assert pack.NODE_CLASS_MAPPINGS, "the pack registers no node"
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert comfy.NODE_CLASS_MAPPINGS.get(name) is cls, f"{name} is not registered in ComfyUI"
        assert name in pack.NODE_DISPLAY_NAME_MAPPINGS, f"{name} has no display name"


def test_server_lists_pack_nodes_in_object_info(comfy_server, pack):
    server = comfy_server()
    info = server.get("/object_info")
    missing = [name for name in pack.NODE_CLASS_MAPPINGS if name not in info]
    assert not missing, f"/object_info lacks {missing}"


@pytest.mark.parametrize("version", ["1.32.9", "1.58.1"])
def test_server_serves_the_chosen_frontend(comfy_server, version):
    from harness.server import frontend_root

    server = comfy_server(frontend=version)
    with urllib.request.urlopen(server.url + "/", timeout=30) as response:
        served = response.read()
    with open(os.path.join(frontend_root(version), "index.html"), "rb") as fh:
        assert served == fh.read(), f"the server did not serve frontend {version}'s index.html"
