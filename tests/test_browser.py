"""The pack in the real ComfyUI web UI: a real server (main.py, comfyui-frontend-package 1.32.9) with the
pack installed, driven in headless Chromium (Debian's chromium + Playwright; scripts/setup_browser.sh).

Every shipped workflow is loaded as the template browser serves it; the box editor is used with real
mouse events; workflow 1 is queued and its images awaited. Screenshots go to test-artifacts/browser/.
The queued run uses tiny generated weights under the workflow's file names and, for CPU time, the
workflow at 128 x 128 with 6 steps (s = 2) instead of 512 x 512 with 50 steps (s = 20).
"""
import json
import os

import pytest

from harness.browser import MISSING_NODES_DIALOG, ComfyUISession
from harness.runtime import PACK_DIR_NAME
from harness.workflow_api import scale_workflow, ui_to_api, widget_layout
from harness.workflow_files import REPO_ROOT, expected_files, load_workflow, shipped_workflows, stage_files

ARTIFACTS = os.path.join(REPO_ROOT, "test-artifacts", "browser")
PACK_SCRIPT_MARKERS = (f"/extensions/{PACK_DIR_NAME}/", "amdm_box_editor")
UNKNOWN_NODE = "AMDMNoSuchNodeType"


@pytest.fixture(scope="module")
def input_types(pack, comfy):
    return lambda node_type: comfy.NODE_CLASS_MAPPINGS[node_type].INPUT_TYPES()


@pytest.fixture(scope="module")
def ui(tmp_path_factory, input_types, comfy_base, tiny_checkpoint):
    """One server + browser for the module, with tiny stand-ins for every file the workflows name."""
    base = str(tmp_path_factory.mktemp("browser") / "base")
    files = expected_files([load_workflow(name) for name in shipped_workflows()], input_types)
    stage_files(base, files, os.path.join(comfy_base, "models", "checkpoints", tiny_checkpoint))
    os.makedirs(ARTIFACTS, exist_ok=True)
    with ComfyUISession(base) as session:
        yield session


def screenshot(ui, name):
    ui.page.screenshot(path=os.path.join(ARTIFACTS, name + ".png"))


def node_id(ui, node_type):
    return ui.page.evaluate("(t) => app.graph.nodes.find(n => n.type === t).id", node_type)


def test_pack_script_is_served_and_runs(ui):
    extensions = ui.server.get("/extensions")
    assert f"/extensions/{PACK_DIR_NAME}/amdm_box_editor.js" in extensions
    state = ui.page.evaluate("""() => ({
        flag: window.__amdmBoxEditor,
        registered: ['InteractDiffusionApply', 'MIGCApply'].map(t => t in LiteGraph.registered_node_types)})""")
    assert state["flag"]["ready"] and set(state["flag"]["nodeTypes"]) == {"InteractDiffusionApply", "MIGCApply"}
    assert state["registered"] == [True, True]


@pytest.mark.parametrize("name", shipped_workflows())
def test_shipped_workflow_loads_cleanly(ui, name, input_types):
    """Loaded from the template route the template browser uses: no missing-nodes dialog, every node
    registered and valid, every widget value kept, and the frontend's own API conversion equal to
    harness.workflow_api.ui_to_api (the converter the workflow tests rely on)."""
    assert name in ui.server.get("/workflow_templates")[PACK_DIR_NAME]
    workflow = ui.page.evaluate(
        "async (url) => { const w = await (await fetch(url)).json(); await app.loadGraphData(w); return w; }",
        f"/api/workflow_templates/{PACK_DIR_NAME}/{name}.json")
    assert workflow == load_workflow(name)
    ui.page.wait_for_timeout(1500)  # the missing-nodes dialog appears ~0.3 s after loading
    screenshot(ui, name)
    assert not ui.missing_nodes_dialog()
    assert ui.page.locator('[role="dialog"]').count() == 0, "a dialog (e.g. missing models) opened on load"
    state = ui.page.evaluate("""async () => {
        const graph = app.graph;
        return {
            bad: graph.nodes.filter(n => !LiteGraph.registered_node_types[n.type] || n.has_errors).map(n => n.type),
            saved: graph.serialize(),
            api: (await app.graphToPrompt()).output,
        };
    }""")
    assert state["bad"] == []
    saved = {n["id"]: n for n in state["saved"]["nodes"]}
    for node in workflow["nodes"]:
        assert saved[node["id"]]["widgets_values"] == node["widgets_values"], (node["type"], node["id"])
    assert sorted(map(tuple, state["saved"]["links"])) == sorted(map(tuple, workflow["links"]))
    ours = ui_to_api(workflow, input_types)
    assert {k: (v["class_type"], v["inputs"]) for k, v in state["api"].items()} == \
           {k: (v["class_type"], v["inputs"]) for k, v in ours.items()}


