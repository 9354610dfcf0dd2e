"""The medical sample's sources: one builder per file that ships inside pydicom, scikit-image or
matplotlib, returning only what is computed from that file (pixels, boxes, values its texts quote).
The texts themselves are in medical.yaml (kit.ingest.samples.texts)."""

from __future__ import annotations

import gzip
import importlib.metadata
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom import pixels
import pydicom.data  # called as pydicom.data.get_testdata_file, so a test can stand in for it

from kit.ingest.samples.pixels import PixelBox, bright_blob_box, dark_dot_boxes, keep_only, mask_box
from kit.ingest.sources.dicom_pixels import min_max, render_frame, segments, to_uint8
from kit.ingest.sources.dicom_tags import dataset_phi, safe_metadata

class Skip(Exception):
    """A source that this installation cannot provide (file absent, codec missing, content changed)."""



@dataclass
class Pixels:
    pixels: np.ndarray  # uint8, (H, W) or (H, W, 3)
    boxes: list[tuple[str, PixelBox]] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)  # str.format values for this id's texts
    images: dict[str, np.ndarray] = field(default_factory=dict)  # for `pixels` variants, by name


_Builder = Callable[[str, list[str]], Pixels]  # (source file name, identifying values found so far)


def package_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _dicom(name: str, modality: str, frame: int | None = None) -> tuple[Any, np.ndarray, np.ndarray, dict[str, str], list[str]]:
    """(dataset, decoded frame, rendered 8-bit image, safe metadata, identifying values) of a pydicom test file."""
    path = pydicom.data.get_testdata_file(name, download=False)
    if path is None:
        raise Skip(f"pydicom {package_version('pydicom')} does not ship {name}")
    ds = pydicom.dcmread(path)
    if str(ds.get("Modality", "")).upper() != modality:
        raise Skip(f"{name} is no longer a {modality} file in this pydicom release")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    index = frame if frame is not None else (n_frames // 2 if n_frames > 1 else None)
    try:
        with warnings.catch_warnings():
            # 693_J2KI.dcm exists to exercise a BitsStored mismatch; pydicom warns and corrects it
            warnings.simplefilter("ignore")
            decoded = pixels.pixel_array(ds, index=index)
    except Exception as e:  # noqa: BLE001 - a missing codec plugin surfaces as many exception types
        raise Skip(f"{name}: this installation cannot decode its pixel data ({type(e).__name__}); a decoder plugin such as pylibjpeg-openjpeg would add it") from None
    return ds, decoded, render_frame(ds, decoded), safe_metadata(ds), dataset_phi(ds)


def _need_shape(name: str, pixels: np.ndarray, shape: tuple[int, ...]) -> None:
    if pixels.shape != shape:
        raise Skip(f"{name} has shape {pixels.shape}, not the {shape} its texts were written for")


def _kept(keep: PixelBox) -> dict[str, str]:
    """The rows and columns `keep_only(image, *keep)` leaves, inclusive, as the README states them."""
    x1, y1, x2, y2 = keep
    return {"kept_rows": f"{y1}-{y2 - 1}", "kept_columns": f"{x1}-{x2 - 1}"}


def _dicom_image(name: str, phi: list[str], *, modality: str, shape: tuple[int, ...], keep: PixelBox | None = None) -> Pixels:
    """The rendered middle frame, blacked out outside `keep` when given."""
    _, _, image, md, values = _dicom(name, modality)
    phi += values
    _need_shape(name, image, shape)
    fields = {"plane": md.get("ImagePlane", "axial")}
    if keep is not None:
        image = keep_only(image, *keep)
        fields |= _kept(keep)
    return Pixels(image, fields=fields)


def _us_echo(name: str, phi: list[str]) -> Pixels:
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
    return Pixels(
        keep_only(image, *keep),
        fields={"n_frames": n_frames, "frame": middle + 1, "early_frame": early + 1} | _kept(keep),
        images={"early_frame_pixels": keep_only(other, *keep)},
    )


def _seg_liver(name: str, phi: list[str]) -> Pixels:
    ds, frame, image, md, values = _dicom(name, "SEG")
    phi += values
    _need_shape(name, image, (512, 512))
    labels, _ = segments(ds, 0, frame)
    if [label.lower() for label in labels] != ["liver"]:
        raise Skip(f"{name} segments {labels}, not the single liver segment its texts describe")
    return Pixels(image, boxes=[("liver", mask_box(image > 0))], fields={"plane": md.get("ImagePlane", "axial")})


def _skimage_file(name: str) -> Path:
    # Read the bundled copy directly: the skimage.data functions fall back to a download when a file
    # is missing, and this sample must never touch the network.
    import skimage.data  # scikit-image is optional (the test extra); without it these sources are skipped

    path = Path(skimage.data.data_dir) / name
    if not path.is_file():
        raise Skip(f"scikit-image {package_version('scikit-image')} does not bundle {name} (it would have to be downloaded)")
    return path


def _skimage_image(name: str, mode: str, shape: tuple[int, ...]) -> np.ndarray:
    with Image.open(_skimage_file(name)) as im:
        image = np.asarray(im.convert(mode))
    _need_shape(name, image, shape)
    return image


def _fundus(name: str, phi: list[str]) -> Pixels:
    with Image.open(_skimage_file(name)) as im:
        if im.size != (1411, 1411):
            raise Skip(f"{name} is {im.size}, not the 1411 x 1411 photograph its texts describe")
        image = np.asarray(im.convert("RGB").resize((512, 512), Image.Resampling.LANCZOS))
    return Pixels(image, boxes=[("optic disc", bright_blob_box(image.mean(axis=2), sigma=6.0, level=0.5))])


def _microaneurysms(name: str, phi: list[str]) -> Pixels:
    raw = _skimage_image(name, "L", (102, 102))
    dots = dark_dot_boxes(raw)  # the threshold is in the original grey levels
    # Two dots are what the image shows; any other count means the detector misfired, and no box
    # is better than a wrong one.
    boxes = [("microaneurysm", b) for b in dots] if len(dots) == 2 else []
    return Pixels(to_uint8(min_max(raw.astype(np.float64))), boxes=boxes)


def _ihc(name: str, phi: list[str]) -> Pixels:
    return Pixels(_skimage_image(name, "RGB", (512, 512, 3)))


def _cell(name: str, phi: list[str]) -> Pixels:
    image = _skimage_image(name, "L", (660, 550))
    return Pixels(image, boxes=[("cell", bright_blob_box(image, sigma=3.0, level=0.2, pad=2))])


def _mri_head(name: str, phi: list[str]) -> Pixels:
    import matplotlib  # ~0.3 s to import, for this one source
    import matplotlib.cbook

    try:
        path = Path(matplotlib.cbook.get_sample_data(name, asfileobj=False))
        raw = gzip.decompress(path.read_bytes())
    except (OSError, ValueError) as e:
        raise Skip(f"matplotlib {matplotlib.__version__} has no readable {name} ({type(e).__name__})") from None
    if len(raw) != 256 * 256 * 2:
        raise Skip(f"{name} holds {len(raw)} bytes, not one 256 x 256 16-bit image")
    values = np.frombuffer(raw, dtype=">u2").reshape(256, 256).astype(np.float64)
    return Pixels(to_uint8(min_max(values)), fields={"matplotlib_version": matplotlib.__version__})


# (id in medical.yaml, source file, builder), in the order the sample lists them.
MEDICAL: tuple[tuple[str, str, _Builder], ...] = (
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
