"""Procedurally drawn, captioned shape images for a mini LLaVA.

Each image holds exactly one solid object (colour x shape x position) on a
light grey background, so every caption and answer can be checked exactly.
The data serves two purposes:

* stage-1 feature alignment (``pretrain.json``: image -> short caption), and
* toy stage-2 instruction tuning (``instruct.json``: multi-turn Q&A).

Everything is deterministic from a seed: image ``i`` of a dataset depends only
on ``(seed, i)``, so a larger dataset with the same seed extends a smaller one.
Pure PIL + numpy on purpose, so data generation never needs torch.

Dataset layout written by :func:`write_shapes_dataset`::

    out_dir/
      images/shape_00000.png ...
      instances.json    COCO detection; one category per "colour shape" label
      captions.json     COCO captions (one caption per image)
      pretrain.json     LLaVA stage-1 conversations
      instruct.json     LLaVA stage-2 multi-turn conversations
      attributes.json   {"shape_00000": {"colour", "shape", "position", "bbox"}}
"""

from __future__ import annotations

import io
import math
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from kit.core.files import write_bytes_atomic, write_json_atomic

# Saturated, mutually distant colours; none is neutral, so a grey background
# pixel (r == g == b) can never be mistaken for the object.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 60, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")

# (column, row) of each position in a 3x3 grid.  Edge-middle cells are never
# used, which keeps every position name unambiguous.
_CELLS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top right": (2, 0),
    "bottom left": (0, 2),
    "bottom right": (2, 2),
    "center": (1, 1),
}

# Object side as a fraction of the image side.
_MIN_FRAC, _MAX_FRAC = 0.25, 0.40
# Keep object centres away from cell borders so the position is never borderline.
_CELL_INSET = 0.1
_BG_RANGE = (185, 235)
_NOISE = 5

_PRETRAIN_PROMPTS: tuple[str, ...] = (
    "Describe the image briefly.",
    "Give a short caption for this image.",
    "What is in the picture?",
    "Summarize the image in one sentence.",
    "Write a brief description of the image.",
    "What do you see?",
)


# --------------------------------------------------------------------------- drawing


def _shape_points(shape: str, box: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    """Polygon vertices for ``shape`` fitted into the inclusive pixel ``box``.

    The polygon is scaled uniformly so its larger extent spans the box exactly
    and centred in it, so every shape has the same nominal size and the drawn
    object (not e.g. a star's circumcircle) sits where the position says.
    """
    if shape == "square":
        pts = [(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]
    elif shape == "triangle":
        pts = [(0.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]
    elif shape == "star":
        # Inner radius a bit fatter than the regular star (0.38) so small stars
        # still read as stars at low resolution.
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a)))
    else:
        raise ValueError(f"not a polygon shape: {shape!r}")
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, y0, x1, y1 = box
    scale = (x1 - x0) / max(max(xs) - min(xs), max(ys) - min(ys))
    ox, oy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return [(cx + (x - ox) * scale, cy + (y - oy) * scale) for x, y in pts]


def _sample_centre(rng: random.Random, position: str, size: int, half: float) -> tuple[float, float]:
    cell = size / 3
    col, row = _CELLS[position]
    out = []
    for idx in (col, row):
        lo = max(idx * cell + _CELL_INSET * cell, half)
        hi = min((idx + 1) * cell - _CELL_INSET * cell, size - half)
        out.append(rng.uniform(lo, hi))
    return out[0], out[1]


def draw_scene(rng: random.Random, size: int = 224) -> tuple[Image.Image, dict[str, Any]]:
    """Draw one random object on a light grey background.

    The object's larger extent is 25-40% of ``size`` and its centre lies in the
    grid cell named by its position.  Returns the RGB image and
    ``{"colour", "shape", "position", "bbox"}`` where ``bbox`` is ``[x, y, w, h]``,
    the exact tight box of the drawn pixels.  All randomness comes from ``rng``.
    """
    colour = rng.choice(list(COLOURS))
    shape = rng.choice(SHAPES)
    position = rng.choice(POSITIONS)
    # Integer pixel sizes: PIL boxes are inclusive, so a float side would drift
    # a pixel past the 40% limit after rounding.
    side = rng.randint(math.ceil(_MIN_FRAC * size), math.floor(_MAX_FRAC * size))
    cx, cy = _sample_centre(rng, position, size, half=side / 2)
    x0 = min(max(round(cx - (side - 1) / 2), 0), size - side)
    y0 = min(max(round(cy - (side - 1) / 2), 0), size - side)
    box = (x0, y0, x0 + side - 1, y0 + side - 1)
    grey = rng.randint(*_BG_RANGE)
    noise_seed = rng.getrandbits(32)

    # The same noise on all channels keeps the background neutral grey.
    noise = np.random.default_rng(noise_seed).integers(-_NOISE, _NOISE + 1, size=(size, size, 1))
    bg = np.clip(grey + noise, 0, 255).astype(np.uint8).repeat(3, axis=2)
    img = Image.fromarray(bg)

    # Draw into a binary mask without anti-aliasing: the object is then a single
    # exact colour and the bbox can be read off the mask precisely.
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "square":
        draw.rectangle(box, fill=255)
    else:
        draw.polygon(_shape_points(shape, box), fill=255)
    img.paste(COLOURS[colour], mask=mask)

    left, top, right, bottom = mask.getbbox()  # right/bottom are exclusive
    attrs = {
        "colour": colour,
        "shape": shape,
        "position": position,
        "bbox": [left, top, right - left, bottom - top],
    }
    return img, attrs


