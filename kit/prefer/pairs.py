"""`kit data pairs`: preference pairs from the user's own annotations, with no labeller.

For each grounded answer about an image, a pair: the answer as `chosen`, and as `rejected` the
same answer with one fact changed so the record's facts make it false (kit.ground.edits: a
co-occurring concept swapped in, a count changed, a side flipped, a concept denied or added, the
modality swapped). Both are claim-checked: a pair whose chosen answer makes an unsupported claim,
or whose rejected answer makes none, is dropped and counted.

Grounded answers come from
- a `kit generate` folder: its conversations' answers (under its review's rule when reviewed,
  kit.data.reviewed), each with the turns before it as the prompt;
- a manifest folder or COCO captions + instances: answers composed from the record itself, its
  caption, its findings, or its boxes ("two people, a dog and a car on the right"), to the
  questions in prompts.yaml.
With a model (`--from-model`), its own greedy answers to the same prompts are a second source of
rejected answers: those the check flags are paired with the grounded answer (edit kind `model`).

The pairs file is a JSON list of {id, image, prompt (LLaVA turns, the last a question), chosen,
rejected, edit {kind, from, to}, claims (what the check found false in `rejected`)}, image paths
relative to the image folder its data card names.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from kit.core.cards import Card
from kit.core.errors import KitError
from kit.core.files import write_json_atomic
from kit.data.reviewed import is_generated_folder, reviewed_samples
from kit.ground.claims import check_text
from kit.ground.edits import EDIT_KINDS, Alternatives, minimal_edits
from kit.ground.facts import Facts, facts_of
from kit.ground.match import find_mentions, plural
from kit.ground.vocab import Vocabulary, load_vocab
from kit.ingest.records import Record
from kit.ingest.sources import from_coco, from_manifest
from kit.prefer.model_answers import model_answers
from kit.review.folder import image_folder_of, read_sources, vocabulary_for

CHOSEN_UNGROUNDED = "chosen answer makes a claim the source does not support"
REJECTED_UNFLAGGED = "edited answer makes no claim the check flags"
NO_EDIT = "no edit the vocabulary can make false"
NO_SOURCE = "conversation without a source record"
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}


@dataclass
class Answer:
    """A grounded answer to pair: its prompt (LLaVA turns ending with the question) and record."""

    id: str
    image: str
    prompt: list[dict]
    text: str
    record: Record


@dataclass
class Pairs:
    pairs: list[dict] = field(default_factory=list)
    answers: int = 0
    made: Counter = field(default_factory=Counter)  # per edit kind
    dropped: Counter = field(default_factory=Counter)  # per reason

    def summary(self) -> dict[str, Any]:
        return {"pairs": len(self.pairs), "answers": self.answers, "by_edit": dict(self.made), "dropped": dict(self.dropped)}

    def line(self) -> str:
        kinds = ", ".join(f"{self.made[k]} {k}" for k in (*EDIT_KINDS, "model") if self.made[k])
        dropped = ", ".join(f"{n} {why}" for why, n in self.dropped.most_common())
        return (f"pairs: {len(self.pairs)} from {self.answers} grounded answers ({kinds or 'none'})"
                + (f"; dropped: {dropped}" if dropped else ""))


def load_prompts(path: Path | None = None) -> dict[str, str]:
    """The questions for composed answers (kit/prefer/prompts.yaml, or a user's copy)."""
    if path is None:
        text, where = resources.files("kit.prefer").joinpath("prompts.yaml").read_text(encoding="utf-8"), "prompts.yaml"
    else:
        try:
            text, where = Path(path).read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as e:
            raise KitError(f"--prompts {path}: cannot be read ({getattr(e, 'strerror', None) or type(e).__name__})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        raise KitError(f"{where}: not valid YAML") from None
    need = ("caption", "findings", "objects")
    if not isinstance(data, dict) or any(not isinstance(data.get(k), str) or not data[k].strip() for k in need):
        raise KitError(f"{where}: give a question (text) for each of {', '.join(need)}")
    return {k: data[k] for k in need}


def objects_answer(record: Record, vocab: Vocabulary) -> str | None:
    """The record's boxes said in words: how many of each concept, and the side of a lone one
    whose box lies clearly left or right ("The image shows two people, a dog and a car on the right.")."""
    seen: dict[str, list[tuple[float, float, float, float]]] = {}
    for b in record.boxes:
        for m in find_mentions(b.label, vocab):
            if not m.negated and vocab.group_of(m.concept).kind == "object":
                seen.setdefault(m.concept, []).append(b.bbox)
                break
    if not seen:
        return None
    parts = []
    for concept, boxes in seen.items():
        name = vocab.concepts[concept].name
        if len(boxes) > 1:
            parts.append(f"{NUMBER_WORDS.get(len(boxes), str(len(boxes)))} {plural(name)}")
            continue
        x = (boxes[0][0] + boxes[0][2]) / 2
        side = " on the left" if x < 0.35 else " on the right" if x > 0.65 else ""
        article = "an" if name[:1].lower() in "aeiou" else "a"
        parts.append(f"{article} {name}{side}")
    said = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"The image shows {said}."


def record_answers(records: list[Record], vocab: Vocabulary, prompts: dict[str, str]) -> list[Answer]:
    """Answers composed from each record's own caption, findings and boxes."""
    out = []
    for r in records:
        texts = [("caption", r.captions[0] if r.captions else None), ("findings", " ".join(r.findings) or None),
                 ("objects", objects_answer(r, vocab))]
        for kind, text in texts:
            if text:
                out.append(Answer(f"{r.id}-{kind}", r.image, [{"from": "human", "value": prompts[kind]}], text=text, record=r))
    return out


def folder_answers(folder: Path, undecided: str) -> tuple[list[Answer], list[Record], int]:
    """Each answer of a generated folder's conversations (what its review lets train), with the
    turns before it as the prompt; all the folder's records; and how many conversations have no
    source record."""
    card = Card.read(folder)
    records, by_sample = read_sources(folder, image_folder_of(folder, card))
    out, orphans = [], 0
    for i, sample in enumerate(reviewed_samples(folder, undecided).samples):
        sid = str(sample.get("id", i))
        record = records.get(by_sample.get(sid, ""))
        if record is None:
            orphans += 1
            continue
        turns = sample["conversations"]
        for j, turn in enumerate(turns):
            if turn.get("from") == "gpt" and j > 0 and turns[j - 1].get("from") == "human":
                out.append(Answer(f"{sid}-a{j}", str(sample.get("image") or record.image), [dict(t) for t in turns[:j]],
                                  text=str(turn["value"]), record=record))
    return out, list(records.values()), orphans


def build_pairs(answers: list[Answer], vocab: Vocabulary, per_answer: int = 2, seed: int = 0,
                records: list[Record] = ()) -> Pairs:
    """Up to `per_answer` pairs per grounded answer, the edit kinds balanced over the whole set
    (the kind with fewest pairs so far first). Concepts to swap in are ranked by co-occurrence over
    `records` (the whole data set) and the answers' own records. Deterministic for a seed."""
    facts: dict[str, Facts] = {}
    for r in [*records, *(a.record for a in answers)]:
        if r.id not in facts:
            facts[r.id] = facts_of(r, vocab)
    alts = Alternatives(vocab, list(facts.values()))
    rng = random.Random(seed)
    out = Pairs()
    for a in answers:
        f = facts[a.record.id]
        if any(c.bad for c in check_text(a.text, f, vocab)):
            out.dropped[CHOSEN_UNGROUNDED] += 1
            continue
        out.answers += 1
        edits = minimal_edits(a.text, f, vocab, alts=alts)
        rng.shuffle(edits)
        edits.sort(key=lambda e: out.made[e.kind])
        kept = 0
        for e in edits:
            if kept == per_answer:
                break
            flagged = [c for c in check_text(e.text, f, vocab) if c.bad]
            if not flagged:
                out.dropped[REJECTED_UNFLAGGED] += 1
                continue
            out.made[e.kind] += 1
            kept += 1
            out.pairs.append({"id": f"{a.id}-{e.kind}", "image": a.image, "prompt": a.prompt, "chosen": a.text, "rejected": e.text,
                              "edit": e.to_json(), "claims": [c.to_json() for c in flagged]})
        if not edits:
            out.dropped[NO_EDIT] += 1
    return out


MODEL_FLAGGED = "model"  # the edit kind of a pair whose rejected side is the model's own flagged answer
MODEL_GROUNDED = "model answer makes no claim the check flags"


def add_model_pairs(result: Pairs, answers: list[Answer], said: list[str], vocab: Vocabulary) -> None:
    """Pairs whose rejected side is the model's own answer, where the check flags it (and the
    grounded answer is clean); counted per outcome."""
    facts: dict[str, Facts] = {}
    for a, text in zip(answers, said):
        f = facts.setdefault(a.record.id, facts_of(a.record, vocab))
        if any(c.bad for c in check_text(a.text, f, vocab)):
            continue  # already counted as an ungrounded chosen answer
        flagged = [c for c in check_text(text, f, vocab) if c.bad]
        if not flagged or text.strip() == a.text.strip():
            result.dropped[MODEL_GROUNDED] += 1
            continue
        result.made[MODEL_FLAGGED] += 1
        said_wrong = ", ".join(dict.fromkeys(c.text for c in flagged))
        result.pairs.append({"id": f"{a.id}-{MODEL_FLAGGED}", "image": a.image, "prompt": a.prompt, "chosen": a.text,
                             "rejected": text, "edit": {"kind": MODEL_FLAGGED, "from": "", "to": said_wrong},
                             "claims": [c.to_json() for c in flagged]})


def write_pairs(source: Path, out: Path, *, vocab: str | None = None, seed: int = 0, per_answer: int = 2,
                images: Path | None = None, instances: Path | None = None, undecided: str = "exclude",
                prompts: Path | None = None, force: bool = False, from_model: Path | None = None, echo=print) -> Pairs:
    """`kit data pairs`: pairs from `source` written to `out` (JSON) with a data card beside it.
    KitError for a bad source or options, an existing `out` without `force`, or no pair at all."""
    source, out = Path(source), Path(out)
    if out.suffix != ".json":
        raise KitError(f"--out {out}: give a .json file name")
    if out.exists() and not force:
        raise KitError(f"--out {out} already exists; choose another name or pass --force to replace it")
    if per_answer < 1:
        raise KitError(f"--per-answer {per_answer}: give at least 1")
    if instances is not None or images is not None:
        if instances is None or images is None:
            raise KitError("a COCO source needs both --instances FILE (the boxes) and --images DIR")
        words = load_vocab(vocab or "general")
        records = from_coco(source, Path(images), Path(instances))
        answers, folder, orphans = record_answers(records, words, load_prompts(prompts)), Path(images), 0
    elif is_generated_folder(source):
        card = Card.read(source)
        words = vocabulary_for(card, vocab)
        if words is None:
            raise KitError(f"{source}: its card names no vocabulary; give one with --vocab (general, medical, ... or a YAML file)")
        answers, records, orphans = folder_answers(source, undecided)
        folder = image_folder_of(source, card)
    elif source.is_dir() and (source / "manifest.jsonl").is_file():
        words = load_vocab(vocab or "general")
        records = from_manifest(source)
        answers, folder, orphans = record_answers(records, words, load_prompts(prompts)), source, 0
    else:
        raise KitError(f"{source}: give a kit generate folder (data.json), a manifest folder (manifest.jsonl), or a COCO "
                       "captions file with --instances and --images")
    result = build_pairs(answers, words, per_answer=per_answer, seed=seed, records=records)
    if from_model is not None:
        echo(f"asking {from_model} the {len(answers)} prompts (greedy) ...")
        add_model_pairs(result, answers, model_answers(from_model, answers, folder, echo=echo), vocab=words)
    if orphans:
        result.dropped[NO_SOURCE] += orphans
    if not result.pairs:
        raise KitError(f"{source}: no pair could be made ({result.line()}); check that its captions, findings or boxes name "
                       f"concepts of the '{words.name}' vocabulary, or give another --vocab")
    write_json_atomic(out, result.pairs)
    here = Card.read(out.parent)
    if here is None or here.made_by == "kit data pairs":
        Card.new("data", made_by="kit data pairs", image_folder=str(Path(folder).resolve()), files=[out.name],
                 pairs={**result.summary(), "vocabulary": words.source, "source": str(source.resolve()), "seed": seed}).write(out.parent)
    elif Path(here.image_folder or out.parent).resolve() != Path(folder).resolve():
        echo(f"note: {out.parent / 'kit.json'} names another image folder; train with --set data.image_folder={Path(folder).resolve()}")
    echo(result.line())
    return result
