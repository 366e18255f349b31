"""InteractDiffusion loader and Apply node on the real ComfyUI runtime (tiny SD1.5-topology UNet, random
weights in the real ext_interactdiff_v1.2.pth layout).

Expected values come from independent sources: a key/shape table written out here from the published
architecture (it must add up to the published 841 MB file), float64 transcriptions of the position net and
the gated self-attention written here, and ComfyUI's own sigma schedule for the step counts.
"""
import dataclasses
import math
import os

import pytest
import torch

from harness.tiny_interactdiffusion import tiny_interactdiffusion_state_dict, write_tiny_interactdiffusion

FILE_NAME = "ext_interactdiff_v1.2.pth"
TINY_WIDTHS = [32, 32, 64, 64, 128, 128, 128, 128, 128, 128, 64, 64, 64, 32, 32, 32]
INTERACTIONS = ("a person | feeding | a cat | 16, 40, 120, 200 | 100, 120, 240, 230\n"
                "# a comment line\n"
                "a girl | holding | a blue bottle | 140, 20, 250, 180 | 180, 60, 230, 120")
SHORT = "a person | holds | a cup | 16, 40, 120, 200 | 100, 120, 240, 230"
SIZE = 256  # image pixels; latent 32x32


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def ids(pack_module):
    class Modules:
        model = pack_module("adapters.interactdiffusion.model")
        load = pack_module("adapters.interactdiffusion.load")
        patch = pack_module("adapters.interactdiffusion.patch")
        nodes = pack_module("adapters.interactdiffusion.nodes")
    return Modules


