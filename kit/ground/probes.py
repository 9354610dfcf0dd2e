"""POPE-style probes built from a data set's own facts: yes/no questions "Is there a {concept} in
the image?" per image, balanced, in three sets as POPE draws its negatives:

- `random`: concepts of the vocabulary the image's facts do not hold, drawn at random;
- `popular`: the concepts most images of this data set hold, among those this image lacks;
- `adversarial`: the concepts that co-occur most with this image's own, among those it lacks.

Positives are the image's object concepts (from boxes, captions, findings, metadata, and what
they imply); the same positives open every set, so each set is balanced yes/no. A negative is
never a concept that everything it implies already holds (an "echocardiogram" for an ultrasound
of the heart could be true). Deterministic for a seed. Describe items ("Describe the image in
detail.") carry the image's facts, for CHAIR-style scoring of descriptions.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from kit.core.errors import KitError
from kit.core.files import write_jsonl_atomic
from kit.ground.facts import Facts, facts_of
from kit.ground.vocab import Vocabulary, load_vocab
from kit.ingest.records import Record
from kit.ingest.sources import from_coco, from_manifest

SETS = ("random", "popular", "adversarial")
DESCRIBE = "Describe the image in detail."


@dataclass(frozen=True)
class _Image:
    record: Record
    facts: Facts
    objects: frozenset[str]  # the object concepts it holds


def _candidates(img: _Image, vocab: Vocabulary, objects: list[str]) -> list[str]:
    return [c for c in objects if c not in img.objects and not vocab.closure[c] <= img.objects]


def _question(vocab: Vocabulary, concept: str) -> str:
    text = vocab.group_of(concept).question.format(concept=concept)
    return text.replace(f" a {concept}", f" an {concept}") if concept[:1].lower() in "aeiou" else text


def build_probes(records: list[Record], vocab: Vocabulary, image_folder: Path, seed: int = 0, per_image: int = 3,
                 describe: bool = True) -> list[dict]:
    """`kit eval` items: per image and set, up to `per_image` yes and as many no questions, plus one
    describe item per image (when `describe`). Images whose facts hold no object concept get none.
    `image` is relative to `image_folder` (where the items' file is read from); KitError when an
    image is not below it."""
    folder = Path(image_folder).resolve()
    objects = sorted(c for c, concept in vocab.concepts.items() if vocab.groups[concept.group].kind == "object")
    images = []
    for r in records:
        facts = facts_of(r, vocab)
        images.append(_Image(r, facts, frozenset(c for c in facts.present if c in vocab.concepts and c in objects)))
    popularity: Counter[str] = Counter(c for img in images for c in img.objects)
    together: dict[str, Counter[str]] = {}
    for img in images:
        for a in img.objects:
            together.setdefault(a, Counter()).update(b for b in img.objects if b != a)
    rng = random.Random(seed)
    items: list[dict] = []
    for img in sorted(images, key=lambda i: i.record.id):
        positives = sorted(img.objects)
        rng.shuffle(positives)
        candidates = _candidates(img, vocab, objects)
        k = min(per_image, len(positives), len(candidates))
        if k == 0:
            continue
        chosen = positives[:k]
        popular = sorted(candidates, key=lambda c: (-popularity[c], c))
        score = {c: sum(together.get(p, Counter())[c] for p in img.objects) for c in candidates}
        negatives = {
            "random": rng.sample(sorted(candidates), k),
            "popular": popular[:k],
            "adversarial": sorted(candidates, key=lambda c: (-score[c], -popularity[c], c))[:k],
        }
        path = (Path(img.record.root) / img.record.image).resolve()
        if not path.is_relative_to(folder):
            raise KitError(f"image {img.record.image} is not below {folder}; write the probes into the image folder "
                           "(kit eval reads image paths relative to the file)")
        image = path.relative_to(folder).as_posix()
        for name in SETS:
            pairs = [(c, "yes") for c in chosen] + [(c, "no") for c in negatives[name]]
            rng.shuffle(pairs)
            for concept, answer in pairs:
                items.append({
                    "id": f"{img.record.id}-{name}-{concept.replace(' ', '_')}", "image": image,
                    "question": _question(vocab, concept), "answer": answer,
                    "answer_type": "closed", "probe": {"concept": concept, "set": name},
                })
        if describe:
            items.append({"id": f"{img.record.id}-describe", "image": image, "question": DESCRIBE,
                          "answer": "", "answer_type": "describe", "facts": img.facts.to_json(), "vocab": vocab.source})
    return items


def write_probes(source: Path, out: Path, *, vocab: str = "general", seed: int = 0, per_image: int = 3,
                 images: Path | None = None, instances: Path | None = None, echo=print) -> int:
    """`kit data probes`: probes for a manifest folder (`source`) or a COCO captions file with
    `instances` and `images`, written to `out` (JSONL) with image paths relative to its folder.
    Raises KitError for a bad source, an `out` that exists, a folder the images are not below,
    or a data set that yields no probe (no image's facts hold a concept of the vocabulary)."""
    source, out = Path(source), Path(out)
    if out.exists():
        raise KitError(f"--out {out} already exists; choose another file")
    if out.suffix != ".jsonl":
        raise KitError(f"--out {out}: give a .jsonl file (kit eval reads it)")
    if instances is not None or images is not None:
        if instances is None or images is None:
            raise KitError("a COCO source needs both --instances FILE (the boxes) and --images DIR")
        records = from_coco(source, Path(images), Path(instances))
    elif source.is_dir():
        records = from_manifest(source)
    else:
        raise KitError(f"{source}: give a manifest folder, or a COCO captions file with --instances and --images")
    words = load_vocab(vocab)
    try:
        items = build_probes(records, words, out.resolve().parent, seed=seed, per_image=per_image)
    except KitError as e:
        raise KitError(f"--out {out}: {e}") from None
    if not items:
        raise KitError(f"{source}: no image's captions, boxes or findings name a concept of the '{words.name}' vocabulary; "
                       "give another --vocab")
    write_jsonl_atomic(out, items)
    n = {s: sum(1 for it in items if it.get("probe", {}).get("set") == s) for s in SETS}
    echo(f"{out}: {sum(n.values())} yes/no probes ({', '.join(f'{v} {k}' for k, v in n.items())}; half answer yes), "
         f"{sum(1 for it in items if it['answer_type'] == 'describe')} describe items; vocabulary {words.source}")
    return len(items)
