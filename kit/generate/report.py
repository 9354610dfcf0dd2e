"""What a generation run reports: its cost (prices per model family), the dry-run estimate, and the
outputs rebuilt from the ledger (data.json, rejects.jsonl, summary.json, the data card, the table)."""

from __future__ import annotations

import io
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kit.core.cards import Card
from kit.core.errors import KitError
from kit.ground.claims import Claim
from kit.ground.policy import Grounding
from kit.core.files import write_json_atomic, write_jsonl_atomic
from kit.data.reviewed import SOURCES_FILE
from kit.generate import prompts
from kit.generate.backends import Backend
from kit.generate.ledger import LEDGER, Ledger

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
    grounding: str = "off"  # reject | flag | off
    claims: dict[str, int] = field(default_factory=dict)  # "<status> <kind>" -> claims in rejected or flagged conversations
    flagged: int = 0  # kept conversations with unsupported or contradicted claims (grounding flag)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        return d


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


def cost_of(p: tuple[float, float] | None, prompt: int, completion: int) -> float | None:
    return None if p is None else round((prompt * p[0] + completion * p[1]) / 1e6, 6)


def category_of(entry: dict) -> str:
    """What the summary counts a rejected or failed task as: the category its ledger line carries
    (ledgers written before kit recorded one: the reason up to its first ':')."""
    return entry.get("category") or entry.get("reason", "").split(":", 1)[0].strip() or "unknown"


def failures_error(summary: Summary) -> KitError | None:
    """The error a run ends with when tasks failed for good (after every retry), or None: what was
    finished is written, and a script must still be able to tell (exit status 1)."""
    n = sum(summary.failed.values())
    if not n:
        return None
    why = ", ".join(f"{count} {reason}" for reason, count in sorted(summary.failed.items(), key=lambda kv: -kv[1]))
    return KitError(f"{n} of {summary.tasks} generation tasks failed ({why}); the {summary.generated} finished are saved in "
                    f"{summary.out_dir}; rerun the same command to retry the failed ones (finished tasks are kept)", exit_code=1)


def render_table(title: str, rows: list[tuple[str, str]]) -> str:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for k, v in rows:
        table.add_row(k, v)
    buf = io.StringIO()
    Console(file=buf, width=100, force_terminal=False, color_system=None).print(table)
    return buf.getvalue().rstrip("\n")


def format_cost(cost: float | None) -> str:
    if cost is None:
        return "unknown (no price known for this model)"
    return "$0" if cost == 0 else f"${cost:,.4f}"


def estimate_dry_run(tasks, pending, domain, backend, ppm, max_tokens, out_dir, echo) -> Summary:
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
    cost = cost_of(ppm, est_prompt, est_completion)
    echo(
        render_table(
            "Dry run: nothing sent",
            [
                ("backend", backend.describe()),
                ("tasks", f"{len(pending):,} to run ({len(tasks) - len(pending):,} already done)"),
                ("est. prompt tokens", f"{est_prompt:,}"),
                ("est. completion tokens", f"{est_completion:,}"),
                ("est. cost", "$0 (local)" if not backend.is_remote and ppm == (0.0, 0.0) else format_cost(cost)),
            ],
        )
    )
    return Summary(
        out_dir=out_dir, tasks=len(tasks), pending=len(pending), resumed=len(tasks) - len(pending),
        prompt_tokens=est_prompt, completion_tokens=est_completion, cost=cost, dry_run=True,
    )


def claims_reason(bad: list[Claim]) -> str:
    """`claims: 2 unsupported, 1 contradicted (catheter, MRI)`: the category, then what was said."""
    by = Counter(c.status for c in bad)
    said = ", ".join(dict.fromkeys(c.text for c in bad))
    return f"claims: {', '.join(f'{n} {status}' for status, n in sorted(by.items()))} ({said})"


def source_line(record, image: str | None, sample_ids: list[str]) -> dict:
    """What a conversation's claims were checked against, kept beside data.json for the reviewer
    (kit review): the record's texts and boxes, with the ids of the conversations made from it."""
    d = record.to_json()
    for key in ("root", "private", "source"):
        d.pop(key, None)
    return {**d, "image": image, "samples": sample_ids}