@pytest.fixture(scope="module")
def model_dir(comfy_base, pack):
    path = os.path.join(comfy_base, "models", "interactdiffusion")
    os.makedirs(path, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def id_file(model_dir):
    write_tiny_interactdiffusion(os.path.join(model_dir, FILE_NAME), seed=3)
    return FILE_NAME


@pytest.fixture(scope="module")
def id_sd():
    return tiny_interactdiffusion_state_dict(seed=3)


@pytest.fixture(scope="module")
def id_model(ids, id_file):
    return ids.nodes.InteractDiffusionLoader().load(id_file)[0]


@pytest.fixture(scope="module")
def encoded(checkpoint, comfy):
    _, clip, _ = checkpoint
    positive = comfy.CLIPTextEncode().encode(clip, "a person feeding a cat, a girl holding a bottle")[0]
    negative = comfy.CLIPTextEncode().encode(clip, "")[0]
    return positive, negative


def apply(ids, checkpoint, conditioning, id_model, text=SHORT, strength=1.0, beta=1.0):
    return ids.nodes.InteractDiffusionApply().apply(conditioning, checkpoint[1], id_model, text, SIZE, SIZE,
                                                   strength, beta)[0]


@pytest.fixture(scope="module")
def grounded(ids, checkpoint, encoded, id_model):
    """The positive with two interactions (CLIP encodes are the slow part of these tests: done once)."""
    return apply(ids, checkpoint, encoded[0], id_model, text=INTERACTIONS)


@pytest.fixture(scope="module")
def plain_latent(comfy, checkpoint, encoded):
    return ksample(comfy, checkpoint[0], *encoded, steps=2)


def carried(conditioning, entry=0):
    """(patcher, Interactions) that InteractDiffusion Apply attached to an entry of a conditioning."""
    control = conditioning[entry][1]["control"]
    return control.patcher, control.interactions


def regrounded(conditioning, patcher=None, **changes):
    """The same interactions with another model and/or strength/beta, without new CLIP encodes (the slow part)."""
    out = []
    for tokens, options in conditioning:
        control = options["control"]
        changed = type(control)(patcher or control.patcher, dataclasses.replace(control.interactions, **changes))
        out.append([tokens, dict(options, control=changed)])
    return out


def token_items(interactions):
    """The Interactions of a conditioning as transcription inputs."""
    return [(interactions.subject_embeddings[i], interactions.action_embeddings[i], interactions.object_embeddings[i],
             interactions.subject_boxes[i].tolist(), interactions.object_boxes[i].tolist())
            for i in range(interactions.count)]


class FuserCalls:
    """Every call of a pack fuser during a block (global forward hook: works for models the graph loads)."""

    def __init__(self, fuser_class):
        self.fuser_class = fuser_class
        self.calls = []

    def __enter__(self):
        def hook(module, args, output):
            if isinstance(module, self.fuser_class):
                x, tokens, scale = args
                self.calls.append({"module": module, "width": x.shape[-1], "tokens": tokens.detach().clone(),
                                   "scale": scale, "changed": not torch.equal(output, x)})
        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def ksample(comfy, model, positive, negative, steps=2, cfg=5.0, scheduler="normal", seed=7):
    latent = comfy.EmptyLatentImage().generate(SIZE, SIZE, 1)[0]
    return comfy.KSampler().sample(model, seed, steps, cfg, "euler", scheduler, positive, negative, latent)[0]["samples"]


def record_sigmas(model):
    """A clone of ``model`` whose every UNet call appends (sigma, cond_or_uncond) to the returned list."""
    seen = []
    clone = model.clone()

    def wrapper(apply_model, args):
        seen.append((float(args["timestep"][0]), tuple(args["cond_or_uncond"])))
        return apply_model(args["input"], args["timestep"], **args["c"])
    clone.set_model_unet_function_wrapper(wrapper)
    return clone, seen


# ---------------------------------------------------------------- independent transcriptions (float64)

def transcribed_tokens(sd, items=()):
    """HOI position net as published: ``items`` = [(subject, action, object embeddings, subject box,
    object box)], boxes normalised xyxy; slots after the last item are null. Returns [1, 90, 768]."""
    p = {k[len("position_net."):]: v.double() for k, v in sd.items() if k.startswith("position_net.")}
    freqs = [100 ** (i / 8) for i in range(8)]

    def fourier(box):
        box = torch.tensor(box, dtype=torch.float64)
        return torch.cat([torch.cat([torch.sin(f * box), torch.cos(f * box)]) for f in freqs])

    def mlp(name, v):
        h = torch.nn.functional.silu(p[f"{name}.0.weight"] @ v + p[f"{name}.0.bias"])
        h = torch.nn.functional.silu(p[f"{name}.2.weight"] @ h + p[f"{name}.2.bias"])
        return p[f"{name}.4.weight"] @ h + p[f"{name}.4.bias"]

    def between(s, o):
        xs, ys = sorted([s[0], s[2], o[0], o[2]]), sorted([s[1], s[3], o[1], o[3]])
        return [xs[1], ys[1], xs[2], ys[2]]

    roles = p["position_embedding.emb.weight"]
    out = torch.zeros(3, 30, 768, dtype=torch.float64)
    for i in range(30):
        if i < len(items):
            s_emb, a_emb, o_emb, s_box, o_box = items[i]
            s_in = torch.cat([s_emb.double(), fourier(s_box)])
            o_in = torch.cat([o_emb.double(), fourier(o_box)])
            a_in = torch.cat([a_emb.double(), fourier(between(s_box, o_box))])
        else:
            s_in = o_in = torch.cat([p["null_positive_feature"], p["null_position_feature"]])
            a_in = torch.cat([p["null_action_feature"], p["null_position_feature"]])
        index = p["interaction_embedding.emb.weight"][i]
        out[0, i] = mlp("linears", s_in) + index + roles[0]
        out[1, i] = mlp("linear_action", a_in) + index + roles[2]
        out[2, i] = mlp("linears", o_in) + index + roles[1]
    return out.reshape(1, 90, 768)


def transcribed_fuser(sd, prefix, x, objs, scale, heads=8):
    """GLIGEN gated self-attention with plain softmax attention, from the file's tensors."""
    w = {k[len(prefix):]: v.double() for k, v in sd.items() if k.startswith(prefix)}
    x, objs = x.double(), objs.double()
    ln = lambda v, n: torch.nn.functional.layer_norm(v, v.shape[-1:], w[f"{n}.weight"], w[f"{n}.bias"])
    o = objs @ w["linear.weight"].T + w["linear.bias"]
    h = ln(torch.cat([x, o], dim=1), "norm1")
    b, n, c = h.shape
    q, k, v = (h @ w[f"attn.to_{t}.weight"].T for t in "qkv")
    q, k, v = (t.reshape(b, n, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // heads), dim=-1) @ v
    attn = attn.transpose(1, 2).reshape(b, n, c) @ w["attn.to_out.0.weight"].T + w["attn.to_out.0.bias"]
    x = x + scale * torch.tanh(w["alpha_attn"]) * attn[:, :x.shape[1]]
    a, gate = (ln(x, "norm2") @ w["ff.net.0.proj.weight"].T + w["ff.net.0.proj.bias"]).chunk(2, dim=-1)
    ff = (a * torch.nn.functional.gelu(gate)) @ w["ff.net.2.weight"].T + w["ff.net.2.bias"]
    return x + scale * torch.tanh(w["alpha_dense"]) * ff


def sd15_table(width=320):
    """The published add-on layout written out from the architecture: 16 SD1.5 transformer blocks
    (320/640/1280 channels, 8 heads), 17 fuser tensors each, and the HOI position net (in/out 768,
    8 Fourier frequencies -> 64, hidden 512, 30 interactions, 3 roles). ``width`` scales the UNet."""
    blocks = {"input_blocks.1": 1, "input_blocks.2": 1, "input_blocks.4": 2, "input_blocks.5": 2,
              "input_blocks.7": 4, "input_blocks.8": 4, "middle_block": 4,
              "output_blocks.3": 4, "output_blocks.4": 4, "output_blocks.5": 4,
              "output_blocks.6": 2, "output_blocks.7": 2, "output_blocks.8": 2,
              "output_blocks.9": 1, "output_blocks.10": 1, "output_blocks.11": 1}
    table = {}
    for block, mult in blocks.items():
        c = mult * width
        f = f"{block}.1.transformer_blocks.0.fuser."
        table.update({f + "linear.weight": (c, 768), f + "linear.bias": (c,),
                      f + "attn.to_q.weight": (c, c), f + "attn.to_k.weight": (c, c), f + "attn.to_v.weight": (c, c),
                      f + "attn.to_out.0.weight": (c, c), f + "attn.to_out.0.bias": (c,),
                      f + "ff.net.0.proj.weight": (2 * 4 * c, c), f + "ff.net.0.proj.bias": (2 * 4 * c,),
                      f + "ff.net.2.weight": (c, 4 * c), f + "ff.net.2.bias": (c,),
                      f + "norm1.weight": (c,), f + "norm1.bias": (c,), f + "norm2.weight": (c,), f + "norm2.bias": (c,),
                      f + "alpha_attn": (), f + "alpha_dense": ()})
    pn = "position_net."
    for mlp in ("linears", "linear_action"):
        table.update({pn + mlp + ".0.weight": (512, 768 + 64), pn + mlp + ".0.bias": (512,),
                      pn + mlp + ".2.weight": (512, 512), pn + mlp + ".2.bias": (512,),
                      pn + mlp + ".4.weight": (768, 512), pn + mlp + ".4.bias": (768,)})
    table.update({pn + "interaction_embedding.emb.weight": (30, 768), pn + "position_embedding.emb.weight": (3, 768),
                  pn + "null_positive_feature": (768,), pn + "null_action_feature": (768,),
                  pn + "null_position_feature": (64,)})
    return table


# ---------------------------------------------------------------- layout and loader

def test_sd15_key_and_shape_table_matches_published_file(ids):
    table = sd15_table()
    assert len(table) == 16 * 17 + 17
    params = sum(math.prod(shape) for shape in table.values())
    assert abs(params * 4 / 1e6 - 841) < 1, f"{params} fp32 params is not the published 841 MB file"
    assert ids.load.expected_layout(320) == table
    meta = {k: torch.empty(shape, device="meta") for k, shape in table.items()}
    assert ids.load.validate_state_dict(meta, FILE_NAME) == 320
    meta["output_blocks.11.1.transformer_blocks.0.fuser.ff.net.2.weight"] = torch.empty(320, 320, device="meta")
    with pytest.raises(ids.load.InteractDiffusionFileError, match=r"ff\.net\.2\.weight is \(320, 320\), expected \(320, 1280\)"):
        ids.load.validate_state_dict(meta, FILE_NAME)


def test_tiny_writer_has_the_real_layout_at_tiny_width(id_sd):
    table = sd15_table(width=32)
    assert {k: tuple(v.shape) for k, v in id_sd.items()} == table
    assert all(v.dtype == torch.float32 for v in id_sd.values())


def test_loader_node_lists_folder_and_loads_the_tiny_file(ids, comfy, id_file, id_sd, id_model):
    listed = comfy.NODE_CLASS_MAPPINGS["InteractDiffusionLoader"].INPUT_TYPES()["required"]["interactdiffusion_name"][0]
    assert id_file in listed
    model = id_model.model
    assert isinstance(model, ids.model.InteractDiffusion)
    assert [f.query_dim for f in model.fusers] == TINY_WIDTHS
    fuser_7 = model.fusers[7].state_dict()
    for name, value in fuser_7.items():
        assert torch.equal(value.float(), id_sd["output_blocks.3.1.transformer_blocks.0.fuser." + name]), name
    assert torch.equal(model.position_net.linear_action[4].weight.float(), id_sd["position_net.linear_action.4.weight"])


def _save(path, sd):
    torch.save(sd, path)
    return os.path.basename(path)


def _gligen_file(sd):
    hoi = ("linear_action", "interaction_embedding", "position_embedding", "null_action_feature")
    return {k: v for k, v in sd.items() if not any(k.startswith("position_net." + h) for h in hoi)}


def _sd2_file(sd):
    out = dict(sd)
    for key, value in sd.items():
        if key.endswith("fuser.linear.weight"):
            out[key] = torch.randn(value.shape[0], 1024)
    return out


def _sdxl_file(sd):
    import comfy.gligen

    out = {k: v for k, v in sd.items() if k.startswith("position_net.")}
    blocks = {"input_blocks.4": (64, 2), "input_blocks.7": (128, 10)}  # SDXL: no level-0 attention, deep stacks
    for block, (width, depth) in blocks.items():
        fuser = comfy.gligen.GatedSelfAttentionDense(width, 2048, width // 64 or 1, 64)
        for d in range(depth):
            for name, value in fuser.state_dict().items():
                out[f"{block}.1.transformer_blocks.{d}.fuser.{name}"] = torch.zeros(value.shape, dtype=torch.float16)
    return out


def _diffusers_file(sd):
    return {k.replace("input_blocks.1.1.", "down_blocks.0.attentions.0."): v for k, v in sd.items()}


def _missing(sd):
    return {k: v for k, v in sd.items() if k != "middle_block.1.transformer_blocks.0.fuser.attn.to_k.weight"}


def _unexpected(sd):
    return dict(sd, **{"model.diffusion_model.out.0.weight": torch.zeros(4)})


def _wrong_width(sd):
    return tiny_interactdiffusion_state_dict(seed=0, model_channels=64) | {
        "input_blocks.2.1.transformer_blocks.0.fuser.attn.to_q.weight": torch.zeros(32, 32)}


BAD_FILES = {
    "gligen.pth": (_gligen_file, r"is a GLIGEN file .*GLIGENLoader from models/gligen/"),
    "sd2_shaped.pth": (_sd2_file, r"is SD2\.x-shaped: its fusers take 1024-wide grounding tokens"),
    "sdxl_shaped.pth": (_sdxl_file, r"SDXL-shaped\. InteractDiffusion in ComfyUI supports SD1\.x only"),
    "diffusers.pth": (_diffusers_file, r"is in diffusers format"),
    "missing.pth": (_missing, r"missing 1 keys: middle_block\.1\.transformer_blocks\.0\.fuser\.attn\.to_k\.weight"),
    "unexpected.pth": (_unexpected, r"unexpected 1 keys: model\.diffusion_model\.out\.0\.weight"),
    "wrong_width.pth": (_wrong_width, r"1 tensors have the wrong shape .*model_channels 64: input_blocks\.2\.1\."
                                      r"transformer_blocks\.0\.fuser\.attn\.to_q\.weight is \(32, 32\), expected \(64, 64\)"),
    "full_checkpoint.pth": (lambda sd: {"model": dict(sd), "step": torch.tensor(1)},
                            r"not a flat state dict of tensors .*interact-diffusion-v1"),
}


@pytest.mark.parametrize("file_name", sorted(BAD_FILES))
def test_loader_rejects_other_files_clearly(ids, model_dir, id_sd, file_name):
    make, message = BAD_FILES[file_name]
    _save(os.path.join(model_dir, file_name), make(id_sd))
    with pytest.raises(ids.load.InteractDiffusionFileError, match=message) as error:
        ids.nodes.InteractDiffusionLoader().load(file_name)
    assert f"'{file_name}'" in str(error.value) and "models/interactdiffusion/" in str(error.value)


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_loader_refuses_files_that_need_code_execution(ids, model_dir, id_sd, tmp_path):
    marker = str(tmp_path / "code_ran")
    _save(os.path.join(model_dir, "pickled_code.pth"), dict(id_sd, payload=_RunsCodeWhenUnpickled(marker)))
    with pytest.raises(ids.load.InteractDiffusionFileError, match=r"'pickled_code\.pth' \(models/interactdiffusion/\): it was refused: .*weights_only=True; nothing from the file was run"):
        ids.nodes.InteractDiffusionLoader().load("pickled_code.pth")
    assert not os.path.exists(marker), "loading the file executed its code"


def test_loader_reports_truncated_and_absent_files(ids, model_dir, id_file):
    with open(os.path.join(model_dir, id_file), "rb") as source:
        head = source.read(4096)
    with open(os.path.join(model_dir, "truncated.pth"), "wb") as target:
        target.write(head)
    with pytest.raises(ids.load.InteractDiffusionFileError, match=r"'truncated\.pth' \(models/interactdiffusion/\): it is an incomplete PyTorch archive"):
        ids.nodes.InteractDiffusionLoader().load("truncated.pth")
    with pytest.raises(ids.load.InteractDiffusionFileError, match=r"'nope\.pth' not found in models/interactdiffusion/ .*jiuntian/interactiondiffusion-weight"):
        ids.nodes.InteractDiffusionLoader().load("nope.pth")


NOT_CHECKPOINTS = {
    "page.pth": (b"\n<!DOCTYPE html><html><head><title>Hugging Face</title></head></html>", "it is a web page (HTML)"),
    "random.pth": (bytes(range(7, 256)) * 40, "it is not a checkpoint"),
    "empty.pth": (b"", "it is empty (0 bytes)"),
}


@pytest.mark.parametrize("file_name", sorted(NOT_CHECKPOINTS))
def test_loader_calls_web_pages_and_random_bytes_not_a_checkpoint(ids, model_dir, file_name):
    content, message = NOT_CHECKPOINTS[file_name]
    with open(os.path.join(model_dir, file_name), "wb") as fh:
        fh.write(content)
    with pytest.raises(ids.load.InteractDiffusionFileError) as error:
        ids.nodes.InteractDiffusionLoader().load(file_name)
    text = str(error.value)
    assert message in text and "pickled" not in text, text
    assert f"'{file_name}' (models/interactdiffusion/)" in text and "Put the add-on file ext_interactdiff_v1.2.pth" in text


# ---------------------------------------------------------------- architecture against transcriptions

def test_position_net_tokens_match_the_published_formula(ids, id_model, id_sd):
    gen = torch.Generator().manual_seed(5)
    items = [(torch.randn(768, generator=gen), torch.randn(768, generator=gen), torch.randn(768, generator=gen),
              [0.1, 0.2, 0.5, 0.9], [0.4, 0.1, 0.95, 0.6]),
             (torch.randn(768, generator=gen), torch.randn(768, generator=gen), torch.randn(768, generator=gen),
              [0.6, 0.6, 0.9, 0.8], [0.05, 0.1, 0.3, 0.35])]
    interactions = ids.patch.Interactions(
        torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items]), torch.stack([i[2] for i in items]),
        torch.tensor([i[3] for i in items]), torch.tensor([i[4] for i in items]), 1.0, 1.0, SIZE, SIZE)
    model = id_model.model
    tokens = model.tokens(interactions, torch.device("cpu"))
    assert tokens.shape == (1, 90, 768)
    torch.testing.assert_close(tokens.double(), transcribed_tokens(id_sd, items), atol=2e-5, rtol=1e-5)
    null = model.tokens(None, torch.device("cpu"))
    torch.testing.assert_close(null.double(), transcribed_tokens(id_sd), atol=2e-5, rtol=1e-5)
    assert (tokens - null).abs().max() > 0.1


def test_fuser_matches_the_published_gated_self_attention(id_model, id_sd):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 64, 64, generator=gen)
    objs = torch.randn(2, 90, 768, generator=gen)
    fuser = id_model.model.fusers[3]  # input_blocks.5, 64 channels
    out = fuser(x, objs, 0.8)
    expected = transcribed_fuser(id_sd, "input_blocks.5.1.transformer_blocks.0.fuser.", x, objs, 0.8)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-5)
    assert (out - x).abs().max() > 1e-2