# --------------------------------------------------------------------------- language


def _where(position: str, rng: random.Random) -> str:
    """A varied prepositional phrase for a position, e.g. 'in the top left corner'."""
    if position == "center":
        options = ("in the center", "at the center of the image", "in the center of the picture")
    else:
        options = (
            f"in the {position} corner",
            f"at the {position}",
            f"in the {position} of the image",
        )
    return rng.choice(options)


def caption(attrs: dict[str, Any], rng: random.Random) -> str:
    """One-sentence caption naming the colour, shape and position of ``attrs``."""
    c, s, w = attrs["colour"], attrs["shape"], _where(attrs["position"], rng)
    templates = (
        f"A {c} {s} {w}.",
        f"There is a {c} {s} {w}.",
        f"The image shows a {c} {s} {w}.",
        f"{w[0].upper()}{w[1:]}, there is a {c} {s}.",
        f"A single {c} {s} sits {w} on a plain background.",
    )
    return rng.choice(templates)


# Synonyms folded into the canonical vocabulary before matching.  "box" and
# "rectangle" are deliberately absent: they must not count as "square".
_NORMALISE: tuple[tuple[str, str], ...] = (
    (r"[-_]", " "),
    (r"\bcentred\b", "centered"),
    (r"\bcentre\b", "center"),
    (r"\bmiddle\b", "center"),
    (r"\bupper\b", "top"),
    (r"\blower\b", "bottom"),
)
_COLOUR_RE = re.compile(r"\b(" + "|".join(COLOURS) + r")\b")
_SHAPE_RE = re.compile(r"\b(" + "|".join(SHAPES) + r")s?\b")
_CORNER_RE = re.compile(r"\b(top|bottom)\s+(left|right)\b")
_CENTER_RE = re.compile(r"\bcenter(ed)?\b")


def _mentions(text: str) -> dict[str, set[str]]:
    text = text.lower()
    for pattern, repl in _NORMALISE:
        text = re.sub(pattern, repl, text)
    positions = {f"{m.group(1)} {m.group(2)}" for m in _CORNER_RE.finditer(text)}
    if _CENTER_RE.search(text):
        positions.add("center")
    return {
        "colour": {m.group(1) for m in _COLOUR_RE.finditer(text)},
        "shape": {m.group(1) for m in _SHAPE_RE.finditer(text)},
        "position": positions,
    }


def score_caption(text: str, attrs: dict[str, Any]) -> dict[str, bool]:
    """Whether ``text`` names the right colour, shape and position.

    Case-insensitive.  Each attribute is correct only if the text names exactly
    the true value and no other value of that attribute, so hedging ("a red or
    blue circle") scores as wrong.  "middle"/"centre" count as "center",
    "upper"/"lower" as "top"/"bottom"; "box"/"rectangle" do not count as
    "square".
    """
    found = _mentions(text)
    return {key: found[key] == {attrs[key]} for key in ("colour", "shape", "position")}


def qa_rounds(attrs: dict[str, Any], rng: random.Random) -> list[tuple[str, str]]:
    """2-3 (question, answer) pairs about distinct attributes, in random order."""
    c, s = attrs["colour"], attrs["shape"]
    w = _where(attrs["position"], rng)
    bank = {
        "colour": (
            ("What colour is the shape?", f"It is {c}."),
            ("What color is the object?", f"The object is {c}."),
            ("Which colour does the shape have?", f"The shape is {c}."),
        ),
        "shape": (
            ("What shape is shown in the image?", f"It is a {s}."),
            ("Which shape can you see?", f"I can see a {s}."),
            ("What kind of shape is drawn?", f"A {s} is drawn."),
        ),
        "position": (
            ("Where is the shape located?", f"It is {w}."),
            ("Where in the image is the object?", f"The object is {w}."),
            ("In which part of the image is the shape?", f"The shape is {w}."),
        ),
    }
    keys = list(bank)
    rng.shuffle(keys)
    return [rng.choice(bank[k]) for k in keys[: rng.choice((2, 3))]]


