// Box editor for the pack's box-conditioning nodes (InteractDiffusion Apply, MIGC Apply).
//
// A canvas sized to the node's width/height widgets, on which boxes are drawn, moved, resized, deleted
// and labelled. The node's text widget stays the single source of truth: the editor parses it on every
// change and writes whole lines back in the format of adapters/boxes.py
//     MIGC instance:      phrase | x0, y0, x1, y1
//     InteractDiffusion:  subject | action | object | sx0, sy0, sx1, sy1 | ox0, oy0, ox1, oy1
// Lines it does not understand (comments, typos) are kept verbatim; the node works without this script.
// The canvas size is computed here from the node's width and the image's aspect ratio (not taken from the
// frontend's widget box), so it is the same in the classic and the "Nodes 2.0" (Vue) rendering.
import { app } from "../../scripts/app.js";

// node type -> the text widget it edits, the phrase fields (and the labels a new box gets while they are
// empty) and the boxes of one line
const EDITORS = {
    InteractDiffusionApply: {
        text: "interactions",
        phrases: ["subject", "action", "object"],
        defaults: ["a person", "interacts with", "an object"],
        boxes: ["S", "O"],
    },
    MIGCApply: { text: "instances", phrases: ["phrase"], defaults: ["an object"], boxes: [""] },
};

const COLORS = ["#ff5d5d", "#4fa3ff", "#ffd23f", "#4cd98b", "#d37bff", "#ff9f40", "#3fe0d0", "#ff7ac6"];
const HANDLE_PX = 7;        // corner grab radius, CSS pixels
const MIN_BOX_PX = 4;       // a drag shorter than this (image pixels) is a click, not a box
const SIDE_PX = 12;         // space kept on each side of the canvas: both renderings' node padding fits in it
const AREA_PX = [160, 480]; // bounds of the canvas height
const CHROME_PX = 60;       // label bar + the hint's two lines around the canvas
const HINT_LINES = 2;       // the hint wraps within the node's width and is written to fit two lines

function parseBox(field) {
    const parts = field.split(",").map((p) => p.trim());
    if (parts.length !== 4 || parts.some((p) => p === "")) return null;
    const box = parts.map(Number);
    return box.every(Number.isFinite) && box[0] < box[2] && box[1] < box[3] ? box : null;
}

// text -> {lines, items}; an item is one understood line: {line, phrases, boxes}
function parseBoxText(text, spec) {
    const lines = (text ?? "").split("\n");
    const items = [];
    const rejected = [];
    lines.forEach((raw, line) => {
        const trimmed = raw.trim();
        if (!trimmed || trimmed.startsWith("#")) return;
        const fields = raw.split("|").map((f) => f.trim());
        const nPhrases = spec.phrases.length;
        const boxes = fields.slice(nPhrases).map(parseBox);
        if (fields.length !== nPhrases + spec.boxes.length || boxes.includes(null)) {
            rejected.push(line + 1);
            return;
        }
        items.push({ line, phrases: fields.slice(0, nPhrases), boxes });
    });
    return { lines, items, rejected };
}

function formatBoxLine(phrases, boxes) {
    // boxes drawn or changed here are whole pixels already; others keep the user's values
    const fmt = (box) => box.map((v) => String(+v.toFixed(2))).join(", ");
    return [...phrases, ...boxes.map(fmt)].join(" | ");
}

function cleanLabel(value) {
    // '|' and newlines would break the line format
    return value.replace(/[|\r\n]/g, " ").trim();
}

class BoxEditor {
    constructor(node, spec) {
        this.node = node;
        this.spec = spec;
        this.selected = null;   // index into this.parsed.items
        this.drag = null;       // the gesture in progress
        this.pending = null;    // InteractDiffusion: a subject box waiting for its object box
        this.showingBox = false; // the label fields hold the selected box's phrases
        this.signature = null;
        this.buildDom();
    }

    widget(name) {
        return this.node.widgets?.find((w) => w.name === name);
    }

