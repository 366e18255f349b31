"""MIGC: file format and loader, the architecture pieces against hand computations, and the attn2
replacement on the real tiny UNet (blocks, schedule, batches, cond/uncond split, no cross-talk).

Model calls go through ComfyUI's BaseModel.apply_model with the transformer_options a sampler builds
(cond_or_uncond, sigmas, sample_sigmas), so every step index and row layout is chosen by the test.
"""
import contextlib
import os

import pytest
import torch

from harness.tiny_migc import MIGC_BLOCKS, migc_sub_key_shapes, write_tiny_migc

SCHEDULE = torch.tensor([14.6, 8.0, 4.0, 2.0, 1.0, 0.0])
WIDTH = HEIGHT = 128  # latent 16x16: middle block 2x2, output blocks 3-5 4x4


@pytest.fixture(scope="module")
def migc_files(comfy, pack, comfy_base):
    folder = os.path.join(comfy_base, "models", "migc")
    write_tiny_migc(os.path.join(folder, "MIGC_SD14.ckpt"), seed=1)
    write_tiny_migc(os.path.join(folder, "MIGC_middle_out4.ckpt"), seed=2, blocks=[("middle", 0), ("output", 4)])
    return folder


@pytest.fixture(scope="module")
def migc_nodes(pack_module):
    return pack_module("adapters.migc.nodes")


@pytest.fixture(scope="module")
def patch_mod(pack_module):
    return pack_module("adapters.migc.patch")


@pytest.fixture(scope="module")
def migc(migc_files, migc_nodes):
    return migc_nodes.MIGCLoader().load("MIGC_SD14.ckpt")[0]


def _instances(seed, count):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 77, 768, generator=gen) for _ in range(count)], torch.randn(count, 768, generator=gen)


def _contexts(seed, rows):
    return torch.randn(rows, 77, 768, generator=torch.Generator().manual_seed(seed))


def call_unet(patcher, x, step, context, cond_or_uncond):
    """One UNet call as ComfyUI's calc_cond_batch makes it: x and context hold len(cond_or_uncond) chunks."""
    from comfy.patcher_extension import copy_nested_dicts

    options = copy_nested_dicts(patcher.model_options["transformer_options"])
    sigma = SCHEDULE[step].repeat(x.shape[0])
    options.update(cond_or_uncond=list(cond_or_uncond), sigmas=sigma, sample_sigmas=SCHEDULE)
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, c_crossattn=context, transformer_options=options)


@contextlib.contextmanager
def spies(patched, weights):
    """Count the attn2 replacement calls per block and record the MIGC module runs (block, ca_x shape)."""
    spied = patched.clone()
    replacements = spied.model_options["transformer_options"]["patches_replace"]["attn2"]
    record = {"replaced": [], "migc": []}
    for key, function in list(replacements.items()):
        def counting(q, k, v, extra, function=function, key=key):
            record["replaced"].append(key)
            return function(q, k, v, extra)
        replacements[key] = counting
    hooks = [weights.layer(block).register_forward_hook(
        lambda module, args, out, block=block: record["migc"].append((block, tuple(args[0].shape))))
        for block in weights.blocks]
    try:
        yield spied, record
    finally:
        for hook in hooks:
            hook.remove()


def record_attn2(patched):
    """A clone that records the input and (final) output of attn2 in every block: {block: {"n", "out"}}."""
    recorded = {}
    clone = patched.clone()

    def record_in(n, context, value, extra):
        recorded.setdefault(extra["block"], {})["n"] = n.clone()
        return n, context, value

    def record_out(out, extra):
        recorded[extra["block"]]["out"] = out.clone()
        return out

    clone.set_model_attn2_patch(record_in)
    clone.set_model_attn2_output_patch(record_out)
    return clone, recorded


def assert_close(a, b, tol=1e-5):
    """Equal up to float round-off (batched and single calls reduce in different orders)."""
    scale = max(1.0, b.abs().max().item())
    assert (a - b).abs().max().item() <= tol * scale, f"max diff {(a - b).abs().max().item():.3g}"


