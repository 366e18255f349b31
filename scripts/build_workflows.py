"""Build the shipped workflows (workflows/*.json, UI format 0.4) from the nodes' own
INPUT_TYPES, so that every widgets_values list has the order and length the frontend expects.

    .venv/bin/python scripts/build_workflows.py                 # rewrite the JSON files
    .venv/bin/python scripts/build_workflows.py --screenshots   # + thumbnails and docs/images/ screenshots

The committed JSON files are what users get; this script is how they are kept in step with the nodes.
``--screenshots`` loads each file into the real ComfyUI frontend (headless Chromium, see
harness/browser.py) and saves ``workflows/<name>.jpg`` (template-browser thumbnail) and
``docs/images/<name>.jpg``.
"""
import argparse
import json
import os
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from harness.tiny_flux_sdxl import (FLUX_CHECKPOINT, FLUX_CONTROLNET, FLUX_REDUX, SDXL_CHECKPOINT,  # noqa: E402
                                    SDXL_CONTROLNET, SDXL_FINETUNE, SIGCLIP_VISION)
from harness.workflow_api import widget_layout  # noqa: E402
from harness.workflow_files import expected_files  # noqa: E402

WORKFLOW_DIR = os.path.join(REPO_ROOT, "workflows")
DOCS_IMAGES = os.path.join(REPO_ROOT, "docs", "images")

# The paper's example (Figure 2) with the reference UI's boxes for it, in pixels of a 512 x 512 image.
CAPTION = "A red hair girl is drinking from a blue bottle of water, oil painting"
NEGATIVE = "worst quality, low quality, bad anatomy, watermark, text, blurry"
SUBJECT = ("a red hair girl", (131, 0, 410, 510))
ACTION = "drinking from"
OBJECT = ("a blue bottle of water", (11, 154, 139, 211))
INTERACTIONS = f"{SUBJECT[0]} | {ACTION} | {OBJECT[0]} | " + " | ".join(
    ", ".join(str(v) for v in box) for box in (SUBJECT[1], OBJECT[1]))
INSTANCES = "\n".join(f"{phrase} | {', '.join(str(v) for v in box)}" for phrase, box in (SUBJECT, OBJECT))
SEED = 1145
SIZE = 512

# Model file names the workflows expect (the names of the public downloads).
CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
INTERACTDIFFUSION = "ext_interactdiff_v1.2.pth"
MIGC = "MIGC_SD14.ckpt"
IPADAPTER = "ip-adapter_sd15.safetensors"
CLIP_VISION = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
STYLE_IMAGE = "amdm_style_reference.png"
CONTROL_IMAGE = "amdm_control_photo.png"
# Download metadata the frontend's "missing models" dialog shows (public safetensors on Hugging Face only:
# the Redux weights are gated behind a license click, so the dialog cannot fetch them).
HF = "https://huggingface.co/"
DOWNLOADS = {
    CHECKPOINT: (HF + "Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly-fp16.safetensors",
                 "checkpoints"),
    IPADAPTER: (HF + "h94/IP-Adapter/resolve/main/models/ip-adapter_sd15.safetensors", "ipadapter"),
    FLUX_CHECKPOINT: (HF + "Comfy-Org/flux1-dev/resolve/main/flux1-dev-fp8.safetensors", "checkpoints"),
    FLUX_CONTROLNET: (HF + "XLabs-AI/flux-controlnet-canny-v3/resolve/main/flux-canny-controlnet-v3.safetensors",
                      "controlnet"),
    SIGCLIP_VISION: (HF + "Comfy-Org/sigclip_vision_384/resolve/main/sigclip_vision_patch14_384.safetensors",
                     "clip_vision"),
    SDXL_CHECKPOINT: (HF + "stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors",
                      "checkpoints"),
    SDXL_FINETUNE: (HF + "cagliostrolab/animagine-xl-3.1/resolve/main/animagine-xl-3.1.safetensors", "checkpoints"),
    SDXL_CONTROLNET: (HF + "lllyasviel/sd_control_collection/resolve/main/diffusers_xl_canny_full.safetensors",
                      "controlnet"),
}

MODELS_NOTE = f"""Model files (see docs/workflows.md)
models/checkpoints/{CHECKPOINT}  (any SD1.5 checkpoint works)
models/interactdiffusion/{INTERACTDIFFUSION}  (Hugging Face: jiuntian/interactiondiffusion-weight)
models/migc/{MIGC}  (MIGC release, limuloo/MIGC)
models/ipadapter/{IPADAPTER}  (Hugging Face: h94/IP-Adapter, models/)
models/clip_vision/{CLIP_VISION}  (h94/IP-Adapter models/image_encoder/model.safetensors, renamed)

One checkpoint loader feeds every branch: the branches are clones of one UNet, so it is in memory once."""

BOXES_NOTE = """Boxes are pixels of the width x height image: 'x0, y0, x1, y1' (top-left origin).
Draw them on the node's canvas (drag = new box, drag a box = move, drag a corner = resize, Del = delete,
type labels in the fields above it) or edit the text; the text is what the node uses.
InteractDiffusion: draw the subject box, then the object box."""

SAMPLER_NOTE = """AMDM Aggregate Sampler
- model/positive/negative: the MAIN branch (its image is the result); model_2...: aux branches.
- aggregation_steps s: steps 1..s merge the branches (slerp), then each branch takes a deviation step
  back toward its own mean; aux branches stop after step s, the main branch finishes alone.
- weight_k: slerp weight of aux branch k (0 = main latent only, 1 = aux only).
- aggregation: paper = the reference formula (2 or 3 branches), sequential = one aux after another.
- deviation_step p: distance moved back toward each branch (0.3 in the paper).
- mean_mode: reference = the paper's posterior mean from the previous eps; exact = the branch's own step.
- noise: independent = aux branch k uses seed + k - 1; shared = every branch the main noise.
- sampler ddim + scheduler ddim_uniform = DDIM (eta 0), as in the paper."""

STYLE_NOTE = """Load a painting in the style you want ('choose file to upload' above); the IP-Adapter
branch carries its style into the result (IP-Adapter weight 0.8, as in the paper)."""

