"""Images a user hands a model at inference: encoded bytes (a request's data: URI) or a file, and
the same pad / crop training applied."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from kit.core.errors import KitError
from kit.data.images import ImageProblem, check_image, mean_colour, open_rgb, pad_to_square

# Larger images are refused rather than decoded (a small PNG can unpack to gigabytes).
MAX_IMAGE_PIXELS = 40_000_000


def decode_image(data: bytes):
    """An RGB PIL image from encoded bytes (PNG, JPEG, ...). Raises ImageProblem if undecodable."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ImageProblem(f"image is {im.width}x{im.height} pixels; at most {MAX_IMAGE_PIXELS:,} are accepted")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, ImageProblem):
            raise
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageProblem(f"the image cannot be decoded ({first})") from None


def load_image_file(path) -> Any:
    """An RGB PIL image from a file. Raises KitError naming the file if it is missing or not an image."""
    path = Path(path)
    try:
        check_image(path)
        return open_rgb(path)
    except ImageProblem as e:
        raise KitError(f"{e}; give a PNG or JPEG file") from None


def fit_image(img, aspect: str, image_processor):
    """As training showed images: 'pad' centres on a square of the mean colour, 'crop' leaves it to the processor."""
    return pad_to_square(img, mean_colour(image_processor)) if aspect == "pad" else img
