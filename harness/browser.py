"""The real ComfyUI web UI in headless Chromium: a real server (main.py + comfyui-frontend-package) with
this pack, driven by Playwright through Debian's chromium binary (``playwright install`` is never run;
scripts/setup_browser.sh installs the browser).

    with ComfyUISession(base_dir, frontend="1.58.1") as ui:
        ui.set_vue_nodes(True)              # "Nodes 2.0" rendering
        ui.load_workflow(workflow)
        assert ui.unregistered_node_types() == [] and not ui.missing_nodes_notice_shown()

Missing nodes are read from a stable signal, the graph's node types against LiteGraph's registered
types; the visible notice differs by frontend (1.32: a dialog; 1.58: a toast whose "View details" opens
the error panel) and ``missing_nodes_notice`` reads either.

Used by tests/test_browser.py and scripts/build_workflows.py --screenshots.
"""
import json
import os
import shutil
import tempfile
import time

from .server import ComfyServer

CHROMIUM_CANDIDATES = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")
# Without the background-networking flags Chromium floods the closed network with connections.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
# First-run tutorial / templates dialog off; the settings file is what a user's profile holds.
SETTINGS = {"Comfy.TutorialCompleted": True}
VUE_NODES_SETTING = "Comfy.VueNodes.Enabled"   # the "Nodes 2.0" rendering
MISSING_NODES_DIALOG = '[role="dialog"][aria-labelledby="global-missing-nodes"]'      # frontend 1.32
MISSING_NODES_ICON = '[data-testid="subgraph-breadcrumb-missing-nodes-icon"]'         # frontend 1.58
MISSING_NODES_CARD = '[data-testid="missing-node-card"]'   # 1.58: the error panel's list of missing nodes
PROPERTIES_PANEL_TOGGLE = 'button[aria-label="Toggle properties panel"]'  # 1.58: opens / closes that panel
# Types the frontend itself provides (no server node behind them).
FRONTEND_NODE_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
BOX_EDITOR_EXTENSION = "amdm-aggregation.BoxEditor"
PACK_EXTENSION_REGISTERED = f"window.app.extensions.some(e => e.name === {BOX_EDITOR_EXTENSION!r})"


def chromium_path():
    """$CHROMIUM, else Debian's chromium; a clear error when there is none."""
    for path in filter(None, (os.environ.get("CHROMIUM"), *CHROMIUM_CANDIDATES)):
        if os.access(path, os.X_OK):
            return path
    raise FileNotFoundError("no Chromium found: run scripts/setup_browser.sh (installs Debian's chromium) "
                            "or set CHROMIUM=/path/to/chromium")


