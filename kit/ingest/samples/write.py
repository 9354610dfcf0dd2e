"""`kit data sample`: small, real, captioned image sets built from files that ship inside packages.

The medical sample uses only images already on disk after `pip install`: pydicom's DICOM test
files, scikit-image's bundled data and matplotlib's sample data. Nothing is downloaded, so the
sample works on an air-gapped machine, and because every caption, finding and question was
written for one exact file, each source is checked (modality, size, segment label) before use and
skipped when a package release ships something else. Those texts are in `medical_sample.yaml`
next to this module; the code here only reads pixels, finds boxes and fills in the values the
texts quote (package versions, frame numbers).

Output layout (what `kit.ingest.sources.from_manifest` reads)::

    out/
      manifest.jsonl   one record per image: captions, findings, metadata, boxes
      images/*.png     base images and their `-augN` variants
      eval.jsonl       LLaVA-Med-style closed (yes/no) and open questions about the base images
      README.md        where each image comes from, its licence note and how it was rendered
      kit.json         data card

DICOM files are rendered with kit's own DICOM path (modality LUT, then the stored window or
min-max) and only coded tags are read; no value of an identifying tag reaches any output file, and
`write_sample` re-checks every byte it wrote against those values before publishing the folder.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import io
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from kit.core.errors import KitError

SAMPLE_DOMAINS: tuple[str, ...] = ("medical",)

PixelBox = tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels, x2/y2 exclusive


class _Skip(Exception):
    """A source that this installation cannot provide (file absent, codec missing, content changed)."""


@dataclass
class _Aug:
    kind: str  # "flip" | "gamma" | "crop" | "pixels"
    value: Any = None  # gamma exponent, crop fraction, or a replacement image
    note: str = ""  # for the README


@dataclass
class _Base:
    id: str
    pixels: np.ndarray  # uint8, (H, W) or (H, W, 3)
    captions: list[str]
    findings: list[str]
    metadata: dict[str, str]
    qa: list[tuple[str, str]]  # question, answer; "yes"/"no" answers are the closed ones
    origin: str
    licence: str
    rendering: str
    augs: list[_Aug]
    boxes: list[tuple[str, PixelBox]] = field(default_factory=list)
    # True only while the image keeps its original left-right orientation: dropped for flips.
    sided: list[str] = field(default_factory=list)
    sided_metadata: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- small image tools


def _flip(pixels: np.ndarray, boxes: list[tuple[str, PixelBox]]) -> tuple[np.ndarray, list[tuple[str, PixelBox]]]:
    w = pixels.shape[1]
    return np.ascontiguousarray(pixels[:, ::-1]), [(label, (w - x2, y1, w - x1, y2)) for label, (x1, y1, x2, y2) in boxes]


def _gamma(pixels: np.ndarray, g: float) -> np.ndarray:
    lut = np.round(255.0 * (np.arange(256) / 255.0) ** g).astype(np.uint8)
    return lut[pixels]


def _crop(pixels: np.ndarray, boxes: list[tuple[str, PixelBox]], frac: float) -> tuple[np.ndarray, list[tuple[str, PixelBox]]]:
    """A centred window of `frac` of each side, slid just enough to keep every box whole."""
    h, w = pixels.shape[:2]
    cw, ch = round(w * frac), round(h * frac)
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    if boxes:
        bx1, by1 = min(b[1][0] for b in boxes), min(b[1][1] for b in boxes)
        bx2, by2 = max(b[1][2] for b in boxes), max(b[1][3] for b in boxes)
        x0 = max(min(x0, bx1), bx2 - cw)
        y0 = max(min(y0, by1), by2 - ch)
    x0, y0 = min(max(x0, 0), w - cw), min(max(y0, 0), h - ch)
    moved = []
    for label, (x1, y1, x2, y2) in boxes:
        nx1, ny1 = min(max(x1 - x0, 0), cw), min(max(y1 - y0, 0), ch)
        nx2, ny2 = min(max(x2 - x0, 0), cw), min(max(y2 - y0, 0), ch)
        if nx2 > nx1 and ny2 > ny1:
            moved.append((label, (nx1, ny1, nx2, ny2)))
    return np.ascontiguousarray(pixels[y0 : y0 + ch, x0 : x0 + cw]), moved


def _mask_box(mask: np.ndarray) -> PixelBox:
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _bright_blob_box(grey: np.ndarray, sigma: float, level: float, pad: int = 0) -> PixelBox:
    """Box of the connected bright region around the brightest smoothed point.

    `level` is the fraction of the way from the median to the peak used as the threshold: the
    region is what stands out of the background, not a fixed grey value.
    """
    from scipy import ndimage as ndi

    smooth = ndi.gaussian_filter(grey.astype(np.float64), sigma)
    cy, cx = np.unravel_index(int(smooth.argmax()), smooth.shape)
    inside = smooth[grey > 0] if (grey > 0).any() else smooth
    background = float(np.median(inside))
    labels, _ = ndi.label(smooth > background + level * (float(smooth.max()) - background))
    x1, y1, x2, y2 = _mask_box(labels == labels[cy, cx])
    h, w = grey.shape
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, w), min(y2 + pad, h)


def _dark_dot_boxes(grey: np.ndarray, pad: int = 2) -> list[PixelBox]:
    """Small, round, dark spots: darker than their surroundings, compact rather than vessel-like."""
    from scipy import ndimage as ndi

    smooth = ndi.gaussian_filter(grey.astype(np.float64), 1.0)
    depth = ndi.median_filter(smooth, size=21) - smooth
    labels, _ = ndi.label(depth > 20.0)
    h, w = grey.shape
    out = []
    for i, sl in enumerate(ndi.find_objects(labels), 1):
        bh, bw = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        fill = float((labels[sl] == i).sum()) / (bh * bw)
        if 3 <= bw <= 8 and 3 <= bh <= 8 and abs(bw - bh) <= 1 and fill >= 0.6:
            out.append((max(sl[1].start - pad, 0), max(sl[0].start - pad, 0), min(sl[1].stop + pad, w), min(sl[0].stop + pad, h)))
    return out


def _keep_only(pixels: np.ndarray, x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    out = np.zeros_like(pixels)
    out[y1:y2, x1:x2] = pixels[y1:y2, x1:x2]
    return out


def _png(pixels: np.ndarray, level: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=level)  # no text chunks: only pixels
    return buf.getvalue()


# --------------------------------------------------------------------------- sources
#
# A builder reads one source file and returns only what is computed from it: pixels, boxes and the
# values its texts quote. The texts themselves (captions, findings, questions, licence notes,
# variants) live in medical_sample.yaml under the builder's id; see `_load_texts`.


@dataclass
class _Pixels:
    pixels: np.ndarray  # uint8, (H, W) or (H, W, 3)
    boxes: list[tuple[str, PixelBox]] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)  # str.format values for this id's texts
    images: dict[str, np.ndarray] = field(default_factory=dict)  # for `pixels` variants, by name


_Builder = Callable[[str, list[str]], _Pixels]  # (source file name, identifying values found so far)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _dicom(name: str, modality: str, frame: int | None = None) -> tuple[Any, np.ndarray, np.ndarray, dict[str, str], list[str]]:
    """(dataset, decoded frame, rendered 8-bit image, safe metadata, identifying values) of a pydicom test file."""
    import pydicom
    from pydicom import pixels
    from pydicom.data import get_testdata_file

    from kit.ingest.sources.dicom import _dataset_phi, _dicom_metadata, _render

    path = get_testdata_file(name, download=False)
    if path is None:
        raise _Skip(f"pydicom {_version('pydicom')} does not ship {name}")
    ds = pydicom.dcmread(path)
    if str(ds.get("Modality", "")).upper() != modality:
        raise _Skip(f"{name} is no longer a {modality} file in this pydicom release")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    index = frame if frame is not None else (n_frames // 2 if n_frames > 1 else None)
    try:
        with warnings.catch_warnings():
            # 693_J2KI.dcm exists to exercise a BitsStored mismatch; pydicom warns and corrects it
            warnings.simplefilter("ignore")
            decoded = pixels.pixel_array(ds, index=index)
    except Exception as e:  # noqa: BLE001 - a missing codec plugin surfaces as many exception types
        raise _Skip(f"{name}: this installation cannot decode its pixel data ({type(e).__name__}); a decoder plugin such as pylibjpeg-openjpeg would add it") from None
    return ds, decoded, _render(ds, decoded), _dicom_metadata(ds), _dataset_phi(ds)


def _need_shape(name: str, pixels: np.ndarray, shape: tuple[int, ...]) -> None:
    if pixels.shape != shape:
        raise _Skip(f"{name} has shape {pixels.shape}, not the {shape} its texts were written for")


def _kept(keep: PixelBox) -> dict[str, str]:
    """The rows and columns `_keep_only(image, *keep)` leaves, inclusive, as the README states them."""
    x1, y1, x2, y2 = keep
    return {"kept_rows": f"{y1}-{y2 - 1}", "kept_columns": f"{x1}-{x2 - 1}"}


def _dicom_image(name: str, phi: list[str], *, modality: str, shape: tuple[int, ...], keep: PixelBox | None = None) -> _Pixels:
    """The rendered middle frame, blacked out outside `keep` when given."""
    _, _, image, md, values = _dicom(name, modality)
    phi += values
    _need_shape(name, image, shape)
    fields = {"plane": md.get("ImagePlane", "axial")}
    if keep is not None:
        image = _keep_only(image, *keep)
        fields |= _kept(keep)
    return _Pixels(image, fields=fields)


def _us_echo(name: str, phi: list[str]) -> _Pixels:
    # The patient-name field is burned into the top-left corner, and settings run down the right edge
    # and along a bottom toolbar; only the sector area is kept.
    keep = (44, 12, 286, 224)
    ds, _, image, _, values = _dicom(name, "US")
    phi += values
    _need_shape(name, image, (240, 320, 3))
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    middle = n_frames // 2
    early = n_frames // 6
    _, _, other, _, _ = _dicom(name, "US", frame=early)
    return _Pixels(
        _keep_only(image, *keep),
        fields={"n_frames": n_frames, "frame": middle + 1, "early_frame": early + 1} | _kept(keep),
        images={"early_frame_pixels": _keep_only(other, *keep)},
    )


def _seg_liver(name: str, phi: list[str]) -> _Pixels:
    from kit.ingest.sources.dicom import _segments

    ds, frame, image, md, values = _dicom(name, "SEG")
    phi += values
    _need_shape(name, image, (512, 512))
    labels, _ = _segments(ds, 0, frame, values)
    if [label.lower() for label in labels] != ["liver"]:
        raise _Skip(f"{name} segments {labels}, not the single liver segment its texts describe")
    return _Pixels(image, boxes=[("liver", _mask_box(image > 0))], fields={"plane": md.get("ImagePlane", "axial")})


def _skimage_file(name: str) -> Path:
    # Read the bundled copy directly: the skimage.data functions fall back to a download when a file
    # is missing, and this sample must never touch the network.
    import skimage.data

    path = Path(skimage.data.data_dir) / name
    if not path.is_file():
        raise _Skip(f"scikit-image {_version('scikit-image')} does not bundle {name} (it would have to be downloaded)")
    return path


def _skimage_image(name: str, mode: str, shape: tuple[int, ...]) -> np.ndarray:
    with Image.open(_skimage_file(name)) as im:
        image = np.asarray(im.convert(mode))
    _need_shape(name, image, shape)
    return image


def _fundus(name: str, phi: list[str]) -> _Pixels:
    with Image.open(_skimage_file(name)) as im:
        if im.size != (1411, 1411):
            raise _Skip(f"{name} is {im.size}, not the 1411 x 1411 photograph its texts describe")
        image = np.asarray(im.convert("RGB").resize((512, 512), Image.Resampling.LANCZOS))
    return _Pixels(image, boxes=[("optic disc", _bright_blob_box(image.mean(axis=2), sigma=6.0, level=0.5))])


def _microaneurysms(name: str, phi: list[str]) -> _Pixels:
    from kit.ingest.sources.dicom import _min_max, _to_uint8

    raw = _skimage_image(name, "L", (102, 102))
    dots = _dark_dot_boxes(raw)  # the threshold is in the original grey levels
    # Two dots are what the image shows; any other count means the detector misfired, and no box
    # is better than a wrong one.
    boxes = [("microaneurysm", b) for b in dots] if len(dots) == 2 else []
    return _Pixels(_to_uint8(_min_max(raw.astype(np.float64))), boxes=boxes)


def _ihc(name: str, phi: list[str]) -> _Pixels:
    return _Pixels(_skimage_image(name, "RGB", (512, 512, 3)))


def _cell(name: str, phi: list[str]) -> _Pixels:
    image = _skimage_image(name, "L", (660, 550))
    return _Pixels(image, boxes=[("cell", _bright_blob_box(image, sigma=3.0, level=0.2, pad=2))])


def _mri_head(name: str, phi: list[str]) -> _Pixels:
    import matplotlib
    import matplotlib.cbook

    from kit.ingest.sources.dicom import _min_max, _to_uint8

    try:
        path = Path(matplotlib.cbook.get_sample_data(name, asfileobj=False))
        raw = gzip.decompress(path.read_bytes())
    except (OSError, ValueError) as e:
        raise _Skip(f"matplotlib {matplotlib.__version__} has no readable {name} ({type(e).__name__})") from None
    if len(raw) != 256 * 256 * 2:
        raise _Skip(f"{name} holds {len(raw)} bytes, not one 256 x 256 16-bit image")
    values = np.frombuffer(raw, dtype=">u2").reshape(256, 256).astype(np.float64)
    return _Pixels(_to_uint8(_min_max(values)), fields={"matplotlib_version": matplotlib.__version__})


# (id in medical_sample.yaml, source file, builder), in the order the sample lists them.
_MEDICAL: tuple[tuple[str, str, _Builder], ...] = (
    ("ct-chest", "CT_small.dcm", partial(_dicom_image, modality="CT", shape=(128, 128))),
    ("mr-small", "MR_small.dcm", partial(_dicom_image, modality="MR", shape=(64, 64))),
    ("ct-head", "693_J2KI.dcm", partial(_dicom_image, modality="CT", shape=(512, 512))),
    ("nm-bone", "JPEG2000.dcm", partial(_dicom_image, modality="NM", shape=(1024, 256))),
    # The site name, settings and a time are burned into the header rows and the colour-bar labels
    # overlap both edges; only the scanned rectangle survives.
    ("us-lymph-node", "examples_rgb_color.dcm", partial(_dicom_image, modality="US", shape=(240, 320, 3), keep=(24, 54, 296, 168))),
    ("us-echo", "examples_ybr_color.dcm", _us_echo),
    ("seg-liver", "liver_1frame.dcm", _seg_liver),
    ("fundus-retina", "retina.jpg", _fundus),
    ("fundus-microaneurysms", "microaneurysms.png", _microaneurysms),
    ("ihc-colon", "ihc.png", _ihc),
    ("cell-phase", "cell.png", _cell),
    ("mri-head-sagittal", "s1045.ima.gz", _mri_head),
)


# --------------------------------------------------------------------------- texts

_TEXTS_FILE = Path(__file__).with_name("medical.yaml")
_TEXT_KEYS = {"captions", "findings", "metadata", "qa", "origin", "licence", "rendering", "augs"}
_OPTIONAL_TEXT_KEYS = {"sided", "sided_metadata"}
_AUG_VALUE = {"flip": None, "gamma": float, "crop": float, "pixels": str}  # kind -> type of its `value`


def _texts_error(rid: str, problem: str) -> RuntimeError:
    # The file ships inside kit, so a bad entry is a kit bug rather than a user error.
    return RuntimeError(f"{_TEXTS_FILE.name}, entry '{rid}': {problem}; please report this")


def _is_strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(s, str) for s in value)


def _is_string_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def _check_entry(rid: str, entry: Any) -> None:
    if not isinstance(entry, dict):
        raise _texts_error(rid, f"expected a mapping, got {type(entry).__name__}")
    missing, unknown = sorted(_TEXT_KEYS - entry.keys()), sorted(entry.keys() - _TEXT_KEYS - _OPTIONAL_TEXT_KEYS)
    if missing or unknown:
        raise _texts_error(rid, f"missing keys {missing}, unknown keys {unknown}")
    for key in ("captions", "findings", "sided"):
        if key in entry and not _is_strings(entry[key]):
            raise _texts_error(rid, f"'{key}' must be a list of strings")
    for key in ("metadata", "sided_metadata"):
        if key in entry and not _is_string_map(entry[key]):
            raise _texts_error(rid, f"'{key}' must map strings to strings")
    for key in ("origin", "licence", "rendering"):
        if not isinstance(entry[key], str):
            raise _texts_error(rid, f"'{key}' must be a string")
    # An unquoted yes/no is a YAML boolean, which would silently turn a closed question into an open one.
    if not isinstance(entry["qa"], list) or not all(_is_strings(p) and len(p) == 2 for p in entry["qa"]):
        raise _texts_error(rid, "'qa' must be a list of [question, answer] string pairs (quote \"yes\" and \"no\")")
    if not isinstance(entry["augs"], list):
        raise _texts_error(rid, "'augs' must be a list")
    for aug in entry["augs"]:
        kind = aug.get("kind") if isinstance(aug, dict) else None
        if kind not in _AUG_VALUE or not isinstance(aug.get("note"), str) or set(aug) - {"kind", "value", "note"}:
            raise _texts_error(rid, f"augmentation {aug!r} needs a kind out of {sorted(_AUG_VALUE)}, a note and nothing else but a value")
        value_type = _AUG_VALUE[kind]
        if (value_type is None) != ("value" not in aug) or (value_type is float and not isinstance(aug["value"], int | float)) or (value_type is str and not isinstance(aug["value"], str)):
            raise _texts_error(rid, f"augmentation {aug!r}: a {kind} takes {'no value' if value_type is None else f'a {value_type.__name__} value'}")


def _load_texts(path: Path = _TEXTS_FILE) -> dict[str, dict[str, Any]]:
    """medical_sample.yaml's entries by id, checked: exactly one per builder, in `_MEDICAL`'s order."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    ids = [rid for rid, _, _ in _MEDICAL]
    found = list(data) if isinstance(data, dict) else []
    if found != ids:
        missing, unknown = [i for i in ids if i not in found], [i for i in found if i not in ids]
        raise RuntimeError(
            f"{path.name} must have one entry per sample image, in the order {ids}; missing {missing}, unknown {unknown}; please report this"
        )
    for rid, entry in data.items():
        _check_entry(rid, entry)
    return data