def hand_cross_attention(attn2, n, context):
    """to_out(softmax(q k^T / sqrt(d)) v) per head, written out with the layer's weights."""
    heads = 8
    q, k, v = n @ attn2.to_q.weight.T, context @ attn2.to_k.weight.T, context @ attn2.to_v.weight.T
    d = q.shape[-1] // heads

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], heads, d).permute(0, 2, 1, 3)

    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / d ** 0.5, dim=-1)
    out = (weights @ split(v)).permute(0, 2, 1, 3).reshape(n.shape[0], n.shape[1], heads * d)
    return out @ attn2.to_out[0].weight.T + attn2.to_out[0].bias


def reference_block_mode(step, has_migc_weights, migc_steps, naive_fuser_steps, instance_count):
    """The reference MIGCProcessor's rule, transcribed: not_use_migc holds on a block without MIGC weights
    and after MIGCsteps; the block is vanilla cross-attention where not_use_migc and the step is past
    NaiveFuserSteps, or with no instance; else MIGC, or the NaiveFuser where not_use_migc."""
    not_use_migc = not has_migc_weights or step > migc_steps
    if instance_count == 0 or (not_use_migc and step > naive_fuser_steps):
        return "plain"
    return "naive" if not_use_migc else "migc"


def box_mask_on_grid(box, tokens, size=WIDTH):
    """[tokens, 1]: 1 where a cell of the block's square grid has its centre inside the pixel box (what
    the bilinear resizes give exactly for boxes whose edges lie on every grid's cell edges)."""
    side = int(tokens ** 0.5)
    centres = (torch.arange(side) + 0.5) * size / side
    x0, y0, x1, y1 = box
    inside_x = (centres >= x0) & (centres < x1)
    inside_y = (centres >= y0) & (centres < y1)
    return (inside_y[:, None] & inside_x[None, :]).float().reshape(tokens, 1)


def reference_naive_fuse(caption_out, instance_outs, masks):
    """MIGC's NaiveFuser: per token (CA(caption) + sum_i 10 M_i CA(phrase_i)) / (1 + sum_i 10 M_i + 1e-6)."""
    numerator = caption_out + sum(10 * m * out for m, out in zip(masks, instance_outs))
    return numerator / (1 + sum(10 * m for m in masks) + 1e-6)


# ---------------------------------------------------------------- file format and loader

def test_tiny_file_has_the_released_layout_and_size(migc_files, migc):
    data = torch.load(os.path.join(migc_files, "MIGC_SD14.ckpt"), weights_only=True)
    assert list(data) == ["state_dict"]
    keys = list(data["state_dict"])
    assert all(k.startswith("model.diffusion_model.") and "migc" in k.split(".") for k in keys)
    blocks = {".".join(k.split(".")[2:4]) for k in keys}
    assert blocks == {"middle_block.1", "output_blocks.3", "output_blocks.4", "output_blocks.5"}
    # the same layout at SD1.5 width is the released file: 4 blocks of 1280 channels, 219 MB of fp32
    real_mib = 4 * 4 * sum(torch.Size(s).numel() for s in migc_sub_key_shapes(1280).values()) / 2 ** 20
    assert 215 < real_mib < 223
    assert migc.model.blocks == list(MIGC_BLOCKS)
    assert migc.model.layer(("output", 3)).norm.weight.shape == (128,)
    loaded = migc.model.layer(("output", 5)).state_dict()
    stored = {k.split(".migc.", 1)[1]: v for k, v in data["state_dict"].items() if ".output_blocks.5." in k}
    assert set(loaded) == set(stored) and all(torch.equal(loaded[k], stored[k]) for k in stored)


