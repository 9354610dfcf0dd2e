"""Reviewed data: an expert's decisions about generated conversations, and the one rule that says
what trains.

`kit review` appends one JSON line per decision to `review.jsonl` in a `kit generate` folder
(`id`, `decision` accept | reject | edit, `conversations` for an edit, `reason`, `time`), each
line flushed and fsynced before the page is told it is saved; the newest line of an id counts.
`data.json` is never changed. The rule (`reviewed_samples`), used by `kit review --export`,
`kit finetune --data FOLDER` and `kit adapt`:
- accepted conversations train as generated, edited ones with the reviewer's text, rejected
  ones do not;
- conversations the claim check rejected (rejects.jsonl) train only when the reviewer accepted or
  edited them (a rescued false alarm);
- undecided conversations of data.json train with `undecided="include"`, not with the default
  `exclude`; a folder nobody has reviewed yet (no review.jsonl) trains data.json as generated.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kit.core.errors import KitError
from kit.core.files import fsync_dir, read_json, read_jsonl

REVIEW_LOG = "review.jsonl"
DATA_FILE = "data.json"
REJECTS_FILE = "rejects.jsonl"
SOURCES_FILE = "sources.jsonl"  # kit generate: each record's facts, for the reviewer
DECISIONS = ("accept", "reject", "edit")
UNDECIDED = ("exclude", "include")
ROLES = ("human", "gpt")


@dataclass(frozen=True)
class Decision:
    id: str
    decision: str  # accept | reject | edit
    conversations: list[dict] | None = None  # the edited turns, for an edit
    reason: str = ""
    time: str = ""
    of: str = ""  # fingerprint of the conversation decided on: a regenerated one is undecided again

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if self.conversations is None:
            del d["conversations"]
        if not self.of:
            del d["of"]
        return d


def fingerprint(turns: list[dict]) -> str:
    """Which generated conversation a decision was made on (ids survive `kit generate --force`)."""
    return hashlib.sha256(json.dumps(turns, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def check_turns(turns: Any, original: list[dict], where: str) -> list[dict]:
    """An edit's conversation: the original's turns in the same order and roles, each with new text.
    KitError naming `where` and the field otherwise."""
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise KitError(f"{where}: field 'conversations' must be a list of {{from, value}} turns")
    if len(turns) != len(original):
        raise KitError(f"{where}: field 'conversations' has {len(turns)} turns and the generated conversation {len(original)}; "
                       "an edit changes the text of turns, not their number")
    out = []
    for j, (turn, orig) in enumerate(zip(turns, original)):
        if turn.get("from") != orig.get("from"):
            raise KitError(f"{where}: conversations[{j}].from is {turn.get('from')!r} where the generated turn is "
                           f"{orig.get('from')!r}; keep each turn's speaker")
        value = turn.get("value")
        if not isinstance(value, str) or not value.strip():
            raise KitError(f"{where}: conversations[{j}].value must be non-empty text")
        if "<image>" in str(orig.get("value", "")) and "<image>" not in value:
            raise KitError(f"{where}: conversations[{j}].value lost its <image> placeholder; keep it where the image goes")
        out.append({"from": orig["from"], "value": value})
    return out


def parse_decision(obj: Any, where: str) -> Decision:
    """A decision line (or a page's request). KitError naming `where` and the field that is wrong."""
    if not isinstance(obj, dict):
        raise KitError(f"{where}: a decision must be a JSON object with 'id' and 'decision'")
    sid, decision = obj.get("id"), obj.get("decision")
    if not isinstance(sid, str) or not sid:
        raise KitError(f"{where}: field 'id' must be the conversation's id (text)")
    if decision not in DECISIONS:
        raise KitError(f"{where}: field 'decision' must be one of {', '.join(DECISIONS)}, got {decision!r}")
    reason = obj.get("reason") or ""
    if not isinstance(reason, str):
        raise KitError(f"{where}: field 'reason' must be text")
    turns = obj.get("conversations")
    if decision == "edit" and not isinstance(turns, list):
        raise KitError(f"{where}: an edit needs field 'conversations' (the edited turns)")
    if decision != "edit" and turns is not None:
        raise KitError(f"{where}: only an edit carries 'conversations'; this decision is '{decision}'")
    stamp, of = obj.get("time") or "", obj.get("of") or ""
    return Decision(sid, decision, turns if decision == "edit" else None, reason=reason.strip(), time=str(stamp), of=str(of))


class ReviewLog:
    """The append-only decisions file of one folder. Thread-safe appends; each is on disk before
    `append` returns."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / REVIEW_LOG
        self._lock = threading.Lock()

    def read(self) -> dict[str, tuple[Decision, int]]:
        """The newest decision per id, with its line number. A last line without its newline was
        cut by a kill mid-write and never acknowledged: it is ignored. KitError for any other bad line."""
        if not self.path.is_file():
            return {}
        # The piece after the last newline (empty when the file ends with one) is the torn write.
        lines = self.path.read_bytes().split(b"\n")[:-1]
        out: dict[str, tuple[Decision, int]] = {}
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{self.path}:{n}"
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise KitError(f"{where}: not a decision line ({type(e).__name__}); remove the line, or the file to "
                               "start the review over") from None
            d = parse_decision(obj, where)
            out[d.id] = (d, n)
        return out

    def append(self, d: Decision) -> None:
        line = (json.dumps(d.to_json(), ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            new = not self.path.exists()
            with open(self.path, "ab+") as fh:
                fh.seek(0, os.SEEK_END)
                if fh.tell():
                    fh.seek(-1, os.SEEK_END)
                    if fh.read(1) != b"\n":
                        # The tail of a write a kill cut short; it was never acknowledged.
                        data = self.path.read_bytes()
                        fh.truncate(data.rfind(b"\n") + 1)
                        fh.seek(0, os.SEEK_END)
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            if new:
                fsync_dir(self.path.parent)


@dataclass
class ReviewCounts:
    accepted: int = 0
    edited: int = 0
    rejected: int = 0
    undecided: int = 0  # generated conversations (data.json) without a decision
    rescued: int = 0  # of accepted + edited, conversations the claim check had rejected
    unknown: int = 0  # decisions about ids that are not in the folder (ignored)
    stale: int = 0  # decisions about a conversation since generated anew (counted as undecided)
    undecided_rule: str = "exclude"
    reviewed: bool = True  # False: no review.jsonl yet, data.json trains as generated

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        if not self.reviewed:
            return f"review: none yet (no {REVIEW_LOG}): the {self.undecided} generated conversations train as generated"
        s = (f"review: {self.accepted} accepted, {self.edited} edited, {self.rejected} rejected, {self.undecided} undecided "
             f"({self.undecided_rule}d)")
        if self.rescued:
            s += f"; {self.rescued} rescued from the claim check's rejects"
        if self.stale:
            s += f"; {self.stale} decisions were about conversations since generated anew (undecided again)"
        if self.unknown:
            s += f"; {self.unknown} decisions name ids not in the folder (ignored)"
        return s


@dataclass
class Reviewed:
    items: list[tuple[str, dict]] = field(default_factory=list)  # (where, LLaVA sample) in training order
    counts: ReviewCounts = field(default_factory=ReviewCounts)

    @property
    def samples(self) -> list[dict]:
        return [s for _, s in self.items]


def is_generated_folder(path: Path) -> bool:
    """A folder `kit generate` wrote (its data.json), which a review may have decided on."""
    return Path(path).is_dir() and (Path(path) / DATA_FILE).is_file()


def review_inputs(path: Path) -> list[Path]:
    """The files whose content decides what a data path trains: the file itself, or a reviewed
    folder's data.json, rejects and decisions (for the card's hash)."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    return [p for p in (path / DATA_FILE, path / REJECTS_FILE, path / REVIEW_LOG) if p.is_file()]