def _base(rid: str, texts: dict[str, Any], built: _Pixels, fields: dict[str, Any]) -> _Base:
    """The image with its texts, every `{name}` in them filled from `fields`."""

    def fill(text: str) -> str:
        try:
            return text.format_map(fields)
        except (KeyError, IndexError, ValueError) as e:
            raise _texts_error(rid, f"cannot fill {text!r} ({type(e).__name__}: {e}); known fields: {sorted(fields)}") from None

    augs = []
    for aug in texts["augs"]:
        value = aug.get("value")
        if aug["kind"] == "pixels":
            if value not in built.images:
                raise _texts_error(rid, f"no image '{value}' for a pixels variant; the builder gives {sorted(built.images)}")
            value = built.images[value]
        augs.append(_Aug(aug["kind"], value, fill(aug["note"])))
    return _Base(
        id=rid,
        pixels=built.pixels,
        captions=[fill(s) for s in texts["captions"]],
        findings=[fill(s) for s in texts["findings"]],
        metadata={k: fill(v) for k, v in texts["metadata"].items()},
        qa=[(fill(q), fill(a)) for q, a in texts["qa"]],
        origin=fill(texts["origin"]),
        licence=fill(texts["licence"]),
        rendering=fill(texts["rendering"]),
        augs=augs,
        boxes=built.boxes,
        sided=[fill(s) for s in texts.get("sided", [])],
        sided_metadata={k: fill(v) for k, v in texts.get("sided_metadata", {}).items()},
    )


