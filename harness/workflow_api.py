"""Convert a UI-format workflow (what users drag into ComfyUI) to the API format POST /prompt takes.

The conversion follows the rules of the ComfyUI frontend (1.32) so that shipped workflow files can be
executed by code, with no hand-kept API twin:

- widgets: every required-then-optional input whose type is INT, FLOAT, STRING, BOOLEAN or a combo
  (a list, or "COMBO") gets a widget unless it is ``forceInput``; ``widgets_values`` holds their values in
  that order, plus one extra value after an INT named ``seed``/``noise_seed`` or declared with
  ``control_after_generate`` (the "control after generate" mode), and one after an ``image_upload``
  combo (the upload button);
- an input with a link takes the link (a widget converted to an input keeps its stale value in
  ``widgets_values``, which is ignored);
- Note / MarkdownNote nodes are dropped, Reroute nodes are followed, muted nodes (mode 2) are dropped,
  bypassed nodes (mode 4) pass their matching input through, PrimitiveNode values are inlined.

``input_types`` is a callable ``class_type -> INPUT_TYPES() dict`` (in-process:
``lambda t: nodes.NODE_CLASS_MAPPINGS[t].INPUT_TYPES()``).
"""

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = {"seed", "noise_seed"}
NOTE_TYPES = {"Note", "MarkdownNote"}
MODE_MUTED = 2
MODE_BYPASSED = 4
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


class WorkflowError(ValueError):
    pass


def _input_items(input_types):
    for section in ("required", "optional"):
        yield from (input_types.get(section) or {}).items()


def _is_widget(spec):
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options.get("forceInput"):
        return False
    return isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES


def widget_layout(input_types):
    """The ``widgets_values`` layout of a node: a list of (input name, spec) for widgets and
    (None, kind) for the frontend's extra values ("control" after seeds, "upload" after image combos)."""
    layout = []
    for name, spec in _input_items(input_types):
        if not _is_widget(spec):
            continue
        layout.append((name, spec))
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if spec[0] == "INT" and (options.get("control_after_generate") or name in SEED_NAMES):
            layout.append((None, "control"))
        elif options.get("image_upload"):
            layout.append((None, "upload"))
    return layout


def _combo_options(spec):
    if isinstance(spec[0], (list, tuple)):
        return list(spec[0])
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return list(options.get("options", []))


def check_widget_value(name, spec, value):
    """A problem description when ``value`` does not fit the input ``spec``, else None."""
    kind = "COMBO" if isinstance(spec[0], (list, tuple)) else spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name}: {value!r} is not a boolean"
    if kind == "STRING":
        return None if isinstance(value, str) else f"{name}: {value!r} is not a string"
    if kind == "COMBO":
        choices = _combo_options(spec)
        return None if value in choices else f"{name}: {value!r} is not one of {choices[:12]}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and value != int(value)):
        return f"{name}: {value!r} is not a{'n integer' if kind == 'INT' else ' number'}"
    low, high = options.get("min"), options.get("max")
    if (low is not None and value < low) or (high is not None and value > high):
        return f"{name}: {value!r} is outside [{low}, {high}]"
    return None


def check_workflow(workflow, input_types):
    """Every mismatch between the workflow's nodes and the nodes' current inputs, as readable strings:
    unknown node types, a widgets_values count or value that does not fit INPUT_TYPES (a renamed,
    added, removed or reordered input), link sockets whose names are not inputs of the node."""
    problems = []
    for node in workflow["nodes"]:
        if node["type"] in NOTE_TYPES or node["type"] in ("Reroute", "PrimitiveNode"):
            continue
        where = f"node {node['id']} ({node['type']})"
        try:
            types = input_types(node["type"])
        except KeyError:
            problems.append(f"{where}: no such node type is registered")
            continue
        layout = widget_layout(types)
        values = node.get("widgets_values") or []
        if len(values) != len(layout):
            expected = [name or f"<{kind}>" for name, kind in layout]
            problems.append(f"{where}: {len(values)} widgets_values for {len(layout)} widgets {expected}")
            continue
        for (name, spec), value in zip(layout, values):
            if name is None:
                if spec == "control" and value not in CONTROL_VALUES:
                    problems.append(f"{where}: control value {value!r} after the seed is not one of {sorted(CONTROL_VALUES)}")
                continue
            problem = check_widget_value(name, spec, value)
            if problem:
                problems.append(f"{where}: {problem}")
        known = {name for name, _ in _input_items(types)}
        for slot in node.get("inputs", []):
            if slot["name"] not in known:
                problems.append(f"{where}: input socket {slot['name']!r} is not an input of the node")
        linked = {slot["name"] for slot in node.get("inputs", []) if slot.get("link") is not None}
        for name, spec in (types.get("required") or {}).items():
            if not _is_widget(spec) and name not in linked:
                problems.append(f"{where}: required input {name!r} is not connected")
    return problems


