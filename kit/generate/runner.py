"""The `kit generate` engine: records x response types -> LLaVA instruction samples.

Every finished task is one fsynced line in `out_dir/ledger.jsonl` (kit.generate.ledger), so a
killed run resumes where it stopped. The outputs (`data.json`, `rejects.jsonl`, `summary.json`,
`kit.json`) are rebuilt from the ledger at the end of every run, written atomically
(kit.generate.report).
"""

from __future__ import annotations

import asyncio
import random
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from kit.core.errors import KitError
from kit.generate import parse, prompts
from kit.generate.backends import Backend, BackendError, Completion
from kit.generate.ledger import LEDGER, Ledger, request_key
from kit.generate.report import Summary, estimate_dry_run, finalise, price_for, summary_table, write_summary
from kit.generate.settings import GenerationSettings, check_privacy, private_records
from kit.ingest.records import Record, image_folder_for


@dataclass
class _Task:
    id: str
    record: Record
    rtype: str
    seed: int
    request: str = ""  # hash of what is sent for it (kit.generate.ledger.request_key)


def _task_seed(seed: int, task_id: str) -> int:
    # From the task id, not its position: a resumed or re-limited run samples each task the same way.
    return (seed * 1_000_003 + zlib.crc32(task_id.encode())) % (2**31 - 1)


def _build_tasks(records: list[Record], types: list[str], seed: int) -> list[_Task]:
    seen: set[str] = set()
    tasks = []
    for r in records:
        if r.id in seen:
            raise KitError(f"two records share the id '{r.id}' ({r.source or r.image}); record ids must be unique")
        seen.add(r.id)
        for t in types:
            tid = f"{r.id}-{t}"
            tasks.append(_Task(tid, r, t, seed=_task_seed(seed, tid)))
    return tasks


def run_generation(records: Iterable[Record], out_dir: Path, *, backend: Backend, settings: GenerationSettings | None = None,
                   echo: Callable[[str], None] = print, **fields: Any) -> Summary:
    """Generate one sample per (record, type), resuming from `out_dir/ledger.jsonl` if present.
    `settings` (or its fields given as keywords) say how (kit.generate.settings).

    Raises KitError before any request when private records would go to a non-loopback backend
    without `allow_remote`, for bad settings, duplicate record ids or an unreadable ledger, and
    mid-run for problems no retry fixes (bad API key, unknown model); finished tasks stay in the
    ledger, so rerunning the same command resumes. The settings' `grounding` decides what happens
    to conversations whose claims the record's facts do not support (kit.ground).
    """
    if settings is not None and fields:
        raise TypeError(f"run_generation: give settings or its fields, not both ({', '.join(fields)})")
    settings = settings or GenerationSettings(**fields)
    records = list(records)
    if settings.limit is not None:
        records = records[:settings.limit]
    # Privacy before anything else: no estimate, file or client exists yet.
    check_privacy(backend, settings.allow_remote, private_records(records))
    if not records:
        raise KitError("no records to generate from; check the input file and image folder")
    domain, types, dry_run = settings.domain, list(settings.types), settings.dry_run
    out_dir = Path(out_dir)
    tasks = _build_tasks(records, types, settings.seed)
    ppm = price_for(backend, settings.price)

    ledger, pending = _resume(out_dir, tasks, backend, settings=settings, echo=echo)
    if dry_run:
        return estimate_dry_run(tasks, pending, domain, backend=backend, ppm=ppm, max_tokens=settings.max_tokens, out_dir=out_dir, echo=echo)

    backend.check()
    prompts.build_messages(tasks[0].record, tasks[0].rtype, domain)  # an unknown domain fails here, before out_dir exists
    out_dir.mkdir(parents=True, exist_ok=True)
    image_root = image_folder_for(records, out_dir)
    run = _Run(backend=backend, ledger=ledger, settings=settings)
    for entry in ledger.entries.values():
        if entry["status"] == "ok" and entry.get("fingerprint"):
            run.fingerprints.setdefault(entry["fingerprint"], entry["task"])
    start = time.monotonic()
    try:
        asyncio.run(run.run(pending, total=len(tasks), progress=settings.progress))
    finally:
        ledger.close()
    summary = finalise(tasks, ledger, out_dir, backend=backend, ppm=ppm, image_root=image_root, domain=domain, types=types,
                       requests=run.requests, seconds=time.monotonic() - start, grounding=settings.grounding)
    summary.resumed = len(tasks) - len(pending)
    write_summary(out_dir, summary, tasks, ledger=ledger)
    extra = sum(1 for k in ledger.entries if k not in {t.id for t in tasks})
    if extra:
        echo(f"note: {extra} finished tasks in {ledger.path} are outside this run's records/types and are not in data.json")
    echo(summary_table(summary))
    return summary


