"""The `kit generate` engine: records x response types -> LLaVA instruction samples.

Every finished task is one fsynced line in `out_dir/ledger.jsonl`, so a killed run resumes where it
stopped: finished tasks (ok or rejected) are skipped, failed ones are tried again. The outputs
(`data.json`, `rejects.jsonl`, `summary.json`, `kit.json`) are rebuilt from the ledger at the end
of every run, written atomically.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kit.core import cards
from kit.core.errors import KitError
from kit.core.files import write_jsonl_atomic
from kit.generate.backends import Backend, BackendError, Completion
from kit.ingest.records import TYPES, Record, image_folder_for

LEDGER = "ledger.jsonl"
FINAL = ("ok", "rejected")  # statuses a resume skips; "failed" is tried again

# USD per 1M (input, output) tokens; a snapshot like gpt-4o-2024-08-06 prices as its family.
PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
}
# Rough reply lengths for the estimate: a multi-turn conversation is the longest.
EST_COMPLETION = {"conversation": 450, "detail": 250, "complex": 350}


@dataclass
class Summary:
    out_dir: Path
    tasks: int
    generated: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    pending: int = 0  # not finished (only after a fatal stop; a dry run counts everything not yet done)
    resumed: int = 0  # finished in an earlier run and skipped
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float | None = 0.0  # USD; None when the model's price is unknown
    requests: int = 0  # requests sent in this run, retries included
    seconds: float = 0.0
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        return d


@dataclass
class _Task:
    id: str
    record: Record
    rtype: str
    seed: int


def price_for(backend: Backend, price: tuple[float, float] | None) -> tuple[float, float] | None:
    """USD per 1M (input, output) tokens: the given price, 0 for local backends, the table, or None (unknown)."""
    if price is not None:
        return (float(price[0]), float(price[1]))
    if not backend.is_remote:
        return (0.0, 0.0)
    model = backend.model
    if model in PRICES:
        return PRICES[model]
    family = [k for k in PRICES if model.startswith(k + "-") and model[len(k) + 1 : len(k) + 2].isdigit()]
    return PRICES[max(family, key=len)] if family else None


def _cost(p: tuple[float, float] | None, prompt: int, completion: int) -> float | None:
    return None if p is None else round((prompt * p[0] + completion * p[1]) / 1e6, 6)


def _task_seed(seed: int, task_id: str) -> int:
    # From the task id, not its position: a resumed or re-limited run samples each task the same way.
    return (seed * 1_000_003 + zlib.crc32(task_id.encode())) % (2**31 - 1)


def _category(reason: str) -> str:
    return reason.split(":", 1)[0].strip() or "unknown"






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
                    dirty = True
                    continue
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


def _render_table(title: str, rows: list[tuple[str, str]]) -> str:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for k, v in rows:
        table.add_row(k, v)
    buf = io.StringIO()
    Console(file=buf, width=100, force_terminal=False, color_system=None).print(table)
    return buf.getvalue().rstrip("\n")


def _fmt_cost(cost: float | None) -> str:
    if cost is None:
        return "unknown (no price known for this model)"
    return "$0" if cost == 0 else f"${cost:,.4f}"


def _privacy_check(records: list[Record], backend: Backend, allow_remote: bool) -> None:
    private = sum(1 for r in records if r.private)
    if private and backend.is_remote and not allow_remote:
        host = getattr(backend, "host", None) or backend.describe()
        raise KitError(
            f"{private} of {len(records)} records are private and the backend sends text to {host}: their captions, "
            f"findings, box labels and coordinates and metadata text (never pixels) would leave this machine; "
            f"use a local backend (--backend hf, or --base-url http://127.0.0.1:...) or pass --allow-remote"
        )


def _build_tasks(records: list[Record], types: list[str], seed: int) -> list[_Task]:
    seen: set[str] = set()
    tasks = []
    for r in records:
        if r.id in seen:
            raise KitError(f"two records share the id '{r.id}' ({r.source or r.image}); record ids must be unique")
        seen.add(r.id)
        for t in types:
            tid = f"{r.id}-{t}"
            tasks.append(_Task(tid, r, t, _task_seed(seed, tid)))
    return tasks


def validate_types(types: Iterable[str] | str) -> list[str]:
    """"a,b" or a list -> known response types in order, without repeats. Raises KitError naming an unknown type."""
    if isinstance(types, str):
        types = [t.strip() for t in types.split(",") if t.strip()]
    out = []
    for t in types:
        if t not in TYPES:
            raise KitError(f"unknown response type '{t}'; choose from: {', '.join(TYPES)}")
        if t not in out:
            out.append(t)
    if not out:
        raise KitError(f"no response types given; choose from: {', '.join(TYPES)}")
    return out


def _modules():
    # Imported at run time: prompts and parse are separate modules that tests may stand in for.
    import importlib

    return importlib.import_module("kit.generate.prompts"), importlib.import_module("kit.generate.parse")


def run_generation(
    records: Iterable[Record],
    out_dir: Path,
    *,
    types: Iterable[str] | str = TYPES,
    domain: str = "general",
    backend: Backend,
    concurrency: int = 8,
    max_retries: int = 6,
    timeout: float = 60,
    limit: int | None = None,
    seed: int = 0,
    temperature: float = 0.7,
    max_tokens: int = 1024,
    allow_remote: bool = False,
    dry_run: bool = False,
    price: tuple[float, float] | None = None,
    echo: Callable[[str], None] = print,
    progress: bool = True,
    backoff_base: float = 1.0,
    backoff_cap: float = 60.0,
) -> Summary:
    """Generate one sample per (record, type), resuming from `out_dir/ledger.jsonl` if present.

    Raises KitError before any request when private records would go to a non-loopback backend
    without `allow_remote`, for bad arguments, duplicate record ids or an unreadable ledger, and
    mid-run for problems no retry fixes (bad API key, unknown model); finished tasks stay in the
    ledger, so rerunning the same command resumes.
    """
    records = list(records)
    if limit is not None:
        if limit < 1:
            raise KitError(f"--limit must be at least 1 (got {limit})")
        records = records[:limit]
    # Privacy before anything else: no estimate, file or client exists yet.
    _privacy_check(records, backend, allow_remote)
    if not records:
        raise KitError("no records to generate from; check the input file and image folder")
    types = validate_types(types)
    if concurrency < 1:
        raise KitError(f"--concurrency must be at least 1 (got {concurrency})")
    if max_retries < 0:
        raise KitError(f"max_retries must be 0 or more (got {max_retries})")
    prompts, parse = _modules()
    out_dir = Path(out_dir)
    tasks = _build_tasks(records, types, seed)
    ppm = price_for(backend, price)

    ledger = Ledger(out_dir / LEDGER)
    ledger.load(repair=not dry_run)
    pending = [t for t in tasks if t.id not in ledger.entries]

    if dry_run:
        return _dry_run(tasks, pending, prompts, domain, backend, ppm, max_tokens, out_dir, echo)

    backend.check()
    prompts.build_messages(tasks[0].record, tasks[0].rtype, domain)  # an unknown domain fails here, before out_dir exists
    out_dir.mkdir(parents=True, exist_ok=True)
    image_root = image_folder_for(records, out_dir)
    run = _Run(
        backend=backend, ledger=ledger, prompts=prompts, parse=parse, domain=domain,
        concurrency=concurrency, max_retries=max_retries, timeout=timeout, temperature=temperature,
        max_tokens=max_tokens, backoff_base=backoff_base, backoff_cap=backoff_cap,
    )
    for entry in ledger.entries.values():
        if entry["status"] == "ok" and entry.get("fingerprint"):
            run.fingerprints.setdefault(entry["fingerprint"], entry["task"])
    start = time.monotonic()
    try:
        asyncio.run(run.run(pending, total=len(tasks), progress=progress))
    finally:
        ledger.close()
    summary = _finalise(tasks, ledger, out_dir, backend, ppm, image_root, domain, types, run.requests, time.monotonic() - start)
    summary.resumed = len(tasks) - len(pending)
    write_summary(out_dir, summary, tasks, ledger)
    extra = sum(1 for k in ledger.entries if k not in {t.id for t in tasks})
    if extra:
        echo(f"note: {extra} finished tasks in {ledger.path} are outside this run's records/types and are not in data.json")
    echo(summary_table(summary))
    return summary


def _dry_run(tasks, pending, prompts, domain, backend, ppm, max_tokens, out_dir, echo) -> Summary:
    est_prompt = est_completion = 0
    first_messages = None
    for t in pending:
        messages = prompts.build_messages(t.record, t.rtype, domain)
        if first_messages is None:
            first_messages = (t.id, messages)
        # ~4 characters per token for English; a few tokens of chat framing per message.
        est_prompt += sum(len(str(m.get("content", ""))) for m in messages) // 4 + 4 * len(messages)
        est_completion += min(max_tokens, EST_COMPLETION.get(t.rtype, 300))
    if first_messages is not None:
        tid, messages = first_messages
        echo(f"First task {tid}: the complete request that would be sent to {backend.describe()}")
        for m in messages:
            echo(f"--- {m.get('role')} ---\n{m.get('content')}")
    else:
        echo(f"All {len(tasks)} tasks are already finished in {out_dir / LEDGER}; nothing would be sent.")
    cost = _cost(ppm, est_prompt, est_completion)
    echo(
        _render_table(
            "Dry run: nothing sent",
            [
                ("backend", backend.describe()),
                ("tasks", f"{len(pending):,} to run ({len(tasks) - len(pending):,} already done)"),
                ("est. prompt tokens", f"{est_prompt:,}"),
                ("est. completion tokens", f"{est_completion:,}"),
                ("est. cost", "$0 (local)" if not backend.is_remote and ppm == (0.0, 0.0) else _fmt_cost(cost)),
            ],
        )
    )
    return Summary(
        out_dir=out_dir, tasks=len(tasks), pending=len(pending), resumed=len(tasks) - len(pending),
        prompt_tokens=est_prompt, completion_tokens=est_completion, cost=cost, dry_run=True,
    )


@dataclass(eq=False)
class _Run:
    backend: Backend
    ledger: Ledger
    prompts: Any
    parse: Any
    domain: str
    concurrency: int
    max_retries: int
    timeout: float
    temperature: float
    max_tokens: int
    backoff_base: float
    backoff_cap: float
    fingerprints: dict[str, str] = field(default_factory=dict)
    requests: int = 0
    _rng: random.Random = field(default_factory=random.Random)
    _not_before: float = 0.0  # a Retry-After pauses every worker, not just the one that was told
    _progress: Any = None
    _bar: Any = None
    _takes_pick: bool | None = None
    _unwritten: list[dict] = field(default_factory=list)
    _writer: asyncio.Future | None = None
    _write_error: Exception | None = None

    async def run(self, pending: list[_Task], *, total: int, progress: bool) -> None:
        batch = max(1, self.backend.batch_size)
        units = [pending[i : i + batch] for i in range(0, len(pending), batch)]
        # A batched backend is one in-process model: more than one batch at a time only queues on it.
        workers = 1 if batch > 1 else min(self.concurrency, max(1, len(units)))
        semaphore = asyncio.Semaphore(self.concurrency)
        queue: asyncio.Queue[list[_Task]] = asyncio.Queue()
        for u in units:
            queue.put_nowait(u)
        if progress and units:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

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
            return min(self.backoff_cap, retry_after)
        # Full jitter: spreads retries of many workers that failed together.
        return self._rng.uniform(0, min(self.backoff_cap, self.backoff_base * 2**attempt))

    async def _request(self, unit: list[_Task], messages: list[list[dict]]) -> list[Completion]:
        loop = asyncio.get_running_loop()
        wait = self._not_before - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        self.requests += len(unit)
        kwargs = dict(max_tokens=self.max_tokens, temperature=self.temperature, seed=unit[0].seed)
        if len(unit) == 1 and self.backend.batch_size == 1:
            try:
                # Outer guard for backends without their own timeout; the OpenAI client times out first.
                return [await asyncio.wait_for(self.backend.complete(messages[0], **kwargs), self.timeout + 1)]
            except asyncio.TimeoutError:
                raise BackendError(f"timeout: no reply within {self.timeout:g}s", retryable=True) from None
        # A local model cannot be interrupted mid-batch, so no timeout here.
        return await self.backend.complete_batch(messages, **kwargs)

    async def _do_unit(self, unit: list[_Task]) -> None:
        messages = [self.prompts.build_messages(t.record, t.rtype, self.domain) for t in unit]
        loop = asyncio.get_running_loop()
        reason = "not tried"
        for attempt in range(self.max_retries + 1):
            try:
                completions = await self._request(unit, messages)
            except BackendError as e:
                reason = e.reason
                if not e.retryable or attempt == self.max_retries:
                    break
                if e.retry_after is not None:
                    self._not_before = max(self._not_before, loop.time() + min(self.backoff_cap, e.retry_after))
                await asyncio.sleep(self._delay(attempt, e.retry_after))
                continue
            for task, c in zip(unit, completions):
                self._finish(task, self._judge(task, c))
            return
        for task in unit:
            self._finish(task, {"task": task.id, "status": "failed", "reason": reason, "attempts": attempt + 1})

    def _parse_reply(self, task: _Task, text: str) -> list:
        if self._takes_pick is None:
            import inspect

            self._takes_pick = "pick" in inspect.signature(self.parse.parse_reply).parameters
        if self._takes_pick:
            # Varies the detail instruction per task, reproducibly (the seed comes from the task id).
            return self.parse.parse_reply(task.rtype, text, pick=task.seed)
        return self.parse.parse_reply(task.rtype, text)

    def _judge(self, task: _Task, c: Completion) -> dict:
        usage = {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens}
        entry: dict[str, Any] = {"task": task.id, "usage": usage}
        text = c.text
        if c.finish_reason == "length":
            # A conversation cut mid-round still holds whole rounds: every answer that a later
            # question follows is complete. Other types have no such boundary.
            text = self.parse.complete_rounds(text) if task.rtype == "conversation" else ""
            if not text:
                return {**entry, "status": "rejected", "reason": f"truncated: reply hit max_tokens ({self.max_tokens})", "raw": c.text}
        if c.finish_reason == "content_filter":
            return {**entry, "status": "rejected", "reason": "content filter: the server cut the reply", "raw": c.text}
        try:
            turns = self._parse_reply(task, text)
        except self.parse.Rejected as e:
            return {**entry, "status": "rejected", "reason": str(getattr(e, "reason", e)), "raw": c.text}
        fp = self.parse.fingerprint(turns)
        if fp in self.fingerprints:
            return {**entry, "status": "rejected", "reason": f"duplicate: same text as {self.fingerprints[fp]}", "raw": c.text}
        self.fingerprints[fp] = task.id
        sample = self.parse.to_sample(task.record, task.rtype, turns)
        return {**entry, "status": "ok", "sample": sample, "fingerprint": fp}

    def _finish(self, task: _Task, entry: dict) -> None:
        """Queue the task's ledger line. The worker moves on at once; the task counts as finished
        (ledger entry, progress) only when the line is fsynced."""
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


def _finalise(tasks, ledger: Ledger, out_dir: Path, backend: Backend, ppm, image_root: Path, domain: str,
              types: list[str], requests: int, seconds: float) -> Summary:
    rejected: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    samples, rejects = [], []
    prompt = completion = generated = pending = 0
    for t in tasks:
        e = ledger.entries.get(t.id)
        if e is None:
            pending += 1
            continue
        usage = e.get("usage") or {}
        prompt += int(usage.get("prompt_tokens", 0))
        completion += int(usage.get("completion_tokens", 0))
        if e["status"] == "ok":
            generated += 1
            sample = dict(e["sample"])
            root = Path(os.path.abspath(t.record.root))
            if root != image_root and isinstance(sample.get("image"), str):
                # The ledger keeps paths relative to each record's root; data.json has one image folder.
                sample["image"] = Path(os.path.relpath(root / sample["image"], image_root)).as_posix()
            samples.append(sample)
        elif e["status"] == "rejected":
            rejected[_category(e.get("reason", ""))] += 1
            rejects.append({"task": t.id, "reason": e.get("reason", ""), "raw": e.get("raw", "")})
        else:
            failed[_category(e.get("reason", ""))] += 1
    cards.write_json_atomic(out_dir / "data.json", samples)
    write_jsonl_atomic(out_dir / "rejects.jsonl", rejects)
    summary = Summary(
        out_dir=out_dir, tasks=len(tasks), generated=generated, rejected=dict(rejected), failed=dict(failed),
        pending=pending, prompt_tokens=prompt, completion_tokens=completion, cost=_cost(ppm, prompt, completion),
        requests=requests, seconds=round(seconds, 3),
    )
    card = cards.new_card(
        "data",
        made_by="kit generate",
        image_folder=str(image_root),
        data="data.json",
        backend=backend.describe(),
        domain=domain,
        types=types,
        counts={"tasks": len(tasks), "generated": generated, "rejected": sum(rejected.values()),
                "failed": sum(failed.values()), "pending": pending},
        usage={"prompt_tokens": prompt, "completion_tokens": completion},
        cost=summary.cost,
    )
    cards.write_card(out_dir, card)
    return summary


def write_summary(out_dir: Path, summary: Summary, tasks, ledger: Ledger) -> None:
    data = summary.to_json()
    data["failed_tasks"] = [
        {"task": t.id, "reason": ledger.entries[t.id].get("reason", "")}
        for t in tasks
        if t.id in ledger.entries and ledger.entries[t.id]["status"] == "failed"
    ]
    cards.write_json_atomic(Path(out_dir) / "summary.json", data)


def summary_table(s: Summary) -> str:
    """The end-of-run table, as plain text."""
    rows = [("generated", f"{s.generated:,} of {s.tasks:,} tasks")]
    if s.resumed:
        rows.append(("resumed", f"{s.resumed:,} finished earlier"))
    for name, counts in (("rejected", s.rejected), ("failed", s.failed)):
        rows.append((name, f"{sum(counts.values()):,}"))
        rows += [(f"  {reason}", f"{n:,}") for reason, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    if s.pending:
        rows.append(("not finished", f"{s.pending:,}"))
    rows += [
        ("prompt tokens", f"{s.prompt_tokens:,}"),
        ("completion tokens", f"{s.completion_tokens:,}"),
        ("cost", _fmt_cost(s.cost)),
        ("time", f"{s.seconds:.1f}s, {s.requests:,} requests"),
    ]
    return _render_table(f"kit generate -> {s.out_dir}", rows)