def ui_to_api(workflow, input_types):
    """The API-format prompt ``{node_id: {"class_type", "inputs"}}`` of a UI-format workflow."""
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow.get("links", [])}

    def source(link_id):
        """(node id, output slot) a link ultimately comes from, through reroutes and bypassed nodes;
        None for a muted source; a literal value (1-tuple) for a PrimitiveNode."""
        link = links.get(link_id)
        if link is None:
            raise WorkflowError(f"link {link_id} is referenced by a node but missing from 'links'")
        _, from_id, from_slot, _, _, link_type = link
        origin = nodes.get(from_id)
        if origin is None:
            raise WorkflowError(f"link {link_id} comes from node {from_id}, which does not exist")
        if origin["type"] == "Reroute" or origin.get("mode") == MODE_BYPASSED:
            upstream = [slot for slot in origin.get("inputs", []) if slot.get("link") is not None
                        and (origin["type"] == "Reroute" or slot.get("type") == link_type)]
            return source(upstream[0]["link"]) if upstream else None
        if origin.get("mode") == MODE_MUTED:
            return None
        if origin["type"] == "PrimitiveNode":
            return (origin["widgets_values"][0],)
        return (str(from_id), from_slot)

    prompt = {}
    for node_id, node in nodes.items():
        if node["type"] in NOTE_TYPES or node["type"] in ("Reroute", "PrimitiveNode"):
            continue
        if node.get("mode") in (MODE_MUTED, MODE_BYPASSED):
            continue
        types = input_types(node["type"])
        inputs = {}
        values = node.get("widgets_values") or []
        layout = widget_layout(types)
        if len(values) != len(layout):
            raise WorkflowError(f"node {node_id} ({node['type']}): {len(values)} widgets_values for "
                                f"{len(layout)} widgets; the workflow is out of date with the node's inputs")
        for (name, _), value in zip(layout, values):
            if name is not None:
                inputs[name] = value
        for slot in node.get("inputs", []):
            if slot.get("link") is None:
                continue
            origin = source(slot["link"])
            if origin is None:
                inputs.pop(slot["name"], None)
            elif len(origin) == 1:
                inputs[slot["name"]] = origin[0]
            else:
                inputs[slot["name"]] = [origin[0], origin[1]]
        prompt[str(node_id)] = {"class_type": node["type"], "inputs": inputs,
                                "_meta": {"title": node.get("title", node["type"])}}
    return prompt


BOX_TEXT_WIDGETS = ("interactions", "instances")  # the pack's box text inputs (adapters/boxes.py format)
SIZE_WIDGETS = ("width", "height")


def _scale_box_text(text, factor):
    def scale_field(field):
        parts = field.split(",")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            return field
        return ", ".join(f"{v / factor:g}" for v in values) if len(values) == 4 else field

    return "\n".join(" | ".join(scale_field(f.strip()) for f in line.split("|")) if "|" in line else line
                     for line in text.splitlines())


def scale_workflow(workflow, input_types, factor):
    """A copy of a UI-format workflow for a ``factor`` times smaller image: every width/height widget
    and every box of the box texts divided by ``factor`` (tests and the CPU demo run the shipped graphs
    at 128 x 128 instead of 512 x 512; the boxes keep their place in the picture)."""
    import copy

    scaled = copy.deepcopy(workflow)
    for node in scaled["nodes"]:
        if node["type"] in NOTE_TYPES or node["type"] in ("Reroute", "PrimitiveNode"):
            continue
        layout = widget_layout(input_types(node["type"]))
        for index, (name, _) in enumerate(layout):
            if name in SIZE_WIDGETS:
                node["widgets_values"][index] = node["widgets_values"][index] // factor
            elif name in BOX_TEXT_WIDGETS:
                node["widgets_values"][index] = _scale_box_text(node["widgets_values"][index], factor)
    return scaled