# --------------------------------------------------------------------------- dataset


def _atomic_write_json(path: Path, obj: Any) -> None:
    write_json_atomic(path, obj, indent=1)


def _atomic_save_png(path: Path, img: Image.Image) -> None:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())


def category_id(colour: str, shape: str) -> int:
    """COCO category id (1-based) of the ``"colour shape"`` label."""
    return list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape) + 1


def _shape_entry(root: Path, i: int, *, seed: int, size: int) -> dict[str, Any]:
    """Image `i` drawn and saved, and its line in each annotation file (image, instance, caption,
    pretrain, instruct) plus its attributes."""
    # A per-image stream (str seeds hash via sha512, stable across runs)
    # makes each image independent of n and of the others.
    rng = random.Random(f"kit.shapes:{seed}:{i}")
    img, attrs = draw_scene(rng, size)
    text = caption(attrs, rng)
    name = f"shape_{i:05d}"
    rel = f"images/{name}.png"
    _atomic_save_png(root / rel, img)
    image_id = i + 1
    x, y, w, h = attrs["bbox"]
    pretrain = {"id": name, "image": rel, "conversations": [
        {"from": "human", "value": "<image>\n" + rng.choice(_PRETRAIN_PROMPTS)}, {"from": "gpt", "value": text}]}
    turns = []
    for k, (q, a) in enumerate(qa_rounds(attrs, rng)):
        turns.append({"from": "human", "value": ("<image>\n" + q) if k == 0 else q})
        turns.append({"from": "gpt", "value": a})
    return {
        "image": {"id": image_id, "file_name": rel, "width": size, "height": size},
        "instance": {"id": image_id, "image_id": image_id, "category_id": category_id(attrs["colour"], attrs["shape"]),
                     "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0},
        "caption": {"id": image_id, "image_id": image_id, "caption": text},
        "pretrain": pretrain,
        "instruct": {"id": name, "image": rel, "conversations": turns},
        "attributes": attrs,
    }


def write_shapes_dataset(out_dir: str | os.PathLike, n: int, seed: int, size: int = 224) -> dict[str, str]:
    """Write ``n`` captioned shape images and their annotation files.

    COCO categories are one per ``"colour shape"`` label (20 in all, e.g.
    ``"red circle"``, supercategory = the shape); ids come from
    :func:`category_id`.  COCO image and annotation ids are 1-based
    (``shape_00000`` has id 1) because COCOeval treats id 0 as "unmatched".
    Annotation ``area`` is the bbox area.

    Image ``i`` depends only on ``(seed, i)``; the same arguments give
    byte-identical files.  Returns the paths written, keyed by ``"root"``,
    ``"images"``, ``"instances"``, ``"captions"``, ``"pretrain"``,
    ``"instruct"`` and ``"attributes"``.
    """
    root = Path(out_dir)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)

    categories = [
        {"id": category_id(c, s), "name": f"{c} {s}", "supercategory": s} for c in COLOURS for s in SHAPES
    ]
    images, instances, captions, pretrain, instruct = [], [], [], [], []
    attributes: dict[str, dict[str, Any]] = {}

    for i in range(n):
        entry = _shape_entry(root, i, seed=seed, size=size)
        images.append(entry["image"])
        instances.append(entry["instance"])
        captions.append(entry["caption"])
        pretrain.append(entry["pretrain"])
        instruct.append(entry["instruct"])
        attributes[entry["pretrain"]["id"]] = entry["attributes"]

    info = {"description": "kit procedural shapes", "seed": seed, "size": size}
    paths = {
        "root": root,
        "images": img_dir,
        "instances": root / "instances.json",
        "captions": root / "captions.json",
        "pretrain": root / "pretrain.json",
        "instruct": root / "instruct.json",
        "attributes": root / "attributes.json",
    }
    _atomic_write_json(
        paths["instances"],
        {"info": info, "images": images, "annotations": instances, "categories": categories},
    )
    _atomic_write_json(paths["captions"], {"info": info, "images": images, "annotations": captions})
    _atomic_write_json(paths["pretrain"], pretrain)
    _atomic_write_json(paths["instruct"], instruct)
    _atomic_write_json(paths["attributes"], attributes)
    return {k: str(v) for k, v in paths.items()}
