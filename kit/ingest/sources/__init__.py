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
from kit.ingest.sources.coco import from_coco
from kit.ingest.sources.dicom import from_dicom
from kit.ingest.sources.dicom_tags import DICOM_METADATA_ALLOWLIST, MODALITY_WORDS, PHI_KEYWORDS, dicom_caption, phi_values
from kit.ingest.sources.figures import from_figures
from kit.ingest.sources.manifest import BOX_FORMATS, MANIFEST_NAME, from_manifest

__all__ = [
    "BOX_FORMATS", "DICOM_METADATA_ALLOWLIST", "MANIFEST_NAME", "MODALITY_WORDS", "PHI_KEYWORDS",
    "SOURCES", "dicom_caption", "from_coco", "from_dicom", "from_figures", "from_manifest", "load_records", "phi_values",
]

SOURCES = ("coco", "manifest", "dicom", "figures")


def load_records(source: str, input: Path, work_dir: Path, images: Path | None = None, instances: Path | None = None,
                 public: bool = False, burned_in_checked: bool = False, echo=None, salt_for: Path | None = None) -> list[Record]:
    """Dispatch on the source kind (what `kit generate` and `kit data ingest` take).

    Every record is private (it never goes to a remote backend without --allow-remote) unless
    `public` says the COCO / figure source is public data; a manifest says so per line, DICOM never.
    `work_dir` receives rendered DICOM images (ids are salted for `salt_for`, default `work_dir`);
    `echo` gets per-file notes. Raises KitError for an unknown source or bad input.
    """
    input = Path(input)
    if source == "coco":
        if images is None:
            raise KitError("--source coco needs --images DIR (the folder of the images' file_name paths)")
        return from_coco(input, Path(images), Path(instances) if instances else None, private=not public)
    if source == "manifest":
        if public:
            raise KitError("--public applies to --source coco and figures; a manifest marks public lines with \"private\": false")
        return from_manifest(input)
    if source == "dicom":
        if public:
            raise KitError("--public does not apply to DICOM: DICOM records are always private")
        return from_dicom(input, Path(work_dir), burned_in_checked=burned_in_checked, echo=echo,
                          salt_for=salt_for)
    if source == "figures":
        return from_figures(input, Path(images) if images else input.parent, private=not public)
    raise KitError(f"unknown --source '{source}'; choose from {', '.join(SOURCES)}")