COMPARE_NOTE = """Without aggregation: the main branch alone (plain KSampler, same seed, steps, cfg,
sampler and scheduler). Compare it with the AMDM result to see what the aux branches transfer."""


TITLE_HEIGHT = 30  # a node's title bar, drawn above its pos
VIEW_SCALE = 0.6
# Screen pixels between the window's top-left corner and the graph's in the saved view: the side bar is
# 56 px wide in frontends 1.32 and 1.58, the tab bar and the floating breadcrumb / run bar end at ~90 px
# (1.32's Nodes 2.0 rendering scales a classic layout by 1.2 when it opens it, moving the graph up).
VIEW_MARGIN = (96, 150)


class GraphBuilder:
    """Nodes, links and groups of one UI-format workflow, typed from the registered nodes."""

    def __init__(self, node_classes):
        self.node_classes = node_classes
        self.nodes = []
        self.links = []
        self.groups = []

    def add(self, node_type, pos, size=(320, 120), title=None, color=None, models=None, **widgets):
        cls = self.node_classes[node_type]
        input_types = cls.INPUT_TYPES()
        layout = widget_layout(input_types)
        unknown = set(widgets) - {name for name, _ in layout}
        if unknown:
            raise KeyError(f"{node_type} has no widget {sorted(unknown)}")
        values = []
        for name, spec in layout:
            if name is None:
                values.append("fixed" if spec == "control" else "image")
            elif name in widgets:
                values.append(widgets[name])
            else:
                values.append(_default(node_type, name, spec))
        node_id = len(self.nodes) + 1
        links, sockets = [], []
        for section in ("required", "optional"):
            for name, spec in (input_types.get(section) or {}).items():
                is_widget = any(name == w for w, _ in layout)
                socket = {"name": name, "type": "COMBO" if isinstance(spec[0], (list, tuple)) else str(spec[0]),
                          "link": None}
                if is_widget:
                    socket["widget"] = {"name": name}
                if section == "optional":
                    socket["shape"] = 7
                (sockets if is_widget else links).append(socket)
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        outputs = [{"name": str(name), "type": str(kind), "links": [], "slot_index": i}
                   for i, (name, kind) in enumerate(zip(names, cls.RETURN_TYPES))]
        node = {"id": node_id, "type": node_type, "pos": list(pos), "size": list(size), "flags": {},
                "order": 0, "mode": 0, "inputs": links + sockets, "outputs": outputs,
                "properties": {"Node name for S&R": node_type}, "widgets_values": values}
        if models:
            node["properties"]["models"] = [{"name": name, "url": DOWNLOADS[name][0], "directory": DOWNLOADS[name][1]}
                                            for name in models]
        if title:
            node["title"] = title
        if color:
            node["color"], node["bgcolor"] = color
        self.nodes.append(node)
        return node

    def note(self, text, pos, size, title="Note", color=("#432", "#653")):
        node = {"id": len(self.nodes) + 1, "type": "Note", "pos": list(pos), "size": list(size), "flags": {},
                "order": 0, "mode": 0, "inputs": [], "outputs": [], "title": title,
                "properties": {"text": ""}, "widgets_values": [text], "color": color[0], "bgcolor": color[1]}
        self.nodes.append(node)
        return node

    def connect(self, source, output, target, input_name):
        """Link ``source``'s output (name or index) to ``target``'s input ``input_name``."""
        outputs = source["outputs"]
        slot = output if isinstance(output, int) else next(
            i for i, o in enumerate(outputs) if o["name"] == output)
        target_slot = next(i for i, s in enumerate(target["inputs"]) if s["name"] == input_name)
        socket = target["inputs"][target_slot]
        if socket["link"] is not None:
            raise ValueError(f"{target['type']}.{input_name} is already connected")
        link_id = len(self.links) + 1
        self.links.append([link_id, source["id"], slot, target["id"], target_slot, outputs[slot]["type"]])
        outputs[slot]["links"].append(link_id)
        socket["link"] = link_id

    def group(self, title, members, color, pad=14):
        """A group framing ``members`` (node title bars included)."""
        x0 = min(n["pos"][0] for n in members) - pad
        y0 = min(n["pos"][1] for n in members) - 30 - pad - 34
        x1 = max(n["pos"][0] + n["size"][0] for n in members) + pad
        y1 = max(n["pos"][1] + n["size"][1] for n in members) + pad
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": [x0, y0, x1 - x0, y1 - y0],
                            "color": color, "font_size": 24, "flags": {}})

    def build(self):
        self._order()
        # the saved view: the graph's top-left corner (title bars and group headers included) VIEW_MARGIN
        # screen pixels from the window's, clear of the frontends' side bar and top bars
        x0 = min([n["pos"][0] for n in self.nodes] + [g["bounding"][0] for g in self.groups])
        y0 = min([n["pos"][1] - TITLE_HEIGHT for n in self.nodes] + [g["bounding"][1] for g in self.groups])
        offset = [round(VIEW_MARGIN[0] / VIEW_SCALE - x0), round(VIEW_MARGIN[1] / VIEW_SCALE - y0)]
        return {
            "last_node_id": len(self.nodes), "last_link_id": len(self.links),
            "nodes": self.nodes, "links": self.links, "groups": self.groups, "config": {},
            "extra": {"ds": {"scale": VIEW_SCALE, "offset": offset}, "frontendVersion": "1.32.9"},
            "version": 0.4,
        }

    def _order(self):
        """The execution order the frontend would compute (topological, notes first)."""
        incoming = {n["id"]: {link[1] for link in self.links if link[3] == n["id"]} for n in self.nodes}
        done, order = set(), 0
        while len(done) < len(self.nodes):
            ready = sorted(nid for nid, deps in incoming.items() if nid not in done and deps <= done)
            for nid in ready:
                next(n for n in self.nodes if n["id"] == nid)["order"] = order
                order += 1
                done.add(nid)


def _default(node_type, name, spec):
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in options:
        return options["default"]
    choices = spec[0] if isinstance(spec[0], (list, tuple)) else options.get("options")
    if choices:
        return choices[0]
    raise ValueError(f"{node_type}.{name} has no default: give it a value")


