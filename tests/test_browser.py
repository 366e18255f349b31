"""The pack in the real ComfyUI web UI, on four legs: frontend 1.32.9 and 1.58.1, each in the classic
and the "Nodes 2.0" rendering (setting Comfy.VueNodes.Enabled). A real server (main.py) with the pack
installed serves each frontend; headless Chromium (Debian's chromium + Playwright;
scripts/setup_browser.sh) drives it. One server and browser per frontend serve both of its renderings
(the setting is switched through the settings API and the page reloaded).

Every shipped workflow is loaded as the template browser serves it; missing nodes are read from a
stable signal (the graph's node types against the frontend's registered types and the server's
/object_info) and from the visible notice of each frontend (1.32: a dialog, 1.58: the error panel), with
negative controls for both; the saved view leaves every title in the window clear of the side bar and the
top bars; the box editor is used with real mouse events, its canvas measured and its hint read whole;
workflow 1 is queued and its images awaited. Screenshots go to test-artifacts/browser/comfyui-<version>/<leg>/.
The queued run uses tiny generated weights under the workflow's file names and, for CPU time, the
workflow at 128 x 128 with 6 steps (s = 2) instead of 512 x 512 with 50 steps (s = 20).
"""
import json
import os

import pytest

from harness.browser import BOX_EDITOR_EXTENSION, FRONTEND_NODE_TYPES, ComfyUISession
from harness.runtime import PACK_DIR_NAME
from harness.workflow_api import scale_workflow, ui_to_api, widget_layout
from harness.workflow_files import REPO_ROOT, expected_files, load_workflow, shipped_workflows, stage_files

# One folder per ComfyUI leg: the matrix runs the legs side by side.
ARTIFACTS = os.path.join(REPO_ROOT, "test-artifacts", "browser",
                         "comfyui-" + os.environ.get("AMDM_COMFYUI_VERSION", "custom"))
FRONTENDS = ("1.32.9", "1.58.1")
RENDERINGS = {"classic": False, "nodes2": True}
LEGS = [(frontend, rendering) for frontend in FRONTENDS for rendering in RENDERINGS]
PACK_SCRIPT = f"/extensions/{PACK_DIR_NAME}/amdm_box_editor.js"
UNKNOWN_NODE = "AMDMNoSuchNodeType"
NODE_WIDTH = 400  # the editor nodes' width in the shipped workflows
BOX_TOLERANCE = 2.0  # image pixels between the box dragged on screen and the box written


@pytest.fixture(scope="module")
def input_types(pack, comfy):
    return lambda node_type: comfy.NODE_CLASS_MAPPINGS[node_type].INPUT_TYPES()


@pytest.fixture(scope="module")
def sessions(tmp_path_factory, input_types, comfy_base, tiny_checkpoint):
    """sessions(frontend) -> the server + browser of that frontend, started on first use and kept for
    the module, with tiny stand-ins for every file the workflows name."""
    from playwright.sync_api import sync_playwright

    files = expected_files([load_workflow(name) for name in shipped_workflows()], input_types)
    checkpoint = os.path.join(comfy_base, "models", "checkpoints", tiny_checkpoint)
    store = str(tmp_path_factory.mktemp("browser_files"))  # one copy of the stand-ins for both frontends
    playwright = sync_playwright().start()
    started = {}

    def session(frontend):
        if frontend not in started:
            base = str(tmp_path_factory.mktemp(f"browser_{frontend}") / "base")
            stage_files(base, files, checkpoint, store_dir=store)
            started[frontend] = ComfyUISession(base, frontend=frontend, playwright=playwright).__enter__()
        return started[frontend]

    yield session
    for ui in started.values():
        ui.__exit__()
    playwright.stop()


@pytest.fixture(scope="module", params=LEGS, ids=[f"{frontend}-{rendering}" for frontend, rendering in LEGS])
def leg(request):
    return request.param


@pytest.fixture
def ui(leg, sessions):
    """The session of this leg's frontend, in this leg's rendering."""
    frontend, rendering = leg
    session = sessions(frontend)
    session.set_vue_nodes(RENDERINGS[rendering])
    return session


def screenshot(ui, leg, name):
    folder = os.path.join(ARTIFACTS, "-".join(leg))
    os.makedirs(folder, exist_ok=True)
    ui.page.screenshot(path=os.path.join(folder, name + ".png"))


