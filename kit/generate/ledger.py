"""The generation ledger: one fsynced JSON line per finished task, so a killed run resumes where it
stopped. Finished tasks (ok or rejected) are skipped on resume while their request is unchanged
(`request`: a hash of the messages, backend and model); failed or changed ones are asked again, and
the newest line of a task is the one that counts."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kit.core.errors import KitError
from kit.core.files import write_jsonl_atomic

LEDGER = "ledger.jsonl"
FINAL = ("ok", "rejected")  # statuses a resume skips; "failed" is tried again


def request_key(messages: list[dict], backend) -> str:
    """What a task asks, as a hash: its messages (records' text and the prompt set), the backend
    kind and the model. Not the URL: the same local server on another port is the same request."""
    body = {"messages": messages, "backend": backend.request_kind(), "model": getattr(backend, "model", "")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class Ledger:
    """Append-only record of finished tasks, one JSON line each, fsynced before the task counts as done."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        self.carried_usage: dict[str, dict] = {}  # usage of failed attempts from earlier runs, so cost stays honest
        self._fh: Any = None

    def load(self, *, repair: bool) -> None:
        """Read finished tasks. With `repair`, cut a torn last line (kill -9 mid-write) and drop failed
        entries (they are retried), rewriting the file atomically so every task id appears once.
        Raises KitError if a line other than the last is unreadable."""
        if not self.path.is_file():
            return
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        dirty = lines[-1] != b""  # no trailing newline: the last write was cut short
        lines = lines[:-1]
        parsed: list[dict] = []
        for i, line in enumerate(lines):
            try:
                entry = json.loads(line)
                if not isinstance(entry, dict) or "task" not in entry or "status" not in entry:
                    raise ValueError("not a ledger entry")
            except ValueError:
                if i == len(lines) - 1 and not dirty:
                    dirty = True  # a torn write that happened to end in a newline byte
                    continue
                raise KitError(
                    f"{self.path}: line {i + 1} is not a ledger entry; remove that line (or the file, to start over)"
                ) from None
            parsed.append(entry)
        for entry in parsed:
            task = entry["task"]
            if entry["status"] in FINAL:
                if task in self.entries:
                    dirty = True  # asked again after its input changed: the newer line counts
                self.entries[task] = entry
            else:
                dirty = True
                usage = entry.get("usage") or {}
                carried = self.carried_usage.setdefault(task, {"prompt_tokens": 0, "completion_tokens": 0})
                for k in carried:
                    carried[k] += int(usage.get(k, 0))
        if repair and dirty:
            write_jsonl_atomic(self.path, self.entries.values(), durable=True)

    def write(self, entries: list[dict]) -> None:
        """Append entries and fsync once: a task is finished only when its line is on disk.
        Thread-safe for one writer at a time; does not touch `entries` (the event loop owns it)."""
        if self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8")
        self._fh.write("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
