"""DICOM folders: pixels rendered with modality LUT + window; only allowlisted, non-identifying tags."""

from __future__ import annotations

import hashlib
import io
import os
import secrets
from pathlib import Path
from typing import Any

from PIL import Image
from pydicom import dcmread, pixels
from pydicom.errors import InvalidDicomError

from kit.core.errors import KitError
from kit.core.files import cache_dir, write_bytes_atomic
from kit.data.images import MAX_PIXELS, MAX_SIDE
from kit.ingest.records import Box, Record
from kit.ingest.sources.common import one_line
from kit.ingest.sources.dicom_pixels import render_frame, segments
from kit.ingest.sources.dicom_tags import dicom_caption, needs_burned_in_check, safe_metadata

def _read_dicom(path: Path, strict: bool) -> Any | None:
    """The dataset, or None for a file that is not DICOM (only allowed when not `strict`)."""
    try:
        return dcmread(str(path))
    except InvalidDicomError:
        if not strict:
            return None
    except Exception as e:  # damaged files raise anything from EOFError to struct.error
        if not strict:
            return None
        raise KitError(f"cannot read DICOM file {path} ({type(e).__name__}: {one_line(e)}); remove or replace it") from None
    # A .dcm without the 128-byte preamble is still common from older systems.
    try:
        ds = dcmread(str(path), force=True)
    except Exception as e:
        raise KitError(f"cannot read DICOM file {path} ({type(e).__name__}: {one_line(e)}); remove or replace it") from None
    if "SOPClassUID" not in ds and "PixelData" not in ds:
        raise KitError(f"cannot read DICOM file {path}: it ends in .dcm but is not DICOM; remove or rename it")
    return ds


