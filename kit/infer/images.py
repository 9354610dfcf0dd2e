"""Images a user hands a model at inference: encoded bytes (a request's data: URI) or a file, and
the same pad / crop training applied."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kit.core.errors import KitError
from kit.data.images import ImageProblem, mean_colour, open_rgb, pad_to_square

def load_image_file(path) -> Any:
    """An RGB PIL image from a file. Raises KitError naming the file if it is missing or not an image."""
    path = Path(path)
    try:
        if not path.is_file():
            raise ImageProblem(f"image file {path} is missing")
        return open_rgb(path)
    except ImageProblem as e:
        raise KitError(f"{e}; give a PNG or JPEG file") from None


def fit_image(img, aspect: str, image_processor):
    """As training showed images: 'pad' centres on a square of the mean colour, 'crop' leaves it to the processor."""
    return pad_to_square(img, mean_colour(image_processor)) if aspect == "pad" else img