# Colours of the frontend's palette (node colour, background colour) and group colours.
# The side output is cyan: red is what users read as an error.
MAIN = ("#232", "#353")
AUX = ("#223", "#335")
STYLE = ("#323", "#535")
PLAIN = ("#233", "#355")
GROUP_MAIN, GROUP_AUX, GROUP_STYLE, GROUP_AMDM, GROUP_PLAIN, GROUP_MODELS = (
    "#8A8", "#88A", "#a1309b", "#b58b2a", "#8AA", "#3f789e")


# Node heights as the frontend 1.32 lays them out (it grows smaller declared sizes on load).
APPLY_ID_HEIGHT, APPLY_MIGC_HEIGHT, AMDM_SAMPLER_HEIGHT, KSAMPLER_ADVANCED_HEIGHT = 656, 728, 706, 334
AMDM_GUIDER_HEIGHT = 330
BLOCK_GAP = 140  # between stacked groups: node title bar + group header + padding


def common(g, with_migc=False, with_ip=False, migc_steps=None):
    """Loaders, prompts, the InteractDiffusion main branch and the requested aux branches."""
    ckpt = g.add("CheckpointLoaderSimple", (0, 380), (330, 100), models=[CHECKPOINT], ckpt_name=CHECKPOINT)
    latent = g.add("EmptyLatentImage", (0, 560), (330, 110), width=SIZE, height=SIZE, batch_size=1)
    positive = g.add("CLIPTextEncode", (390, 380), (380, 140), title="Caption (positive)", text=CAPTION)
    negative = g.add("CLIPTextEncode", (390, 580), (380, 120), title="Negative", text=NEGATIVE)
    g.connect(ckpt, "CLIP", positive, "clip")
    g.connect(ckpt, "CLIP", negative, "clip")
    g.group("One SD1.5 checkpoint feeds every branch", [ckpt, latent, positive, negative], GROUP_MODELS)
    g.note(MODELS_NOTE, (0, 820), (770, 220), title="Model files")
    g.note(BOXES_NOTE, (390, 60), (380, 200), title="Boxes")

    y = 0
    id_loader = g.add("InteractDiffusionLoader", (830, y), (400, 70), color=MAIN,
                      interactdiffusion_name=INTERACTDIFFUSION)
    id_apply = g.add("InteractDiffusionApply", (830, y + 120), (400, APPLY_ID_HEIGHT), color=MAIN,
                     interactions=INTERACTIONS, width=SIZE, height=SIZE, strength=1.0, beta=1.0)
    g.connect(positive, 0, id_apply, "conditioning")
    g.connect(ckpt, "CLIP", id_apply, "clip")
    g.connect(id_loader, 0, id_apply, "interactdiffusion")
    g.group("Main: InteractDiffusion (interaction)", [id_loader, id_apply], GROUP_MAIN)
    branches = {"ckpt": ckpt, "latent": latent, "positive": positive, "negative": negative, "main": id_apply}
    y += 120 + APPLY_ID_HEIGHT + BLOCK_GAP

    if with_migc:
        migc_loader = g.add("MIGCLoader", (830, y), (400, 70), color=AUX, migc_name=MIGC)
        migc_apply = g.add("MIGCApply", (830, y + 120), (400, APPLY_MIGC_HEIGHT), color=AUX, instances=INSTANCES,
                           width=SIZE, height=SIZE, migc_steps=migc_steps, naive_fuser_steps=-1)
        g.connect(ckpt, "MODEL", migc_apply, "model")
        g.connect(ckpt, "CLIP", migc_apply, "clip")
        g.connect(migc_loader, 0, migc_apply, "migc")
        g.group("Aux: MIGC (attributes)", [migc_loader, migc_apply], GROUP_AUX)
        branches["migc"] = migc_apply
        y += 120 + APPLY_MIGC_HEIGHT + BLOCK_GAP
    if with_ip:
        ip_loader = g.add("AMDMIPAdapterLoader", (830, y), (400, 70), color=STYLE, models=[IPADAPTER],
                          ipadapter_file=IPADAPTER)
        vision = g.add("CLIPVisionLoader", (830, y + 120), (400, 70), color=STYLE, clip_name=CLIP_VISION)
        ip_apply = g.add("AMDMIPAdapterApply", (830, y + 240), (400, 170), color=STYLE, weight=0.8,
                         start_at=0.0, end_at=1.0)
        image = g.add("LoadImage", (830, y + 460), (400, 360), title="Style reference image", color=STYLE,
                      image=STYLE_IMAGE)
        g.connect(ckpt, "MODEL", ip_apply, "model")
        g.connect(ip_loader, 0, ip_apply, "ipadapter")
        g.connect(image, "IMAGE", ip_apply, "image")
        g.connect(vision, 0, ip_apply, "clip_vision")
        style = g.note(STYLE_NOTE, (830, y + 870), (400, 110), title="Style reference")
        g.group("Aux: IP-Adapter (reference style)", [ip_loader, vision, image, ip_apply, style], GROUP_STYLE)
        branches["ip"] = ip_apply
    return branches


def decode_and_save(g, latent, vae, pos, prefix, title):
    decode = g.add("VAEDecode", pos, (220, 50))
    save = g.add("SaveImage", (pos[0] + 260, pos[1]), (420, 470), title=title, filename_prefix=prefix)
    g.connect(latent, 0, decode, "samples")
    g.connect(vae, "VAE", decode, "vae")
    g.connect(decode, 0, save, "images")
    return decode, save


# The paper's sampling: DDIM (eta 0) with its timesteps, cfg 7.5, the example's seed.
SD15_SAMPLING = {"seed": SEED, "cfg": 7.5, "sampler_name": "ddim", "scheduler": "ddim_uniform"}


def branch(model, positive, negative):
    """One AMDM branch: (node, output) of its MODEL, positive and negative CONDITIONING."""
    return {"model": model, "positive": positive, "negative": negative}


def connect_branch(g, sampler, br, suffix=""):
    for socket in ("model", "positive", "negative"):
        node, output = br[socket]
        g.connect(node, output, sampler, socket + suffix)