def node_id(ui, node_type):
    return ui.page.evaluate("(t) => app.graph.nodes.find(n => n.type === t).id", node_type)


def server_node_types(ui):
    return set(ui.server.get("/object_info")) | FRONTEND_NODE_TYPES


def test_pack_script_is_served_and_runs(ui, leg):
    assert PACK_SCRIPT in ui.server.get("/extensions")
    state = ui.page.evaluate("""(name) => ({
        frontend: window.__COMFYUI_FRONTEND_VERSION__,
        nodes2: app.ui.settings.getSettingValue('Comfy.VueNodes.Enabled'),
        extension: app.extensions.filter(e => e.name === name).length,
        registered: ['InteractDiffusionApply', 'MIGCApply'].map(t => t in LiteGraph.registered_node_types),
        globals: Object.keys(window).filter(k => k.toLowerCase().includes('amdm')),
    })""", BOX_EDITOR_EXTENSION)
    assert (state["frontend"], state["nodes2"]) == (leg[0], RENDERINGS[leg[1]])
    assert state["extension"] == 1 and state["registered"] == [True, True]
    assert state["globals"] == [], "the pack's script wrote a global"


@pytest.mark.parametrize("name", shipped_workflows())
def test_shipped_workflow_loads_cleanly(ui, leg, name, input_types):
    """Loaded from the template route the template browser uses: every node type known to the frontend
    and the server, no missing-nodes notice, no dialog, every widget value kept, and the frontend's own
    API conversion equal to harness.workflow_api.ui_to_api (the converter the workflow tests rely on)."""
    assert name in ui.server.get("/workflow_templates")[PACK_DIR_NAME]
    ui.close_dialogs()
    workflow = ui.page.evaluate(
        "async (url) => { const w = await (await fetch(url)).json(); await app.loadGraphData(w); return w; }",
        f"/api/workflow_templates/{PACK_DIR_NAME}/{name}.json")
    assert workflow == load_workflow(name)
    ui.page.wait_for_timeout(1500)  # the missing-nodes notice appears ~0.3 s after loading
    screenshot(ui, leg, name)
    assert ui.titles_under_chrome() == [], "the saved view puts titles under the side bar or the top bars"
    assert ui.unregistered_node_types() == []
    assert {n["type"] for n in workflow["nodes"]} <= server_node_types(ui)
    assert not ui.missing_nodes_notice_shown()
    assert ui.page.locator('[role="dialog"]').count() == 0, "a dialog (e.g. missing models) opened on load"
    state = ui.page.evaluate("""async () => ({
        errors: app.graph.nodes.filter(n => n.has_errors).map(n => n.type),
        saved: app.graph.serialize(),
        api: (await app.graphToPrompt()).output,
    })""")
    assert state["errors"] == []
    saved = {n["id"]: n for n in state["saved"]["nodes"]}
    for node in workflow["nodes"]:
        # frontend 1.58 leaves the key out for a node without widgets
        assert saved[node["id"]].get("widgets_values", []) == node["widgets_values"], (node["type"], node["id"])
    assert sorted(map(tuple, state["saved"]["links"])) == sorted(map(tuple, workflow["links"]))
    ours = ui_to_api(workflow, input_types)
    assert {k: (v["class_type"], v["inputs"]) for k, v in state["api"].items()} == \
           {k: (v["class_type"], v["inputs"]) for k, v in ours.items()}


def test_template_browser_lists_the_workflows(ui, leg):
    ui.close_dialogs()
    ui.page.get_by_text("Templates", exact=True).first.click()
    dialog = ui.page.locator('[role="dialog"]').first
    dialog.get_by_text(PACK_DIR_NAME, exact=True).first.click()
    for name in shipped_workflows():
        dialog.get_by_text(name, exact=True).first.wait_for(timeout=10_000)
    screenshot(ui, leg, "template_browser")
    ui.close_dialogs()
    assert ui.page.locator('[role="dialog"]').count() == 0


def test_unknown_node_type_is_reported_missing(ui, leg):
    """Negative control for the checks above: an unknown node type shows in the stable signal and in
    the frontend's notice."""
    workflow = load_workflow("amdm_interactdiffusion_migc")
    workflow["nodes"][0]["type"] = UNKNOWN_NODE
    ui.load_workflow(workflow, settle_ms=0)
    assert ui.unregistered_node_types() == [UNKNOWN_NODE]
    assert UNKNOWN_NODE not in server_node_types(ui)
    assert UNKNOWN_NODE in ui.missing_nodes_notice()
    assert ui.missing_nodes_notice_shown()
    screenshot(ui, leg, "negative_control_unknown_node")
    ui.close_dialogs()


