"""Image files: safe path resolution, integrity checks, and LLaVA's pad / crop handling."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError


class ImageProblem(ValueError):
    """Why an image can't be used; reported against the sample id by the caller."""


def resolve_image(folder: Path, rel: str) -> Path:
    """`folder/rel`, refusing paths that leave `folder` (absolute paths, `..`, symlinks out)."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise ImageProblem(f"image path {rel!r} is not a usable file name (give a relative path such as scans/0001.png)")
    root = Path(folder).resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise ImageProblem(f"image path '{rel}' escapes the image folder {root}")
    return path


# Formats kit decodes: what scanners, cameras and exports write. Others are refused unopened: EPS
# and PS would run Ghostscript, and rarer decoders are more attack surface than use.
FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF", "PPM")
# Checked from the header, before any pixel is decoded: a small file can unpack to gigabytes, and an
# extreme shape (40000 x 1000) needs a huge canvas once padded to a square.
MAX_PIXELS = 40_000_000
MAX_SIDE = 8192
_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError)


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0] or type(e).__name__


def _opened(source, label: str) -> Image.Image:
    """The image, its header checked: an allowed format, within MAX_PIXELS and MAX_SIDE."""
    try:
        im = Image.open(source, formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageProblem(f"{label} is not an image kit reads (formats: {', '.join(FORMATS)})") from None
    except FileNotFoundError:
        raise ImageProblem(f"{label} is missing") from None
    except Image.DecompressionBombError:
        raise ImageProblem(f"{label} is far larger than kit takes (at most {MAX_PIXELS:,} pixels and {MAX_SIDE} on the longest "
                           "side); downscale it first") from None
    except _ERRORS as e:
        raise ImageProblem(f"{label} is truncated, damaged or not an image ({_first_line(e)})") from None
    w, h = im.size
    if w * h > MAX_PIXELS or max(w, h) > MAX_SIDE:
        im.close()
        raise ImageProblem(f"{label} is {w}x{h} pixels; kit takes at most {MAX_PIXELS:,} pixels and {MAX_SIDE} on the longest side "
                           "(downscale it first)")
    return im


def _decoded(source, label: str) -> Image.Image:
    """Every pixel decoded, as RGB: a truncated or damaged file fails here, not in training."""
    im = _opened(source, label)
    try:
        with im:
            return im.convert("RGB")
    except _ERRORS as e:
        raise ImageProblem(f"{label} cannot be decoded: it is truncated or damaged ({_first_line(e)})") from None


def check_image(path: Path) -> None:
    """The file is an image kit will be able to use: allowed format, size limits, fully decodable."""
    path = Path(path)
    if not path.is_file():
        raise ImageProblem(f"image file {path} is missing")
    _decoded(path, f"image file {path}")


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header (checked against the limits), without decoding the pixels."""
    with _opened(Path(path), f"image file {path}") as im:
        return im.size


def open_rgb(path: Path) -> Image.Image:
    return _decoded(Path(path), f"image file {path}")


class EncodedImage:
    """An image checked from its header (format, size limits) whose pixels are decoded only when
    asked: a few kilobytes of PNG can unpack to hundreds of megabytes, so what waits (a queued
    request) holds the encoded bytes, and whoever decodes can count the cost first.

    Raises ImageProblem (with `label`) for a bad header, and from `decode()` for damaged pixels."""

    def __init__(self, source: bytes | Path, label: str):
        self.source, self.label = source, label
        with _opened(self._stream(), label) as im:
            self.size: tuple[int, int] = im.size

    def _stream(self):
        return io.BytesIO(self.source) if isinstance(self.source, bytes) else Path(self.source)

    @property
    def canvas_pixels(self) -> int:
        """Pixels of the largest canvas it can take while being prepared (padded to a square)."""
        return max(self.size) ** 2

    def decode(self) -> Image.Image:
        return _decoded(self._stream(), self.label)


def pad_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's `pad`: centre the image on a square of the processor's mean colour."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def mean_colour(image_processor) -> tuple[int, int, int]:
    mean = getattr(image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
    return tuple(int(round(m * 255)) for m in mean)


def prepare_image(path: Path, aspect: str, image_processor) -> Image.Image:
    img = open_rgb(path)
    if aspect == "pad":
        img = pad_to_square(img, mean_colour(image_processor))
    return img  # "crop": the processor's resize + center crop does the rest