def test_template_browser_lists_the_workflows(ui):
    ui.page.get_by_text("Templates", exact=True).first.click()
    dialog = ui.page.locator('[role="dialog"]').first
    dialog.get_by_text(PACK_DIR_NAME, exact=True).click()
    for name in shipped_workflows():
        dialog.get_by_text(name, exact=True).wait_for(timeout=10_000)
    screenshot(ui, "template_browser")
    ui.close_dialogs()
    assert ui.page.locator('[role="dialog"]').count() == 0


def test_unknown_node_type_raises_missing_nodes_dialog(ui):
    """Negative control for the check above: the dialog does appear when a node type is unknown."""
    workflow = load_workflow("amdm_interactdiffusion_migc")
    workflow["nodes"][0]["type"] = UNKNOWN_NODE
    ui.load_workflow(workflow, settle_ms=0)
    ui.page.wait_for_selector(MISSING_NODES_DIALOG, timeout=10_000)
    assert UNKNOWN_NODE in ui.page.locator(MISSING_NODES_DIALOG).inner_text()
    screenshot(ui, "negative_control_unknown_node")
    ui.close_dialogs()


def show_node(ui, node_type):
    """Put the node at the top-left of the canvas at zoom 1; returns its id."""
    nid = node_id(ui, node_type)
    ui.page.evaluate("""(id) => {
        const node = app.graph.getNodeById(id);
        app.canvas.ds.scale = 1;
        app.canvas.ds.offset = [100 - node.pos[0], 80 - node.pos[1]];
        app.canvas.setDirty(true, true);
    }""", nid)
    ui.page.wait_for_timeout(300)
    return nid


def text_of(ui, nid, widget):
    return ui.page.evaluate("([id, w]) => app.graph.getNodeById(id).widgets.find(x => x.name === w).value",
                            [nid, widget])


class ImageFrame:
    """Maps image pixels to page coordinates the way the editor is specified to draw: the width x height
    image fitted (letterboxed, centred) into the canvas."""

    def __init__(self, ui, nid, width, height):
        box = ui.page.locator(f'[data-amdm-box-editor="{nid}"] canvas').bounding_box()
        self.scale = min(box["width"] / width, box["height"] / height)
        self.x = box["x"] + (box["width"] - width * self.scale) / 2
        self.y = box["y"] + (box["height"] - height * self.scale) / 2

    def page(self, x, y):
        return self.x + x * self.scale, self.y + y * self.scale

    def tolerance(self):
        return 1.5 / self.scale + 1  # a pixel of the screen, plus rounding to whole image pixels


def drag(ui, frame, start, end):
    ui.page.mouse.move(*frame.page(*start))
    ui.page.mouse.down()
    for t in (0.25, 0.5, 0.75, 1.0):
        ui.page.mouse.move(*frame.page(start[0] + t * (end[0] - start[0]), start[1] + t * (end[1] - start[1])))
    ui.page.mouse.up()
    ui.page.wait_for_timeout(150)


def boxes_of(line):
    return [[float(v) for v in field.split(",")] for field in line.split("|") if field.count(",") == 3]


def assert_box(actual, expected, tolerance):
    assert all(abs(a - e) <= tolerance for a, e in zip(actual, expected)), (actual, expected)


def test_box_editor_draws_moves_resizes_labels_and_deletes(ui, input_types):
    ui.load_workflow(load_workflow("amdm_interactdiffusion_migc"))
    nid = show_node(ui, "MIGCApply")
    before = text_of(ui, nid, "instances")
    frame = ImageFrame(ui, nid, 512, 512)
    tol = frame.tolerance()

    # the shipped boxes cover x 131..410 (the girl) and a small box at the left: x > 410 is empty
    drag(ui, frame, (430, 300), (500, 420))  # draw a new box on empty canvas
    lines = text_of(ui, nid, "instances").splitlines()
    assert lines[:-1] == before.splitlines(), "the existing lines were rewritten"
    assert lines[-1].split("|")[0].strip() == "an object"
    assert_box(boxes_of(lines[-1])[0], (430, 300, 500, 420), tol)
    screenshot(ui, "box_editor_drawn")

    drag(ui, frame, (465, 360), (470, 320))  # move it by (5, -40)
    assert_box(boxes_of(text_of(ui, nid, "instances").splitlines()[-1])[0], (435, 260, 505, 380), tol)
    drag(ui, frame, (505, 380), (511, 470))  # resize by its bottom-right corner
    assert_box(boxes_of(text_of(ui, nid, "instances").splitlines()[-1])[0], (435, 260, 511, 470), tol)

    label = ui.page.locator(f'[data-amdm-box-editor="{nid}"] input[data-phrase="phrase"]')
    label.fill("a green cat")  # the moved box is still selected
    assert text_of(ui, nid, "instances").splitlines()[-1].startswith("a green cat | ")

    nodes_before = ui.page.evaluate("app.graph.nodes.length")
    ui.page.mouse.click(*frame.page(470, 360))  # select it, then the Delete key
    ui.page.keyboard.press("Delete")
    assert text_of(ui, nid, "instances") == before
    assert ui.page.evaluate("app.graph.nodes.length") == nodes_before, "Delete removed a node"

    # text typed into the widget is what the canvas shows (the text is the single source of truth)
    typed = before + "\n# a comment line\na bird | 10, 10, 50, 60"
    ui.page.evaluate("([id, t]) => { app.graph.getNodeById(id).widgets.find(x => x.name === 'instances').value = t; }",
                     [nid, typed])
    shown = ui.page.evaluate("(id) => app.graph.getNodeById(id).amdmBoxEditor.parsed.items.map(i => i.phrases[0])",
                             nid)
    assert shown == [line.split("|")[0].strip() for line in typed.splitlines() if "|" in line]

    # the editor adds nothing to the saved workflow or to the prompt
    saved, api = ui.page.evaluate("""async (id) => [app.graph.getNodeById(id).serialize(),
                                                    (await app.graphToPrompt()).output[String(id)]]""", nid)
    assert len(saved["widgets_values"]) == len(widget_layout(input_types("MIGCApply")))
    assert "box_editor" not in api["inputs"] and api["inputs"]["instances"] == typed