    get textWidget() {
        return this.widget(this.spec.text);
    }

    get imageSize() {
        const w = Number(this.widget("width")?.value) || 512;
        const h = Number(this.widget("height")?.value) || 512;
        return [w, h];
    }

    get linked() {
        const slot = this.node.inputs?.findIndex((i) => i.widget?.name === this.spec.text) ?? -1;
        return slot >= 0 && this.node.isInputConnected(slot);
    }

    // [width, height] of the canvas in CSS pixels: the node's width less the side space, the image's
    // aspect ratio within AREA_PX (letterboxed beyond it)
    canvasSize() {
        const [w, h] = this.imageSize;
        const width = Math.max(80, (this.node.size?.[0] ?? 400) - 2 * SIDE_PX);
        return [width, Math.min(Math.max(width * h / w, AREA_PX[0]), AREA_PX[1])];
    }

    applySize() {
        const [width, height] = this.canvasSize();
        const style = this.canvas.style;
        if (style.width === `${width}px` && style.height === `${height}px`) return;
        Object.assign(style, { width: `${width}px`, height: `${height}px` });
        this.holder.style.height = `${height}px`;
        this.render();
    }

    buildDom() {
        const root = document.createElement("div");
        root.className = "amdm-box-editor";
        Object.assign(root.style, {
            display: "flex", flexDirection: "column", gap: "3px", width: "100%", minWidth: "0",
            boxSizing: "border-box", font: "11px sans-serif", color: "#ccc",
        });
        const bar = document.createElement("div");
        Object.assign(bar.style, { display: "flex", gap: "3px", alignItems: "center", minWidth: "0" });
        // Empty while no box is selected (a prefilled phrase would read like the workflow's own); a new box
        // takes what is typed here, else the spec's defaults.
        this.labelInputs = this.spec.phrases.map((name, i) => {
            const input = document.createElement("input");
            Object.assign(input, {
                type: "text", placeholder: name, value: "",
                title: `${name} of the selected box; with no box selected, of the next box you draw ` +
                       `(empty: "${this.spec.defaults[i]}")`,
            });
            input.dataset.phrase = name;
            Object.assign(input.style, {
                flex: "1 1 0", width: "0", minWidth: "0", background: "#222", color: "#ddd",
                border: "1px solid #555", borderRadius: "3px", padding: "1px 3px",
            });
            input.addEventListener("input", () => this.relabelSelected());
            bar.append(input);
            return input;
        });
        const del = document.createElement("button");
        del.textContent = "Delete";
        del.title = "Delete the selected box (Delete key)";
        del.addEventListener("click", () => this.deleteSelected());
        bar.append(del);
        this.hint = document.createElement("div");
        this.hint.className = "amdm-box-editor-hint";
        Object.assign(this.hint.style, {
            height: `${13 * HINT_LINES}px`, lineHeight: "13px", whiteSpace: "normal", overflowWrap: "anywhere",
        });
        // the holder keeps the canvas centred when the frontend's widget box is wider than the canvas
        const holder = document.createElement("div");
        Object.assign(holder.style, { flex: "0 0 auto", display: "flex", justifyContent: "center" });
        this.canvas = document.createElement("canvas");
        this.canvas.tabIndex = 0;
        Object.assign(this.canvas.style, { flex: "0 0 auto", display: "block", outline: "none", cursor: "crosshair" });
        holder.append(this.canvas);
        root.append(bar, holder, this.hint);
        this.root = root;
        this.holder = holder;
        this.applySize();

        this.canvas.addEventListener("pointerdown", (e) => this.onPointerDown(e));
        this.canvas.addEventListener("pointermove", (e) => this.onPointerMove(e));
        this.canvas.addEventListener("pointerup", (e) => this.onPointerUp(e));
        this.canvas.addEventListener("keydown", (e) => this.onKeyDown(e));
        new ResizeObserver(() => this.applySize()).observe(root);
    }