def test_loader_matches_blocks_by_type_number_and_migc_element(migc_files, pack_module):
    loader = pack_module("adapters.migc.load")
    standard = torch.load(os.path.join(migc_files, "MIGC_SD14.ckpt"), weights_only=True)["state_dict"]
    other_paths = {k.replace("middle_block.1.transformer_blocks.0.attn2.migc", "middle_block.1.migc")
                    .replace(".1.transformer_blocks.0.attn2.migc", ".1.attn2.migc"): v for k, v in standard.items()}
    assert set(other_paths) != set(standard)
    torch.save({"state_dict": other_paths}, os.path.join(migc_files, "inner_path.ckpt"))
    weights = loader.load_migc_file("inner_path.ckpt")
    assert weights.blocks == list(MIGC_BLOCKS)
    ref = loader.load_migc_file("MIGC_SD14.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(weights.state_dict().values(), ref.state_dict().values()))


class _NotATensor:
    pass


def _bad_files(standard):
    first_block = {k: v for k, v in standard.items() if ".middle_block." in k}
    missing = dict(first_block)
    missing.pop(next(k for k in missing if k.endswith("la.to_q.weight")))
    wrong = dict(first_block)
    key = next(k for k in wrong if k.endswith("ea.to_k.weight"))
    wrong[key] = torch.zeros(128, 1024)
    return {
        "sd_checkpoint.ckpt": ({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(3)}},
                               "is not a MIGC key"),
        "migc_plus.ckpt": ({"up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.migc.norm.bias":
                            torch.zeros(4)}, "MIGC++ is not supported"),
        "flat.ckpt": ({"model.diffusion_model.middle_block.1.migc.norm.bias": torch.zeros(4)}, "no 'state_dict'"),
        "missing.ckpt": ({"state_dict": missing}, "missing migc.la.to_q.weight"),
        "wrong_shape.ckpt": ({"state_dict": wrong}, "wrong shapes ea.to_k.weight (128, 1024) (expected (128, 768))"),
        "pickled_object.ckpt": ({"state_dict": _NotATensor()}, "weights_only=True"),
        "garbage.ckpt": (b"this is not a checkpoint", "it is not a checkpoint"),
        "page.ckpt": (b"<!DOCTYPE html><html><body>404</body></html>", "web page (HTML)"),
        "empty.ckpt": (b"", "empty (0 bytes)"),
        "list.ckpt": ([torch.zeros(2)], "holds a list, not a dict"),
    }


def test_bad_files_are_rejected_with_file_problem_and_folder(migc_files, migc_nodes, pack_module):
    loader = pack_module("adapters.migc.load")
    standard = torch.load(os.path.join(migc_files, "MIGC_SD14.ckpt"), weights_only=True)["state_dict"]
    for name, (content, problem) in _bad_files(standard).items():
        path = os.path.join(migc_files, name)
        if isinstance(content, bytes):
            with open(path, "wb") as f:
                f.write(content)
        else:
            torch.save(content, path)
        try:
            with pytest.raises(loader.MIGCFileError) as err:
                migc_nodes.MIGCLoader().load(name)
        finally:
            os.remove(path)
        message = str(err.value)
        assert name in message and problem in message and "models/migc/" in message, message
        assert "Put the original MIGC_SD14.ckpt" in message, message
    with pytest.raises(loader.MIGCFileError, match=r"'MIGC_missing\.ckpt' not found in models/migc/ \(searched: .*\)\. Put "):
        migc_nodes.MIGCLoader().load("MIGC_missing.ckpt")


# ---------------------------------------------------------------- pieces computed by hand

def test_box_masks_by_hand(patch_mod):
    # 64x32 image -> latent 8 wide, 4 high; bilinear /8 samples pixels 8i+3 and 8i+4 (mean of the two)
    masks, background = patch_mod.box_masks([(0, 0, 32, 32), (4, 8, 64, 24)], 64, 32)
    box1 = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]] * 4, dtype=torch.float32)
    box2 = torch.tensor([0, 1, 1, 0.])[:, None] * torch.tensor([0.5, 1, 1, 1, 1, 1, 1, 1])[None]
    free_row = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1.])
    expected_background = torch.stack([free_row, torch.zeros(8), torch.zeros(8), free_row])
    assert torch.equal(masks[0, 0], box1) and torch.equal(masks[0, 1], box2)
    assert torch.equal(background[0, 0], expected_background)