def generated_samples(folder: Path) -> list[dict]:
    data = read_json(Path(folder) / DATA_FILE, "generated data", expect=list)
    for i, s in enumerate(data):
        if not isinstance(s, dict) or not isinstance(s.get("conversations"), list):
            raise KitError(f"{Path(folder) / DATA_FILE}[{i}]: a sample must be a JSON object with 'conversations'")
    return data


def rescuable(folder: Path) -> list[dict]:
    """Conversations the claim check rejected, as samples (rejects.jsonl lines that keep them)."""
    path = Path(folder) / REJECTS_FILE
    if not path.is_file():
        return []
    out = []
    for _, line in read_jsonl(path, "rejects file", allow_empty=True):
        if isinstance(line.get("conversations"), list) and isinstance(line.get("id"), str) and "image" in line:
            out.append({"id": line["id"], "image": line["image"], "conversations": line["conversations"],
                        **({"type": line["type"]} if "type" in line else {})})
    return out


def sample_id(sample: dict, index: int) -> str:
    return str(sample.get("id", index))


def reviewed_samples(folder: Path, undecided: str = "exclude") -> Reviewed:
    """What trains from a generated folder under its review (the module's rule). KitError for a
    bad decisions file or an edit that does not fit its conversation (naming review.jsonl:line)."""
    if undecided not in UNDECIDED:
        raise KitError(f"undecided '{undecided}': choose one of {', '.join(UNDECIDED)}")
    folder = Path(folder)
    generated = generated_samples(folder)
    log = ReviewLog(folder)
    decisions = log.read()
    if not log.path.exists():
        undecided = "include"
    counts = ReviewCounts(undecided_rule=undecided, reviewed=log.path.exists())
    out = Reviewed(counts=counts)
    known = set()
    sources = [(s, f"{folder / DATA_FILE}[{i}]", False) for i, s in enumerate(generated)]
    sources += [(s, f"{folder / REJECTS_FILE} ({s['id']})", True) for s in rescuable(folder)]
    for i, (sample, where, was_rejected) in enumerate(sources):
        sid = sample_id(sample, i)
        known.add(sid)
        decided = decisions.get(sid)
        if decided is not None and decided[0].of and decided[0].of != fingerprint(sample["conversations"]):
            counts.stale += 1
            decided = None
        if decided is None:
            if not was_rejected:
                counts.undecided += 1
                if undecided == "include":
                    out.items.append((where, sample))
            continue
        d, line = decided
        if d.decision == "reject":
            counts.rejected += 1
            continue
        counts.rescued += was_rejected
        if d.decision == "accept":
            counts.accepted += 1
            out.items.append((where, sample))
        else:
            counts.edited += 1
            log_where = f"{folder / REVIEW_LOG}:{line}"
            out.items.append((log_where, {**sample, "conversations": check_turns(d.conversations, sample["conversations"], log_where)}))
    counts.unknown = len(set(decisions) - known)
    return out
