"""`kit data sample`: small, real, captioned image sets built from files that ship inside packages.

The medical sample uses only images already on disk after `pip install`: pydicom's DICOM test
files, scikit-image's bundled data and matplotlib's sample data. Nothing is downloaded, so the
sample works on an air-gapped machine, and because every caption, finding and question was
written for one exact file, each source is checked (modality, size, segment label) before use and
skipped when a package release ships something else.

Output layout (what `kit.generate.sources.from_manifest` reads)::

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
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kit.errors import KitError

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

    from kit.generate.sources.dicom import _dataset_phi, _dicom_metadata, _render

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


def _pydicom_licence(extra: str = "") -> str:
    text = f"pydicom test file, distributed with pydicom {_version('pydicom')} under that package's licence (MIT)"
    return text + (f"; {extra}" if extra else "")


def _need_shape(name: str, pixels: np.ndarray, shape: tuple[int, ...]) -> None:
    if pixels.shape != shape:
        raise _Skip(f"{name} has shape {pixels.shape}, not the {shape} its texts were written for")


def _ct_chest(phi: list[str]) -> _Base:
    _, _, image, md, values = _dicom("CT_small.dcm", "CT")
    phi += values
    _need_shape("CT_small.dcm", image, (128, 128))
    return _Base(
        id="ct-chest",
        pixels=image,
        captions=[
            "Axial CT slice through the chest at the level of a thoracic vertebra.",
            "Computed tomography cross-section of the thorax centred on the spine.",
        ],
        findings=[
            "A vertebral body with the spinal canal and the posterior arch sits in the middle of the image, surrounded by the paraspinal muscles.",
            "Dark, air-filled lung with fine vessels shows in both upper corners.",
            "A round soft-tissue structure just in front of the vertebra is most likely the descending aorta.",
        ],
        metadata={"modality": "CT", "body_part": "chest", "plane": md.get("ImagePlane", "axial")},
        qa=[
            ("Is this a CT image?", "yes"),
            ("Is this an MRI?", "no"),
            ("Is a vertebra visible?", "yes"),
            ("Is this a colour image?", "no"),
            ("What imaging modality is shown?", "CT"),
            ("In which plane is this slice?", "axial"),
        ],
        origin=f"pydicom {_version('pydicom')}: CT_small.dcm (`pydicom.data.get_testdata_file`)",
        licence=_pydicom_licence("a reduced copy of a NEMA sample image, as pydicom's test-file notes say"),
        rendering="rescale slope/intercept applied; the file stores no window, so min-max scaled to 8 bits",
        augs=[_Aug("flip", note="horizontal flip"), _Aug("gamma", 0.8, "gamma 0.8 (brighter mid-tones)")],
    )


def _mr_small(phi: list[str]) -> _Base:
    _, _, image, md, values = _dicom("MR_small.dcm", "MR")
    phi += values
    _need_shape("MR_small.dcm", image, (64, 64))
    return _Base(
        id="mr-small",
        pixels=image,
        captions=[
            "Low-resolution axial magnetic resonance slice; the body region is not recorded.",
            "Small greyscale MR image in the axial plane.",
        ],
        findings=[
            "Soft tissue of mixed signal with bright and dark bands fills the field.",
            "At this resolution the anatomy cannot be named with confidence.",
        ],
        metadata={"modality": "MRI", "plane": md.get("ImagePlane", "axial")},
        qa=[
            ("Is this an MRI?", "yes"),
            ("Is this a CT image?", "no"),
            ("Is this a greyscale image?", "yes"),
            ("Is this a colour image?", "no"),
            ("What imaging modality is shown?", "MRI"),
        ],
        origin=f"pydicom {_version('pydicom')}: MR_small.dcm",
        licence=_pydicom_licence("a reduced copy of a NEMA sample image, as pydicom's test-file notes say"),
        rendering="modality LUT, then the window stored in the file",
        augs=[_Aug("flip", note="horizontal flip"), _Aug("gamma", 1.25, "gamma 1.25 (darker mid-tones)")],
    )


def _ct_head(phi: list[str]) -> _Base:
    _, _, image, md, values = _dicom("693_J2KI.dcm", "CT")
    phi += values
    _need_shape("693_J2KI.dcm", image, (512, 512))
    return _Base(
        id="ct-head",
        pixels=image,
        captions=[
            "Axial CT slice of the head shown in a narrow brain window.",
            "Head computed tomography in the axial plane; the skull appears bright white.",
        ],
        findings=[
            "The skull forms a thick bright ring around the brain, which appears mid-grey.",
            "Strong lossy compression has caused blotchy artefacts, so fine brain detail cannot be assessed.",
            "Thin curved lines outside the head are most likely the head holder of the scanner.",
        ],
        metadata={"modality": "CT", "body_part": "head", "plane": md.get("ImagePlane", "axial"), "window": "brain"},
        qa=[
            ("Is this a CT image?", "yes"),
            ("Is the skull visible?", "yes"),
            ("Is this an image of the chest?", "no"),
            ("Is this an ultrasound image?", "no"),
            ("What body region is imaged?", "head"),
            ("In which plane is this slice?", "axial"),
        ],
        origin=f"pydicom {_version('pydicom')}: 693_J2KI.dcm (JPEG 2000 compressed; decoded by Pillow's JPEG 2000 support through pydicom)",
        licence=_pydicom_licence(
            "pydicom ships it as a regression file for its issue 693; it appears to come from a public head-CT research "
            "collection whose own terms may limit commercial use, so check before using it beyond tests and demos"
        ),
        rendering="rescale slope/intercept, then the window stored in the file (a brain window)",
        augs=[_Aug("crop", 0.85, "centred crop to 85%"), _Aug("flip", note="horizontal flip")],
    )


def _nm_bone(phi: list[str]) -> _Base:
    _, _, image, _, values = _dicom("JPEG2000.dcm", "NM")
    phi += values
    _need_shape("JPEG2000.dcm", image, (1024, 256))
    return _Base(
        id="nm-bone",
        pixels=image,
        captions=[
            "Planar whole-body nuclear medicine image showing tracer uptake in the skeleton, a bone scan.",
            "Whole-body bone scintigraphy from head to feet.",
        ],
        findings=[
            "Faint, fairly even uptake outlines the skeleton from the skull down to the legs.",
            "The brightest focus projects over the pelvis, where excreted tracer normally collects in the urinary bladder.",
            "The image is blurred by strong lossy compression, so small foci cannot be judged.",
        ],
        metadata={"modality": "nuclear medicine", "body_part": "whole body", "view": "planar"},
        qa=[
            ("Is this a nuclear medicine image?", "yes"),
            ("Does the image show the whole body?", "yes"),
            ("Is this a CT image?", "no"),
            ("Is this a single cross-sectional slice?", "no"),
            ("What imaging modality is shown?", "nuclear medicine"),
            ("Over which body region is the brightest focus of uptake?", "pelvis"),
        ],
        origin=f"pydicom {_version('pydicom')}: JPEG2000.dcm (JPEG 2000 compressed)",
        licence=_pydicom_licence("an edited NEMA sample image, as pydicom's test-file notes say"),
        rendering="modality LUT; no window in the file, so min-max scaled to 8 bits",
        augs=[_Aug("flip", note="horizontal flip"), _Aug("gamma", 0.7, "gamma 0.7 (faint uptake brighter)")],
    )


def _us_lymph_node(phi: list[str]) -> _Base:
    _, _, image, _, values = _dicom("examples_rgb_color.dcm", "US")
    phi += values
    _need_shape("examples_rgb_color.dcm", image, (240, 320, 3))
    # The site name, settings and a time are burned into the header rows and the colour-bar labels
    # overlap both edges; only the scanned rectangle survives.
    image = _keep_only(image, 24, 54, 296, 168)
    return _Base(
        id="us-lymph-node",
        pixels=image,
        captions=[
            "Power Doppler ultrasound of a lymph node with flow signal inside it.",
            "Small-parts ultrasound with a colour power Doppler overlay on a greyscale image.",
        ],
        findings=[
            "An elongated, lobulated, mostly dark (hypoechoic) structure spans much of the image width, surrounded by brighter, layered soft tissue.",
            "Orange-yellow power Doppler signal fills a large part of the structure, showing blood flow inside it.",
            "Two rectangular outlines mark the Doppler sampling boxes.",
            "The black areas above, below and beside the scan are where on-screen lettering was removed.",
        ],
        metadata={"modality": "ultrasound", "body_part": "lymph node", "mode": "power Doppler"},
        qa=[
            ("Is this an ultrasound image?", "yes"),
            ("Is Doppler flow signal shown?", "yes"),
            ("Is this an MRI?", "no"),
            ("Is this a histology slide?", "no"),
            ("What imaging modality is shown?", "ultrasound"),
            ("What structure is shown?", "lymph node"),
        ],
        origin=f"pydicom {_version('pydicom')}: examples_rgb_color.dcm",
        licence=_pydicom_licence("a cropped NEMA ultrasound sample, as pydicom's test-file notes say"),
        rendering="RGB pixels as stored; everything outside the scanned rectangle (rows 54-167, columns 24-295) set to black because the header carries burned-in identifying lettering",
        augs=[_Aug("flip", note="horizontal flip"), _Aug("gamma", 0.8, "gamma 0.8")],
    )


def _us_echo(phi: list[str]) -> _Base:
    # The patient-name field is burned into the top-left corner, and settings run down the right edge
    # and along a bottom toolbar; only the sector area is kept.
    keep = (44, 12, 286, 224)
    ds, _, image, _, values = _dicom("examples_ybr_color.dcm", "US")
    phi += values
    _need_shape("examples_ybr_color.dcm", image, (240, 320, 3))
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    middle = n_frames // 2
    early = n_frames // 6
    _, _, other, _, _ = _dicom("examples_ybr_color.dcm", "US", frame=early)
    return _Base(
        id="us-echo",
        pixels=_keep_only(image, *keep),
        captions=[
            "Cardiac ultrasound (echocardiography) frame showing the heart chambers in a fan-shaped sector.",
            "Greyscale echocardiogram frame from a cine loop.",
        ],
        findings=[
            "The heart walls and valve leaflets appear bright against the dark, blood-filled chambers.",
            "The fan-shaped sector narrows to its apex at the top of the image, where the transducer sits.",
            "The black margins are where on-screen lettering was removed.",
        ],
        metadata={"modality": "ultrasound", "body_part": "heart", "mode": "B-mode"},
        qa=[
            ("Is this an ultrasound image?", "yes"),
            ("Is the heart shown?", "yes"),
            ("Is this a CT image?", "no"),
            ("Is this a whole-body image?", "no"),
            ("Which organ is imaged?", "heart"),
            ("What imaging modality is shown?", "ultrasound"),
        ],
        origin=f"pydicom {_version('pydicom')}: examples_ybr_color.dcm (JPEG baseline, YBR colour, {n_frames} frames)",
        licence=_pydicom_licence("a reduced copy of a multi-frame colour test image, as pydicom's test-file notes say"),
        rendering=f"frame {middle + 1} of {n_frames}, YBR converted to RGB by pydicom; everything outside the sector area (rows {keep[1]}-{keep[3] - 1}, columns {keep[0]}-{keep[2] - 1}) set to black because burned-in lettering carries an identifying field",
        augs=[
            _Aug("pixels", _keep_only(other, *keep), f"frame {early + 1} of {n_frames} of the same loop, same masking"),
            _Aug("gamma", 0.8, "gamma 0.8"),
        ],
    )


def _seg_liver(phi: list[str]) -> _Base:
    from kit.generate.sources.dicom import _segments

    ds, frame, image, md, values = _dicom("liver_1frame.dcm", "SEG")
    phi += values
    _need_shape("liver_1frame.dcm", image, (512, 512))
    labels, _ = _segments(ds, 0, frame, values)
    if [label.lower() for label in labels] != ["liver"]:
        raise _Skip(f"liver_1frame.dcm segments {labels}, not the single liver segment its texts describe")
    mask = image > 0
    return _Base(
        id="seg-liver",
        pixels=image,
        captions=[
            "Binary segmentation mask of the liver on one axial CT slice.",
            "Axial liver segmentation: the liver in white on a black background.",
        ],
        findings=[
            "A single white region marks the liver; everything else is background.",
            "The region has a smooth, rounded outer contour and a tapering lobe that extends across the upper abdomen.",
        ],
        sided=[
            "In the usual radiological display the region lies on the image left, so the liver occupies the patient's right upper abdomen.",
        ],
        metadata={"modality": "segmentation mask", "source_modality": "CT", "body_part": "abdomen", "plane": md.get("ImagePlane", "axial"), "segment": "liver"},
        boxes=[("liver", _mask_box(mask))],
        qa=[
            ("Is the liver segmented in this image?", "yes"),
            ("Is this a binary segmentation mask?", "yes"),
            ("Is the spleen segmented in this image?", "no"),
            ("Is more than one organ segmented?", "no"),
            ("Which organ is segmented?", "liver"),
            ("In which plane is the slice?", "axial"),
        ],
        origin=f"pydicom {_version('pydicom')}: liver_1frame.dcm (DICOM SEG made with dcmqi, one frame)",
        licence=_pydicom_licence("an example produced with the dcmqi library, as pydicom's test-file notes say"),
        rendering="the binary segment frame scaled to 0/255 (the CT it was drawn on is not shipped); the box is the mask's extent",
        augs=[_Aug("crop", 0.8, "centred crop to 80%, shifted to keep the liver whole"), _Aug("flip", note="horizontal flip")],
    )


def _skimage_file(name: str) -> Path:
    # Read the bundled copy directly: the skimage.data functions fall back to a download when a file
    # is missing, and this sample must never touch the network.
    import skimage.data

    path = Path(skimage.data.data_dir) / name
    if not path.is_file():
        raise _Skip(f"scikit-image {_version('scikit-image')} does not bundle {name} (it would have to be downloaded)")
    return path


def _skimage_licence(terms: str) -> str:
    return f"scikit-image {_version('scikit-image')} bundled data (package under BSD-3-Clause); {terms}"


def _fundus(phi: list[str]) -> _Base:
    with Image.open(_skimage_file("retina.jpg")) as im:
        if im.size != (1411, 1411):
            raise _Skip(f"retina.jpg is {im.size}, not the 1411 x 1411 photograph its texts describe")
        image = np.asarray(im.convert("RGB").resize((512, 512), Image.Resampling.LANCZOS))
    disc = _bright_blob_box(image.mean(axis=2), sigma=6.0, level=0.5)
    return _Base(
        id="fundus-retina",
        pixels=image,
        captions=[
            "Colour fundus photograph of the retina with the optic disc, the macula and the retinal vessels.",
            "Retinal photograph showing the back of the eye through a circular field.",
        ],
        findings=[
            "The bright, round optic disc sits near one edge of the field, and retinal arteries and veins branch out from it.",
            "The darker macula with the fovea at its centre lies near the middle of the image.",
            "No haemorrhages or exudates are evident at this resolution.",
        ],
        sided=["This is a left eye: the optic disc lies to the left of the macula."],
        sided_metadata={"laterality": "left eye"},
        metadata={"modality": "fundus photograph", "body_part": "eye (retina)"},
        boxes=[("optic disc", disc)],
        qa=[
            ("Is this a fundus photograph of the retina?", "yes"),
            ("Is the optic disc visible?", "yes"),
            ("Is this a CT image?", "no"),
            ("Is this a histology image?", "no"),
            ("What is the bright round structure where the vessels converge?", "optic disc"),
            ("What imaging modality is shown?", "fundus photography"),
        ],
        origin=f"scikit-image {_version('scikit-image')}: skimage/data/retina.jpg (`skimage.data.retina()`)",
        licence=_skimage_licence("the photograph is from Wikimedia Commons (M. Haggstrom), CC0 1.0 public domain dedication"),
        rendering="RGB, resized from 1411 x 1411 to 512 x 512 (Lanczos); optic disc box = the bright region around the brightest smoothed point",
        augs=[_Aug("flip", note="horizontal flip (left-eye statements dropped)"), _Aug("crop", 0.85, "centred crop to 85%, shifted to keep the optic disc whole")],
    )


def _microaneurysms(phi: list[str]) -> _Base:
    from kit.generate.sources.dicom import _min_max, _to_uint8

    with Image.open(_skimage_file("microaneurysms.png")) as im:
        raw = np.asarray(im.convert("L"))
    _need_shape("microaneurysms.png", raw, (102, 102))
    image = _to_uint8(_min_max(raw.astype(np.float64)))
    dots = _dark_dot_boxes(raw)  # the threshold is in the original grey levels
    # Two dots are what the image shows; any other count means the detector misfired, and no box
    # is better than a wrong one.
    boxes = [("microaneurysm", b) for b in dots] if len(dots) == 2 else []
    return _Base(
        id="fundus-microaneurysms",
        pixels=image,
        captions=[
            "Greyscale close-up of the retina, the green channel of a fundus photograph, with vessels and small dark dots.",
            "Detail of a fundus image from an eye with diabetic retinopathy, showing microaneurysms.",
        ],
        findings=[
            "Several dark retinal vessels cross the field roughly horizontally.",
            "Two small, round, dark dots lie between the vessels; these are the microaneurysms the crop was chosen for.",
        ],
        metadata={"modality": "fundus photograph (green channel)", "body_part": "eye (retina)"},
        boxes=boxes,
        qa=[
            ("Are microaneurysms visible?", "yes"),
            ("Are retinal vessels visible?", "yes"),
            ("Is this a colour image?", "no"),
            ("Is this an ultrasound image?", "no"),
            ("What are the small dark dots?", "microaneurysms"),
        ],
        origin=f"scikit-image {_version('scikit-image')}: skimage/data/microaneurysms.png (`skimage.data.microaneurysms()`)",
        licence=_skimage_licence("a crop of an image from the High-Resolution Fundus (HRF) database, CC0 given by its owner"),
        rendering="grey levels min-max stretched to 0-255 (the original spans a narrow range); boxes = compact dark spots found against a median background",
        augs=[_Aug("flip", note="horizontal flip"), _Aug("gamma", 0.8, "gamma 0.8")],
    )


def _ihc(phi: list[str]) -> _Base:
    with Image.open(_skimage_file("ihc.png")) as im:
        image = np.asarray(im.convert("RGB"))
    _need_shape("ihc.png", image, (512, 512, 3))
    return _Base(
        id="ihc-colon",
        pixels=image,
        captions=[
            "Immunohistochemistry of colonic glands: brown DAB staining with a blue hematoxylin counterstain.",
            "Light micrograph of colon tissue stained for the FHL2 protein by immunohistochemistry.",
        ],
        findings=[
            "Several colonic glands are cut in cross and longitudinal section; their epithelial cells are stained brown.",
            "Blue nuclei line the glands and are scattered through the pale connective tissue between them.",
            "The brown signal is strongest in the gland epithelium, while the stroma is largely unstained.",
        ],
        metadata={"modality": "brightfield microscopy", "body_part": "colon", "stain": "immunohistochemistry (DAB) with hematoxylin counterstain"},
        qa=[
            ("Is this a histology image?", "yes"),
            ("Is brown DAB staining present?", "yes"),
            ("Is this a radiograph?", "no"),
            ("Is this a CT image?", "no"),
            ("Which chromogen produces the brown colour?", "DAB"),
            ("What is the counterstain?", "hematoxylin"),
        ],
        origin=f"scikit-image {_version('scikit-image')}: skimage/data/ihc.png (`skimage.data.immunohistochemistry()`)",
        licence=_skimage_licence("acquired at the Center for Microscopy And Molecular Imaging (CMMI); no known copyright restrictions"),
        rendering="RGB as stored",
        augs=[_Aug("flip", note="horizontal flip"), _Aug("crop", 0.8, "centred crop to 80%")],
    )


def _cell(phi: list[str]) -> _Base:
    with Image.open(_skimage_file("cell.png")) as im:
        image = np.asarray(im.convert("L"))
    _need_shape("cell.png", image, (660, 550))
    return _Base(
        id="cell-phase",
        pixels=image,
        captions=[
            "Quantitative phase microscopy image of a single round cell floating in saline.",
            "Label-free phase image: one bright spherical cell on a grey background with faint banding.",
        ],
        findings=[
            "One round cell appears bright because its phase value is higher than the background's.",
            "A faint banding pattern in the background is an artefact of the holographic reconstruction.",
            "No stain is used; the contrast comes from the optical phase shift.",
        ],
        sided=["The cell lies in the lower right part of the field."],
        metadata={"modality": "quantitative phase microscopy", "body_part": "single cell", "stain": "none (label-free)"},
        boxes=[("cell", _bright_blob_box(image, sigma=3.0, level=0.2, pad=2))],
        qa=[
            ("Is there a cell in this image?", "yes"),
            ("Is more than one cell visible?", "no"),
            ("Is this image stained with hematoxylin?", "no"),
            ("Is the cell round?", "yes"),
            ("How many cells are visible?", "one"),
            ("What imaging technique produced this image?", "quantitative phase microscopy"),
        ],
        origin=f"scikit-image {_version('scikit-image')}: skimage/data/cell.png (`skimage.data.cell()`)",
        licence=_skimage_licence("a phase image from Mueller et al., Optics Express 2018, CC0 public domain dedication"),
        rendering="grey levels as stored; cell box = the bright region around the brightest smoothed point, 2 px margin",
        augs=[_Aug("crop", 0.8, "centred crop to 80%, shifted to keep the cell whole"), _Aug("flip", note="horizontal flip (position statement dropped)")],
    )


def _mri_head(phi: list[str]) -> _Base:
    import matplotlib
    import matplotlib.cbook

    from kit.generate.sources.dicom import _min_max, _to_uint8

    try:
        path = Path(matplotlib.cbook.get_sample_data("s1045.ima.gz", asfileobj=False))
        raw = gzip.decompress(path.read_bytes())
    except (OSError, ValueError) as e:
        raise _Skip(f"matplotlib {matplotlib.__version__} has no readable s1045.ima.gz ({type(e).__name__})") from None
    if len(raw) != 256 * 256 * 2:
        raise _Skip(f"s1045.ima.gz holds {len(raw)} bytes, not one 256 x 256 16-bit image")
    values = np.frombuffer(raw, dtype=">u2").reshape(256, 256).astype(np.float64)
    return _Base(
        id="mri-head-sagittal",
        pixels=_to_uint8(_min_max(values)),
        captions=[
            "Sagittal MR image of the head showing the brain, the skull and the face.",
            "Sagittal magnetic resonance slice through the head and upper neck.",
        ],
        findings=[
            "The cerebral hemisphere with its folded gyri fills the upper part of the head.",
            "The face, the oral cavity and the soft tissues of the upper neck lie below the brain.",
            "The scalp fat appears bright and the bone of the skull dark.",
        ],
        sided=["The face points to the image left."],
        metadata={"modality": "MRI", "body_part": "head", "plane": "sagittal"},
        qa=[
            ("Is this an MRI?", "yes"),
            ("Is this a sagittal image?", "yes"),
            ("Is this a CT image?", "no"),
            ("Is the abdomen shown?", "no"),
            ("What body region is imaged?", "head"),
            ("In which plane is the image?", "sagittal"),
        ],
        origin=f"matplotlib {matplotlib.__version__}: mpl-data/sample_data/s1045.ima.gz (`matplotlib.cbook.get_sample_data`)",
        licence=f"matplotlib {matplotlib.__version__} sample data, distributed with matplotlib under its licence; the package does not document the image's origin",
        rendering="gzip-compressed raw big-endian 16-bit 256 x 256 image, min-max scaled to 8 bits",
        augs=[_Aug("flip", note="horizontal flip (face-direction statement dropped)"), _Aug("gamma", 0.8, "gamma 0.8")],
    )


_MEDICAL: tuple[Callable[[list[str]], _Base], ...] = (
    _ct_chest, _mr_small, _ct_head, _nm_bone, _us_lymph_node, _us_echo, _seg_liver,
    _fundus, _microaneurysms, _ihc, _cell, _mri_head,
)
_SOURCE_FILES = {
    _ct_chest: "CT_small.dcm", _mr_small: "MR_small.dcm", _ct_head: "693_J2KI.dcm", _nm_bone: "JPEG2000.dcm",
    _us_lymph_node: "examples_rgb_color.dcm", _us_echo: "examples_ybr_color.dcm", _seg_liver: "liver_1frame.dcm",
    _fundus: "retina.jpg", _microaneurysms: "microaneurysms.png", _ihc: "ihc.png", _cell: "cell.png", _mri_head: "s1045.ima.gz",
}


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
    from kit.cards import hash_files, new_card, write_card

    if domain not in SAMPLE_DOMAINS:
        raise KitError(f"unknown sample domain '{domain}'; choose from {', '.join(SAMPLE_DOMAINS)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KitError(f"{out} already exists and is not an empty folder; choose a new folder or remove it")

    phi: list[str] = []
    bases: list[_Base] = []
    skipped: list[str] = []
    for make in _MEDICAL:
        try:
            bases.append(make(phi))
        except _Skip as e:
            skipped.append(f"{_SOURCE_FILES[make]}: {e}")
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
                # The texts are fixed in this module, so this is a kit bug, not a user error.
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