def plain_branch(g, main, latent, vae, sampling, steps, pos, note=None):
    """The side output: the main branch alone, with the same seed and sampling settings."""
    sampler = g.add("KSampler", pos, (330, 270), title="Main branch WITHOUT aggregation", color=PLAIN,
                    steps=steps, denoise=1.0, **sampling)
    connect_branch(g, sampler, main)
    g.connect(latent, 0, sampler, "latent_image")
    decode, save = decode_and_save(g, sampler, vae, (pos[0] + 390, pos[1]), "AMDM/without_aggregation",
                                   "Without aggregation")
    note = g.note(note or COMPARE_NOTE, (pos[0], pos[1] + 340), (330, 130), title="Compare")
    g.group("Side output: the main branch alone (same seed)", [sampler, decode, save, note], GROUP_PLAIN)


def amdm_sampler(g, main, aux, latent, vae, sampling, steps, s, weights, prefix, aggregation="paper",
                 mean_mode="reference", note=SAMPLER_NOTE, note_height=250, compare_note=None):
    """AMDM Aggregate Sampler on the ``main`` branch and the ``aux`` branches (each cfg = the main cfg),
    its decoded result and the side output."""
    cfgs = {f"cfg_{k}": sampling["cfg"] for k in range(2, len(aux) + 2)}
    extra = {f"weight_{k}": w for k, w in enumerate(weights[1:], start=3)}
    sampler = g.add("AMDMAggregateSampler", (1290, 120), (340, AMDM_SAMPLER_HEIGHT), title="AMDM Aggregate Sampler",
                    steps=steps, denoise=1.0, weight_2=weights[0], aggregation_steps=s, aggregation=aggregation,
                    deviation_step=0.3, mean_mode=mean_mode, noise="independent", **sampling, **cfgs, **extra)
    connect_branch(g, sampler, main)
    g.connect(latent, 0, sampler, "latent_image")
    for k, aux_branch in enumerate(aux, start=2):
        connect_branch(g, sampler, aux_branch, f"_{k}")
    decode, save = decode_and_save(g, sampler, vae, (1680, 120), prefix, "AMDM result")
    note = g.note(note, (1680, 660), (700, note_height), title="AMDM parameters")
    g.group("AMDM: the branches sample in lockstep and merge during steps 1..s", [sampler, decode, save, note],
            GROUP_AMDM)
    plain_branch(g, main, latent, vae, sampling, steps, (1290, 120 + AMDM_SAMPLER_HEIGHT + BLOCK_GAP + 120),
                 compare_note)


def sd15_sampler(g, b, aux_models, steps, s, weights, prefix, aggregation="paper"):
    """amdm_sampler on an SD1.5 graph of ``common``: InteractDiffusion main, the aux MODEL nodes with the caption."""
    main = branch((b["ckpt"], "MODEL"), (b["main"], 0), (b["negative"], 0))
    aux = [branch((model, 0), (b["positive"], 0), (b["negative"], 0)) for model in aux_models]
    amdm_sampler(g, main, aux, b["latent"], b["ckpt"], SD15_SAMPLING, steps, s, weights, prefix, aggregation)


def interactdiffusion_migc(nodes):
    """Paper section 4.1: InteractDiffusion(+MIGC), 50 DDIM steps, s = 20, w = 0.5, p = 0.3, cfg 7.5."""
    g = GraphBuilder(nodes)
    b = common(g, with_migc=True, migc_steps=25)
    sd15_sampler(g, b, [b["migc"]], steps=50, s=20, weights=[0.5], prefix="AMDM/interactdiffusion_migc")
    return g.build()


def interactdiffusion_ipadapter(nodes):
    """InteractDiffusion(+IP-Adapter): 10 DDIM steps, s = 5, w = 0.5, IP-Adapter weight 0.8."""
    g = GraphBuilder(nodes)
    b = common(g, with_ip=True)
    sd15_sampler(g, b, [b["ip"]], steps=10, s=5, weights=[0.5], prefix="AMDM/interactdiffusion_ipadapter")
    return g.build()


def interactdiffusion_migc_ipadapter(nodes):
    """Three models, the paper's aggregation: 10 steps, s = 5, w1 = 0.5, w2 = 0.65."""
    g = GraphBuilder(nodes)
    b = common(g, with_migc=True, with_ip=True, migc_steps=5)
    sd15_sampler(g, b, [b["migc"], b["ip"]], steps=10, s=5, weights=[0.5, 0.65],
                 prefix="AMDM/interactdiffusion_migc_ipadapter")
    return g.build()


BY_HAND_NOTE = """AMDM by hand (InteractDiffusion main + MIGC aux, 10 DDIM steps, s = 2)
Each KSamplerAdvanced runs ONE step (start_at_step .. end_at_step) and returns the latent with its
leftover noise. Step 0: each branch alone. Steps 1 and 2: each branch steps, Slerp Latent Merge merges
the two results (weight = the aux branch's), Deviation Correct moves the merge back toward each branch
(mean_mode exact: the branch's own step result) and that is the branch's input for the next step.
After step 2 the aux branch stops and the main branch runs steps 3..10 alone.
Noise: the aux branch's first step uses seed + 1, as the sampler's 'independent' noise mode does.
MIGC counts steps within each one-step run here, so migc_steps only needs to be >= 0.
The result equals AMDM Aggregate Sampler with steps 10, s = 2, mean_mode exact, noise independent
(up to MIGC's per-step slot order, which restarts in every one-step run)."""