def test_position_boxes_and_fourier_features_by_hand(patch_mod, pack_module):
    model = pack_module("adapters.migc.model")
    patch = patch_mod.MIGCPatch(None, {}, [torch.zeros(1, 77, 768)], torch.zeros(1, 768), [(64, 32, 192, 96)],
                                256, 128, 0, -1)
    assert patch.position_boxes.tolist() == [[0.25, 0.75, 0.25, 0.75]]  # (x0, x1, y0, y1)
    box = torch.tensor([0.1, 0.2, 0.3, 0.4])
    features = model.fourier_embed(box)
    assert features.shape == (64,)
    assert torch.allclose(features[:8], torch.cat([torch.sin(box), torch.cos(box)]))
    assert torch.allclose(features[32:40], torch.cat([torch.sin(10 * box), torch.cos(10 * box)]), atol=1e-6)


def test_schedule_step_index_and_rows(pack_module):
    common = pack_module("adapters.common")
    schedule = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    assert [common.step_index(s, schedule) for s in (12.0, 10.0, 5.0, 3.0, 2.0, 1.0)] == [0, 0, 1, 1, 2, 3]

    def rows(kinds, batch):
        return common.cond_rows({"cond_or_uncond": kinds}, batch)
    assert rows([1, 0], 4) == [2, 3] and rows([0, 1], 2) == [0]
    assert rows([0, 0, 1], 3) == [0, 1] and rows([1], 2) == []


def test_layout_attention_keeps_tokens_inside_their_masks(pack_module):
    model = pack_module("adapters.migc.model")
    torch.manual_seed(0)
    layout = model.LayoutAttention(16, heads=2, dim_head=8, operations=torch.nn)  # initialised weights
    masks = torch.zeros(1, 2, 2, 4)
    masks[0, 0, :, :2] = 1  # tokens 0,1,4,5
    masks[0, 1, :, 2:] = 1  # tokens 2,3,6,7
    x = torch.randn(1, 8, 16)
    changed = x.clone()
    changed[0, [2, 3, 6, 7]] += 1.0
    a, b = layout(x, masks), layout(changed, masks)
    assert torch.allclose(a[0, [0, 1, 4, 5]], b[0, [0, 1, 4, 5]], atol=1e-6)
    assert (a[0, [2, 3, 6, 7]] - b[0, [2, 3, 6, 7]]).abs().max() > 1e-2


# ---------------------------------------------------------------- the replacement on the tiny UNet

def test_replacement_runs_on_exactly_the_checkpoint_blocks_and_only_while_active(
        tiny_model, migc_files, migc_nodes, patch_mod):
    partial = migc_nodes.MIGCLoader().load("MIGC_middle_out4.ckpt")[0]
    contexts, pooled = _instances(0, 2)
    patched = patch_mod.patch_model(tiny_model, partial, contexts, pooled, [(0, 0, 64, 128), (64, 0, 128, 64)],
                                    WIDTH, HEIGHT, migc_steps=1, naive_fuser_steps=-1)
    assert set(patched.model_options["transformer_options"]["patches_replace"]["attn2"]) == {("middle", 0),
                                                                                          ("output", 4)}
    assert not tiny_model.model_options["transformer_options"], "the input model was modified"
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    context = _contexts(2, 2)
    for step, active in ((1, True), (2, False)):
        with spies(patched, partial.model) as (spied, record):
            out = call_unet(spied, x, step, context, [1, 0])
        plain = call_unet(tiny_model, x, step, context, [1, 0])
        assert sorted(record["replaced"]) == [("middle", 0), ("output", 4)]
        if active:
            assert sorted(b for b, _ in record["migc"]) == [("middle", 0), ("output", 4)]
            assert (out - plain).abs().max() > 1e-4
            assert_close(out[0], plain[0])  # the uncond row: plain cross-attention
        else:
            assert record["migc"] == [] and torch.equal(out, plain)


def test_zero_instances_is_plain_cross_attention(tiny_model, migc, patch_mod):
    patched = patch_mod.patch_model(tiny_model, migc, [], torch.zeros(0, 768), [], WIDTH, HEIGHT, 10, 10)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    context = _contexts(4, 2)
    with spies(patched, migc.model) as (spied, record):
        out = call_unet(spied, x, 0, context, [1, 0])
    assert len(set(record["replaced"])) == 16 and record["migc"] == []  # NaiveFuser on: every cross-attention block
    assert torch.equal(out, call_unet(tiny_model, x, 0, context, [1, 0]))