# --------------------------------------------------------------------------- writing


def _variant(base: _Base, aug: _Aug) -> tuple[np.ndarray, list[tuple[str, PixelBox]], bool]:
    """(pixels, boxes, keeps left-right orientation)."""
    if aug.kind == "flip":
        pixels, boxes = _flip(base.pixels, base.boxes)
        return pixels, boxes, False
    if aug.kind == "gamma":
        return _gamma(base.pixels, float(aug.value)), list(base.boxes), True
    if aug.kind == "crop":
        pixels, boxes = _crop(base.pixels, base.boxes, float(aug.value))
        return pixels, boxes, True
    if aug.kind == "pixels":
        # another frame of the same acquisition: boxes drawn on the base frame would not fit
        return aug.value, [], True
    raise ValueError(f"unknown augmentation {aug.kind}")


def _manifest_line(rid: str, base: _Base, boxes: list[tuple[str, PixelBox]], oriented: bool) -> dict[str, Any]:
    metadata = dict(base.metadata)
    findings = list(base.findings)
    if oriented:
        metadata.update(base.sided_metadata)
        findings += base.sided
    line: dict[str, Any] = {
        "id": rid,
        "image": f"images/{rid}.png",
        "captions": base.captions,
        "findings": findings,
        "metadata": metadata,
    }
    if boxes:
        line["boxes"] = [{"label": label, "bbox": [int(v) for v in box], "format": "xyxy_pixels"} for label, box in boxes]
    line["private"] = True
    return line