def amdm_by_hand(nodes):
    """AMDM built from KSamplerAdvanced single steps + Slerp Latent Merge + Deviation Correct."""
    g = GraphBuilder(nodes)
    b = common(g, with_migc=True, migc_steps=10)
    ckpt, migc = b["ckpt"], b["migc"]
    total, s = 10, 2
    main_y, merge_y, aux_y, column = 120, 600, 1480, 350
    sigmas = g.add("BasicScheduler", (1290, merge_y), (300, 110), scheduler="ddim_uniform", steps=total, denoise=1.0)
    g.connect(ckpt, "MODEL", sigmas, "model")

    def one_step(model, positive, latent, start, pos, seed, title, color, last=False):
        node = g.add("KSamplerAdvanced", pos, (300, KSAMPLER_ADVANCED_HEIGHT), title=title, color=color,
                     add_noise="enable" if start == 0 else "disable", noise_seed=seed, steps=total, cfg=7.5,
                     sampler_name="ddim", scheduler="ddim_uniform", start_at_step=start,
                     end_at_step=total if last else start + 1,
                     return_with_leftover_noise="disable" if last else "enable")
        g.connect(model, "MODEL" if model is ckpt else 0, node, "model")
        g.connect(positive, 0, node, "positive")
        g.connect(b["negative"], 0, node, "negative")
        g.connect(latent, 0, node, "latent_image")
        return node

    x, main_in, aux_in = 1290, b["latent"], b["latent"]
    main_nodes, aux_nodes, merge_nodes = [], [], [sigmas]
    for step in range(s + 1):
        main_out = one_step(ckpt, b["main"], main_in, step, (x, main_y), SEED, f"main: step {step}", MAIN)
        aux_out = one_step(migc, b["positive"], aux_in, step, (x, aux_y), SEED + 1, f"aux (MIGC): step {step}", AUX)
        main_nodes.append(main_out)
        aux_nodes.append(aux_out)
        if step == 0:
            main_in, aux_in = main_out, aux_out
            x += column
            continue
        merge = g.add("AMDMSlerpLatentMerge", (x, merge_y), (300, 100), title=f"merge after step {step}", weight=0.5)
        g.connect(main_out, 0, merge, "latent_a")
        g.connect(aux_out, 0, merge, "latent_b")
        merge_nodes.append(merge)
        branches = [("main", ckpt, main_in, main_out)] + ([("aux", migc, aux_in, aux_out)] if step < s else [])
        corrected = []
        for k, (name, model, branch_in, branch_out) in enumerate(branches):
            fix = g.add("AMDMDeviationCorrect", (x, merge_y + 160 + 330 * k), (300, 270),
                        title=f"deviation: {name} after step {step}", step=step, deviation_step=0.3,
                        mean_mode="exact")
            g.connect(model, "MODEL" if model is ckpt else 0, fix, "model")
            g.connect(merge, 0, fix, "merged")
            g.connect(branch_in, 0, fix, "branch_in")
            g.connect(branch_out, 0, fix, "branch_out")
            g.connect(sigmas, 0, fix, "sigmas")
            corrected.append(fix)
            merge_nodes.append(fix)
        main_in, aux_in = corrected[0], corrected[-1]  # after step s the aux branch is not used again
        x += column
    tail = one_step(ckpt, b["main"], main_in, s + 1, (x, main_y), SEED, f"main: steps {s + 1}..{total - 1} alone", MAIN,
                    last=True)
    main_nodes.append(tail)
    decode, save = decode_and_save(g, tail, ckpt, (x + column, main_y), "AMDM/by_hand", "AMDM by hand")
    g.group("Main branch (InteractDiffusion), one KSamplerAdvanced per step", main_nodes + [decode, save], GROUP_MAIN)
    g.group("Merge (Slerp Latent Merge) + deviation optimization (Deviation Correct)", merge_nodes, GROUP_AMDM)
    g.group("Aux branch (MIGC): steps 0..s only", aux_nodes, GROUP_AUX)
    g.note(BY_HAND_NOTE, (x, merge_y), (700, 330), title="How this graph does AMDM")
    plain_branch(g, branch((ckpt, "MODEL"), (b["main"], 0), (b["negative"], 0)), b["latent"], ckpt, SD15_SAMPLING,
                 total, (x, aux_y))
    return g.build()


GUIDER_NOTE = """AMDM Guider (SamplerCustomAdvanced)
- guider: the MAIN branch's GUIDER (its image is the result); guider_2...: aux branches. Any GUIDER
  node works as a branch (CFGGuider here; DualCFGGuider, BasicGuider, ...), each with its own model,
  prompts and cfg.
- The SAMPLER wired into SamplerCustomAdvanced steps every branch (dpmpp_2m here); the SIGMAS are the
  schedule of all branches (karras here); RandomNoise is the main branch's noise.
- aggregation_steps s, weight_k, aggregation, deviation_step p, mean_mode, noise: as on AMDM Aggregate
  Sampler (noise independent: aux branch k draws from noise_seed + k - 1)."""

GUIDER_COMPARE_NOTE = """Without aggregation: SamplerCustomAdvanced with the main branch's CFGGuider alone
(same noise, sampler and sigmas). Compare it with the AMDM result to see what the aux branch transfers."""


