"""`kit data sample`: small, real, captioned image sets built from files that ship inside packages.

The medical sample uses only images already on disk after `pip install`: pydicom's DICOM test
files, scikit-image's bundled data and matplotlib's sample data. Nothing is downloaded, so the
sample works on an air-gapped machine, and because every caption, finding and question was
written for one exact file, each source is checked (modality, size, segment label) before use and
skipped when a package release ships something else. Those texts are in `medical.yaml`
next to this module; the code here only reads pixels, finds boxes and fills in the values the
texts quote (package versions, frame numbers).

Output layout (what `kit.ingest.sources.from_manifest` reads)::

    out/
      manifest.jsonl   one record per image: captions, findings, metadata, boxes
      images/*.png     base images and their `-augN` variants
      eval.jsonl       LLaVA-Med-style closed (yes/no) and open questions about the base images
      README.md        where each image comes from, its licence note and how it was rendered
      kit.json         data card

DICOM files are rendered with kit's own DICOM path (modality LUT, then the stored window or
min-max) and only coded tags are read; no value of an identifying tag reaches any output file, and
`write_sample` re-checks every byte it wrote against those values before publishing the folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from kit.core.cards import Card, hash_files
from kit.core.errors import KitError
from kit.core.files import staged_folder
from kit.ingest.samples.medical import MEDICAL, Skip, package_version
from kit.ingest.samples.pixels import PixelBox, crop, flip, gamma, png_bytes
from kit.ingest.samples.texts import Aug, SampleImage, load_texts, sample_image

SAMPLE_DOMAINS: tuple[str, ...] = ("medical",)


# --------------------------------------------------------------------------- writing


def _variant(base: SampleImage, aug: Aug) -> tuple[np.ndarray, list[tuple[str, PixelBox]], bool]:
    """(pixels, boxes, keeps left-right orientation)."""
    if aug.kind == "flip":
        pixels, boxes = flip(base.pixels, base.boxes)
        return pixels, boxes, False
    if aug.kind == "gamma":
        return gamma(base.pixels, float(aug.value)), list(base.boxes), True
    if aug.kind == "crop":
        pixels, boxes = crop(base.pixels, base.boxes, float(aug.value))
        return pixels, boxes, True
    if aug.kind == "pixels":
        # another frame of the same acquisition: boxes drawn on the base frame would not fit
        return aug.value, [], True
    raise ValueError(f"unknown augmentation {aug.kind}")


def _manifest_line(rid: str, base: SampleImage, boxes: list[tuple[str, PixelBox]], oriented: bool) -> dict[str, Any]:
    metadata = dict(base.metadata)
    findings = list(base.findings)
    if oriented:
        metadata.update(base.sided_metadata)
        findings += base.sided
    line: dict[str, Any] = {
        "id": rid,
        "image": f"images/{rid}.png",
        "captions": base.captions,
        "findings": findings,
        "metadata": metadata,
    }
    if boxes:
        line["boxes"] = [{"label": label, "bbox": [int(v) for v in box], "format": "xyxy_pixels"} for label, box in boxes]
    line["private"] = True
    return line


def _leaks(data: bytes, phi: list[bytes]) -> list[bytes]:
    return [p for p in phi if p in data]


def _encode_png(pixels: np.ndarray, phi: list[bytes]) -> bytes:
    """PNG bytes in which no identifying value occurs even by chance.

    Compressed pixel data is effectively random, so a short value such as a three-digit number can
    appear in it; another (fixed, ordered) compression level gives other bytes for the same pixels.
    """
    for level in (6, 9, 1, 3, 5, 7, 2, 4, 8):
        data = png_bytes(pixels, level)
        if not _leaks(data, phi):
            return data
    raise RuntimeError("every PNG encoding of a sample image contains an identifying DICOM value by chance; please report this")


def _readme(bases: list[SampleImage], variants: dict[str, list[tuple[str, str]]], skipped: list[str], n_records: int, n_closed: int, n_open: int, n_yes: int) -> str:
    lines = [
        "# kit medical sample",
        "",
        f"{n_records} real medical images ({len(bases)} originals and their variants) taken from files that ship inside",
        "installed Python packages, in the manifest layout `kit generate --source manifest` and `kit data ingest` read.",
        "Nothing was downloaded. Every record is marked private, as your own data would be.",
        "",
        "- `manifest.jsonl`: captions, findings, metadata and (where known) boxes, written for each image by hand from the",
        "  file's coded metadata and what the image shows.",
        "- `images/`: 8-bit PNGs. `<id>-augN` are deterministic variants of `<id>` (flips, crops, gamma changes, another",
        "  frame); statements about left and right are dropped from flipped variants.",
        f"- `eval.jsonl`: {n_closed + n_open} LLaVA-Med-style questions about the original images: {n_closed} closed (yes/no,",
        f"  {n_yes} yes), scored by accuracy, and {n_open} open (short answers), scored by the recall of the answer's words.",
        "  When you evaluate on them, hold out each original together with its `-augN` variants from training.",
        "",
        "No value of an identifying DICOM field (names, IDs, dates, institutions, UIDs, free-text descriptions) was",
        "copied into any file here; ultrasound screens with burned-in lettering were blacked out around the scan.",
        "",
        "## Images",
        "",
    ]
    for base in bases:
        lines += [
            f"### `{base.id}`",
            "",
            f"- Source: {base.origin}",
            f"- Licence: {base.licence}",
            f"- Rendering: {base.rendering}",
        ]
        for rid, note in variants[base.id]:
            lines.append(f"- `{rid}`: {note}")
        lines.append("")
    if skipped:
        lines += ["## Skipped in this installation", ""] + [f"- {s}" for s in skipped] + [""]
    lines += [
        "## Licences",
        "",
        "The pydicom test files and the scikit-image and matplotlib sample images are distributed with those packages",
        "under the packages' licences (and the upstream terms noted above). They are here for tests, demos and trying",
        "kit out; check the terms before building anything you distribute on them.",
        "",
    ]
    return "\n".join(lines)


def _built_sources() -> tuple[list[SampleImage], list[str], list[bytes]]:
    """(the sample images this installation can build, the sources it cannot and why, the DICOM
    values that must not appear in any written byte)."""
    phi: list[str] = []
    bases: list[SampleImage] = []
    skipped: list[str] = []
    entries = load_texts()
    versions = {"pydicom_version": package_version("pydicom"), "skimage_version": package_version("scikit-image")}
    for rid, source, build in MEDICAL:
        try:
            built = build(source, phi)
        except Skip as e:
            skipped.append(f"{source}: {e}")
            continue
        bases.append(sample_image(rid, entries[rid], built, fields=versions | built.fields))
    if not bases:
        raise KitError(f"no sample source is available in this installation: {'; '.join(skipped)}")
    # Short values (sex codes, single digits) occur everywhere by chance and identify no one.
    return bases, skipped, sorted({p.encode("utf-8") for p in phi if len(p) >= 3})


def _write_images(bases: list[SampleImage], staging: Path, phi_bytes: list[bytes]) -> tuple[list[dict[str, Any]], dict[str, list[tuple[str, str]]]]:
    """Each image and its augmented copies as PNGs under images/; (manifest lines, each image's copies and what was done)."""
    (staging / "images").mkdir()
    manifest: list[dict[str, Any]] = []
    variants: dict[str, list[tuple[str, str]]] = {}
    for base in bases:
        rows = [(base.id, base.pixels, list(base.boxes), True)]
        variants[base.id] = []
        for n, aug in enumerate(base.augs, 1):
            rid = f"{base.id}-aug{n}"
            rows.append((rid, *_variant(base, aug)))
            variants[base.id].append((rid, aug.note))
        for rid, pixels, boxes, oriented in rows:
            (staging / "images" / f"{rid}.png").write_bytes(_encode_png(pixels, phi_bytes))
            manifest.append(_manifest_line(rid, base, boxes, oriented=oriented))
    return manifest, variants


def write_sample(domain: str, out: Path) -> Card:
    """Write the sample set for `domain` into the new folder `out` and return its `kit.json` card.

    Everything is built in a hidden temporary folder next to `out` and renamed into place at the
    end, so an error leaves nothing behind. The same installed packages give the same bytes on every
    run, except the card's creation time. Sources this installation cannot provide (a file missing,
    a codec absent) are skipped and listed in the card and the README.

    Raises KitError for an unknown domain, an `out` that exists and is not an empty folder, or a
    domain whose sources are all missing.
    """
    if domain not in SAMPLE_DOMAINS:
        raise KitError(f"unknown sample domain '{domain}'; choose from {', '.join(SAMPLE_DOMAINS)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KitError(f"{out} already exists and is not an empty folder; choose a new folder or remove it")

    bases, skipped, phi_bytes = _built_sources()
    with staged_folder(out) as staging:
        manifest, variants = _write_images(bases, staging, phi_bytes)
        questions = [{"id": f"{base.id}-q{n}", "image": f"images/{base.id}.png", "question": question, "answer": answer,
                      "answer_type": "closed" if answer in ("yes", "no") else "open"}
                     for base in bases for n, (question, answer) in enumerate(base.qa, 1)]
        n_closed = sum(q["answer_type"] == "closed" for q in questions)
        n_yes = sum(q["answer"] == "yes" for q in questions)

        texts = {
            "manifest.jsonl": "".join(json.dumps(m, ensure_ascii=True) + "\n" for m in manifest),
            "eval.jsonl": "".join(json.dumps(q, ensure_ascii=True) + "\n" for q in questions),
            "README.md": _readme(bases, variants, skipped, n_records=len(manifest), n_closed=n_closed, n_open=len(questions) - n_closed, n_yes=n_yes),
        }
        for name, text in texts.items():
            leaked = _leaks(text.encode("utf-8"), phi_bytes)
            if leaked:
                # The texts are fixed in medical.yaml, so this is a kit bug, not a user error.
                raise RuntimeError(f"sample {name} would contain {len(leaked)} identifying DICOM value(s); please report this")
            (staging / name).write_text(text, encoding="utf-8")

        written = sorted(p for p in staging.rglob("*") if p.is_file())
        card = Card.new(
            "data",
            made_by=f"kit data sample {domain}",
            domain=domain,
            images=len(manifest),
            base_images=len(bases),
            eval_items=len(questions),
            eval_closed=n_closed,
            eval_closed_yes=n_yes,
            eval_open=len(questions) - n_closed,
            sources={base.id: base.origin for base in bases},
            skipped=skipped,
            content_sha256=hash_files(written),
        )
        card.write(staging)
    return card