class ComfyUISession:
    """Server + browser page. ``base_dir/models``/``input`` are prepared by the caller beforehand.

    ``console`` collects every console message and page error as (kind, text, url)."""

    def __init__(self, base_dir, install_pack=True, tiny_models=True, viewport=(1600, 1000), settings=None,
                 playwright=None, server_threads=1, frontend=None, vue_nodes=False):
        """``playwright``: an already started Playwright (sync API) to open this browser with (one process
        may run only one); ``server_threads``: the server's OMP_NUM_THREADS (on a busy 2-core machine two
        OpenMP threads made each tiny-UNet call ~10x slower than one); ``frontend``: a version installed
        under .frontends/ (None: the one in the venv); ``vue_nodes``: start in "Nodes 2.0" rendering."""
        self.frontend = frontend
        self.base_dir = os.path.abspath(base_dir)
        self._own_playwright = playwright is None
        self.playwright = playwright
        self.server_threads = server_threads
        self.install_pack = install_pack
        self.tiny_models = tiny_models
        self.viewport = {"width": viewport[0], "height": viewport[1]}
        self.console = []
        self.server = None
        settings_file = os.path.join(self.base_dir, "user", "default", "comfy.settings.json")
        os.makedirs(os.path.dirname(settings_file), exist_ok=True)
        with open(settings_file, "w") as fh:
            json.dump(dict(SETTINGS, **{VUE_NODES_SETTING: vue_nodes}, **(settings or {})), fh)

    def __enter__(self):
        from playwright.sync_api import sync_playwright

        self.server = ComfyServer(self.base_dir, install_pack=self.install_pack, tiny_models=self.tiny_models,
                                  threads=self.server_threads, frontend=self.frontend).start()
        try:
            if self._own_playwright:
                self.playwright = sync_playwright().start()
            self._profile = tempfile.mkdtemp(prefix="amdm_chromium_")
            self.context = self.playwright.chromium.launch_persistent_context(
                self._profile, executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS,
                viewport=self.viewport)
            self.page = self.context.pages[0] if self.context.pages else self.context.new_page()
            self.page.on("console", lambda m: self.console.append((m.type, m.text, m.location.get("url", ""))))
            self.page.on("pageerror", lambda e: self.console.append(("pageerror", f"{e}\n{e.stack}", "")))
            # the "Nodes 2.0" banner would cover the top of every screenshot
            self.page.add_init_script('localStorage.setItem("vueNodesBannerDismissed", "true")')
            self.page.goto(self.server.url)
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        if getattr(self, "context", None):
            self.context.close()
            self.context = None
        if getattr(self, "_profile", None):
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None
        if self._own_playwright and self.playwright:
            self.playwright.stop()
            self.playwright = None
        if self.server:
            self.server.stop()

    def _wait_ready(self):
        ready = "window.app && window.app.graph" + (f" && {PACK_EXTENSION_REGISTERED}" if self.install_pack else "")
        self.page.wait_for_function(ready, timeout=90_000)
        self.page.evaluate(_RECORD_DEPRECATIONS_JS)

    def deprecations(self, marker=None):
        """Frontend deprecation warnings recorded so far (message + JS stack), those whose stack
        contains ``marker`` if given; None where the frontend has no deprecation hook."""
        recorded = self.page.evaluate("() => LiteGraph.onDeprecationWarning?.amdmRecorded ?? null")
        return None if recorded is None else [r for r in recorded if marker is None or marker in r]

    def vue_nodes(self):
        return self.page.evaluate(f"() => window.app.ui.settings.getSettingValue({VUE_NODES_SETTING!r})")

    def set_vue_nodes(self, enabled):
        """Switch the "Nodes 2.0" rendering: the setting is saved through the server's settings API and
        the page reloaded, so the frontend starts in that rendering as a user's would."""
        if self.vue_nodes() == enabled:
            return
        self.page.evaluate("""async ([id, value]) => {
            const response = await fetch('/api/settings/' + id, {method: 'POST', body: JSON.stringify(value)});
            if (!response.ok) throw new Error('settings API answered ' + response.status);
        }""", [VUE_NODES_SETTING, enabled])
        self.page.reload()
        self._wait_ready()
        if self.vue_nodes() != enabled:
            raise RuntimeError(f"{VUE_NODES_SETTING} is still {not enabled} after the reload")

    def unregistered_node_types(self):
        """Node types of the loaded graph the frontend has no definition for (sorted, unique)."""
        return self.page.evaluate("""(frontendTypes) => [...new Set(window.app.graph.nodes.map(n => n.type))]
            .filter(t => !frontendTypes.includes(t) && !(t in LiteGraph.registered_node_types)).sort()""",
                                  sorted(FRONTEND_NODE_TYPES))

    def missing_nodes_notice_shown(self):
        """Whether the frontend shows (1.32) or flags (1.58) missing nodes right now."""
        notices = f"{MISSING_NODES_DIALOG}, {MISSING_NODES_ICON}, {MISSING_NODES_CARD}"
        return self.page.locator(notices).count() > 0

    def missing_nodes_notice(self, timeout_ms=10_000):
        """The text of the frontend's missing-nodes notice, as a user reaches it: 1.32's dialog, or 1.58's
        error panel opened through the "View details" button of its toast. Raises when none appears."""
        self.page.locator(f"{MISSING_NODES_DIALOG}, {MISSING_NODES_ICON}").first.wait_for(
            state="attached", timeout=timeout_ms)
        dialog = self.page.locator(MISSING_NODES_DIALOG)
        if dialog.count():
            return dialog.inner_text()
        self.page.get_by_role("button", name="View details").first.click(timeout=timeout_ms)
        card = self.page.locator(MISSING_NODES_CARD).first
        card.wait_for(state="visible", timeout=timeout_ms)
        text = card.inner_text()
        # close the panel again: the frontend remembers it open, over the right of every later view
        self.page.locator(PROPERTIES_PANEL_TOGGLE).first.click(timeout=timeout_ms)
        card.wait_for(state="detached", timeout=timeout_ms)
        return text

    def titles_under_chrome(self):
        """Node titles and group headers in the window that the frontend's own chrome (side bar, tab bar,
        breadcrumb, run bar) covers: [(title, x, y, what covers it)]. The point tested is the start of the
        title; what counts as uncovered is the graph canvas or, in Nodes 2.0, the node's own element. The
        minimap and the zoom controls (floating tools the user places or closes) and toasts (passing
        notices, such as 1.32's warning that the 0.33 backend wants a newer frontend) are left out."""
        return self.page.evaluate(_TITLES_UNDER_CHROME_JS)

    def load_workflow(self, workflow, fit=False, settle_ms=1500):
        """app.loadGraphData(workflow) in a new tab, then wait ``settle_ms`` (the missing-nodes dialog
        appears ~0.3 s after loading). ``fit`` zooms the canvas to show every node and group."""
        self.close_dialogs()
        self.page.evaluate("async (w) => { await window.app.loadGraphData(w); }", workflow)
        if fit:
            self.page.evaluate(_FIT_VIEW_JS)
        self.page.wait_for_timeout(settle_ms)

    def close_dialogs(self):
        """Escape, then a click on the backdrop for dialogs that ignore Escape (the templates dialog)."""
        if not self.page.locator('[role="dialog"]').count():
            return
        self.page.keyboard.press("Escape")
        self.page.wait_for_timeout(300)
        if self.page.locator('[role="dialog"]').count():
            self.page.mouse.click(5, self.viewport["height"] // 2)
            self.page.wait_for_timeout(300)

    def errors(self, marker):
        """Console errors / page errors whose text or source contains ``marker``."""
        return [(kind, text, url) for kind, text, url in self.console
                if kind in ("error", "pageerror") and (marker in text or marker in url)]

    def wait_for_history(self, timeout=300, known=()):
        """The first finished /history entry whose prompt id is not in ``known`` (polls the server);
        raises on an error status."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.server.get("/history")
            for prompt_id, entry in history.items():
                if prompt_id in known:
                    continue
                status = entry.get("status", {})
                if status.get("completed") is not None or status.get("status_str") == "error":
                    if status.get("status_str") == "error":
                        raise RuntimeError(f"prompt {prompt_id} failed: {json.dumps(status)[:3000]}")
                    return prompt_id, entry
            time.sleep(0.5)
        raise TimeoutError(f"no prompt finished within {timeout}s:\n{self.server.log()}")


# Scale and offset the canvas so that every node and group is on screen.
_FIT_VIEW_JS = """() => {
    const canvas = window.app.canvas, graph = window.app.graph;
    const boxes = graph.nodes.map(n => [n.pos[0], n.pos[1] - 30, n.pos[0] + n.size[0], n.pos[1] + n.size[1]])
        .concat((graph.groups || []).map(g => [g.pos[0], g.pos[1], g.pos[0] + g.size[0], g.pos[1] + g.size[1]]));
    const x0 = Math.min(...boxes.map(b => b[0])), y0 = Math.min(...boxes.map(b => b[1]));
    const x1 = Math.max(...boxes.map(b => b[2])), y1 = Math.max(...boxes.map(b => b[3]));
    const el = canvas.canvas, margin = 16, left = 64, top = 40;
    const scale = Math.min((el.clientWidth - left - margin) / (x1 - x0), (el.clientHeight - top - margin) / (y1 - y0));
    canvas.ds.scale = scale;
    canvas.ds.offset = [left / scale - x0, top / scale - y0];
    canvas.setDirty(true, true);
}"""


_TITLES_UNDER_CHROME_JS = """() => {
    const canvas = app.canvas.canvas, ds = app.canvas.ds, box = canvas.getBoundingClientRect();
    const floating = '.litegraph-minimap, .minimap-main-container, .p-buttongroup, [class*="canvas-menu"], ' +
        '[class*="toast"]';
    const covered = [];
    const check = (title, x, y, own) => {
        const px = box.left + (x + ds.offset[0]) * ds.scale, py = box.top + (y + ds.offset[1]) * ds.scale;
        if (px < 0 || py < 0 || px >= window.innerWidth || py >= window.innerHeight) return;
        const el = document.elementFromPoint(px, py);
        if (!el || el === canvas || (own && own.contains(el)) || el.closest(floating)) return;
        covered.push([title, Math.round(px), Math.round(py), el.tagName + '.' + String(el.className).slice(0, 60)]);
    };
    for (const node of app.graph.nodes) {
        const own = document.querySelector(`[data-node-id="${node.id}"]`);
        check(node.title || node.type, node.pos[0] + 12, node.pos[1] - LiteGraph.NODE_TITLE_HEIGHT / 2, own);
    }
    for (const group of app.graph.groups) check('group: ' + group.title, group.pos[0] + 12, group.pos[1] + 12, null);
    return covered;
}"""


# LiteGraph calls every function in LiteGraph.onDeprecationWarning with the message; record it with the
# caller's stack (every time, not only the first: the frontend's own code may have warned first).
_RECORD_DEPRECATIONS_JS = """() => {
    const hooks = LiteGraph.onDeprecationWarning;
    if (!Array.isArray(hooks) || hooks.amdmRecorded) return;
    hooks.amdmRecorded = [];
    LiteGraph.alwaysRepeatWarnings = true;
    hooks.push((message) => hooks.amdmRecorded.push(message + "\\n" + new Error().stack));
}"""