def amdm_guider(nodes):
    """AMDM Guider on SamplerCustomAdvanced: a CFGGuider per branch, dpmpp_2m with karras sigmas."""
    g = GraphBuilder(nodes)
    b = common(g, with_migc=True, migc_steps=12)
    steps, s = 20, 8
    x, column = 1330, 420
    main_guider = g.add("CFGGuider", (x, 0), (330, 130), title="Main branch guider (InteractDiffusion)", color=MAIN,
                        cfg=7.5)
    g.connect(b["ckpt"], "MODEL", main_guider, "model")
    g.connect(b["main"], 0, main_guider, "positive")
    g.connect(b["negative"], 0, main_guider, "negative")
    aux_guider = g.add("CFGGuider", (x, 200), (330, 130), title="Aux branch guider (MIGC)", color=AUX, cfg=7.5)
    g.connect(b["migc"], 0, aux_guider, "model")
    g.connect(b["positive"], 0, aux_guider, "positive")
    g.connect(b["negative"], 0, aux_guider, "negative")
    amdm = g.add("AMDMGuider", (x, 400), (330, AMDM_GUIDER_HEIGHT), title="AMDM Guider", weight_2=0.5, aggregation_steps=s,
                 aggregation="paper", deviation_step=0.3, mean_mode="reference", noise="independent")
    g.connect(main_guider, 0, amdm, "guider")
    g.connect(aux_guider, 0, amdm, "guider_2")
    y = 400 + AMDM_GUIDER_HEIGHT + BLOCK_GAP
    noise = g.add("RandomNoise", (x, y), (330, 90), noise_seed=SEED)
    sampler = g.add("KSamplerSelect", (x, y + 140), (330, 60), sampler_name="dpmpp_2m")
    sigmas = g.add("BasicScheduler", (x, y + 250), (330, 110), scheduler="karras", steps=steps, denoise=1.0)
    g.connect(b["ckpt"], "MODEL", sigmas, "model")
    g.group("A guider per branch", [main_guider, aux_guider, amdm], GROUP_AMDM)
    g.group("Noise, sampler, sigmas", [noise, sampler, sigmas], GROUP_MODELS)

    def run(guider, pos, prefix, title, color):
        node = g.add("SamplerCustomAdvanced", pos, (330, 330), title=title, color=color)
        g.connect(noise, 0, node, "noise")
        g.connect(guider, 0, node, "guider")
        g.connect(sampler, 0, node, "sampler")
        g.connect(sigmas, 0, node, "sigmas")
        g.connect(b["latent"], 0, node, "latent_image")
        decode, save = decode_and_save(g, node, b["ckpt"], (pos[0] + column, pos[1]), prefix,
                                       "AMDM result" if guider is amdm else "Without aggregation")
        return [node, decode, save]

    result = run(amdm, (x + column, 0), "AMDM/guider_dpmpp_2m", "SamplerCustomAdvanced (AMDM)", None)
    note = g.note(GUIDER_NOTE, (x + column, 520), (700, 270), title="AMDM Guider parameters")
    g.group("AMDM: the branches sample in lockstep and merge during steps 1..s", result + [note], GROUP_AMDM)
    plain = run(main_guider, (x + column, 1000), "AMDM/without_aggregation", "Main branch WITHOUT aggregation", PLAIN)
    compare = g.note(GUIDER_COMPARE_NOTE, (x + column, 1400), (330, 130), title="Compare")
    g.group("Side output: the main branch alone (same noise)", plain + [compare], GROUP_PLAIN)
    return g.build()


CONTROL_NOTE = """Load a photo whose outlines the image should follow ('choose file to upload' above);
the Canny node turns it into an edge map for the ControlNet (raise the thresholds for fewer edges)."""

CONTROLNET_COLUMN_HEIGHT = 1060  # the main branch's column of controlnet_nodes, its group header included


def controlnet_nodes(g, controlnet_file, strength):
    """The main branch's column: photo -> Canny -> ControlNet Apply (Advanced) with the loaded ControlNet,
    and its note; returns (photo, canny, loader, apply), the apply node's prompts left to connect."""
    photo = g.add("LoadImage", (830, 0), (400, 340), title="Control image (a photo)", color=MAIN, image=CONTROL_IMAGE)
    canny = g.add("Canny", (830, 390), (400, 82), color=MAIN, low_threshold=0.4, high_threshold=0.8)
    loader = g.add("ControlNetLoader", (830, 520), (400, 60), color=MAIN, models=[controlnet_file],
                   control_net_name=controlnet_file)
    control = g.add("ControlNetApplyAdvanced", (830, 630), (400, 230), color=MAIN, strength=strength,
                    start_percent=0.0, end_percent=1.0)
    g.connect(photo, "IMAGE", canny, "image")
    g.connect(loader, 0, control, "control_net")
    g.connect(canny, 0, control, "image")
    note = g.note(CONTROL_NOTE, (830, 910), (400, 110), title="Control image")
    g.group("Main: Canny ControlNet (layout)", [photo, canny, loader, control, note], GROUP_MAIN)
    return photo, canny, loader, control


