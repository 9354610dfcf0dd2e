"""File helpers every module shares: atomic writes (no half-written file is ever visible) and
JSONL reading with errors that name the file and line."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kit.core.errors import KitError

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the `kit` package folder
ASSETS = PACKAGE_ROOT / "assets"


def _fsync_dir(folder: Path) -> None:
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
        _fsync_dir(path.parent)


def write_json_atomic(path: Path, data: Any, indent: int = 2) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=indent, default=str) + "\n").encode("utf-8"))


def write_jsonl_atomic(path: Path, rows: Iterable[dict], *, durable: bool = False) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_bytes_atomic(path, text.encode("utf-8"), durable=durable)


def read_jsonl(path: Path, what: str, allow_empty: bool = False) -> list[tuple[int, dict[str, Any]]]:
    """Non-blank lines as (line number, object). Raises KitError naming `file:line` for a line that
    is not a JSON object, for non-UTF-8 text and (unless `allow_empty`) for an empty file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise KitError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the {what} as UTF-8") from None
    rows: list[tuple[int, dict[str, Any]]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
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