    // ---- text <-> model ------------------------------------------------------------------------
    refresh(force = false) {
        const text = this.textWidget?.value ?? "";
        const signature = `${text}\u0000${this.imageSize.join("x")}\u0000${this.linked}`;
        if (!force && signature === this.signature) return;
        const sizeChanged = this.signature?.split("\u0000")[1] !== this.imageSize.join("x");
        this.signature = signature;
        this.root.dataset.amdmBoxEditor = String(this.node.id);   // the id is known only once added
        this.parsed = parseBoxText(text, this.spec);
        if (this.selected != null && this.selected >= this.parsed.items.length) this.selected = null;
        this.syncLabelInputs();
        this.applySize();
        if (sizeChanged) this.fitNode();
        this.render();
    }

    fitNode() {
        const needed = this.node.computeSize?.()[1];
        if (needed && this.node.size[1] < needed) this.node.setSize([this.node.size[0], needed]);
    }

    writeText(lines) {
        const widget = this.textWidget;
        if (!widget || this.linked) return;
        widget.value = lines.join("\n");   // the widget's setter also fires its callback
        this.node.setDirtyCanvas?.(true, true);
        app.graph?.change?.();
        this.refresh();
    }

    writeItem(index, phrases, boxes) {
        const lines = [...this.parsed.lines];
        lines[this.parsed.items[index].line] = formatBoxLine(phrases, boxes);
        this.writeText(lines);
    }

    appendItem(phrases, boxes) {
        const lines = [...this.parsed.lines];
        while (lines.length && lines[lines.length - 1].trim() === "") lines.pop();
        lines.push(formatBoxLine(phrases, boxes));
        this.writeText(lines);
        this.selected = this.parsed.items.length - 1;
        this.syncLabelInputs();
        this.render();
    }

    deleteSelected() {
        if (this.pending) {
            this.pending = null;
            this.render();
            return;
        }
        if (this.selected == null || this.linked) return;
        const lines = [...this.parsed.lines];
        lines.splice(this.parsed.items[this.selected].line, 1);
        this.selected = null;
        this.writeText(lines);
    }

    labels() {
        return this.labelInputs.map((input, i) => cleanLabel(input.value) || this.spec.defaults[i]);
    }

    relabelSelected() {
        if (this.selected == null) return;
        const item = this.parsed.items[this.selected];
        this.writeItem(this.selected, this.labels(), item.boxes);
    }

    // The fields show the selected box's phrases; once it is deselected they empty again (what was typed
    // with no box selected is kept: it labels the next box).
    syncLabelInputs() {
        const item = this.selected != null ? this.parsed.items[this.selected] : null;
        if (!item && !this.showingBox) return;
        this.labelInputs.forEach((input, i) => {
            if (document.activeElement !== input) input.value = item ? item.phrases[i] : "";
        });
        this.showingBox = Boolean(item);
    }

    preferredHeight() {
        return this.canvasSize()[1] + CHROME_PX;
    }

    // ---- geometry --------------------------------------------------------------------------------
    layout() {
        const [w, h] = this.imageSize;
        const cw = this.canvas.clientWidth;
        const ch = this.canvas.clientHeight;
        const scale = Math.max(1e-6, Math.min(cw / w, ch / h));
        return { scale, ox: (cw - w * scale) / 2, oy: (ch - h * scale) / 2, w, h };
    }

    toImage(e) {
        const rect = this.canvas.getBoundingClientRect();
        const { scale, ox, oy, w, h } = this.layout();
        // the canvas may be drawn zoomed by the graph canvas: CSS size vs on-screen size
        const zx = rect.width / (this.canvas.clientWidth || 1);
        const zy = rect.height / (this.canvas.clientHeight || 1);
        const x = ((e.clientX - rect.left) / zx - ox) / scale;
        const y = ((e.clientY - rect.top) / zy - oy) / scale;
        return [Math.min(Math.max(x, 0), w), Math.min(Math.max(y, 0), h)];
    }