# ---------------------------------------------------------------- Apply node

def test_apply_attaches_interactions_for_both_passes(ids, checkpoint, encoded, id_model, grounded):
    positive, _ = encoded
    assert all("control" not in entry[1] for entry in positive), "the input conditioning was modified"
    patcher, interactions = carried(grounded)
    assert patcher is id_model and torch.equal(grounded[0][0], positive[0][0])
    # ComfyUI copies a control marked so onto the negative: one object, so cond and uncond batch together
    assert grounded[0][1]["control_apply_to_uncond"] is True
    assert grounded[0][1]["control"].get_models() == [id_model]
    assert interactions.count == 2 and (interactions.strength, interactions.beta) == (1.0, 1.0)
    torch.testing.assert_close(interactions.subject_boxes[0], torch.tensor([16, 40, 120, 200]) / 256.0)
    torch.testing.assert_close(interactions.object_boxes[1], torch.tensor([180, 60, 230, 120]) / 256.0)
    # Phrase feature = CLIP's pooled output before the projection: the final (layer-normed) hidden state of
    # the end-of-text token, as the original's text_model_output.pooler_output.
    clip = checkpoint[1]
    tokens = clip.tokenize("holding")
    hidden = clip.encode_from_tokens(tokens)
    end_of_text = [token for token, _ in tokens["l"][0]].index(49407)
    torch.testing.assert_close(interactions.action_embeddings[1], hidden[0, end_of_text].float())
    assert (interactions.action_embeddings[1] - interactions.action_embeddings[0]).abs().max() > 1e-3


