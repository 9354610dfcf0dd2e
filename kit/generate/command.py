"""`kit generate`: instruction data from images' symbolic descriptions, written by a text-only LLM.

Checks every option against the source before anything is read or written, then reads the
records and runs the resumable engine (kit.generate.runner).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from kit.core import options
from kit.core.errors import KitError
from kit.data.reviewed import SOURCES_FILE
from kit.generate.replicas import backend_for
from kit.generate.ledger import LEDGER
from kit.generate.prompts import load_domain
from kit.generate.report import Summary, failures_error
from kit.generate.runner import run_generation
from kit.generate.settings import GenerationSettings, check_privacy
from kit.ground.policy import resolve_grounding
from kit.ingest.sources import SOURCES, load_records


def generate_command(
    source: str,
    input: Path,
    out: Path,
    images: Path | None = None,
    instances: Path | None = None,
    types: str = ",".join(options.GENERATE_TYPES),
    domain: str = options.GENERATE_DOMAIN,
    backend: str = options.GENERATE_BACKEND,
    model: str | None = None,
    base_url: list[str] | str | None = None,
    concurrency: int = options.GENERATE_CONCURRENCY,
    limit: int | None = None,
    seed: int = 0,
    dry_run: bool = False,
    allow_remote: bool = False,
    max_tokens: int = options.GENERATE_MAX_TOKENS,
    temperature: float = options.GENERATE_TEMPERATURE,
    *,
    timeout: float = 60,
    echo: Callable[[str], None] = print,
    progress: bool = True,
    public: bool = False,
    burned_in_checked: bool = False,
    force: bool = False,
    grounding: str = options.GROUNDING[0],
    vocab: str | None = None,
) -> Summary:
    """Read records from `source`, generate, and write data.json, rejects.jsonl, summary.json,
    ledger.jsonl and kit.json into `out`; rerunning the same command resumes. `force` replaces
    what an earlier kit generate wrote into `out` instead of resuming it. `grounding` and `vocab`
    set the claim check (kit.ground.policy.resolve_grounding).

    Raises KitError, before `out` is created, for an unknown source, type, domain or backend, a
    flag that does not fit the source, an `out` that holds files but is not a kit generate folder,
    or DICOM input bound for a remote backend without `allow_remote`; whatever the source reader
    and `run_generation` raise; and, after writing what finished, when any task failed for good
    (exit status 1: rerunning the same command retries those).
    """
    if source not in SOURCES:
        raise KitError(f"unknown source '{source}'; choose one of: {', '.join(SOURCES)}")
    load_domain(domain)  # an unknown or incomplete prompt set fails before anything is read
    settings = GenerationSettings(
        types=types, domain=domain, concurrency=concurrency, timeout=timeout, limit=limit, seed=seed,
        temperature=temperature, max_tokens=max_tokens, allow_remote=allow_remote, dry_run=dry_run, progress=progress,
        grounding=resolve_grounding(grounding, vocab, domain),
    )
    if source in ("coco", "figures") and images is None:
        raise KitError(f"--images is required for --source {source}: the folder the image paths are relative to")
    if source not in ("coco", "figures") and images is not None:
        raise KitError(f"--images applies only to --source coco and figures; {source} input names its own images")
    if instances is not None and source != "coco":
        raise KitError("--instances applies only to --source coco")
    engine = backend_for(backend, model, base_url, timeout=timeout)
    if source == "dicom":
        # DICOM records are always private; refuse before converting anything into `out`.
        check_privacy(engine, allow_remote, "DICOM records")

    input, out = Path(input), Path(out)
    if not dry_run:
        prepare_out(out, force)
    # A DICOM dry run leaves nothing behind: the converted PNGs go to a temporary folder.
    scratch = tempfile.TemporaryDirectory(prefix="kit-generate-dry-") if source == "dicom" and dry_run else None
    records = load_records(source, input, Path(scratch.name) if scratch else out / "dicom", images=images, instances=instances, public=public,
                           burned_in_checked=burned_in_checked, echo=echo, salt_for=out / "dicom")
    try:
        summary = run_generation(records, out, backend=engine, settings=settings, echo=echo)
    finally:
        if scratch is not None:
            scratch.cleanup()
    failed = None if dry_run else failures_error(summary)
    if failed is not None:
        raise failed
    return summary


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