def show_node(ui, node_type):
    """The node at the top-left of the canvas at zoom 1; returns its id."""
    nid = node_id(ui, node_type)
    ui.page.evaluate("""(id) => {
        const node = app.graph.getNodeById(id);
        app.canvas.ds.scale = 1;
        app.canvas.ds.offset = [100 - node.pos[0], 80 - node.pos[1]];
        app.canvas.setDirty(true, true);
    }""", nid)
    ui.page.wait_for_timeout(500)
    return nid


def text_of(ui, nid, widget):
    return ui.page.evaluate("([id, w]) => app.graph.getNodeById(id).widgets.find(x => x.name === w).value",
                            [nid, widget])


def editor_canvas(ui, nid):
    return ui.page.locator(f'[data-amdm-box-editor="{nid}"] canvas')


class ImageFrame:
    """Maps image pixels to page coordinates the way the editor is specified to draw: the width x height
    image fitted (letterboxed, centred) into the canvas."""

    def __init__(self, ui, nid, width, height):
        box = editor_canvas(ui, nid).bounding_box()
        self.scale = min(box["width"] / width, box["height"] / height)
        self.x = box["x"] + (box["width"] - width * self.scale) / 2
        self.y = box["y"] + (box["height"] - height * self.scale) / 2

    def page(self, x, y):
        return self.x + x * self.scale, self.y + y * self.scale


def drag(ui, frame, start, end):
    ui.page.mouse.move(*frame.page(*start))
    ui.page.mouse.down()
    for t in (0.25, 0.5, 0.75, 1.0):
        ui.page.mouse.move(*frame.page(start[0] + t * (end[0] - start[0]), start[1] + t * (end[1] - start[1])))
    ui.page.mouse.up()
    ui.page.wait_for_timeout(150)


def boxes_of(line):
    return [[float(v) for v in field.split(",")] for field in line.split("|") if field.count(",") == 3]


def assert_box(actual, expected):
    assert all(abs(a - e) <= BOX_TOLERANCE for a, e in zip(actual, expected)), (actual, expected)


def test_box_editor_canvas_has_the_same_size_in_every_leg(ui, leg):
    """The canvas is the node's width less 12 px on each side, square for a 512 x 512 image, in both
    renderings of both frontends, for both editor nodes: 376 x 376 CSS pixels (and on screen at zoom 1)
    for a 400-px-wide node. Frontend 1.32.9's Nodes 2.0 scales a classic workflow's layout by 1.2 when
    it loads it (its setting Comfy.VueNodes.AutoScaleLayout) and keeps its own node sizes, so there the
    node is 480 px wide and the canvas 456 x 456: the same share of the node."""
    ui.load_workflow(load_workflow("amdm_interactdiffusion_migc"))
    for node_type in ("MIGCApply", "InteractDiffusionApply"):
        nid = show_node(ui, node_type)
        width = ui.page.evaluate("(id) => app.graph.getNodeById(id).size[0]", nid)
        assert width == (NODE_WIDTH * 1.2 if leg == ("1.32.9", "nodes2") else NODE_WIDTH), width
        expected = [round(width - 24)] * 2
        canvas = editor_canvas(ui, nid)
        assert canvas.evaluate("(c) => [c.clientWidth, c.clientHeight]") == expected, node_type
        box = canvas.bounding_box()
        assert abs(box["width"] - expected[0]) <= 2 and abs(box["height"] - expected[1]) <= 2, box
    screenshot(ui, leg, "box_editor_canvas")


