"""`kit review DIR`: serve the review page until interrupted; `kit review DIR --export OUT.json`:
write what should train (kit.data.reviewed's rule) as a LLaVA JSON file."""

from __future__ import annotations

from pathlib import Path

from kit.core import options
from kit.core.cards import Card
from kit.core.errors import KitError
from kit.core.files import write_json_atomic
from kit.core.http import allowed_hosts, bind, require_key_off_loopback, resolve_key
from kit.data.reviewed import ReviewCounts, is_generated_folder, reviewed_samples
from kit.review.app import create_app
from kit.review.folder import ReviewFolder


def serve_review(folder: Path, host: str = options.SERVE_HOST, port: int = options.REVIEW_PORT, api_key: str | None = None,
                 api_key_file: Path | None = None, vocab: str | None = None, echo=print) -> None:
    """Load the folder, bind, and serve the page. KitError for a folder that is not a generated
    one, a bad decisions file, or an address other machines can reach without a key."""
    import uvicorn  # the export path does not need it

    api_key = resolve_key(api_key, api_key_file)
    local = require_key_off_loopback(host, api_key)
    review = ReviewFolder(folder, vocab)
    sock = bind(host, port)
    try:
        app = create_app(review, hosts=allowed_hosts(host), api_key=api_key)
        if not local:
            echo(f"warning: listening on {host}, reachable from other machines: with the key they can read and decide "
                 f"on the conversations and images of {folder}")
        decided = len(review.decisions)
        checked = (f"claims checked with the '{review.vocab.source}' vocabulary" if review.checks_claims
                   else "claims not checked: " + review.summary()["why_unchecked"])
        echo(f"reviewing {len(review.items)} conversations in {folder} ({decided} decided; {checked})")
        echo(f"review page at http://{'[' + host + ']' if ':' in host else host}:{sock.getsockname()[1]}/ (Ctrl-C stops; "
             f"every decision is saved to {review.log.path} as it is made)")
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    finally:
        sock.close()


def export_reviewed(folder: Path, out: Path, undecided: str = "exclude", force: bool = False) -> tuple[ReviewCounts, str | None]:
    """Write the conversations that should train to `out` (LLaVA JSON, image paths as in
    data.json) and, when `out`'s folder has no card of its own, a data card naming the image folder
    so `kit finetune --data OUT` finds the images. Returns the counts and a note when another
    card there names another image folder. KitError for an existing `out` without `force`."""
    folder, out = Path(folder), Path(out)
    if not is_generated_folder(folder):
        raise KitError(f"{folder} has no data.json; give a kit generate output folder")
    if out.suffix != ".json":
        raise KitError(f"--export {out}: give a .json file name (LLaVA JSON)")
    if out.is_dir():
        raise KitError(f"--export {out} is a folder; give a .json file name")
    if out.resolve() == (folder / "data.json").resolve():
        raise KitError(f"--export {out} is the generated data.json, which a review never changes; choose another name")
    if out.exists() and not force:
        raise KitError(f"--export {out} already exists; choose another name or pass --force to replace it")
    reviewed = reviewed_samples(folder, undecided)
    source = Card.read(folder)
    images = (Path(source.image_folder) if source and source.image_folder else folder).resolve()
    here = Card.read(out.parent) if out.parent.is_dir() else None
    write_json_atomic(out, reviewed.samples)
    note = None
    if here is None:
        Card.new("data", made_by="kit review", image_folder=str(images), files=[out.name],
                 review={**reviewed.counts.to_json(), "folder": str(folder.resolve())}).write(out.parent)
    elif Path(here.image_folder or out.parent).resolve() != images:
        note = (f"{out.parent / 'kit.json'} names another image folder; train {out.name} with "
                f"--set data.image_folder={images}")
    return reviewed.counts, note
