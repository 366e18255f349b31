"""IP-Adapter Loader / Apply (AMDM) against the real ComfyUI: tiny random adapters in the public
ip-adapter_sd15 / ip-adapter-plus_sd15 key layouts, a tiny CLIP vision model loaded by core
CLIPVisionLoader, the tiny SD1.5 UNet, and ComfyUI's own sampling path (cond + uncond in one batch)."""
import os

import pytest
import torch
import torch.nn.functional as F

from harness import tiny_clip_vision, tiny_ipadapter

CLIP_VISION_FILE = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
BASE_FILE, PLUS_FILE = "ip-adapter_sd15.safetensors", "ip-adapter-plus_sd15.safetensors"
WEIGHT = 0.8

# Independent transcription of the file's ip_adapter.<n> numbering (diffusers' processor order: down
# blocks, up blocks, mid block; cross-attention at odd n) onto ComfyUI's attn2 patch keys.
INDEX_OF_BLOCK = {
    ("input", 1): 1, ("input", 2): 3, ("input", 4): 5, ("input", 5): 7, ("input", 7): 9, ("input", 8): 11,
    ("output", 3): 13, ("output", 4): 15, ("output", 5): 17, ("output", 6): 19, ("output", 7): 21,
    ("output", 8): 23, ("output", 9): 25, ("output", 10): 27, ("output", 11): 29, ("middle", 0): 31,
}


@pytest.fixture(scope="module")
def ipa(pack, comfy):
    """Files under the real names in the running ComfyUI's models/ folders, and the loaded objects."""
    import folder_paths

    models = folder_paths.models_dir
    tiny_clip_vision.write_tiny_clip_vision(os.path.join(models, "clip_vision", CLIP_VISION_FILE))
    for name, plus in ((BASE_FILE, False), (PLUS_FILE, True)):
        tiny_ipadapter.write_tiny_ipadapter(os.path.join(models, "ipadapter", name), seed=0, plus=plus)
    loader = comfy.NODE_CLASS_MAPPINGS["AMDMIPAdapterLoader"]()

    class Loaded:
        clip_vision = comfy.CLIPVisionLoader().load_clip(CLIP_VISION_FILE)[0]
        adapters = {name: loader.load(name)[0] for name in (BASE_FILE, PLUS_FILE)}
        apply = comfy.NODE_CLASS_MAPPINGS["AMDMIPAdapterApply"]().apply
        folder = os.path.join(models, "ipadapter")

    return Loaded


def image(seed, batch=1):
    return torch.rand(batch, 96, 80, 3, generator=torch.Generator().manual_seed(seed))