FLUX_CAPTION = "a lighthouse on a rocky coast at sunset, waves breaking on the rocks, dramatic clouds"
FLUX_SAMPLING = {"seed": SEED, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"}
FLUX_SIZE = 1024

FLUX_MODELS_NOTE = f"""Model files (see docs/workflows.md)
models/checkpoints/{FLUX_CHECKPOINT}  (Hugging Face: Comfy-Org/flux1-dev; UNet, CLIP-L, T5 and VAE in one file)
models/controlnet/{FLUX_CONTROLNET}  (Hugging Face: XLabs-AI/flux-controlnet-canny-v3)
models/style_models/{FLUX_REDUX}  (Hugging Face: black-forest-labs/FLUX.1-Redux-dev, accept its license)
models/clip_vision/{SIGCLIP_VISION}  (Hugging Face: Comfy-Org/sigclip_vision_384)

One checkpoint loader feeds both branches: they are clones of one Flux model, so it is in memory once."""

FLUX_SAMPLER_NOTE = """AMDM Aggregate Sampler on Flux
- model/positive/negative: the MAIN branch (Canny ControlNet: the layout); model_2...: the aux branch
  (Redux: the style of the reference image). Its image is the main branch's, with the aux branch's
  influence merged in during steps 1..s.
- cfg 1: Flux dev is guidance-distilled; its guidance is the FluxGuidance node (3.5), so the negative
  prompt is not used (the sampler still needs one).
- aggregation_steps s = 8 of 20, weight_2 0.5, deviation_step p 0.3: as on SD1.5; a larger s or weight
  carries more of the style, a smaller one keeps more of the ControlNet's outlines.
- mean_mode auto = exact on Flux (a rectified-flow model has no DDPM table for the paper's mean).
- sampler euler + scheduler simple, as ComfyUI's Flux examples."""

FLUX_STYLE_NOTE = """Load an image in the style you want ('choose file to upload' above); Redux turns its
SigLIP features into extra prompt tokens of the aux branch (Apply Style Model, strength 1)."""


def flux_controlnet_redux(nodes):
    """Flux dev: a Canny-ControlNet main branch and a Redux (reference image style) aux branch."""
    g = GraphBuilder(nodes)
    ckpt = g.add("CheckpointLoaderSimple", (0, 380), (330, 100), models=[FLUX_CHECKPOINT], ckpt_name=FLUX_CHECKPOINT)
    latent = g.add("EmptySD3LatentImage", (0, 560), (330, 110), width=FLUX_SIZE, height=FLUX_SIZE, batch_size=1)
    caption = g.add("CLIPTextEncode", (390, 380), (380, 140), title="Caption (positive)", text=FLUX_CAPTION)
    guidance = g.add("FluxGuidance", (390, 580), (380, 60), guidance=3.5)
    negative = g.add("CLIPTextEncode", (390, 700), (380, 100), title="Negative (not used at cfg 1)", text="")
    for encoder in (caption, negative):
        g.connect(ckpt, "CLIP", encoder, "clip")
    g.connect(caption, 0, guidance, "conditioning")
    g.group("One Flux checkpoint feeds both branches", [ckpt, latent, caption, guidance, negative], GROUP_MODELS)
    g.note(FLUX_MODELS_NOTE, (0, 900), (770, 220), title="Model files")

    photo, canny, loader, control = controlnet_nodes(g, FLUX_CONTROLNET, strength=0.7)
    g.connect(guidance, 0, control, "positive")
    g.connect(negative, 0, control, "negative")

    y = CONTROLNET_COLUMN_HEIGHT + BLOCK_GAP
    style_loader = g.add("StyleModelLoader", (830, y), (400, 60), color=STYLE, style_model_name=FLUX_REDUX)
    vision = g.add("CLIPVisionLoader", (830, y + 110), (400, 60), color=STYLE, models=[SIGCLIP_VISION],
                   clip_name=SIGCLIP_VISION)
    image = g.add("LoadImage", (830, y + 220), (400, 340), title="Style reference image", color=STYLE,
                  image=STYLE_IMAGE)
    encode = g.add("CLIPVisionEncode", (830, y + 610), (400, 80), color=STYLE, crop="center")
    style = g.add("StyleModelApply", (830, y + 740), (400, 130), color=STYLE, strength=1.0, strength_type="multiply")
    g.connect(vision, 0, encode, "clip_vision")
    g.connect(image, "IMAGE", encode, "image")
    g.connect(guidance, 0, style, "conditioning")
    g.connect(style_loader, 0, style, "style_model")
    g.connect(encode, 0, style, "clip_vision_output")
    style_note = g.note(FLUX_STYLE_NOTE, (830, y + 920), (400, 110), title="Style reference")
    g.group("Aux: Redux (reference style)", [style_loader, vision, image, encode, style, style_note], GROUP_STYLE)

    main = branch((ckpt, "MODEL"), (control, 0), (control, 1))
    aux = [branch((ckpt, "MODEL"), (style, 0), (negative, 0))]
    amdm_sampler(g, main, aux, latent, ckpt, FLUX_SAMPLING, steps=20, s=8, weights=[0.5],
                 prefix="AMDM/flux_controlnet_redux", mean_mode="auto", note=FLUX_SAMPLER_NOTE, note_height=300)
    return g.build()


SDXL_CAPTION = "a girl with red hair reading a book by the window of a cozy library, warm afternoon light"
SDXL_NEGATIVE = "worst quality, low quality, blurry, watermark, text"
SDXL_SAMPLING = {"seed": SEED, "cfg": 6.5, "sampler_name": "dpmpp_2m", "scheduler": "karras"}
SDXL_SIZE = 1024

SDXL_MODELS_NOTE = f"""Model files (see docs/workflows.md)
models/checkpoints/{SDXL_CHECKPOINT}  (Hugging Face: stabilityai/stable-diffusion-xl-base-1.0)
models/checkpoints/{SDXL_FINETUNE}  (Hugging Face: cagliostrolab/animagine-xl-3.1; any SDXL fine-tune works)
models/controlnet/{SDXL_CONTROLNET}  (Hugging Face: lllyasviel/sd_control_collection, diffusers_xl_canny_full)

Two checkpoints: the aux branch is a second SDXL model (two UNets in memory); both must be SDXL."""

SDXL_SAMPLER_NOTE = """AMDM Aggregate Sampler on SDXL
- model/positive/negative: the MAIN branch (SDXL base with a Canny ControlNet: the layout);
  model_2...: the aux branch (a fine-tune, here Animagine XL: its look). Each branch has its own
  prompts, encoded by its own checkpoint's text encoders.
- aggregation_steps s = 10 of 30, weight_2 0.5, deviation_step p 0.3: a larger s or weight carries more
  of the fine-tune's look, a smaller one keeps more of the base model and the ControlNet.
- mean_mode auto = reference on SDXL (the paper's mean, from the model's DDPM table).
- sampler dpmpp_2m + scheduler karras, cfg 6.5 on both branches."""


def sdxl_controlnet_finetune(nodes):
    """SDXL: a Canny-ControlNet main branch on the base model and an aux branch on a fine-tune."""
    g = GraphBuilder(nodes)
    base = g.add("CheckpointLoaderSimple", (0, 380), (330, 100), title="Load Checkpoint (SDXL base)",
                 models=[SDXL_CHECKPOINT], ckpt_name=SDXL_CHECKPOINT)
    latent = g.add("EmptyLatentImage", (0, 560), (330, 110), width=SDXL_SIZE, height=SDXL_SIZE, batch_size=1)
    caption = g.add("CLIPTextEncode", (390, 380), (380, 140), title="Caption (base)", text=SDXL_CAPTION)
    negative = g.add("CLIPTextEncode", (390, 580), (380, 120), title="Negative (base)", text=SDXL_NEGATIVE)
    for encoder in (caption, negative):
        g.connect(base, "CLIP", encoder, "clip")
    g.group("SDXL base: the main branch's model", [base, latent, caption, negative], GROUP_MODELS)
    g.note(SDXL_MODELS_NOTE, (0, 1340), (770, 200), title="Model files")

    photo, canny, loader, control = controlnet_nodes(g, SDXL_CONTROLNET, strength=0.6)
    g.connect(caption, 0, control, "positive")
    g.connect(negative, 0, control, "negative")

    y = 920
    finetune = g.add("CheckpointLoaderSimple", (0, y), (330, 100), title="Load Checkpoint (SDXL fine-tune)", color=AUX,
                     models=[SDXL_FINETUNE], ckpt_name=SDXL_FINETUNE)
    aux_caption = g.add("CLIPTextEncode", (390, y), (380, 140), title="Caption (fine-tune)", color=AUX,
                        text=SDXL_CAPTION)
    aux_negative = g.add("CLIPTextEncode", (390, y + 200), (380, 120), title="Negative (fine-tune)", color=AUX,
                         text=SDXL_NEGATIVE)
    for encoder in (aux_caption, aux_negative):
        g.connect(finetune, "CLIP", encoder, "clip")
    g.group("Aux: an SDXL fine-tune (its look)", [finetune, aux_caption, aux_negative], GROUP_AUX)

    main = branch((base, "MODEL"), (control, 0), (control, 1))
    aux = [branch((finetune, "MODEL"), (aux_caption, 0), (aux_negative, 0))]
    amdm_sampler(g, main, aux, latent, base, SDXL_SAMPLING, steps=30, s=10, weights=[0.5],
                 prefix="AMDM/sdxl_controlnet_finetune", mean_mode="auto", note=SDXL_SAMPLER_NOTE, note_height=270)
    return g.build()


WORKFLOWS = {
    "amdm_interactdiffusion_migc": interactdiffusion_migc,
    "amdm_interactdiffusion_ipadapter": interactdiffusion_ipadapter,
    "amdm_interactdiffusion_migc_ipadapter": interactdiffusion_migc_ipadapter,
    "amdm_by_hand": amdm_by_hand,
    "amdm_guider": amdm_guider,
    "amdm_flux_controlnet_redux": flux_controlnet_redux,
    "amdm_sdxl_controlnet_finetune": sdxl_controlnet_finetune,
}


def registered_nodes():
    """ComfyUI's node classes with this pack loaded (in-process, CPU, temporary base directory)."""
    from harness import runtime

    runtime.boot(tempfile.mkdtemp(prefix="amdm_build_"))
    runtime.load_pack()
    import nodes

    return nodes.NODE_CLASS_MAPPINGS


def write_workflows(classes):
    os.makedirs(WORKFLOW_DIR, exist_ok=True)
    paths = []
    for name, build in WORKFLOWS.items():
        path = os.path.join(WORKFLOW_DIR, name + ".json")
        with open(path, "w") as fh:
            json.dump(build(classes), fh, indent=1)
            fh.write("\n")
        paths.append(path)
        print("wrote", os.path.relpath(path, REPO_ROOT))
    return paths


def style_reference_image(path, size=256):
    """A procedurally painted stand-in for the IP-Adapter style image (brush-stroke-like colour waves);
    users replace it with a painting of the style they want."""
    import numpy as np
    from PIL import Image, ImageFilter

    y, x = np.mgrid[0:size, 0:size] / size
    waves = [np.sin(2 * np.pi * (3 * x + 2 * np.sin(4 * y) + phase)) for phase in (0.0, 0.33, 0.66)]
    rgb = np.stack([0.55 + 0.35 * w for w in waves], axis=-1)
    rgb *= np.array([1.0, 0.8, 0.55])  # warm, oil-painting palette
    image = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype("uint8")).filter(ImageFilter.ModeFilter(7))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path)
    return path


