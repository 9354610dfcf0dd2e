"""`kit generate`: instruction data from images' symbolic descriptions, written by a text-only LLM.

Checks every option against the source before anything is read or written, then reads the
records and runs the resumable engine (kit.generate.runner).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kit.core import options
from kit.core.errors import KitError
from kit.data.reviewed import SOURCES_FILE
from kit.generate.replicas import backend_for
from kit.generate.ledger import LEDGER
from kit.generate.report import Summary, failures_error
from kit.generate.runner import run_generation
from kit.generate.settings import GenerationSettings, check_privacy
from kit.ingest.records import Record
from kit.ingest.sources import SOURCES, load_records


def generate_command(source: str, input: Path, out: Path, *, backend: str = options.GENERATE_BACKEND, model: str | None = None,
                     base_url: list[str] | str | None = None, force: bool = False, echo: Callable[[str], None] = print,
                     **choices: Any) -> Summary:
    """Read records from `source`, generate, and write data.json, rejects.jsonl, summary.json,
    ledger.jsonl and kit.json into `out`; rerunning the same command resumes. `force` replaces
    what an earlier kit generate wrote into `out` instead of resuming it. `choices`: where the
    records come from (SourceInput's images, instances, public, burned_in_checked) and how the run
    goes (GenerationSettings' fields, `grounding` and `vocab` included).

    Raises KitError, before `out` is created, for an unknown source, type, domain or backend, a
    flag that does not fit the source, an `out` that holds files but is not a kit generate folder,
    or DICOM input bound for a remote backend without `allow_remote`; whatever the source reader
    and `run_generation` raise; and, after writing what finished, when any task failed for good
    (exit status 1: rerunning the same command retries those).
    """
    where = SourceInput(source, Path(input), **{k: choices.pop(k) for k in SOURCE_OPTIONS if k in choices})
    settings = GenerationSettings(**choices)
    engine = backend_for(backend, model, base_url, timeout=settings.timeout)
    if where.kind == "dicom":
        # DICOM records are always private; refuse before converting anything into `out`.
        check_privacy(engine, settings.allow_remote, "DICOM records")
    out = Path(out)
    if not settings.dry_run:
        prepare_out(out, force)
    with where.records(out, dry_run=settings.dry_run, echo=echo) as records:
        summary = run_generation(records, out, backend=engine, settings=settings, echo=echo)
    failed = None if settings.dry_run else failures_error(summary)
    if failed is not None:
        raise failed
    return summary


SOURCE_OPTIONS = ("images", "instances", "public", "burned_in_checked")


@dataclass(frozen=True)
class SourceInput:
    """Where `kit generate` reads its records: the source kind, its input, and the options only some
    sources take (checked when made)."""

    kind: str
    input: Path
    images: Path | None = None
    instances: Path | None = None
    public: bool = False
    burned_in_checked: bool = False

    def __post_init__(self) -> None:
        if self.kind not in SOURCES:
            raise KitError(f"unknown source '{self.kind}'; choose one of: {', '.join(SOURCES)}")
        if self.kind in ("coco", "figures") and self.images is None:
            raise KitError(f"--images is required for --source {self.kind}: the folder the image paths are relative to")
        if self.kind not in ("coco", "figures") and self.images is not None:
            raise KitError(f"--images applies only to --source coco and figures; {self.kind} input names its own images")
        if self.instances is not None and self.kind != "coco":
            raise KitError("--instances applies only to --source coco")

    @contextlib.contextmanager
    def records(self, out: Path, *, dry_run: bool, echo: Callable[[str], None]) -> Iterator[list[Record]]:
        """The records; DICOM images rendered into out/dicom, or for a dry run into a temporary
        folder that is gone afterwards (a dry run leaves nothing behind)."""
        with contextlib.ExitStack() as stack:
            work = out / "dicom"
            if self.kind == "dicom" and dry_run:
                work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kit-generate-dry-")))
            yield load_records(self.kind, self.input, work, images=self.images, instances=self.instances, public=self.public,
                               burned_in_checked=self.burned_in_checked, echo=echo, salt_for=out / "dicom")


# What kit generate writes into --out; --force removes these and nothing else.
WRITTEN = ("data.json", "kit.json", "summary.json", "rejects.jsonl", "flagged.jsonl", SOURCES_FILE, LEDGER, "dicom")


def prepare_out(out: Path, force: bool) -> None:
    """Make sure generating into `out` overwrites nothing of the user's: a new or empty folder, or
    one an earlier kit generate wrote (its ledger is there: the run resumes, or with `force`
    starts over). Raises KitError otherwise."""
    if out.exists() and not out.is_dir():
        raise KitError(f"--out {out} is a file; give a folder path")
    if not out.is_dir() or not any(out.iterdir()):
        return
    # A DICOM run renders its images into out/dicom before the ledger exists.
    if not (out / LEDGER).is_file() and {p.name for p in out.iterdir()} != {"dicom"}:
        raise KitError(f"--out {out} already holds files and is not a kit generate folder (no {LEDGER}); choose a new or empty "
                       "folder (--force replaces only what kit generate wrote)")
    if force:
        for name in WRITTEN:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