BAD_TEXT = {
    "31 interactions": ("\n".join(["a | b | c | 0, 0, 8, 8 | 8, 8, 16, 16"] * 31), r"31 interactions given; at most 30"),
    "empty": ("  \n# only a comment\n", r"no interaction given"),
    "box outside": ("a | b | c | 0, 0, 8, 8 | 200, 100, 300, 120", r"line 1: box 200, 100, 300, 120 lies outside the 256x256 image"),
    "missing field": ("a person | feeding | 0, 0, 8, 8 | 8, 8, 16, 16\nok", r"line 1: expected 5 fields"),
    "bad box": ("a | b | c | 0, 0, 8, 8 | 8, 8, 16, 16\na | b | c | 0, 0, 8 | 1, 1, 2, 2", r"line 2: '0, 0, 8' is not a box"),
}


@pytest.mark.parametrize("case", sorted(BAD_TEXT))
def test_apply_rejects_bad_interaction_text(ids, checkpoint, encoded, id_model, case):
    text, message = BAD_TEXT[case]
    with pytest.raises(ValueError, match=message):
        apply(ids, checkpoint, encoded[0], id_model, text=text)


def test_apply_rejects_wrong_wiring(ids, checkpoint, encoded, id_model, grounded):
    with pytest.raises(ValueError, match=r"already carries GLIGEN or InteractDiffusion grounding"):
        apply(ids, checkpoint, grounded, id_model)
    with pytest.raises(ValueError, match=r"not an InteractDiffusion model: connect an InteractDiffusion Loader"):
        apply(ids, checkpoint, encoded[0], checkpoint[0])
    with pytest.raises(ValueError, match=r"clip input is None"):
        ids.nodes.InteractDiffusionApply().apply(encoded[0], None, id_model, INTERACTIONS, SIZE, SIZE, 1.0, 1.0)


