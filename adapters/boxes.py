"""The text format shared by the box-conditioning nodes and the web box editor.

One item per line, fields separated by ``|``; a box is ``x0, y0, x1, y1`` in pixels of the target image
(top-left origin, like core GLIGENTextBoxApply). Blank lines and lines starting with ``#`` are ignored.

    MIGC instance:            a red hair girl | 64, 32, 256, 480
    InteractDiffusion:        a girl | drinking from | a blue bottle | 64, 32, 256, 480 | 200, 96, 296, 256

The text widget is the single source of truth: the box editor only reads and writes it.
"""


from .common import quote


class BoxFormatError(ValueError):
    pass


def _parse_box(field, line_no, line, width, height):
    parts = [p.strip() for p in field.split(",")]
    try:
        if len(parts) != 4:
            raise ValueError
        x0, y0, x1, y1 = (float(p) for p in parts)
    except ValueError:
        raise BoxFormatError(
            f"line {line_no}: {quote(field.strip())} is not a box; write four numbers 'x0, y0, x1, y1' "
            f"in pixels (in: {quote(line)})") from None
    if not (x0 < x1 and y0 < y1):
        raise BoxFormatError(
            f"line {line_no}: box {x0:g}, {y0:g}, {x1:g}, {y1:g} is empty or inverted; "
            f"it needs x0 < x1 and y0 < y1 (in: {quote(line)})")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise BoxFormatError(
            f"line {line_no}: box {x0:g}, {y0:g}, {x1:g}, {y1:g} lies outside the {width}x{height} image; "
            f"keep 0 <= x <= {width} and 0 <= y <= {height}, or set width/height to the image size")
    return (x0, y0, x1, y1)


def parse_box_lines(text, phrase_names, box_names, width, height, max_items, what):
    """Parse ``text`` into a list of (phrases, boxes) tuples, one per non-comment line.

    ``phrase_names`` / ``box_names`` name the fields of a line (they make the error messages and the
    expected layout); ``what`` names the item ("interaction", "instance"). Every error names the line.
    """
    if width <= 0 or height <= 0:
        raise BoxFormatError(f"width and height must be positive, got {width}x{height}")
    layout = " | ".join(list(phrase_names) + ["x0, y0, x1, y1"] * len(box_names))
    items = []
    for line_no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split("|")]
        if len(fields) != len(phrase_names) + len(box_names):
            raise BoxFormatError(
                f"line {line_no}: expected {len(phrase_names) + len(box_names)} fields '{layout}' "
                f"separated by '|', found {len(fields)} (in: {quote(line)})")
        phrases = tuple(fields[:len(phrase_names)])
        for name, phrase in zip(phrase_names, phrases):
            if not phrase:
                raise BoxFormatError(f"line {line_no}: the {name} is empty (in: {quote(line)})")
        boxes = tuple(_parse_box(f, line_no, line, width, height) for f in fields[len(phrase_names):])
        items.append((phrases, boxes))
    if not items:
        raise BoxFormatError(f"no {what} given: write at least one line '{layout}'")
    if len(items) > max_items:
        raise BoxFormatError(f"{len(items)} {what}s given; at most {max_items} are supported")
    return items


def normalise_box(box, width, height):
    """Pixel box -> (x0, y0, x1, y1) as fractions of the image size."""
    x0, y0, x1, y1 = box
    return (x0 / width, y0 / height, x1 / width, y1 / height)