def test_box_editor_draws_moves_resizes_labels_and_deletes(ui, leg, input_types):
    ui.load_workflow(load_workflow("amdm_interactdiffusion_migc"))
    nid = show_node(ui, "MIGCApply")
    before = text_of(ui, nid, "instances")
    frame = ImageFrame(ui, nid, 512, 512)

    # the shipped boxes cover x 131..410 (the girl) and a small box at the left: x > 410 is empty
    drag(ui, frame, (430, 300), (500, 420))  # draw a new box on empty canvas
    lines = text_of(ui, nid, "instances").splitlines()
    assert lines[:-1] == before.splitlines(), "the existing lines were rewritten"
    assert lines[-1].split("|")[0].strip() == "an object"
    assert_box(boxes_of(lines[-1])[0], (430, 300, 500, 420))
    screenshot(ui, leg, "box_editor_drawn")

    drag(ui, frame, (465, 360), (470, 320))  # move it by (5, -40)
    assert_box(boxes_of(text_of(ui, nid, "instances").splitlines()[-1])[0], (435, 260, 505, 380))
    drag(ui, frame, (505, 380), (511, 470))  # resize by its bottom-right corner
    assert_box(boxes_of(text_of(ui, nid, "instances").splitlines()[-1])[0], (435, 260, 511, 470))

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
    shown = ui.page.evaluate("""(id) => app.graph.getNodeById(id).widgets.find(w => w.name === 'box_editor')
                                  .boxEditor.parsed.items.map(i => i.phrases[0])""", nid)
    assert shown == [line.split("|")[0].strip() for line in typed.splitlines() if "|" in line]

    # the editor adds nothing to the saved workflow or to the prompt
    saved, api = ui.page.evaluate("""async (id) => [app.graph.getNodeById(id).serialize(),
                                                    (await app.graphToPrompt()).output[String(id)]]""", nid)
    assert len(saved["widgets_values"]) == len(widget_layout(input_types("MIGCApply")))
    assert "box_editor" not in api["inputs"] and api["inputs"]["instances"] == typed


def test_box_editor_draws_an_interaction(ui, leg):
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
    assert_box(subject, (420, 220, 500, 330))
    assert_box(obj, (425, 360, 505, 500))
    screenshot(ui, leg, "box_editor_interaction")


def label_fields(ui, nid):
    return ui.page.evaluate("""(id) => [...document.querySelectorAll(`[data-amdm-box-editor="${id}"] input`)]
                                  .map(i => [i.value, i.placeholder])""", nid)


def test_box_editor_hint_is_whole_and_the_fields_show_only_a_selected_box(ui, leg):
    """The hint under the canvas is shown whole (no clipped line, its last character not covered); the
    label fields are empty (placeholders only) until a box is selected, show its phrases while it is, and
    empty again when it is deselected (Esc)."""
    ui.load_workflow(load_workflow("amdm_interactdiffusion_migc"))
    for node_type, names in (("InteractDiffusionApply", ["subject", "action", "object"]), ("MIGCApply", ["phrase"])):
        nid = show_node(ui, node_type)
        hint = ui.page.evaluate("""(id) => {
            const el = document.querySelector(`[data-amdm-box-editor="${id}"] .amdm-box-editor-hint`);
            const range = document.createRange();
            range.setStart(el.firstChild, el.textContent.length - 1);
            range.setEnd(el.firstChild, el.textContent.length);
            const last = range.getBoundingClientRect();
            return {text: el.textContent,
                    overflow: [el.scrollWidth - el.clientWidth, el.scrollHeight - el.clientHeight],
                    lastShown: document.elementFromPoint(last.x + last.width / 2, last.y + last.height / 2) === el};
        }""", nid)
        assert hint["text"].startswith("Drag") and hint["overflow"][0] <= 0 and hint["overflow"][1] <= 0, hint
        assert hint["lastShown"], f"{node_type}: the end of the hint is cut off or covered: {hint['text']!r}"
        assert label_fields(ui, nid) == [["", name] for name in names]
        frame = ImageFrame(ui, nid, 512, 512)
        ui.page.mouse.click(*frame.page(300, 250))  # inside the girl's box
        widget = "interactions" if node_type == "InteractDiffusionApply" else "instances"
        line = text_of(ui, nid, widget).splitlines()[0]
        assert [value for value, _ in label_fields(ui, nid)] == [f.strip() for f in line.split("|")[:len(names)]]
        ui.page.keyboard.press("Escape")
        assert label_fields(ui, nid) == [["", name] for name in names]
    screenshot(ui, leg, "box_editor_hint")