# ---------------------------------------------------------------- sampling

def split_passes(model):
    """A clone of ``model`` that runs every batched UNet call as one call per cond/uncond chunk (what
    ComfyUI does when the chunks cannot be batched), with the same patches; the returned list counts calls."""
    calls = []
    clone = model.clone()

    def wrapper(apply_model, args):
        kinds = args["cond_or_uncond"]
        n = len(kinds)
        outputs = []
        for index, kind in enumerate(kinds):
            c = {k: (v.chunk(n)[index] if isinstance(v, torch.Tensor) else v) for k, v in args["c"].items()}
            c["transformer_options"] = dict(args["c"]["transformer_options"], cond_or_uncond=[kind])
            calls.append((kind,))
            outputs.append(apply_model(args["input"].chunk(n)[index], args["timestep"].chunk(n)[index], **c))
        return torch.cat(outputs)
    clone.set_model_unet_function_wrapper(wrapper)
    return clone, calls


def test_one_batched_pass_per_step_with_null_objects_for_uncond(ids, comfy, checkpoint, encoded, id_model, id_sd,
                                                                grounded, plain_latent):
    cond_tokens = transcribed_tokens(id_sd, token_items(carried(grounded)[1]))
    null_tokens = transcribed_tokens(id_sd)
    recorded, passes = record_sigmas(checkpoint[0])
    with FuserCalls(ids.model.GatedSelfAttentionFuser) as fusers:
        grounded_latent = ksample(comfy, recorded, grounded, encoded[1], steps=2)

    assert [sorted(kinds) for _, kinds in passes] == [[0, 1], [0, 1]], "expected ONE cond+uncond pass per step"
    assert len(fusers.calls) == 16 * len(passes)
    fuser_list = list(id_model.model.fusers)
    for index, call in enumerate(fusers.calls):
        assert call["module"] is fuser_list[index % 16] and call["width"] == TINY_WIDTHS[index % 16]
        assert call["changed"] and call["scale"] == 1.0
    for (_, kinds), start in zip(passes, range(0, len(fusers.calls), 16)):
        for call in fusers.calls[start:start + 16]:
            for row, kind in enumerate(kinds):
                expected = cond_tokens if kind == 0 else null_tokens
                torch.testing.assert_close(call["tokens"][row:row + 1].double(), expected, atol=2e-5, rtol=1e-5)
    assert (grounded_latent - plain_latent).abs().max() > 1e-3

    # the same sampling run as two passes per step (cond, then uncond) gives the same latent, within the
    # float difference batching makes for the plain model (batched matmuls round differently; cfg 5 scales it)
    split, calls = split_passes(checkpoint[0])
    two_pass_latent = ksample(comfy, split, grounded, encoded[1], steps=2)
    assert sorted(calls) == [(0,), (0,), (1,), (1,)]
    plain_split = ksample(comfy, split_passes(checkpoint[0])[0], *encoded, steps=2)
    batching_noise = (plain_split - plain_latent).abs().max().item()
    difference = (two_pass_latent - grounded_latent).abs().max().item()
    assert difference <= 4 * batching_noise + 1e-5, (difference, batching_noise)