    hitTest(p) {
        const tol = HANDLE_PX / this.layout().scale;
        const items = this.parsed?.items ?? [];
        const order = items.map((_, i) => i).reverse();
        if (this.selected != null) order.unshift(this.selected);
        for (const index of order) {
            for (const [b, box] of items[index].boxes.entries()) {
                const corners = [[0, 1], [2, 1], [0, 3], [2, 3]];
                for (const [cx, cy] of corners) {
                    if (Math.abs(p[0] - box[cx]) <= tol && Math.abs(p[1] - box[cy]) <= tol) {
                        return { index, box: b, corner: [cx, cy] };
                    }
                }
            }
        }
        for (const index of order) {
            for (const [b, box] of items[index].boxes.entries()) {
                if (p[0] >= box[0] && p[0] <= box[2] && p[1] >= box[1] && p[1] <= box[3]) return { index, box: b };
            }
        }
        return null;
    }

    // ---- gestures --------------------------------------------------------------------------------
    onPointerDown(e) {
        if (e.button !== 0 || !this.parsed) return;
        e.preventDefault();
        e.stopPropagation();
        this.canvas.focus();
        if (this.linked) return;
        this.canvas.setPointerCapture?.(e.pointerId);
        const p = this.toImage(e);
        const hit = this.pending ? null : this.hitTest(p);
        if (hit) {
            this.selected = hit.index;
            this.syncLabelInputs();
            const origin = this.parsed.items[hit.index].boxes;
            const boxes = origin.map((b) => [...b]);
            this.drag = { kind: hit.corner ? "resize" : "move", ...hit, start: p, origin, boxes };
        } else {
            if (!this.pending) this.selected = null;
            this.syncLabelInputs();
            this.drag = { kind: "draw", start: p, box: [p[0], p[1], p[0], p[1]] };
        }
        this.render();
    }

    onPointerMove(e) {
        if (!this.drag) {
            const hit = this.parsed && !this.pending ? this.hitTest(this.toImage(e)) : null;
            this.canvas.style.cursor = hit ? (hit.corner ? "nwse-resize" : "move") : "crosshair";
            return;
        }
        e.stopPropagation();
        const p = this.toImage(e);
        const d = this.drag;
        const [w, h] = this.imageSize;
        if (d.kind === "draw") {
            d.box = [Math.min(d.start[0], p[0]), Math.min(d.start[1], p[1]), Math.max(d.start[0], p[0]), Math.max(d.start[1], p[1])];
        } else if (d.kind === "move") {
            const o = d.origin[d.box];
            const dx = Math.min(Math.max(p[0] - d.start[0], -o[0]), w - o[2]);
            const dy = Math.min(Math.max(p[1] - d.start[1], -o[1]), h - o[3]);
            d.boxes[d.box] = [o[0] + dx, o[1] + dy, o[2] + dx, o[3] + dy];
        } else {
            const box = [...d.origin[d.box]];
            const [cx, cy] = d.corner;
            box[cx] = p[0];
            box[cy] = p[1];
            d.boxes[d.box] = [Math.min(box[0], box[2]), Math.min(box[1], box[3]), Math.max(box[0], box[2]), Math.max(box[1], box[3])];
        }
        this.render();
    }

    onPointerUp(e) {
        const d = this.drag;
        if (!d) return;
        e.stopPropagation();
        this.drag = null;
        this.canvas.releasePointerCapture?.(e.pointerId);
        if (d.kind === "draw") {
            const box = d.box.map(Math.round);
            if (box[2] - box[0] < MIN_BOX_PX || box[3] - box[1] < MIN_BOX_PX) {
                this.render();
                return;
            }
            if (this.spec.boxes.length === 1) {
                this.appendItem(this.labels(), [box]);
            } else if (!this.pending) {
                this.pending = box;   // the subject box; the next box drawn is the object box
                this.render();
            } else {
                const subject = this.pending;
                this.pending = null;
                this.appendItem(this.labels(), [subject, box]);
            }
            return;
        }
        const item = this.parsed.items[d.index];
        const boxes = d.boxes.map((b) => b.map(Math.round));
        const valid = boxes.every((b) => b[2] - b[0] >= 1 && b[3] - b[1] >= 1);
        if (valid && JSON.stringify(boxes) !== JSON.stringify(item.boxes)) {
            this.writeItem(d.index, item.phrases, boxes);
        } else {
            this.render();
        }
    }