def test_naive_fuser_output_and_instance_order_by_hand(tiny_model, migc, patch_mod):
    # boxes on the 32-pixel cells of output block 4 (4x4 grid at 128x128): masks there are exactly 0/1
    boxes = [(0, 0, 64, 128), (64, 0, 128, 64)]
    contexts, pooled = _instances(5, 2)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    context = _contexts(7, 2)  # rows: [uncond, cond]
    block = ("output", 4)

    def run(ctxs, bxs):
        patched = patch_mod.patch_model(tiny_model, migc, ctxs, pooled, bxs, WIDTH, HEIGHT,
                                        migc_steps=-1, naive_fuser_steps=3)
        clone, recorded = record_attn2(patched)
        call_unet(clone, x, 2, context, [1, 0])
        return recorded[block]

    recorded = run(contexts, boxes)
    attn2 = patch_mod.find_attn2(tiny_model.model.diffusion_model, block)
    n = recorded["n"]
    with torch.no_grad():
        uncond = hand_cross_attention(attn2, n[:1], context[:1])
        ca = [hand_cross_attention(attn2, n[1:], c) for c in (context[1:], contexts[0], contexts[1])]
    m1 = torch.zeros(4, 4)
    m1[:, :2] = 1
    m2 = torch.zeros(4, 4)
    m2[:2, 2:] = 1
    m1, m2 = m1.reshape(16, 1), m2.reshape(16, 1)
    assert torch.equal(m1, box_mask_on_grid(boxes[0], 16)) and torch.equal(m2, box_mask_on_grid(boxes[1], 16))
    expected = reference_naive_fuse(ca[0], ca[1:], [m1, m2])
    assert_close(recorded["out"][:1], uncond)
    assert_close(recorded["out"][1:], expected)
    assert (expected - ca[0]).abs().max() > 1e-2  # the instances matter here
    swapped = run(contexts[::-1], boxes[::-1])["out"]  # instances listed in the other order: same image
    assert_close(swapped, recorded["out"])
    mismatched = run(contexts[::-1], boxes)["out"]  # phrase 2 in box 1: different
    assert (mismatched - recorded["out"]).abs().max() > 1e-3


def test_naive_fuser_runs_in_every_cross_attention_block_by_the_reference_rule(tiny_model, migc, patch_mod):
    """With naive_fuser_steps >= the step, the NaiveFuser fuses in every cross-attention block, those
    without MIGC weights included; MIGC blocks run MIGC up to migc_steps first; each block's output against
    a hand computation (the reference rule, the NaiveFuser formula and plain cross-attention)."""
    boxes = [(0, 0, 64, 128), (64, 0, 128, 64)]  # edges on the cells of every block's grid, down to 2x2
    contexts, pooled = _instances(21, 2)
    patched = patch_mod.patch_model(tiny_model, migc, contexts, pooled, boxes, WIDTH, HEIGHT,
                                    migc_steps=1, naive_fuser_steps=3)
    diffusion_model = tiny_model.model.diffusion_model
    blocks = [("input", i) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0)] + [("output", i) for i in range(3, 12)]
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(22))
    context = _contexts(23, 2)  # rows: [uncond, cond]
    seen = set()
    for step in range(5):
        clone, recorded = record_attn2(patched)
        with spies(clone, migc.model) as (spied, record):
            call_unet(spied, x, step, context, [1, 0])
        assert sorted(recorded) == sorted(blocks)
        migc_blocks = sorted(block for block, _ in record["migc"])
        expected = [b for b in blocks if reference_block_mode(step, b in MIGC_BLOCKS, 1, 3, 2) == "migc"]
        assert migc_blocks == sorted(expected)
        for block in blocks:
            mode = reference_block_mode(step, block in MIGC_BLOCKS, 1, 3, 2)
            seen.add((block in MIGC_BLOCKS, mode))
            attn2 = patch_mod.find_attn2(diffusion_model, block)
            n, out = recorded[block]["n"], recorded[block]["out"]
            with torch.no_grad():
                plain = [hand_cross_attention(attn2, n[row:row + 1], context[row:row + 1]) for row in (0, 1)]
                phrases = [hand_cross_attention(attn2, n[1:], c) for c in contexts]
            assert_close(out[:1], plain[0])  # the uncond row: always plain cross-attention
            if mode == "plain":
                assert_close(out[1:], plain[1])
            elif mode == "naive":
                masks = [box_mask_on_grid(box, n.shape[1]) for box in boxes]
                assert_close(out[1:], reference_naive_fuse(plain[1], phrases, masks))
                assert (out[1:] - plain[1]).abs().max() > 1e-3, block
    # every case of the rule was met: MIGC, NaiveFuser and plain on MIGC blocks, NaiveFuser and plain elsewhere
    assert seen == {(True, "migc"), (True, "naive"), (True, "plain"), (False, "naive"), (False, "plain")}


