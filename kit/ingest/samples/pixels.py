"""Small image tools for the packaged samples: variants (flip, gamma, crop), boxes found in pixels,
blacking out burned-in text, PNG bytes."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

PixelBox = tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels, x2/y2 exclusive


def flip(pixels: np.ndarray, boxes: list[tuple[str, PixelBox]]) -> tuple[np.ndarray, list[tuple[str, PixelBox]]]:
    w = pixels.shape[1]
    return np.ascontiguousarray(pixels[:, ::-1]), [(label, (w - x2, y1, w - x1, y2)) for label, (x1, y1, x2, y2) in boxes]


def gamma(pixels: np.ndarray, g: float) -> np.ndarray:
    lut = np.round(255.0 * (np.arange(256) / 255.0) ** g).astype(np.uint8)
    return lut[pixels]


def crop(pixels: np.ndarray, boxes: list[tuple[str, PixelBox]], frac: float) -> tuple[np.ndarray, list[tuple[str, PixelBox]]]:
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


def mask_box(mask: np.ndarray) -> PixelBox:
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def bright_blob_box(grey: np.ndarray, sigma: float, level: float, pad: int = 0) -> PixelBox:
    """Box of the connected bright region around the brightest smoothed point.

    `level` is the fraction of the way from the median to the peak used as the threshold: the
    region is what stands out of the background, not a fixed grey value.
    """
    smooth = ndi.gaussian_filter(grey.astype(np.float64), sigma)
    cy, cx = np.unravel_index(int(smooth.argmax()), smooth.shape)
    inside = smooth[grey > 0] if (grey > 0).any() else smooth
    background = float(np.median(inside))
    labels, _ = ndi.label(smooth > background + level * (float(smooth.max()) - background))
    x1, y1, x2, y2 = mask_box(labels == labels[cy, cx])
    h, w = grey.shape
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, w), min(y2 + pad, h)


def dark_dot_boxes(grey: np.ndarray, pad: int = 2) -> list[PixelBox]:
    """Small, round, dark spots: darker than their surroundings, compact rather than vessel-like."""
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


def keep_only(pixels: np.ndarray, x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    out = np.zeros_like(pixels)
    out[y1:y2, x1:x2] = pixels[y1:y2, x1:x2]
    return out


def png_bytes(pixels: np.ndarray, level: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=level)  # no text chunks: only pixels
    return buf.getvalue()