    onKeyDown(e) {
        if (e.key === "Delete" || e.key === "Backspace") {
            this.deleteSelected();
        } else if (e.key === "Escape") {
            this.pending = null;
            this.selected = null;
            this.syncLabelInputs();
            this.render();
        } else {
            return;
        }
        // keep the graph from deleting the selected node
        e.preventDefault();
        e.stopPropagation();
    }

    // ---- drawing ---------------------------------------------------------------------------------
    render() {
        const canvas = this.canvas;
        if (!this.parsed || !canvas.isConnected) return;
        const dpr = window.devicePixelRatio || 1;
        const cw = canvas.clientWidth;
        const ch = canvas.clientHeight;
        if (canvas.width !== Math.round(cw * dpr) || canvas.height !== Math.round(ch * dpr)) {
            canvas.width = Math.round(cw * dpr);
            canvas.height = Math.round(ch * dpr);
        }
        const ctx = canvas.getContext("2d");
        ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
        ctx.clearRect(0, 0, cw, ch);
        const { scale, ox, oy, w, h } = this.layout();
        const rect = (b) => [ox + b[0] * scale, oy + b[1] * scale, (b[2] - b[0]) * scale, (b[3] - b[1]) * scale];
        ctx.fillStyle = "#1b1b1b";
        ctx.fillRect(ox, oy, w * scale, h * scale);
        ctx.strokeStyle = "#2c2c2c";
        ctx.lineWidth = 1;
        for (let g = 64; g < Math.max(w, h); g += 64) {
            if (g < w) ctx.strokeRect(ox + g * scale, oy, 0, h * scale);
            if (g < h) ctx.strokeRect(ox, oy + g * scale, w * scale, 0);
        }
        ctx.strokeStyle = "#666";
        ctx.strokeRect(ox, oy, w * scale, h * scale);

        ctx.font = "11px sans-serif";
        ctx.textBaseline = "top";
        this.parsed.items.forEach((item, index) => {
            const drag = this.drag && this.drag.index === index && this.drag.boxes ? this.drag : null;
            const boxes = drag ? drag.boxes : item.boxes;
            const color = COLORS[index % COLORS.length];
            const selected = index === this.selected;
            boxes.forEach((box, b) => {
                const [x, y, bw, bh] = rect(box);
                ctx.fillStyle = color + "22";
                ctx.fillRect(x, y, bw, bh);
                ctx.setLineDash(b === 1 ? [5, 3] : []);
                ctx.strokeStyle = color;
                ctx.lineWidth = selected ? 2.5 : 1.5;
                ctx.strokeRect(x, y, bw, bh);
                ctx.setLineDash([]);
                const phrase = this.spec.boxes.length === 1 ? item.phrases[0] : item.phrases[b === 0 ? 0 : 2];
                const tag = `${index + 1}${this.spec.boxes[b]} ${phrase}`;
                ctx.fillStyle = "#000a";
                ctx.fillRect(x, y, ctx.measureText(tag).width + 6, 14);
                ctx.fillStyle = color;
                ctx.fillText(tag, x + 3, y + 1);
                if (selected) {
                    for (const [cx, cy] of [[x, y], [x + bw, y], [x, y + bh], [x + bw, y + bh]]) {
                        ctx.fillRect(cx - 3, cy - 3, 6, 6);
                    }
                }
            });
            if (boxes.length === 2) {
                // the action sits between subject and object
                const centre = (b) => [ox + (b[0] + b[2]) / 2 * scale, oy + (b[1] + b[3]) / 2 * scale];
                const [a, c] = boxes.map(centre);
                ctx.strokeStyle = color;
                ctx.lineWidth = 1;
                ctx.beginPath();
                ctx.moveTo(...a);
                ctx.lineTo(...c);
                ctx.stroke();
                ctx.fillStyle = color;
                ctx.fillText(item.phrases[1], (a[0] + c[0]) / 2 + 3, (a[1] + c[1]) / 2 + 2);
            }
        });
        const ghost = this.drag?.kind === "draw" ? this.drag.box : null;
        for (const box of [this.pending, ghost]) {
            if (!box) continue;
            ctx.setLineDash([4, 3]);
            ctx.strokeStyle = "#eee";
            ctx.lineWidth = 1.5;
            ctx.strokeRect(...rect(box));
            ctx.setLineDash([]);
        }
        this.hint.textContent = this.hintText();
    }