def denoise_once(model, sigma, conds, batch=1, seed=0, cfg=5.0):
    """One Euler step from ``sigma`` to 0 through ComfyUI's sampler (returns the CFG x0 estimate)."""
    import comfy.sample
    import comfy.samplers

    latent = torch.zeros(batch, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample_custom(model, noise, cfg, comfy.samplers.sampler_object("euler"),
                                      torch.tensor([float(sigma), 0.0]), conds[0], conds[1], latent,
                                      disable_pbar=True, seed=seed)


def attention(q, k, v, heads):
    b, n, c = q.shape
    split = lambda t: t.reshape(b, t.shape[1], heads, c // heads).transpose(1, 2)  # noqa: E731
    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, n, c)


class Recorder:
    """Wraps an installed attn2 replace patch; logs every call with its inputs and output."""

    def __init__(self, key, patch, log):
        self.key, self.patch, self.log = key, patch, log

    def __call__(self, q, k, v, extra):
        out = self.patch(q, k, v, extra)
        self.log.append({"key": self.key, "block": extra["block"], "chunks": list(extra["cond_or_uncond"]),
                         "q": q, "k": k, "v": v, "out": out, "heads": extra["n_heads"]})
        return out

    def to(self, device_or_dtype):
        self.patch = self.patch.to(device_or_dtype)
        return self


def instrument(model):
    log = []
    replace = model.model_options["transformer_options"]["patches_replace"]["attn2"]
    for key in list(replace):
        replace[key] = Recorder(key, replace[key], log)
    return log


@pytest.fixture
def conds(random_cond):
    return random_cond(1), random_cond(2)


@pytest.mark.parametrize("name", [BASE_FILE, PLUS_FILE])
def test_patches_exactly_the_16_sd15_cross_attention_blocks_as_a_clone(ipa, tiny_model, conds, name):
    before = {k: v for k, v in tiny_model.model_options["transformer_options"].items()}
    patched = ipa.apply(tiny_model, ipa.adapters[name], image(1), WEIGHT, 0.0, 1.0, ipa.clip_vision)[0]
    replace = patched.model_options["transformer_options"]["patches_replace"]
    assert set(replace) == {"attn2"} and set(replace["attn2"]) == set(INDEX_OF_BLOCK)
    assert ("middle", 1) not in replace["attn2"]
    # shares the UNet: no weight or object patch, the input model is untouched
    assert patched.model is tiny_model.model and not patched.patches and not patched.object_patches
    assert tiny_model.model_options["transformer_options"] == before

    log = instrument(patched)
    plain = denoise_once(tiny_model, 1.0, conds)
    out = denoise_once(patched, 1.0, conds)
    assert {entry["key"] for entry in log} == set(INDEX_OF_BLOCK), "some patched blocks never ran"
    for entry in log:
        assert entry["block"] == entry["key"], f"patch keyed {entry['key']} ran in block {entry['block']}"
        assert sorted(entry["chunks"]) == [0, 1], "cond and uncond should run batched"
        unpatched = attention(entry["q"], entry["k"], entry["v"], entry["heads"])
        per_chunk = (entry["out"] - unpatched).abs().flatten(1).amax(1)
        assert (per_chunk > 1e-4).all(), f"{entry['key']}: the image term is zero for a chunk"
    assert (out - plain).abs().max() > 1e-3


def test_each_block_adds_weight_times_attention_over_its_own_ip_layer(ipa, tiny_model, conds, comfy):
    """Independent transcription of the reference for ip-adapter_sd15: tokens = LN(W e + b) (negative side:
    e = 0), out = attn(q, k, v) + weight * attn(q, tokens W_k[n]^T, tokens W_v[n]^T), n from the table."""
    import safetensors.torch

    raw = {k: v.float() for k, v in safetensors.torch.load_file(os.path.join(ipa.folder, BASE_FILE)).items()}
    picture = image(3)
    embeds = comfy.CLIPVisionEncode().encode(ipa.clip_vision, picture, "center")[0]["image_embeds"].float()

    def tokens(e):
        projected = F.linear(e, raw["image_proj.proj.weight"], raw["image_proj.proj.bias"]).reshape(-1, 4, 768)
        return F.layer_norm(projected, (768,), raw["image_proj.norm.weight"], raw["image_proj.norm.bias"])

    by_chunk = {0: tokens(embeds), 1: tokens(torch.zeros_like(embeds))}
    patched = ipa.apply(tiny_model, ipa.adapters[BASE_FILE], picture, WEIGHT, 0.0, 1.0, ipa.clip_vision)[0]
    log = instrument(patched)
    denoise_once(patched, 1.0, conds, batch=2)
    assert len(log) == 16
    for entry in log:
        n = INDEX_OF_BLOCK[entry["block"]]
        per_chunk = entry["q"].shape[0] // len(entry["chunks"])
        t = torch.cat([by_chunk[c].expand(per_chunk, -1, -1) for c in entry["chunks"]])
        k_ip, v_ip = t @ raw[f"ip_adapter.{n}.to_k_ip.weight"].t(), t @ raw[f"ip_adapter.{n}.to_v_ip.weight"].t()
        expected = attention(entry["q"], entry["k"], entry["v"], entry["heads"]) + \
            WEIGHT * attention(entry["q"], k_ip, v_ip, entry["heads"])
        torch.testing.assert_close(entry["out"], expected, atol=2e-5, rtol=1e-4,
                                   msg=f"block {entry['block']} (ip_adapter.{n})")


def test_weight_zero_or_sigma_outside_window_gives_the_plain_output_exactly(ipa, tiny_model, conds):
    sampling = tiny_model.get_model_object("model_sampling")
    mid = sampling.percent_to_sigma(0.5)
    plain = {sigma: denoise_once(tiny_model, sigma, conds) for sigma in (mid * 2, mid / 2)}

    def run(weight, start_at, end_at, sigma):
        patched = ipa.apply(tiny_model, ipa.adapters[BASE_FILE], image(1), weight, start_at, end_at,
                            ipa.clip_vision)[0]
        log = instrument(patched)
        out = denoise_once(patched, sigma, conds)
        assert {entry["block"] for entry in log} == set(INDEX_OF_BLOCK), "the patches did not run"
        return out

    assert torch.equal(run(0.0, 0.0, 1.0, mid * 2), plain[mid * 2])
    assert torch.equal(run(WEIGHT, 0.5, 1.0, mid * 2), plain[mid * 2])  # before start_at (higher sigma)
    assert torch.equal(run(WEIGHT, 0.0, 0.5, mid / 2), plain[mid / 2])  # after end_at (lower sigma)
    assert not torch.equal(run(WEIGHT, 0.5, 1.0, mid / 2), plain[mid / 2])  # inside the window
    assert not torch.equal(run(WEIGHT, 0.0, 0.5, mid * 2), plain[mid * 2])


@pytest.mark.parametrize("name", [BASE_FILE, PLUS_FILE])
def test_the_reference_image_changes_the_output(ipa, tiny_model, conds, name):
    def run(picture):
        patched = ipa.apply(tiny_model, ipa.adapters[name], picture, WEIGHT, 0.0, 1.0, ipa.clip_vision)[0]
        return denoise_once(patched, 1.0, conds)

    first = run(image(1))
    assert (first - run(image(2))).abs().max() > 1e-3
    assert (first - run(image(1, batch=2))).abs().max() > 1e-3  # two images: tokens of both


def test_stacks_on_attn2_replace_patches_keyed_per_block_like_the_other_pack(ipa, tiny_model, conds):
    """A patch of the shape ComfyUI_IPAdapter_plus installs (callable(q, k, v, extra_options) keyed
    (block, index)) already on the model keeps running, and this adapter adds its term on top."""
    import comfy.ldm.modules.attention as comfy_attention

    calls = []

    def other_pack_patch(q, k, v, extra):
        calls.append(extra["block"])
        return comfy_attention.optimized_attention(q, k, v, extra["n_heads"]) * 0.5

    other = tiny_model.clone()
    for block in INDEX_OF_BLOCK:
        other.set_model_attn2_replace(other_pack_patch, *block)
    other_only = denoise_once(other, 1.0, conds)
    assert set(calls) == set(INDEX_OF_BLOCK)
    calls.clear()
    both = ipa.apply(other, ipa.adapters[BASE_FILE], image(1), WEIGHT, 0.0, 1.0, ipa.clip_vision)[0]
    log = instrument(both)
    out = denoise_once(both, 1.0, conds)
    assert set(calls) == set(INDEX_OF_BLOCK) and {e["block"] for e in log} == set(INDEX_OF_BLOCK)
    assert (out - other_only).abs().max() > 1e-3


def test_loader_reads_the_real_size_layouts(pack_module):
    """The full-size SD1.5 layouts (shapes of the 44.6 MB / 98.2 MB downloads) load with the reference's
    hyper-parameters: 4 tokens from 1024-wide ViT-H embeds; Resampler 16 queries, depth 4, 12 heads."""
    model = pack_module("adapters.ipadapter.load")
    real = dict(model_channels=320, clip_embed_dim=1024, clip_hidden_dim=1280, resampler_dim=768)
    base = model.ipadapter_from_state_dict(tiny_ipadapter.ipadapter_state_dict(**real), BASE_FILE)
    assert not base.plus and base.input_width == 1024 and base.image_proj.tokens == 4
    plus = model.ipadapter_from_state_dict(tiny_ipadapter.ipadapter_state_dict(plus=True, **real), PLUS_FILE)
    resampler = plus.image_proj
    assert plus.plus and plus.input_width == 1280 and resampler.latents.shape == (1, 16, 768)
    assert len(resampler.layers) == 4 and resampler.layers[0][0].heads == 12
    assert plus.to_k[("middle", 0)].shape == (1280, 768) and plus.to_k[("output", 11)].shape == (320, 768)


# ---------------------------------------------------------------------------------------------- bad inputs

def _write(folder, name, sd):
    import safetensors.torch

    path = os.path.join(folder, name)
    if name.endswith(".bin"):
        torch.save(sd, path)
    else:
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return name


def _sdxl_layout():
    """ip-adapter_sdxl_vit-h: 70 cross-attention layers (1..139), 2048-wide context (widths shrunk)."""
    sd = {"image_proj.proj.weight": torch.randn(4 * 2048, 1024), "image_proj.proj.bias": torch.randn(4 * 2048),
          "image_proj.norm.weight": torch.ones(2048), "image_proj.norm.bias": torch.zeros(2048)}
    for n in range(1, 140, 2):
        sd[f"ip_adapter.{n}.to_k_ip.weight"] = torch.randn(8, 2048)
        sd[f"ip_adapter.{n}.to_v_ip.weight"] = torch.randn(8, 2048)
    return sd


def _faceid_layout():
    """ip-adapter-faceid_sd15.bin: nested dict, MLP image_proj from a 512-d face embedding, LoRA keys."""
    image_proj = {"proj.0.weight": torch.randn(64, 512), "proj.0.bias": torch.randn(64),
                  "proj.2.weight": torch.randn(4 * 768, 64), "proj.2.bias": torch.randn(4 * 768),
                  "norm.weight": torch.ones(768), "norm.bias": torch.zeros(768)}
    ip_adapter = {}
    for n in range(32):
        for proj in ("to_q", "to_k", "to_v", "to_out"):
            ip_adapter[f"{n}.{proj}_lora.down.weight"] = torch.randn(4, 32)
            ip_adapter[f"{n}.{proj}_lora.up.weight"] = torch.randn(32, 4)
        if n % 2:
            ip_adapter[f"{n}.to_k_ip.weight"] = torch.randn(32, 768)
            ip_adapter[f"{n}.to_v_ip.weight"] = torch.randn(32, 768)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


@pytest.mark.parametrize("name, make, expected", [
    ("ip-adapter_sdxl_vit-h.safetensors", _sdxl_layout, ["SDXL", "2048", "70 IP attention layers"]),
    ("ip-adapter-faceid_sd15.bin", _faceid_layout, ["FaceID", "LoRA"]),
    ("not-an-adapter.safetensors", lambda: {"model.diffusion_model.out.2.weight": torch.randn(4, 4)},
     ["is not an IP-Adapter file", "models/ipadapter"]),
    ("scalar-layers.safetensors", lambda: dict(tiny_ipadapter.ipadapter_state_dict(), **{
        "image_proj.proj.weight": torch.randn(3)}), ["image_proj does not match the image projection layout"]),
])
def test_loader_rejects_other_layouts_naming_the_file_and_what_it_found(ipa, comfy, name, make, expected):
    _write(ipa.folder, name, make())
    with pytest.raises(ValueError) as error:
        comfy.NODE_CLASS_MAPPINGS["AMDMIPAdapterLoader"]().load(name)
    message = str(error.value)
    assert name in message and all(part in message for part in expected), message
    assert "ip-adapter_sd15" in message and "models/ipadapter/" in message


def _unreadable_files(folder):
    """name -> (how to make it in ``folder``, what the message must say): the files people end up with."""
    good = os.path.join(folder, BASE_FILE)

    def write(content):
        return lambda path: open(path, "wb").write(content)

    def truncated(path):
        with open(good, "rb") as fh:
            open(path, "wb").write(fh.read(5000))

    def link(target):
        return lambda path: os.symlink(target, path)

    class RunsCode:
        def __reduce__(self):
            return (os.mkdir, (os.path.join(folder, "code_ran"),))

    return {
        "truncated.safetensors": (truncated, "not a complete safetensors file"),
        "zero.safetensors": (write(b""), "empty (0 bytes)"),
        "random.safetensors": (write(bytes(range(256)) * 64), "not a complete safetensors file"),
        "random.bin": (write(bytes(range(3, 256)) * 64), "it is not a checkpoint"),
        "page.safetensors": (write(b"<!DOCTYPE html>\n<html><body>Not found</body></html>"), "web page (HTML)"),
        "page.bin": (write(b"  <html><body>rate limited</body></html>"), "web page (HTML)"),
        "header-only.safetensors": (write(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"), "not a safetensors file"),
        "passwd.safetensors": (link("/etc/passwd"), "(a symbolic link)"),
        "zero-device.safetensors": (link("/dev/zero"), "not a regular file (a symbolic link)"),
        "code.bin": (lambda path: torch.save({"x": RunsCode()}, path), "nothing from the file was run"),
        "list.bin": (lambda path: torch.save([torch.zeros(2)], path), "holds a list, not a dict"),
    }


def test_loader_explains_every_unreadable_file(ipa, comfy):
    loader = comfy.NODE_CLASS_MAPPINGS["AMDMIPAdapterLoader"]()
    for name, (make, expected) in _unreadable_files(ipa.folder).items():
        path = os.path.join(ipa.folder, name)
        make(path)
        try:
            with pytest.raises(ValueError) as error:
                loader.load(name)
        finally:
            os.remove(path)
        message = str(error.value)
        assert f"IP-Adapter file '{name}' (models/ipadapter/): " in message and expected in message, message
        assert "Put an SD1.5 IP-Adapter such as ip-adapter_sd15.safetensors" in message, message
    assert not os.path.exists(os.path.join(ipa.folder, "code_ran")), "loading the file executed its code"
    with pytest.raises(ValueError, match=r"IP-Adapter file 'absent\.safetensors' not found in models/ipadapter/ "
                                         r"\(searched: .*\)\. Put an SD1.5 IP-Adapter"):
        loader.load("absent.safetensors")


@pytest.mark.parametrize("setting", ["weight", "start_at", "end_at"])
def test_apply_refuses_non_finite_settings_by_name(ipa, tiny_model, setting):
    settings = {"weight": WEIGHT, "start_at": 0.0, "end_at": 1.0, setting: float("nan")}
    with pytest.raises(ValueError, match=rf"IP-Adapter Apply \(AMDM\): {setting} is nan; give a finite number"):
        ipa.apply(tiny_model, ipa.adapters[BASE_FILE], image(1), clip_vision=ipa.clip_vision, **settings)


def test_apply_errors_leave_the_model_untouched(ipa, tiny_model, pack_module):
    patch = pack_module("adapters.ipadapter.patch")
    model = tiny_model.clone()
    before = repr(model.model_options)
    adapter = ipa.adapters[BASE_FILE]
    with pytest.raises(patch.IPAdapterApplyError, match=r"no CLIP vision model.*CLIP-ViT-H-14-laion2B-s32B-b79K"
                                                         r"\.safetensors \(in models/clip_vision\)"):
        ipa.apply(model, adapter, image(1), WEIGHT, 0.0, 1.0)
    with pytest.raises(patch.IPAdapterApplyError, match=r"start_at \(0.7\) and end_at \(0.2\)"):
        ipa.apply(model, adapter, image(1), WEIGHT, 0.7, 0.2, ipa.clip_vision)

    wrong_clip = pack_module("adapters.ipadapter.load").ipadapter_from_state_dict(
        tiny_ipadapter.ipadapter_state_dict(clip_embed_dim=32), "narrow.safetensors")
    with pytest.raises(patch.IPAdapterApplyError, match=r"width 32; the connected CLIP vision model gives 48.*"
                                                        r"CLIP-ViT-H-14-laion2B-s32B-b79K"):
        ipa.apply(model, wrong_clip, image(1), WEIGHT, 0.0, 1.0, ipa.clip_vision)

    wider = pack_module("adapters.ipadapter.load").ipadapter_from_state_dict(
        tiny_ipadapter.ipadapter_state_dict(model_channels=64), "wide.safetensors")
    with pytest.raises(patch.IPAdapterApplyError, match=r"'wide.safetensors' does not fit this model at "
                                                        r"\('input', 1\).*32 wide.*ip_adapter.1 expects 64"):
        ipa.apply(model, wider, image(1), WEIGHT, 0.0, 1.0, ipa.clip_vision)
    assert repr(model.model_options) == before


def _graph(clip_vision=True, ipadapter=PLUS_FILE, checkpoint="tiny_sd15.safetensors"):
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "clipv": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": CLIP_VISION_FILE}},
        "img": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0xC04020}},
        "ipa": {"class_type": "AMDMIPAdapterLoader", "inputs": {"ipadapter_file": ipadapter}},
        "apply": {"class_type": "AMDMIPAdapterApply", "inputs": {
            "model": ["ckpt", 0], "ipadapter": ["ipa", 0], "image": ["img", 0],
            "weight": 0.8, "start_at": 0.0, "end_at": 1.0}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a painting"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["apply", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": 1, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "out": {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}},
    }
    if clip_vision:
        graph["apply"]["inputs"]["clip_vision"] = ["clipv", 0]
    return graph


def test_graph_with_core_clip_vision_loader_runs_and_missing_clip_vision_is_explained(ipa, run_graph, tiny_checkpoint):
    from harness.executor import GraphError

    outputs, _ = run_graph(_graph(checkpoint=tiny_checkpoint))
    assert outputs["out"]["images"], "no image came out of the IP-Adapter graph"
    with pytest.raises(GraphError, match=r"no CLIP vision model.*Load CLIP Vision.*"
                                         r"CLIP-ViT-H-14-laion2B-s32B-b79K\.safetensors \(in models/clip_vision\)"):
        run_graph(_graph(clip_vision=False, checkpoint=tiny_checkpoint))