def control_photo_image(path, size=256):
    """A drawn stand-in for the ControlNet workflows' photo (a tower on a rock at the sea, clear outlines);
    users replace it with a photo of the layout they want."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (120, 160, 210))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, size * 0.62, size, size), fill=(40, 80, 130))                        # sea
    draw.polygon([(size * 0.15, size), (size * 0.35, size * 0.55), (size * 0.75, size * 0.6),
                  (size * 0.95, size)], fill=(90, 80, 70))                                  # rock
    draw.polygon([(size * 0.47, size * 0.58), (size * 0.5, size * 0.2), (size * 0.56, size * 0.2),
                  (size * 0.6, size * 0.58)], fill=(235, 230, 220))                         # tower
    draw.rectangle((size * 0.48, size * 0.12, size * 0.58, size * 0.2), fill=(250, 220, 120))  # lamp
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path)
    return path


def stage_placeholder_files(base_dir, classes):
    """Empty files under every model name the workflows load (enough for the frontend's lists) and the
    two input images."""
    workflows = []
    for name in WORKFLOWS:
        with open(os.path.join(WORKFLOW_DIR, name + ".json")) as fh:
            workflows.append(json.load(fh))
    for folder, name in expected_files(workflows, lambda node_type: classes[node_type].INPUT_TYPES()):
        if folder == "input":
            continue
        path = os.path.join(base_dir, "models", folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").close()
    style_reference_image(os.path.join(base_dir, "input", STYLE_IMAGE))
    control_photo_image(os.path.join(base_dir, "input", CONTROL_IMAGE))


def write_screenshots(classes):
    """Thumbnails (workflows/<name>.jpg) and docs screenshots from the real frontend."""
    from PIL import Image

    from harness import browser

    base_dir = os.path.join(tempfile.mkdtemp(prefix="amdm_shots_"), "base")
    stage_placeholder_files(base_dir, classes)
    # full-detail rendering at any zoom, so that the whole graph fits one readable picture
    with browser.ComfyUISession(base_dir, tiny_models=False, viewport=(2400, 1500),
                                settings={"LiteGraph.Canvas.MinFontSizeForLOD": 1,
                                          "Comfy.Minimap.Visible": False}) as session:
        for name in WORKFLOWS:
            with open(os.path.join(WORKFLOW_DIR, name + ".json")) as fh:
                workflow = json.load(fh)
            shot = os.path.join(session.base_dir, name + ".png")
            session.load_workflow(workflow, fit=True)
            session.page.screenshot(path=shot)
            image = Image.open(shot).convert("RGB").crop((56, 36, 2400, 1500))  # no side bar, no tab bar
            os.makedirs(DOCS_IMAGES, exist_ok=True)
            docs = image.copy()
            docs.thumbnail((1800, 1200))
            docs.save(os.path.join(DOCS_IMAGES, name + ".jpg"), quality=82, optimize=True)
            thumb = image.copy()
            thumb.thumbnail((480, 320))
            thumb.save(os.path.join(WORKFLOW_DIR, name + ".jpg"), quality=80, optimize=True)
            print("screenshot", name)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--screenshots", action="store_true",
                        help="also render thumbnails and docs screenshots in headless Chromium")
    args = parser.parse_args()
    classes = registered_nodes()
    write_workflows(classes)
    if args.screenshots:
        write_screenshots(classes)


if __name__ == "__main__":
    main()