def _leaks(data: bytes, phi: list[bytes]) -> list[bytes]:
    return [p for p in phi if p in data]


def _encode_png(pixels: np.ndarray, phi: list[bytes]) -> bytes:
    """PNG bytes in which no identifying value occurs even by chance.

    Compressed pixel data is effectively random, so a short value such as a three-digit number can
    appear in it; another (fixed, ordered) compression level gives other bytes for the same pixels.
    """
    for level in (6, 9, 1, 3, 5, 7, 2, 4, 8):
        data = _png(pixels, level)
        if not _leaks(data, phi):
            return data
    raise RuntimeError("every PNG encoding of a sample image contains an identifying DICOM value by chance; please report this")


def _readme(bases: list[_Base], variants: dict[str, list[tuple[str, str]]], skipped: list[str], n_records: int, n_closed: int, n_open: int, n_yes: int) -> str:
    lines = [
        "# kit medical sample",
        "",
        f"{n_records} real medical images ({len(bases)} originals and their variants) taken from files that ship inside",
        "installed Python packages, in the manifest layout `kit generate --source manifest` and `kit data ingest` read.",
        "Nothing was downloaded. Every record is marked private, as your own data would be.",
        "",
        "- `manifest.jsonl`: captions, findings, metadata and (where known) boxes, written for each image by hand from the",
        "  file's coded metadata and what the image shows.",
        "- `images/`: 8-bit PNGs. `<id>-augN` are deterministic variants of `<id>` (flips, crops, gamma changes, another",
        "  frame); statements about left and right are dropped from flipped variants.",
        f"- `eval.jsonl`: {n_closed + n_open} LLaVA-Med-style questions about the original images: {n_closed} closed (yes/no,",
        f"  {n_yes} yes), scored by accuracy, and {n_open} open (short answers), scored by the recall of the answer's words.",
        "  When you evaluate on them, hold out each original together with its `-augN` variants from training.",
        "",
        "No value of an identifying DICOM field (names, IDs, dates, institutions, UIDs, free-text descriptions) was",
        "copied into any file here; ultrasound screens with burned-in lettering were blacked out around the scan.",
        "",
        "## Images",
        "",
    ]
    for base in bases:
        lines += [
            f"### `{base.id}`",
            "",
            f"- Source: {base.origin}",
            f"- Licence: {base.licence}",
            f"- Rendering: {base.rendering}",
        ]
        for rid, note in variants[base.id]:
            lines.append(f"- `{rid}`: {note}")
        lines.append("")
    if skipped:
        lines += ["## Skipped in this installation", ""] + [f"- {s}" for s in skipped] + [""]
    lines += [
        "## Licences",
        "",
        "The pydicom test files and the scikit-image and matplotlib sample images are distributed with those packages",
        "under the packages' licences (and the upstream terms noted above). They are here for tests, demos and trying",
        "kit out; check the terms before building anything you distribute on them.",
        "",
    ]
    return "\n".join(lines)


