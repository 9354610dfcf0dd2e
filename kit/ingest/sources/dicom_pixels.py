"""DICOM pixels for display and training: modality LUT, then the file's window or min-max, to 8 bits;
and the boxes of a segmentation's segments. Shared by the DICOM source and the packaged medical
sample, so both render a file the same way."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydicom import pixels

from kit.ingest.records import Box
from kit.ingest.sources.common import pixel_box
from kit.ingest.sources.dicom_tags import first_value, identity_tokens, repeats_identity

def _window(arr: np.ndarray, ds: Any) -> np.ndarray | None:
    """DICOM linear VOI window to 0..1, or None when the file has no usable window."""
    try:
        centre = float(first_value(ds.get("WindowCenter")))
        width = float(first_value(ds.get("WindowWidth")))
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(centre) and math.isfinite(width)) or width <= 1:
        return None
    out = ((arr - (centre - 0.5)) / (width - 1) + 0.5).clip(0.0, 1.0)
    # A window written for another series can blank the image; min-max is more useful then.
    return out if out.max() > out.min() else None


def min_max(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.float64)
    return (arr - lo) / (hi - lo)


def to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.round(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


def render_frame(ds: Any, frame: np.ndarray) -> np.ndarray:
    """One decoded frame -> 8-bit grey (H, W) or RGB (H, W, 3) array for display and training."""
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric == "PALETTE COLOR":
        frame = pixels.apply_color_lut(frame, ds)
    if frame.ndim == 3:
        # pixel_array(as_rgb=True) already turned YBR into RGB
        if frame.dtype == np.uint8:
            return frame
        bits = int(ds.get("BitsStored", 16) or 16) if photometric != "PALETTE COLOR" else 16
        return to_uint8(frame.astype(np.float64) / float((1 << bits) - 1))
    values = pixels.apply_modality_lut(frame, ds).astype(np.float64)
    unit = _window(values, ds)
    if unit is None:
        unit = min_max(values)
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit  # MONOCHROME1 shows low values as white
    return to_uint8(unit)


def segments(ds: Any, frame_index: int, frame: np.ndarray) -> tuple[list[str], list[Box]]:
    """Segment names and the box of each segment visible in the rendered frame.

    Names are the coded meanings (SegmentedPropertyTypeCodeSequence, e.g. "Liver") only, never the
    free-text SegmentLabel: a label can hold a patient's name spelled any way, which no comparison
    with the PatientName tag catches. A coded meaning is text too: one that repeats a part of the
    file's identity values (a name, an ID) is dropped. A segment without a usable code is "segment N"."""
    labels: dict[int, str] = {}
    identity = identity_tokens(ds)
    for item in ds.get("SegmentSequence") or []:
        number = int(item.get("SegmentNumber", len(labels) + 1))
        coded = ""
        for code in item.get("SegmentedPropertyTypeCodeSequence") or []:
            coded = " ".join(str(code.get("CodeMeaning", "") or "").split())
        if repeats_identity(coded, identity):
            coded = ""
        labels[number] = coded or f"segment {number}"
    if not labels:
        return [], []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    number = None
    if frame_index < len(per_frame):
        for ident in per_frame[frame_index].get("SegmentIdentificationSequence") or []:
            number = int(ident.get("ReferencedSegmentNumber", 0))
    if number is None and len(labels) == 1:
        number = next(iter(labels))
    boxes: list[Box] = []
    mask = np.asarray(frame) > 0
    if number in labels and mask.any():
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        h, w = mask.shape
        boxes.append(Box(labels[number], pixel_box(cols[0], rows[0], cols[-1] + 1, y2=rows[-1] + 1, width=w, height=h)))
    return list(labels.values()), boxes
