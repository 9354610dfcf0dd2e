"""Sources: turn COCO files, a manifest folder, DICOM folders and figure captions into `Record`s.

A record is all a text-only generator may learn about an image: captions, labelled boxes, free-text
findings and a few safe metadata fields. Nothing here hands pixels to a generator; DICOM pixels are
only converted to PNG so the *training* step can see them later.

Every problem a user can fix is raised as a one-line `KitError` that names the file and the
offending line or id, so a broken 100k-line file can be repaired without a debugger.
"""

from pathlib import Path

from kit.core.errors import KitError
from kit.ingest.records import Record
from kit.ingest.sources.coco import from_coco  # noqa: F401
from kit.ingest.sources.manifest import MANIFEST_NAME, BOX_FORMATS, from_manifest  # noqa: F401
from kit.ingest.sources.figures import from_figures  # noqa: F401
from kit.ingest.sources.dicom import DICOM_METADATA_ALLOWLIST, MODALITY_WORDS, PHI_KEYWORDS, dicom_caption, from_dicom, phi_values  # noqa: F401
from kit.ingest.pairs import CAPTION_INSTRUCTIONS, write_caption_pairs  # noqa: F401
from kit.ingest.sources.common import PRIVATE_DIR_NAME  # noqa: F401

SOURCES = ("coco", "manifest", "dicom", "figures")


def load_records(source: str, input: Path, work_dir: Path, images: Path | None = None, instances: Path | None = None) -> list[Record]:
    """Dispatch on the source kind (what `kit generate` and `kit data ingest` take).

    `work_dir` receives rendered DICOM images. Raises KitError for an unknown source or bad input.
    """
    input = Path(input)
    if source == "coco":
        if images is None:
            raise KitError("--source coco needs --images DIR (the folder of the images' file_name paths)")
        return from_coco(input, Path(images), Path(instances) if instances else None)
    if source == "manifest":
        return from_manifest(input)
    if source == "dicom":
        return from_dicom(input, Path(work_dir))
    if source == "figures":
        return from_figures(input, Path(images) if images else input.parent)
    raise KitError(f"unknown --source '{source}'; choose from {', '.join(SOURCES)}")