def test_fuser_stops_after_beta_of_the_sampling(ids, comfy, checkpoint, encoded, grounded):
    model = checkpoint[0]
    model_sampling = model.get_model_object("model_sampling")
    steps = 4
    for beta in (0.5, 0.3):
        recorded = model.clone()
        calls_per_pass = []
        with FuserCalls(ids.model.GatedSelfAttentionFuser) as fusers:
            def count(apply_model, args):
                before = len(fusers.calls)
                result = apply_model(args["input"], args["timestep"], **args["c"])
                calls_per_pass.append((int(model_sampling.timestep(args["timestep"][:1])), len(fusers.calls) - before))
                return result
            recorded.set_model_unet_function_wrapper(count)
            ksample(comfy, recorded, regrounded(grounded, beta=beta), encoded[1], steps=steps, cfg=1.0)  # cond only
        # The reference WebUI extension (timestep_to_alpha, stage_one = beta): on while t >= (1 - beta) * 1000.
        expected = [16 if t >= (1 - beta) * 1000 else 0 for t, _ in calls_per_pass]
        assert [calls for _, calls in calls_per_pass] == expected, (beta, calls_per_pass)
        # normal schedule, t = 999, 666, 333, 0: 2 steps for beta 0.5 and 1 for beta 0.3 (here also the
        # diffusers pipeline's int(beta * steps)).
        assert sum(calls > 0 for _, calls in calls_per_pass) == {0.5: 2, 0.3: 1}[beta]


def test_scheduled_sampling_gate_at_every_timestep(ids, checkpoint, id_model):
    """The gate for every SD1.x timestep, against the reference rule t >= (1 - beta) * 1000 evaluated in
    integers (beta in percent), including the boundary timesteps."""
    model_sampling = checkpoint[0].get_model_object("model_sampling")
    for percent in (5, 30, 50, 70, 85, 100):
        patch = ids.patch.FuserPatch(id_model.model, None, None, 1.0, ids.patch.first_inactive_timestep(percent / 100))
        active = [patch.active({"sigmas": model_sampling.sigma(torch.tensor([float(t)]))}) for t in range(1000)]
        assert active == [t >= 10 * (100 - percent) for t in range(1000)], percent