def test_naive_fuser_off_patches_only_the_migc_blocks(tiny_model, migc, patch_mod):
    """naive_fuser_steps = -1: only the four MIGC blocks are replaced, so an adapter on another block (an
    IP-Adapter, say) keeps its patch; with the NaiveFuser on, such a block is refused with a clear error."""
    other = tiny_model.clone()
    other.set_model_attn2_replace(lambda q, k, v, extra: q, "input", 1)
    contexts, pooled = _instances(24, 1)
    off = patch_mod.patch_model(other, migc, contexts, pooled, [(0, 0, 64, 64)], WIDTH, HEIGHT, 5, -1)
    replaced = off.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert sorted(key[:2] for key in replaced if key[:2] != ("input", 1)) == sorted(MIGC_BLOCKS)
    refused = r"block \('input', 1\).*NaiveFuser runs on.*separate model branch"
    with pytest.raises(patch_mod.MIGCApplyError, match=refused):
        patch_mod.patch_model(other, migc, contexts, pooled, [(0, 0, 64, 64)], WIDTH, HEIGHT, 5, 0)


def test_batch_two_with_cfg_and_cfg_one_match_single_image_calls(tiny_model, migc, patch_mod):
    contexts, pooled = _instances(8, 3)
    patched = patch_mod.patch_model(tiny_model, migc, contexts, pooled,
                                    [(0, 0, 64, 64), (32, 32, 128, 96), (64, 64, 128, 128)], WIDTH, HEIGHT, 2, -1)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(9))
    cond, uncond = _contexts(10, 1).repeat(2, 1, 1), _contexts(11, 1).repeat(2, 1, 1)
    with spies(patched, migc.model) as (spied, record):
        batched = call_unet(spied, torch.cat([x, x]), 1, torch.cat([uncond, cond]), [1, 0])  # 2 images, CFG
    assert len(record["migc"]) == 4 and all(shape[:2] == (2, 4) for _, shape in record["migc"])
    single = call_unet(patched, torch.cat([x[1:]] * 2), 1, torch.cat([uncond[:1], cond[:1]]), [1, 0])
    assert_close(batched[[1, 3]], single)  # image 2 of the batch = image 2 sampled alone
    cond_first = call_unet(patched, torch.cat([x, x]), 1, torch.cat([cond, uncond]), [0, 1])
    assert_close(cond_first, torch.cat([batched[2:], batched[:2]]))
    with spies(patched, migc.model) as (spied, record):
        cfg_one = call_unet(spied, x, 1, cond, [0])  # cfg 1: ComfyUI skips the uncond chunk
    assert len(record["migc"]) == 4 and all(shape[0] == 2 for _, shape in record["migc"])
    assert_close(cfg_one, batched[2:])


def test_clones_of_one_model_do_not_cross_talk(tiny_model, migc, patch_mod):
    boxes = [(0, 0, 64, 128)]
    a = patch_mod.patch_model(tiny_model, migc, *_instances(12, 1), boxes, WIDTH, HEIGHT, 3, -1)
    b = patch_mod.patch_model(tiny_model, migc, *_instances(13, 1), [(64, 0, 128, 128)], WIDTH, HEIGHT, 3, -1)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(14))
    context = _contexts(15, 2)
    plain, out_a = call_unet(tiny_model, x, 0, context, [1, 0]), call_unet(a, x, 0, context, [1, 0])
    out_b = call_unet(b, x, 0, context, [1, 0])
    assert (out_a - out_b).abs().max() > 1e-4
    assert torch.equal(call_unet(a, x, 0, context, [1, 0]), out_a)
    assert torch.equal(call_unet(tiny_model, x, 0, context, [1, 0]), plain)
    assert "patches" not in tiny_model.model_options["transformer_options"]


