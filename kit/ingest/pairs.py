"""Stage-1 (concept alignment) caption pairs written from records: `kit data ingest`."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from kit.core.cards import Card
from kit.core.errors import KitError
from kit.core.files import write_json_atomic, write_jsonl_atomic
from kit.ingest.records import Record, image_folder_for
from kit.ingest.sources import load_records

CAPTION_INSTRUCTIONS: tuple[str, ...] = (
    "Describe the image concisely.",
    "Give a brief description of this picture.",
    "What does this image show? Answer in one sentence.",
    "Summarize the visual content of the image.",
    "Write a short caption for the image.",
    "Provide a one-sentence summary of what is shown.",
    "Briefly say what can be seen here.",
    "Offer a compact description of the image.",
)


def _instruction(seed: int, rid: str) -> str:
    # sha256 rather than hash(): Python's str hash changes per process.
    digest = hashlib.sha256(f"{seed}\0{rid}".encode("utf-8")).digest()
    return CAPTION_INSTRUCTIONS[int.from_bytes(digest[:8], "big") % len(CAPTION_INSTRUCTIONS)]



def write_caption_pairs(records: list[Record], out_file: Path, seed: int = 0) -> int:
    """Write stage-1 (concept alignment) LLaVA data: one image -> caption sample per record.

    Records without a caption are skipped; the first caption is the answer; the instruction is one
    of `CAPTION_INSTRUCTIONS`, chosen from (seed, id) so reruns give the same file. `.jsonl` output
    is one sample per line, anything else a JSON list; written atomically. A `kit.json` card beside
    the file records `image_folder` (absolute), which the `image` paths are relative to.

    Returns the number of samples. Raises KitError when no record has a caption or two records
    share an id.
    """
    out_file = Path(out_file)
    usable = [r for r in records if r.captions]
    if not usable:
        raise KitError(f"no record has a caption; nothing to write to {out_file}")
    seen: dict[str, str] = {}
    for r in usable:
        if r.id in seen:
            raise KitError(f"two records share id '{r.id}' ({seen[r.id]} and {r.source}); ids must be unique in one data file")
        seen[r.id] = r.source
    out_file.parent.mkdir(parents=True, exist_ok=True)
    folder = image_folder_for(usable, out_file.parent)
    samples = []
    for r in usable:
        image = Path(os.path.relpath(os.path.abspath(r.root / r.image), folder)).as_posix()
        samples.append(
            {
                "id": r.id,
                "image": image,
                "conversations": [
                    {"from": "human", "value": "<image>\n" + _instruction(seed, r.id)},
                    {"from": "gpt", "value": r.captions[0]},
                ],
            }
        )
    if out_file.suffix == ".jsonl":
        write_jsonl_atomic(out_file, samples)
    else:
        write_json_atomic(out_file, samples)
    Card.new("data", made_by="kit data ingest", image_folder=str(folder), files=[out_file.name],
             samples=len(samples), private=any(r.private for r in usable)).write(out_file.parent)
    return len(samples)


def ingest(source: str, input: Path, out: Path, images: Path | None = None, instances: Path | None = None, seed: int = 0,
           public: bool = False, burned_in_checked: bool = False, echo=None) -> int:
    """Read the source fully, then write `out` (+ its data card). Raises KitError; writes nothing on error."""
    out = Path(out)
    if out.suffix != ".json":
        raise KitError(f"--out {out}: give a .json file path")
    if out.exists():
        raise KitError(f"--out {out} already exists; choose another file")
    out.parent.mkdir(parents=True, exist_ok=True)
    # DICOM pixels are rendered next to the output; a failed read leaves no half-filled folder.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".ingest.") as scratch:
        staging = Path(scratch)
        records = load_records(source, input, staging, images=images, instances=instances, public=public, burned_in_checked=burned_in_checked,
                               echo=echo, salt_for=out.parent)
        if not any(r.captions for r in records):
            raise KitError(f"{input}: no record has a caption to pair with its image")
        if source == "dicom":
            target = out.parent / "images"
            target.mkdir(exist_ok=True)
            for f in (staging / "images").glob("*.png"):
                f.replace(target / f.name)
            for r in records:
                r.root = out.parent
        return write_caption_pairs(records, out, seed)