def _dicom_files(folder: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.suffix.lower() == ".dcm" or (not p.suffix and not name.startswith(".")):
                files.append(p)
    return files


def salt_file(work_dir: Path) -> Path:
    """Where the id salt of an output folder lives: in kit's cache (KIT_CACHE, else ~/.cache/kit),
    keyed by the folder's absolute path, never inside the folder: whoever receives the converted
    data must not be able to test guessed paths (often patient names) against its ids."""
    key = hashlib.sha256(str(Path(work_dir).resolve()).encode("utf-8")).hexdigest()[:32]
    return cache_dir() / "dicom-id-salts" / key


def id_salt(work_dir: Path) -> bytes:
    """A random salt per output folder: ids stay stable across reruns into the same output, and
    cannot be recomputed from a guessed path. Moving the output folder starts a new salt."""
    f = salt_file(work_dir)
    if not f.is_file():
        write_bytes_atomic(f, secrets.token_hex(16).encode())
    return f.read_bytes().strip()


def _pixel_limits(ds: Any, where: str) -> None:
    """The frame size from the header, checked before any pixel is decoded: a small compressed file
    can declare a frame of gigabytes (the same limits as every other image kit opens)."""
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    except (TypeError, ValueError):
        raise KitError(f"{where}: Rows / Columns are not numbers; the file is damaged") from None
    if rows * cols > MAX_PIXELS or max(rows, cols) > MAX_SIDE:
        raise KitError(f"{where}: its frames are {cols}x{rows} pixels; kit takes at most {MAX_PIXELS:,} pixels and {MAX_SIDE} "
                       "on the longest side (downscale it, or leave the file out)")


def middle_frame(ds, path: Path):
    """(the middle frame's pixels, its index) of a DICOM image; KitError when they cannot be decoded."""
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    index = n_frames // 2
    try:
        frame = pixels.pixel_array(ds, index=index if n_frames > 1 else None)
    except Exception as e:  # missing codec plugins and corrupt streams both land here
        raise KitError(
            f"cannot decode the pixel data of {path} ({type(e).__name__}: {one_line(e)}); install the codec pydicom names "
            "(e.g. pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg) or remove the file"
        ) from None
    if frame.ndim == 3 and int(ds.get("SamplesPerPixel", 1) or 1) == 1:
        frame = frame[frame.shape[0] // 2]  # frames the header did not count
    return frame, index


def dicom_record(ds, rid: str, *, frame, index: int, work_dir: Path, note) -> Record:
    """The record of one DICOM image rendered as work_dir/images/<rid>.png: allowlisted metadata
    (`note(tags left out)` when any were), a caption from it, a segmentation's segments as findings
    and boxes. Always private."""
    dropped: list[str] = []
    metadata = safe_metadata(ds, dropped)
    if dropped:
        note(dropped)
    labels: list[str] = []
    boxes: list[Box] = []
    if str(ds.get("Modality", "")).upper() == "SEG":
        labels, boxes = segments(ds, index, frame)
    return Record(
        id=rid,
        image=f"images/{rid}.png",
        root=work_dir,
        captions=[dicom_caption(metadata, labels)],
        boxes=boxes,
        findings=[f"Segmented region: {label}" for label in labels],
        metadata=metadata,
        private=True,
        source=f"dicom#{rid}",  # not the path: folder names are often patient names
    )


def from_dicom(folder: Path, work_dir: Path, burned_in_checked: bool = False, echo=None,
               salt_for: Path | None = None) -> list[Record]:
    """Records from every DICOM image under `folder` (recursive), with an 8-bit PNG per file.

    Files ending in `.dcm` must be DICOM; files without an extension are used when pydicom can read
    them and silently skipped otherwise; DICOM objects without pixel data (reports, DICOMDIR) are
    skipped. Each image becomes `work_dir/images/<id>.png` (the middle frame of a multi-frame file,
    modality LUT then the file's window or min-max, MONOCHROME1 inverted, colour as RGB).

    Ids are `dicom-` + 12 hex chars of a salted sha256 of the path relative to `folder` (the salt
    is kept in kit's cache per output folder, see `salt_file`): stable across reruns, and unlike
    UIDs or bare path hashes not traceable to the patient. Metadata holds only
    `DICOM_METADATA_ALLOWLIST` tags whose values are standard terms or numbers and repeat none of
    the file's identity values; captions come from it. A segmentation's coded segment names go to
    findings and the box of the segment shown in the PNG to boxes. Records are always private.
    `echo` is told, per file, which tags were left out. `salt_for` is the folder the ids belong to
    when `work_dir` is a staging folder (default: `work_dir`).

    Raises KitError for: a missing folder; a `.dcm` file that cannot be read; a frame beyond the
    image limits (checked before decoding); pixel data that cannot be decoded (a codec plugin is
    missing); unless `burned_in_checked`, an image whose BurnedInAnnotation is YES, or that has no
    BurnedInAnnotation and is of a kind that usually shows text (ultrasound, photographs, secondary
    captures: `dicom_codes.yaml`); a folder with no DICOM image.
    """
    folder, work_dir = Path(folder), Path(work_dir)
    if not folder.is_dir():
        raise KitError(f"DICOM folder {folder} does not exist")
    records: list[Record] = []
    salt = None
    for path in _dicom_files(folder):
        ds = _read_dicom(path, strict=path.suffix.lower() == ".dcm")
        if ds is None or "PixelData" not in ds:
            continue
        rel = path.relative_to(folder).as_posix()
        burned_in = needs_burned_in_check(ds)
        if burned_in and not burned_in_checked:
            raise KitError(f"{folder.name}/{rel}: {burned_in}; remove the file, or check the pixels of every such file "
                           "and pass --burned-in-checked")
        _pixel_limits(ds, f"{folder.name}/{rel}")
        salt = salt or id_salt(salt_for or work_dir)
        rid = "dicom-" + hashlib.sha256(salt + b"\0" + rel.encode("utf-8")).hexdigest()[:12]
        frame, index = middle_frame(ds, path)
        buf = io.BytesIO()
        Image.fromarray(render_frame(ds, frame)).save(buf, format="PNG")  # no text chunks: nothing but pixels
        write_bytes_atomic(work_dir / "images" / f"{rid}.png", buf.getvalue())

        records.append(dicom_record(ds, rid, frame=frame, index=index, work_dir=work_dir,
                                    note=lambda dropped: echo(f"note: {folder.name}/{rel}: left out {', '.join(dropped)} (values that "
                                                              "are not DICOM terms or numbers, or that repeat the patient's name or IDs)")
                                    if echo is not None else None))
    if not records:
        raise KitError(f"no DICOM images under {folder} (looked for *.dcm and extensionless DICOM files)")
    return records