def test_model_level_errors(tiny_model, migc, migc_files, patch_mod, pack_module):
    contexts, pooled = _instances(16, 1)
    patched = patch_mod.patch_model(tiny_model, migc, contexts, pooled, [(0, 0, 64, 64)], WIDTH, HEIGHT, 5, -1)
    with pytest.raises(patch_mod.MIGCApplyError, match="already has MIGC applied"):
        patch_mod.patch_model(patched, migc, contexts, pooled, [(0, 0, 64, 64)], WIDTH, HEIGHT, 5, -1)
    other = tiny_model.clone()
    other.set_model_attn2_replace(lambda q, k, v, extra: q, "output", 4)
    with pytest.raises(patch_mod.MIGCApplyError, match=r"attention replacement on block \('output', 4\)"):
        patch_mod.patch_model(other, migc, contexts, pooled, [(0, 0, 64, 64)], WIDTH, HEIGHT, 5, -1)
    with pytest.raises(patch_mod.MIGCApplyError, match="multiples of 8"):
        patch_mod.patch_model(tiny_model, migc, contexts, pooled, [(0, 0, 64, 64)], 130, HEIGHT, 5, -1)
    # a checkpoint for a block without cross-attention in SD1.x (input 3 is a downsampler)
    loader = pack_module("adapters.migc.load")
    import comfy.model_patcher

    middle = torch.load(os.path.join(migc_files, "MIGC_SD14.ckpt"), weights_only=True)["state_dict"]
    torch.save({"state_dict": {k.replace("middle_block.1.", "input_blocks.3.1."): v for k, v in middle.items()
                               if ".middle_block." in k}}, os.path.join(migc_files, "input3.ckpt"))
    fake = comfy.model_patcher.ModelPatcher(loader.load_migc_file("input3.ckpt"),
                                            torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(patch_mod.MIGCApplyError, match=r"block \('input', 3\).*no cross-attention.*SD1.x"):
        patch_mod.patch_model(tiny_model, fake, contexts, pooled, [(0, 0, 64, 64)], WIDTH, HEIGHT, 5, -1)
    # MIGC weights made for a narrower UNet (64 channels at the middle block)
    write_tiny_migc(os.path.join(migc_files, "wide.ckpt"), model_channels=16)
    wide = comfy.model_patcher.ModelPatcher(loader.load_migc_file("wide.ckpt"),
                                            torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(patch_mod.MIGCApplyError, match="expects 64 channels.*has 128 channels"):
        patch_mod.patch_model(tiny_model, wide, contexts, pooled, [(0, 0, 64, 64)], WIDTH, HEIGHT, 5, -1)
    # another adapter replacing attn2 on a MIGC block after MIGC Apply: the run stops instead of silently
    # dropping MIGC there
    overridden = patched.clone()
    overridden.set_model_attn2_replace(lambda q, k, v, extra: q, "output", 4)
    with pytest.raises(patch_mod.MIGCApplyError, match=r"block \('output', 4\) did not run"):
        call_unet(overridden, torch.randn(2, 4, 16, 16), 0, _contexts(17, 2), [1, 0])
    # a model call without the sampler's schedule cannot count steps
    with pytest.raises(patch_mod.MIGCApplyError, match="sampling schedule"):
        patched.model.apply_model(torch.randn(1, 4, 16, 16), SCHEDULE[:1], c_crossattn=_contexts(17, 1),
                                  transformer_options=patched.model_options["transformer_options"])
    # the latent does not match width/height: a clear error at the first MIGC step
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(patch_mod.MIGCApplyError, match="set for a 128x128 image.*latent is 8x8"):
        call_unet(patched, x, 0, _contexts(17, 2), [1, 0])
    assert not tiny_model.model_options["transformer_options"]