@dataclass
class Outcomes:
    """The ledger's finished tasks sorted into what data.json, rejects.jsonl, flagged.jsonl and the
    sources file hold, with the counts the summary and card report."""

    grounding: Grounding
    image_root: Path
    rejected: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    claims: Counter[str] = field(default_factory=Counter)
    samples: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    flagged: list[dict] = field(default_factory=list)
    sources: dict[str, tuple] = field(default_factory=dict)  # record id -> (record, its image as data.json names it, its conversations' ids)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generated: int = 0
    pending: int = 0

    def add(self, t, e: dict | None) -> None:
        """One task and its ledger entry (None: not finished)."""
        if e is None:
            self.pending += 1
            return
        usage = e.get("usage") or {}
        self.prompt_tokens += int(usage.get("prompt_tokens", 0))
        self.completion_tokens += int(usage.get("completion_tokens", 0))
        if e["status"] == "ok":
            self._add_sample(t, dict(e["sample"]))
        elif e["status"] == "rejected":
            self.rejected[category_of(e)] += 1
            self.rejects.append({"id": f"{t.record.id}-{t.rtype}", "task": t.id, "reason": e.get("reason", ""), "raw": e.get("raw", "")})
        else:
            self.failed[category_of(e)] += 1

    def _add_sample(self, t, sample: dict) -> None:
        root = Path(os.path.abspath(t.record.root))
        if root != self.image_root and isinstance(sample.get("image"), str):
            # The ledger keeps paths relative to each record's root; data.json has one image folder.
            sample["image"] = Path(os.path.relpath(root / sample["image"], self.image_root)).as_posix()
        self.sources.setdefault(t.record.id, (t.record, sample.get("image"), []))[2].append(sample["id"])
        answers = [turn["value"] for turn in sample["conversations"] if turn["from"] == "gpt"]
        bad = self.grounding.bad_claims(t.record, answers)
        if bad:
            self.claims.update(f"{c.status} {c.kind}" for c in bad)
            line = {"id": sample["id"], "task": t.id, "reason": claims_reason(bad), "claims": [c.to_json() for c in bad]}
            if self.grounding.mode == "reject":
                self.rejected["claims"] += 1
                # Whole, so a reviewer can rescue a false alarm (kit review) and it trains as written.
                self.rejects.append({**line, "image": sample.get("image"), "type": sample.get("type"),
                                     "conversations": sample["conversations"]})
                return
            self.flagged.append(line)
        self.generated += 1
        self.samples.append(sample)

    def write(self, out_dir: Path) -> None:
        write_json_atomic(out_dir / "data.json", self.samples)
        write_jsonl_atomic(out_dir / "rejects.jsonl", self.rejects)
        write_jsonl_atomic(out_dir / SOURCES_FILE, [source_line(*v) for v in self.sources.values()])
        if self.grounding.mode == "flag" or (out_dir / "flagged.jsonl").exists():
            write_jsonl_atomic(out_dir / "flagged.jsonl", self.flagged)


def finalise(tasks, ledger: Ledger, out_dir: Path, backend: Backend, ppm, image_root: Path, domain: str,
              types: list[str], requests: int, seconds: float, grounding: Grounding) -> Summary:
    """data.json, rejects.jsonl (and flagged.jsonl) and the card from the ledger. The claim check
    runs here, on every finished conversation, so a changed vocabulary or mode applies on resume
    without asking the model again."""
    o = Outcomes(grounding, image_root)
    for t in tasks:
        o.add(t, ledger.entries.get(t.id))
    o.write(out_dir)
    rejected, failed, claim_counts, flagged = o.rejected, o.failed, o.claims, o.flagged
    prompt, completion, generated, pending = o.prompt_tokens, o.completion_tokens, o.generated, o.pending
    summary = Summary(
        out_dir=out_dir, tasks=len(tasks), generated=generated, rejected=dict(rejected), failed=dict(failed),
        pending=pending, prompt_tokens=prompt, completion_tokens=completion, cost=cost_of(ppm, prompt, completion),
        requests=requests, seconds=round(seconds, 3), grounding=grounding.mode, claims=dict(claim_counts),
        flagged=len(flagged),
    )
    card = Card.new(
        "data",
        made_by="kit generate",
        image_folder=str(image_root),
        files=["data.json"],
        backend=backend.describe(),
        domain=domain,
        types=types,
        counts={"tasks": len(tasks), "generated": generated, "rejected": sum(rejected.values()),
                "rejected_for_claims": rejected.get("claims", 0), "flagged": len(flagged),
                "failed": sum(failed.values()), "pending": pending},
        grounding={**grounding.describe(), "claims": dict(claim_counts)},
        usage={"prompt_tokens": prompt, "completion_tokens": completion},
        cost=summary.cost,
    )
    card.write(out_dir)
    return summary


def write_summary(out_dir: Path, summary: Summary, tasks, ledger: Ledger) -> None:
    data = summary.to_json()
    data["failed_tasks"] = [
        {"task": t.id, "reason": ledger.entries[t.id].get("reason", "")}
        for t in tasks
        if t.id in ledger.entries and ledger.entries[t.id]["status"] == "failed"
    ]
    write_json_atomic(Path(out_dir) / "summary.json", data)


def summary_table(s: Summary) -> str:
    """The end-of-run table, as plain text."""
    rows = [("generated", f"{s.generated:,} of {s.tasks:,} tasks")]
    if s.resumed:
        rows.append(("resumed", f"{s.resumed:,} finished earlier"))
    for name, counts in (("rejected", s.rejected), ("failed", s.failed)):
        rows.append((name, f"{sum(counts.values()):,}"))
        rows += [(f"  {reason}", f"{n:,}") for reason, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    if s.flagged:
        rows.append(("kept with claims flagged", f"{s.flagged:,}"))
    if s.claims:
        rows.append(("claims the source does not support", f"{sum(s.claims.values()):,}"))
        rows += [(f"  {kind}", f"{n:,}") for kind, n in sorted(s.claims.items(), key=lambda kv: -kv[1])]
    if s.pending:
        rows.append(("not finished", f"{s.pending:,}"))
    rows += [
        ("prompt tokens", f"{s.prompt_tokens:,}"),
        ("completion tokens", f"{s.completion_tokens:,}"),
        ("cost", format_cost(s.cost)),
        ("time", f"{s.seconds:.1f}s, {s.requests:,} requests"),
    ]
    return render_table(f"kit generate -> {s.out_dir}", rows)
