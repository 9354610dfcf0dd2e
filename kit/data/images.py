"""Image files: safe path resolution, integrity checks, and LLaVA's pad / crop handling."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError


class ImageProblem(ValueError):
    """Why an image can't be used; reported against the sample id by the caller."""


def resolve_image(folder: Path, rel: str) -> Path:
    """`folder/rel`, refusing paths that leave `folder` (absolute paths, `..`, symlinks out)."""
    root = Path(folder).resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise ImageProblem(f"image path '{rel}' escapes the image folder {root}")
    return path


def check_image(path: Path) -> None:
    if not path.is_file():
        raise ImageProblem(f"image file {path} is missing")
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageProblem(f"image file {path} is corrupt or not an image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageProblem(f"image file {path} is corrupt or not an image ({e})") from None


def open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageProblem(f"image file {path} cannot be decoded ({e})") from None


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