def test_strength_zero_gives_the_plain_model_exactly(ids, comfy, checkpoint, encoded, id_model, grounded,
                                                    plain_latent):
    model, (positive, negative) = checkpoint[0], encoded
    with FuserCalls(ids.model.GatedSelfAttentionFuser) as fusers:
        off = apply(ids, checkpoint, positive, id_model, strength=0.0)
        assert torch.equal(ksample(comfy, model, off, negative, steps=2), plain_latent)
    assert not fusers.calls
    assert apply(ids, checkpoint, positive, id_model, beta=0.0) is positive  # never active: nothing attached

    # The installed middle patch at strength 0 is the identity, bit for bit, in the same batch.
    interactions = dataclasses.replace(carried(grounded)[1], strength=0.0)
    patch = ids.patch.InteractionControl(id_model, interactions).fuser_patch(torch.device("cpu"))
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([3.0])
    options = {"patches": {"middle_patch": [patch]}, "cond_or_uncond": [0], "sigmas": sigma}
    with FuserCalls(ids.model.GatedSelfAttentionFuser) as fusers:
        patched = model.model.apply_model(x, sigma, c_crossattn=positive[0][0], transformer_options=options)
    assert not fusers.calls
    assert torch.equal(patched, model.model.apply_model(x, sigma, c_crossattn=positive[0][0]))


def test_batched_rows_get_cond_or_null_tokens_per_chunk(ids, checkpoint, encoded, id_model, id_sd, grounded):
    """A batch of 2 images with cond and uncond chunks in one UNet call (as other samplers may batch them)."""
    interactions = dataclasses.replace(carried(grounded)[1], width=128, height=128)  # latent 16x16
    patch = ids.patch.InteractionControl(id_model, interactions).fuser_patch(torch.device("cpu"))
    x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([2.0])
    context = torch.cat([encoded[0][0][0]] * 2 + [encoded[1][0][0]] * 2)
    options = {"patches": {"middle_patch": [patch]}, "cond_or_uncond": [0, 1], "sigmas": sigma}
    with FuserCalls(ids.model.GatedSelfAttentionFuser) as fusers:
        checkpoint[0].model.apply_model(x, sigma.repeat(4), c_crossattn=context, transformer_options=options)
    assert len(fusers.calls) == 16
    cond = transcribed_tokens(id_sd, token_items(carried(grounded)[1]))
    null = transcribed_tokens(id_sd)
    tokens = fusers.calls[0]["tokens"].double()
    assert tokens.shape == (4, 90, 768)
    for row, expected in enumerate((cond, cond, null, null)):
        torch.testing.assert_close(tokens[row:row + 1], expected, atol=2e-5, rtol=1e-5)


def test_width_mismatch_is_reported_at_sampling(ids, comfy, checkpoint, encoded, model_dir, grounded):
    write_tiny_interactdiffusion(os.path.join(model_dir, "wide.pth"), seed=1, model_channels=64)
    wide = ids.nodes.InteractDiffusionLoader().load("wide.pth")[0]
    assert [f.query_dim for f in wide.model.fusers][:2] == [64, 64]
    with pytest.raises(ids.model.ModelMismatchError, match=r"'wide\.pth' does not fit this model: transformer block 0 of the UNet has 32 channels, "
                                                         r"the fuser for input_blocks\.1 expects 64"):
        ksample(comfy, checkpoint[0], regrounded(grounded, wide), encoded[1], steps=1)
    assert torch.isfinite(ksample(comfy, checkpoint[0], *encoded, steps=1, cfg=1.0)).all()  # nothing left patched


def _graph(id_file, sampler):
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a person feeding a cat"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "idl": {"class_type": "InteractDiffusionLoader", "inputs": {"interactdiffusion_name": id_file}},
        "ida": {"class_type": "InteractDiffusionApply", "inputs": {
            "conditioning": ["pos", 0], "clip": ["ckpt", 1], "interactdiffusion": ["idl", 0],
            "interactions": SHORT, "width": SIZE, "height": SIZE, "strength": 1.0, "beta": 1.0}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}},
        "out": {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}},
    }
    graph["sampler"] = sampler
    return graph