def _resume(out_dir: Path, tasks: list[_Task], backend: Backend, settings: GenerationSettings,
            echo: Callable[[str], None]) -> tuple[Ledger, list[_Task]]:
    """The run's ledger, loaded, and the tasks it has not finished. A finished task is kept only
    while its request is unchanged: a corrected caption, another prompt set or another model is
    asked again (the old reply may quote what was corrected)."""
    ledger = Ledger(out_dir / LEDGER)
    ledger.load(repair=not settings.dry_run)
    for t in tasks:
        t.request = request_key(prompts.build_messages(t.record, t.rtype, settings.domain), backend)
    stale = {t.id for t in tasks if t.id in ledger.entries and ledger.entries[t.id].get("request") != t.request}
    for tid in stale:
        ledger.entries.pop(tid)
    if stale and not settings.dry_run:
        echo(f"{len(stale)} finished tasks were asked with other inputs (captions, findings, prompts or model changed): asked again")
    return ledger, [t for t in tasks if t.id not in ledger.entries]


@dataclass(eq=False)
class _Run:
    backend: Backend
    ledger: Ledger
    settings: GenerationSettings
    fingerprints: dict[str, str] = field(default_factory=dict)
    requests: int = 0
    _rng: random.Random = field(default_factory=random.Random)
    _not_before: float = 0.0  # a Retry-After pauses every worker, not just the one that was told
    _progress: Any = None
    _bar: Any = None
    _unwritten: list[dict] = field(default_factory=list)
    _writer: asyncio.Future | None = None
    _write_error: Exception | None = None

    async def run(self, pending: list[_Task], *, total: int, progress: bool) -> None:
        batch = max(1, self.backend.batch_size)
        units = [pending[i : i + batch] for i in range(0, len(pending), batch)]
        # A batched backend is one in-process model: more than one batch at a time only queues on it.
        in_flight = self.settings.concurrency * max(1, self.backend.servers)
        workers = 1 if batch > 1 else min(in_flight, max(1, len(units)))
        semaphore = asyncio.Semaphore(in_flight)
        queue: asyncio.Queue[list[_Task]] = asyncio.Queue()
        for u in units:
            queue.put_nowait(u)
        if progress and units:
            self._progress = Progress(
                TextColumn("generate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._progress.start()
            self._bar = self._progress.add_task("generate", total=total, completed=total - len(pending))

        async def worker() -> None:
            while True:
                if self._write_error is not None:
                    raise self._write_error  # the ledger cannot be written: stop sending requests
                try:
                    unit = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                async with semaphore:
                    await self._do_unit(unit)

        running = [asyncio.ensure_future(worker()) for _ in range(workers)]
        try:
            await asyncio.gather(*running)
        finally:
            for r in running:
                r.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            # Whatever was answered is kept, even when stopping on an error.
            await self._flush_ledger()
            if self._progress is not None:
                self._progress.stop()
            await self.backend.aclose()

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(self.settings.backoff_cap, retry_after)
        # Full jitter: spreads retries of many workers that failed together.
        return self._rng.uniform(0, min(self.settings.backoff_cap, self.settings.backoff_base * 2**attempt))

    async def _request(self, unit: list[_Task], messages: list[list[dict]]) -> list[Completion]:
        loop = asyncio.get_running_loop()
        wait = self._not_before - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        self.requests += len(unit)
        kwargs = dict(max_tokens=self.settings.max_tokens, temperature=self.settings.temperature, seed=unit[0].seed)
        if len(unit) == 1 and self.backend.batch_size == 1:
            try:
                # Outer guard for backends without their own timeout; the OpenAI client times out first.
                return [await asyncio.wait_for(self.backend.complete(messages[0], **kwargs), self.settings.timeout + 1)]
            except asyncio.TimeoutError:
                raise BackendError("timeout", f"timeout: no reply within {self.settings.timeout:g}s", retryable=True) from None
        # A local model cannot be interrupted mid-batch, so no timeout here.
        return await self.backend.complete_batch(messages, **kwargs)

    async def _do_unit(self, unit: list[_Task]) -> None:
        messages = [prompts.build_messages(t.record, t.rtype, self.settings.domain) for t in unit]
        loop = asyncio.get_running_loop()
        reason, category = "not tried", "not tried"
        for attempt in range(self.settings.max_retries + 1):
            try:
                completions = await self._request(unit, messages)
            except BackendError as e:
                reason, category = e.reason, e.category
                if not e.retryable or attempt == self.settings.max_retries:
                    break
                if e.retry_after is not None:
                    self._not_before = max(self._not_before, loop.time() + min(self.settings.backoff_cap, e.retry_after))
                await asyncio.sleep(self._delay(attempt, e.retry_after))
                continue
            for task, c in zip(unit, completions):
                self._finish(task, self._judge(task, c))
            return
        for task in unit:
            self._finish(task, {"task": task.id, "status": "failed", "category": category, "reason": reason,
                                "attempts": attempt + 1})

    def _judge(self, task: _Task, c: Completion) -> dict:
        usage = {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens}
        entry: dict[str, Any] = {"task": task.id, "usage": usage}
        text = c.text
        if c.finish_reason == "length":
            # A conversation cut mid-round still holds whole rounds: every answer that a later
            # question follows is complete. Other types have no such boundary.
            text = parse.complete_rounds(text) if task.rtype == "conversation" else ""
            if not text:
                return {**entry, "status": "rejected", "category": "truncated",
                        "reason": f"truncated: reply hit max_tokens ({self.settings.max_tokens})", "raw": c.text}
        if c.finish_reason == "content_filter":
            return {**entry, "status": "rejected", "category": "content filter", "reason": "content filter: the server cut the reply",
                    "raw": c.text}
        try:
            # pick varies the detail instruction per task, reproducibly (the seed comes from the task id).
            turns = parse.parse_reply(task.rtype, text, pick=task.seed)
        except parse.Rejected as e:
            return {**entry, "status": "rejected", "category": e.category, "reason": e.reason, "raw": c.text}
        fp = parse.fingerprint(turns)
        if fp in self.fingerprints:
            return {**entry, "status": "rejected", "category": "duplicate", "reason": f"duplicate: same text as {self.fingerprints[fp]}",
                    "raw": c.text}
        self.fingerprints[fp] = task.id
        sample = parse.to_sample(task.record, task.rtype, turns)
        return {**entry, "status": "ok", "sample": sample, "fingerprint": fp}

    def _finish(self, task: _Task, entry: dict) -> None:
        """Queue the task's ledger line. The worker moves on at once; the task counts as finished
        (ledger entry, progress) only when the line is fsynced."""
        entry["request"] = task.request
        carried = self.ledger.carried_usage.get(task.id)
        usage = entry.setdefault("usage", {"prompt_tokens": 0, "completion_tokens": 0})
        if carried:
            for k, v in carried.items():
                usage[k] = usage.get(k, 0) + v
        self._unwritten.append(entry)
        if self._write_error is None and (self._writer is None or self._writer.done()):
            self._writer = asyncio.ensure_future(self._write_ledger())

    async def _write_ledger(self) -> None:
        # Group commit in a thread: one fsync covers every line that arrived while the previous
        # one ran, and the event loop keeps serving requests meanwhile.
        while self._unwritten:
            batch, self._unwritten = self._unwritten, []
            try:
                await asyncio.to_thread(self.ledger.write, batch)
            except Exception as e:
                self._write_error = e
                return
            for entry in batch:
                self.ledger.entries[entry["task"]] = entry
            if self._bar is not None:
                self._progress.advance(self._bar, len(batch))

    async def _flush_ledger(self) -> None:
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)
        if self._write_error is not None:
            raise KitError(f"cannot write {self.ledger.path}: {self._write_error}") from self._write_error