def test_box_editor_draws_an_interaction(ui):
    ui.load_workflow(load_workflow("amdm_interactdiffusion_migc"))
    nid = show_node(ui, "InteractDiffusionApply")
    before = text_of(ui, nid, "interactions").splitlines()
    frame = ImageFrame(ui, nid, 512, 512)
    drag(ui, frame, (420, 220), (500, 330))  # subject box (x > 410 is empty in the shipped boxes)
    assert text_of(ui, nid, "interactions").splitlines() == before, "written before the object box was drawn"
    drag(ui, frame, (425, 360), (505, 500))  # object box
    lines = text_of(ui, nid, "interactions").splitlines()
    assert lines[:-1] == before and len(lines) == len(before) + 1
    fields = [f.strip() for f in lines[-1].split("|")]
    assert fields[:3] == ["a person", "interacts with", "an object"]
    subject, obj = boxes_of(lines[-1])
    assert_box(subject, (420, 220, 500, 330), frame.tolerance())
    assert_box(obj, (425, 360, 505, 500), frame.tolerance())
    screenshot(ui, "box_editor_interaction")


def test_queue_workflow_1_in_the_browser(ui, input_types):
    workflow = scale_workflow(load_workflow("amdm_interactdiffusion_migc"), input_types, 4)
    ui.load_workflow(workflow)
    ui.page.evaluate("""() => {
        for (const node of app.graph.nodes) {
            for (const w of node.widgets || []) {
                if (w.name === 'steps') w.value = 6;
                if (w.name === 'aggregation_steps') w.value = 2;
            }
        }
    }""")
    ui.page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    prompt_id, entry = ui.wait_for_history(timeout=600)
    images = [img for output in entry["outputs"].values() for img in output.get("images", [])]
    assert {img["filename"].split("_")[0] for img in images} == {"interactdiffusion", "without"}
    for img in images:
        assert os.path.getsize(os.path.join(ui.base_dir, "output", img["subfolder"], img["filename"])) > 0
    save_id = str(next(n["id"] for n in workflow["nodes"] if n["type"] == "SaveImage"))
    ui.page.wait_for_function(
        "(id) => { const n = app.graph.getNodeById(Number(id)); return n.imgs && n.imgs.length > 0 && n.imgs[0].complete; }",
        arg=save_id, timeout=30_000)
    screenshot(ui, "workflow_1_queued")
    sent = entry["prompt"][2]
    assert sent[save_id]["class_type"] == "SaveImage"
    assert [v["inputs"]["steps"] for v in sent.values() if v["class_type"] == "AMDMAggregateSampler"] == [6]


def test_no_console_error_from_the_pack(ui):
    """Runs after the others in this module: nothing the pack's script did logged an error."""
    ours = [entry for marker in PACK_SCRIPT_MARKERS for entry in ui.errors(marker)]
    with open(os.path.join(ARTIFACTS, "console.json"), "w") as fh:
        json.dump(ui.console, fh, indent=1)
    assert ours == []


def test_server_without_the_pack_reports_its_nodes_missing(ui, tmp_path):
    """Negative control: without the pack, the pack's workflow raises the missing-nodes dialog."""
    with ComfyUISession(str(tmp_path / "base"), install_pack=False, tiny_models=False,
                        playwright=ui.playwright) as bare:
        bare.load_workflow(load_workflow("amdm_interactdiffusion_migc"), settle_ms=0)
        bare.page.wait_for_selector(MISSING_NODES_DIALOG, timeout=10_000)
        text = bare.page.locator(MISSING_NODES_DIALOG).inner_text()
        bare.page.screenshot(path=os.path.join(ARTIFACTS, "negative_control_without_pack.png"))
    assert "AMDMAggregateSampler" in text and "MIGCApply" in text