def test_box_editor_is_read_only_when_its_text_is_linked(ui, leg):
    """The editor reads the text input's connection through node.isInputConnected: linked, a drag
    writes nothing and the hint says where to edit."""
    ui.load_workflow(load_workflow("amdm_interactdiffusion_migc"))
    nid = show_node(ui, "MIGCApply")
    before = text_of(ui, nid, "instances")
    linked = ui.page.evaluate("""(id) => {
        const node = app.graph.getNodeById(id);
        const slot = node.inputs.findIndex(i => i.widget?.name === 'instances');
        const source = LiteGraph.createNode('PrimitiveStringMultiline');
        app.graph.add(source);
        source.connect(0, node, slot);
        return node.isInputConnected(slot);
    }""", nid)
    assert linked
    ui.page.wait_for_timeout(300)
    frame = ImageFrame(ui, nid, 512, 512)
    drag(ui, frame, (430, 300), (500, 420))
    assert text_of(ui, nid, "instances") == before
    assert "comes from a link" in ui.page.locator(f'[data-amdm-box-editor="{nid}"]').inner_text()


def test_queue_workflow_1_in_the_browser(ui, leg, input_types):
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
    known = set(ui.server.get("/history"))
    ui.page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    prompt_id, entry = ui.wait_for_history(timeout=600, known=known)
    images = [img for output in entry["outputs"].values() for img in output.get("images", [])]
    assert {img["filename"].split("_")[0] for img in images} == {"interactdiffusion", "without"}
    for img in images:
        assert os.path.getsize(os.path.join(ui.base_dir, "output", img["subfolder"], img["filename"])) > 0
    save_id = str(next(n["id"] for n in workflow["nodes"] if n["type"] == "SaveImage"))
    shown = next(img["filename"] for img in entry["outputs"][save_id]["images"])
    # the classic canvas draws the node's loaded images (node.imgs); Nodes 2.0 shows them as <img> elements
    ui.page.wait_for_function("""([id, file]) => {
        const n = app.graph.getNodeById(Number(id));
        return (n.imgs?.length > 0 && n.imgs[0].complete) ||
            [...document.querySelectorAll('img')].some(i => i.src.includes(encodeURIComponent(file)) && i.complete);
    }""", arg=[save_id, shown], timeout=30_000)
    screenshot(ui, leg, "workflow_1_queued")
    sent = entry["prompt"][2]
    assert sent[save_id]["class_type"] == "SaveImage"
    assert [v["inputs"]["steps"] for v in sent.values() if v["class_type"] == "AMDMAggregateSampler"] == [6]


def test_no_console_error_or_deprecation_from_the_pack(ui, leg):
    """Runs after the others of its leg: nothing the pack's script did logged an error or used a
    deprecated frontend API. The deprecation hook is checked on a read the test itself makes."""
    ours = [entry for marker in (PACK_SCRIPT, "amdm_box_editor") for entry in ui.errors(marker)]
    folder = os.path.join(ARTIFACTS, "-".join(leg))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "console.json"), "w") as fh:
        json.dump(ui.console, fh, indent=1)
    assert ours == []
    recorded = ui.deprecations()
    assert recorded is not None and ui.deprecations(PACK_SCRIPT) == []
    ui.page.evaluate("() => app.graph.nodes.find(n => n.inputs?.length).inputs[0].link")
    new = ui.deprecations()[len(recorded):]
    if leg[0] == "1.58.1":  # the hook catches a deprecated read (the test's own)
        assert new and "input.link is deprecated" in new[-1]
    else:  # 1.32.9 does not deprecate input.link yet
        assert new == []


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_server_without_the_pack_reports_its_nodes_missing(sessions, frontend, tmp_path):
    """Negative control: without the pack, the pack's workflow shows its nodes missing, in the stable
    signal and in the frontend's notice."""
    with ComfyUISession(str(tmp_path / "base"), install_pack=False, tiny_models=False, frontend=frontend,
                        playwright=sessions(frontend).playwright) as bare:
        bare.load_workflow(load_workflow("amdm_interactdiffusion_migc"), settle_ms=0)
        missing = bare.unregistered_node_types()
        text = bare.missing_nodes_notice()
        os.makedirs(os.path.join(ARTIFACTS, frontend), exist_ok=True)
        bare.page.screenshot(path=os.path.join(ARTIFACTS, frontend, "negative_control_without_pack.png"))
    assert {"AMDMAggregateSampler", "MIGCApply", "InteractDiffusionApply"} <= set(missing)
    assert "AMDMAggregateSampler" in text and "MIGCApply" in text