def write_sample(domain: str, out: Path) -> dict[str, Any]:
    """Write the sample set for `domain` into the new folder `out` and return its `kit.json` card.

    Everything is built in a hidden temporary folder next to `out` and renamed into place at the
    end, so an error leaves nothing behind. The same installed packages give the same bytes on every
    run, except the card's creation time. Sources this installation cannot provide (a file missing,
    a codec absent) are skipped and listed in the card and the README.

    Raises KitError for an unknown domain, an `out` that exists and is not an empty folder, or a
    domain whose sources are all missing.
    """
    from kit.core.cards import hash_files, new_card, write_card

    if domain not in SAMPLE_DOMAINS:
        raise KitError(f"unknown sample domain '{domain}'; choose from {', '.join(SAMPLE_DOMAINS)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KitError(f"{out} already exists and is not an empty folder; choose a new folder or remove it")

    phi: list[str] = []
    bases: list[_Base] = []
    skipped: list[str] = []
    entries = _load_texts()
    versions = {"pydicom_version": _version("pydicom"), "skimage_version": _version("scikit-image")}
    for rid, source, build in _MEDICAL:
        try:
            built = build(source, phi)
        except _Skip as e:
            skipped.append(f"{source}: {e}")
            continue
        bases.append(_base(rid, entries[rid], built, versions | built.fields))
    if not bases:
        raise KitError(f"no sample source is available in this installation: {'; '.join(skipped)}")
    # Short values (sex codes, single digits) occur everywhere by chance and identify no one.
    phi_bytes = sorted({p.encode("utf-8") for p in phi if len(p) >= 3})

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.sample."))
    try:
        (staging / "images").mkdir()
        manifest: list[dict[str, Any]] = []
        variants: dict[str, list[tuple[str, str]]] = {}
        for base in bases:
            rows = [(base.id, base.pixels, list(base.boxes), True)]
            variants[base.id] = []
            for n, aug in enumerate(base.augs, 1):
                rid = f"{base.id}-aug{n}"
                rows.append((rid, *_variant(base, aug)))
                variants[base.id].append((rid, aug.note))
            for rid, pixels, boxes, oriented in rows:
                (staging / "images" / f"{rid}.png").write_bytes(_encode_png(pixels, phi_bytes))
                manifest.append(_manifest_line(rid, base, boxes, oriented))

        questions: list[dict[str, str]] = []
        for base in bases:
            for n, (question, answer) in enumerate(base.qa, 1):
                kind = "closed" if answer in ("yes", "no") else "open"
                questions.append({"id": f"{base.id}-q{n}", "image": f"images/{base.id}.png", "question": question, "answer": answer, "answer_type": kind})
        n_closed = sum(q["answer_type"] == "closed" for q in questions)
        n_yes = sum(q["answer"] == "yes" for q in questions)

        texts = {
            "manifest.jsonl": "".join(json.dumps(m, ensure_ascii=True) + "\n" for m in manifest),
            "eval.jsonl": "".join(json.dumps(q, ensure_ascii=True) + "\n" for q in questions),
            "README.md": _readme(bases, variants, skipped, len(manifest), n_closed, len(questions) - n_closed, n_yes),
        }
        for name, text in texts.items():
            leaked = _leaks(text.encode("utf-8"), phi_bytes)
            if leaked:
                # The texts are fixed in medical_sample.yaml, so this is a kit bug, not a user error.
                raise RuntimeError(f"sample {name} would contain {len(leaked)} identifying DICOM value(s); please report this")
            (staging / name).write_text(text, encoding="utf-8")

        written = sorted(p for p in staging.rglob("*") if p.is_file())
        card = new_card(
            "data",
            made_by=f"kit data sample {domain}",
            domain=domain,
            images=len(manifest),
            base_images=len(bases),
            eval_items=len(questions),
            eval_closed=n_closed,
            eval_closed_yes=n_yes,
            eval_open=len(questions) - n_closed,
            sources={base.id: base.origin for base in bases},
            skipped=skipped,
            content_sha256=hash_files(written),
        )
        write_card(staging, card)
        staging.chmod(0o755)  # mkdtemp's 0700 would otherwise become the folder's mode
        if out.exists():
            out.rmdir()  # empty, checked above; rename cannot replace a folder everywhere
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return card