    // At most two lines at the narrowest node (400 px): the hint box is two lines high.
    hintText() {
        if (this.linked) return `${this.spec.text} comes from a link: edit the boxes at its source`;
        if (this.pending) return "now draw the object box (Esc cancels)";
        const rejected = this.parsed.rejected;
        const bad = rejected.length
            ? ` Line ${rejected.slice(0, 3).join(", ")}${rejected.length > 3 ? ", ..." : ""} kept as typed.` : "";
        const draw = this.spec.boxes.length === 2 ? "Drag: subject box, then object box." : "Drag: new box.";
        return `${draw} Drag a box: move; a corner: resize. Click: select, Del: delete.${bad}`;
    }
}

app.registerExtension({
    name: "amdm-aggregation.BoxEditor",   // namespaced with the registry id (comfy-test.toml)
    beforeRegisterNodeDef(nodeType, nodeData) {
        const spec = EDITORS[nodeData.name];
        if (!spec) return;
        const onNodeCreated = nodeType.prototype.onNodeCreated;
        nodeType.prototype.onNodeCreated = function () {
            const result = onNodeCreated?.apply(this, arguments);
            const editor = new BoxEditor(this, spec);
            const widget = this.addDOMWidget("box_editor", "amdm-aggregation.box_editor", editor.root, {
                serialize: false,   // not an input: the text widget holds the boxes
                hideOnZoom: false,
                hideInPanel: true,  // the frontend's node panel would take the element out of the node
                getValue: () => undefined,
                setValue: () => {},
                getMinHeight: () => editor.preferredHeight(),
                onDraw: () => editor.refresh(),
            });
            widget.serialize = false;   // keeps widgets_values identical with and without this script
            widget.boxEditor = editor;
            for (const name of [spec.text, "width", "height"]) {
                const target = editor.widget(name);
                if (!target) continue;
                const callback = target.callback;
                target.callback = function () {
                    const r = callback?.apply(this, arguments);
                    editor.refresh();
                    return r;
                };
            }
            const [w] = this.size;
            this.setSize([Math.max(w, 400), this.computeSize()[1]]);
            requestAnimationFrame(() => editor.refresh(true));
            return result;
        };
        const editorOf = (node) => node.widgets?.find((w) => w.name === "box_editor")?.boxEditor;
        const onConfigure = nodeType.prototype.onConfigure;
        nodeType.prototype.onConfigure = function () {
            const result = onConfigure?.apply(this, arguments);
            editorOf(this)?.refresh(true);
            return result;
        };
        // a link to or from the text input makes the canvas read-only (Nodes 2.0 calls no onDraw to notice)
        const onConnectionsChange = nodeType.prototype.onConnectionsChange;
        nodeType.prototype.onConnectionsChange = function () {
            const result = onConnectionsChange?.apply(this, arguments);
            editorOf(this)?.refresh();
            return result;
        };
        const onResize = nodeType.prototype.onResize;
        nodeType.prototype.onResize = function () {
            const result = onResize?.apply(this, arguments);
            editorOf(this)?.applySize();
            return result;
        };
    },
});