def test_workflow_with_core_ksampler(ids, run_graph, tiny_checkpoint, id_file):
    sampler = {"class_type": "KSampler", "inputs": {
        "model": ["ckpt", 0], "positive": ["ida", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
        "seed": 1, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    with FuserCalls(ids.model.GatedSelfAttentionFuser) as fusers:
        outputs, _ = run_graph(_graph(id_file, sampler))
    assert outputs["out"]["images"]
    assert len(fusers.calls) == 2 * 16 and all(c["changed"] for c in fusers.calls)  # cfg 1: cond passes only


def test_amdm_sampler_with_interactdiffusion_as_main_and_as_aux_branch(ids, comfy, encoded, checkpoint, model_dir,
                                                                       id_model, id_sd, grounded):
    """One AMDM run, InteractDiffusion on both branches (two files): the main branch's fusers run every
    step, the aux branch's only in steps 0..s, where its uncond passes see null objects (main cfg 1:
    cond passes only, to keep the test short)."""
    write_tiny_interactdiffusion(os.path.join(model_dir, "aux.pth"), seed=4)
    aux_model = ids.nodes.InteractDiffusionLoader().load("aux.pth")[0]
    aux_positive = regrounded(grounded, aux_model)
    model, (_, negative) = checkpoint[0], encoded
    steps, window = 3, 1
    latent = comfy.EmptyLatentImage().generate(SIZE, SIZE, 1)[0]
    with FuserCalls(ids.model.GatedSelfAttentionFuser) as fusers:
        result = comfy.NODE_CLASS_MAPPINGS["AMDMAggregateSampler"]().sample(
            model=model, positive=grounded, negative=negative, model_2=model, positive_2=aux_positive,
            negative_2=negative, latent_image=latent, seed=1, steps=steps, cfg=1.0, cfg_2=5.0, sampler_name="ddim",
            scheduler="ddim_uniform", denoise=1.0, weight_2=0.5, aggregation_steps=window, aggregation="paper",
            deviation_step=0.3, mean_mode="reference", noise="independent")[0]["samples"]
    assert torch.isfinite(result).all()
    aux_sd = tiny_interactdiffusion_state_dict(seed=4)
    branches = {"main": (id_model, id_sd, steps, 1), "aux": (aux_model, aux_sd, window + 1, 2)}  # rows per pass
    items = token_items(carried(grounded)[1])
    for name, (patcher, sd, active_steps, rows) in branches.items():
        mine = [c for c in fusers.calls if any(c["module"] is f for f in patcher.model.fusers)]
        assert len(mine) == active_steps * 16, f"{name} branch: {len(mine)} fuser calls (one pass per step)"
        null, cond = transcribed_tokens(sd), transcribed_tokens(sd, items)
        tokens = [row.unsqueeze(0).double() for c in mine for row in c["tokens"]]
        assert len(tokens) == len(mine) * rows
        is_null = [torch.allclose(t, null, atol=2e-5) for t in tokens]
        assert sum(is_null) == len(tokens) * (rows - 1) // 2, f"{name} branch: uncond rows must see null objects"
        assert all(torch.allclose(t, cond, atol=2e-5) for t, n in zip(tokens, is_null) if not n)


@pytest.mark.parametrize("setting", ["strength", "beta"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_apply_refuses_non_finite_settings_by_name(ids, checkpoint, encoded, id_model, setting, value):
    settings = {"strength": 1.0, "beta": 1.0, setting: value}
    with pytest.raises(ValueError, match=rf"InteractDiffusion Apply: {setting} is {value}; give a finite number"):
        ids.nodes.InteractDiffusionApply().apply(encoded[0], checkpoint[1], id_model, SHORT, SIZE, SIZE, **settings)


def test_quoted_input_is_cut_to_about_200_characters(ids, checkpoint, encoded, id_model):
    line = "a person | holds | a cup | 16, 40, 120, 200 | " + "1" * 1_000_000
    with pytest.raises(ValueError) as error:
        apply(ids, checkpoint, encoded[0], id_model, text=line)
    assert len(str(error.value)) < 700 and "(1000046 characters)" in str(error.value), str(error.value)[:800]


def test_size_is_checked_against_the_sampled_latent(ids, comfy, checkpoint, encoded, grounded):
    """Boxes drawn for 256x256 on a 64x64-pixel latent: refused at the first step, as MIGC Apply does."""
    latent = comfy.EmptyLatentImage().generate(64, 64, 1)[0]
    with pytest.raises(ValueError, match=r"InteractDiffusion Apply was set for a 256x256 image \(latent 32x32\) "
                                         r"but the sampler's latent is 8x8 \(64x64 pixels\)"):
        comfy.KSampler().sample(checkpoint[0], 1, 1, 5.0, "euler", "normal", grounded, encoded[1], latent)
    assert torch.isfinite(ksample(comfy, checkpoint[0], *encoded, steps=1, cfg=1.0)).all()  # nothing left patched


def test_bf16_unet_matches_fp32_within_bf16_precision(ids, comfy, checkpoint, encoded, grounded, plain_latent):
    """The fusers follow the UNet's dtype (comfy.ops manual_cast): with the tiny UNet cast to bf16 the
    grounded result differs from fp32 by at most twice what bf16 does to the plain model, plus 1% (relative
    L2), while the fusers themselves change the output by more than 3 times that."""
    from test_ipadapter_sampler import bf16_copy

    bf16 = bf16_copy(checkpoint[0])
    with FuserCalls(ids.model.GatedSelfAttentionFuser) as fusers:
        bf16_out = ksample(comfy, bf16, grounded, encoded[1], steps=2).float()
    assert len(fusers.calls) == 2 * 16  # one batched pass per step: the fusers ran in every block
    fp32_out = ksample(comfy, checkpoint[0], grounded, encoded[1], steps=2)
    plain_bf16 = ksample(comfy, bf16, *encoded, steps=2).float()
    error = ((bf16_out - fp32_out).norm() / fp32_out.norm()).item()
    plain_error = ((plain_bf16 - plain_latent).norm() / plain_latent.norm()).item()
    effect = ((plain_bf16 - bf16_out).norm() / fp32_out.norm()).item()
    assert error <= 2 * plain_error + 0.01 and effect > 3 * error, (error, plain_error, effect)
