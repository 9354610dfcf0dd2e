"""File helpers every stage shares: atomic files, staged output folders (no half-written file or
folder is ever visible) and JSON / JSONL reading with errors that name the file and line."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kit.core.errors import KitError


def cache_dir() -> Path:
    """kit's own cache (KIT_CACHE, else ~/.cache/kit): built bases, compiled wheels, DICOM id salts."""
    return Path(os.environ.get("KIT_CACHE", Path.home() / ".cache" / "kit"))

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the `kit` package folder
ASSETS = PACKAGE_ROOT / "assets"
STAGING_MARK = ".kit-staging-"  # in the name of every staged folder: `.{name}.kit-staging-{pid}-{random}`


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Replace `path` via a temp file beside it (same filesystem, so the rename is atomic).
    `durable` also survives power loss (fsync of file and folder): for ledgers, not outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs stay readable like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def write_json_atomic(path: Path, data: Any, indent: int = 2) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=indent, default=str) + "\n").encode("utf-8"))


def write_jsonl_atomic(path: Path, rows: Iterable[dict], *, durable: bool = False) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_bytes_atomic(path, text.encode("utf-8"), durable=durable)


# ------------------------------------------------------------------------------ staged folders


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale_staging(parent: Path, name: str) -> None:
    """Remove staged folders for `name` left in `parent` by processes that died (kill -9, power loss).
    A folder whose process still runs is another build in progress and stays."""
    for p in Path(parent).glob(f".{name}{STAGING_MARK}*"):
        pid = p.name.rsplit(STAGING_MARK, 1)[1].split("-", 1)[0]
        if p.is_dir() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


@contextmanager
def staged_folder(out: Path, *, replace: bool = False, keep_existing: bool = False) -> Iterator[Path]:
    """A temp folder beside `out` that becomes `out` when the block ends cleanly.

    On any error the temp folder is removed, with the parent folders this created, so a failed
    write leaves nothing. When `out` exists at the end: an empty folder is replaced; with `replace`
    a non-empty one is too (the old contents are deleted only after the rename); with
    `keep_existing` the new folder is discarded (another process built the same thing first, e.g.
    a cache entry); otherwise KitError. Stale temp folders of dead processes are swept first.
    """
    out = Path(out)
    created = [p for p in reversed(out.absolute().parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_staging(out.parent, out.name)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}{STAGING_MARK}{os.getpid()}-"))
    tmp.chmod(0o755)  # mkdtemp's 0700 would otherwise become the output's mode
    try:
        yield tmp
        old = None
        if out.exists():
            if keep_existing:
                shutil.rmtree(tmp, ignore_errors=True)
                return
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()  # rename cannot replace a folder on every platform
            elif replace:
                old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}{STAGING_MARK}{os.getpid()}-old-"))
                os.replace(out, old / "x")
            else:
                raise KitError(f"{out} appeared while it was being written; choose another folder")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in reversed(created):
            try:
                p.rmdir()
            except OSError:
                break
        raise


# ---------------------------------------------------------------------------------- reading


def _decode(path: Path, what: str) -> str:
    return decode_bytes(path.read_bytes(), path, what)


def read_json(path: Path, what: str, *, expect: type | None = dict, fix: str = "fix the file") -> Any:
    """The JSON value in `path`. Raises KitError naming `file:line` for invalid JSON, and the file
    for non-UTF-8 text or a top-level value that is not an `expect` (None: anything)."""
    path = Path(path)
    return parse_json_text(_decode(path, what), path, what, expect=expect, fix=fix)


def decode_bytes(raw: bytes, path: Path, what: str) -> str:
    """`raw` (read from `path`) as UTF-8 text; KitError naming the file otherwise."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise KitError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the {what} as UTF-8") from None


def parse_json_text(text: str, path: Path, what: str, *, expect: type | None = dict, fix: str = "fix the file") -> Any:
    """read_json for text already read from `path` (for files whose bytes are needed besides)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise KitError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}); {fix}") from None
    if expect is not None and not isinstance(data, expect):
        kind = {dict: "a JSON object", list: "a JSON list"}.get(expect, expect.__name__)
        raise KitError(f"{path}: expected {kind} in the {what}, got {type(data).__name__}")
    return data


def read_jsonl(path: Path, what: str, allow_empty: bool = False) -> list[tuple[int, dict[str, Any]]]:
    """Non-blank lines as (line number, object). Raises KitError naming `file:line` for a line that
    is not a JSON object, for non-UTF-8 text and (unless `allow_empty`) for an empty file."""
    path = Path(path)
    rows: list[tuple[int, dict[str, Any]]] = []
    for lineno, line in enumerate(_decode(path, what).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise KitError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); fix or remove the line") from None
        if not isinstance(obj, dict):
            raise KitError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
        rows.append((lineno, obj))
    if not rows and not allow_empty:
        raise KitError(f"{path} is empty; add one JSON object per line (see the {what} layout in the docs)")
    return rows
