"""`kit adapt`: ingest -> generate -> check -> train -> evaluate, privately, from one command.

With a manifest folder (or a recipe's sample set) as data, the images are split into training and
held-out groups (augmented copies of one image stay together), instruction data is generated for
the training images only, the base is evaluated on the held-out VQA items, adapted, and evaluated
again. A LLaVA JSON file as data skips the generation and split.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from kit.core import cards
from kit.core.errors import KitError
from kit.core.files import read_jsonl, write_json_atomic, write_jsonl_atomic
from kit.core.recipes import Recipe

PRIVATE_ROOT = Path("private_data")


def sample_folder(recipe: Recipe) -> Path:
    return PRIVATE_ROOT / f"{recipe.data.sample}-sample"


def image_group(record_id: str) -> str:
    """Augmented copies (`<id>-aug1`, ...) belong to their source image."""
    return re.sub(r"-aug\d+$", "", record_id)


def held_out_groups(groups: set[str], fraction: float) -> set[str]:
    """round(fraction x groups) of them (at least one), chosen by hash: stable as data is added."""
    if not fraction or len(groups) < 2:
        return set()
    k = min(len(groups) - 1, max(1, round(fraction * len(groups))))
    return set(sorted(groups, key=lambda g: hashlib.sha256(g.encode()).hexdigest())[:k])


def _resolve_data(recipe: Recipe, data: str | None, echo) -> Path:
    if data is not None:
        path = Path(data)
        if not path.exists():
            raise KitError(f"--data {path} does not exist; give a manifest folder (private_data/README.md) or a LLaVA .json/.jsonl file")
        return path
    if not recipe.data.sample:
        raise KitError(f"recipe '{recipe.name}' names no sample set; pass --data (a manifest folder or a LLaVA .json file)")
    folder = sample_folder(recipe)
    if not (folder / "manifest.jsonl").is_file():
        from kit.ingest.samples.write import write_sample

        echo(f"sample data: writing the '{recipe.data.sample}' sample set to {folder}")
        write_sample(recipe.data.sample, folder)
    return folder


def _write_eval_subset(eval_file: Path, contexts: dict[str, str], dest: Path, data_root: Path) -> int:
    """Keep the VQA items whose image is held out (`contexts`: manifest image path -> what is known
    about it). Each item gets that text as `context`, for `kit eval --judge` (the judge never sees
    the image)."""
    kept = []
    for _, item in read_jsonl(eval_file, "evaluation file", allow_empty=True):
        key = str(Path(str(item.get("image", ""))))
        if key in contexts:
            kept.append({**item, "context": item.get("context") or contexts[key]})
    write_jsonl_atomic(dest, kept)
    cards.write_card(dest.parent, cards.new_card("data", made_by="kit adapt", image_folder=str(data_root.resolve())))
    return len(kept)


def vqa_samples(eval_file: Path, images: set[str]) -> list[dict]:
    """The eval file's items about `images` as training conversations, asked exactly as kit eval asks."""
    from kit.eval.vqa import SUFFIX

    out = []
    for lineno, item in read_jsonl(eval_file, "evaluation file", allow_empty=True):
        if str(Path(str(item.get("image", "")))) not in images:
            continue
        kind = item.get("answer_type")
        if kind not in SUFFIX:
            raise KitError(f"{eval_file}:{lineno}: answer_type must be closed or open")
        answer = str(item["answer"]).strip()
        answer = answer.capitalize() + "." if kind == "closed" else answer
        out.append({
            "id": f"{item.get('id', lineno)}-vqa",
            "image": item["image"],
            "conversations": [
                {"from": "human", "value": f"<image>\n{item['question']} {SUFFIX[kind]}"},
                {"from": "gpt", "value": answer},
            ],
        })
    return out


def prepare_data(recipe: Recipe, data: str | None, echo=print) -> tuple[Path, Path | None]:
    """(training file, held-out eval file or None). Generation resumes from its ledger if rerun."""
    path = _resolve_data(recipe, data, echo)
    if path.is_file():
        return path, None
    if not (path / "manifest.jsonl").is_file():
        raise KitError(f"--data {path}: a data folder needs a manifest.jsonl (see private_data/README.md), or pass a LLaVA .json file")
    from kit.generate.backends import make_backend
    from kit.generate.runner import run_generation
    from kit.ingest.sources import from_manifest, write_caption_pairs

    records = from_manifest(path)
    fraction = recipe.eval.held_out if recipe.eval else 0.0
    held = held_out_groups({image_group(r.id) for r in records}, fraction)
    train_records = [r for r in records if image_group(r.id) not in held]
    if not train_records:
        raise KitError(f"{path}: every image fell into the held-out split; add images or lower eval.held_out")
    work = path / ".kit" / recipe.name
    work.mkdir(parents=True, exist_ok=True)
    g = recipe.generate
    if g is None:
        raise KitError(f"recipe '{recipe.name}' has no generate section; it cannot turn {path} into conversations")
    backend = make_backend(g.backend, g.model, g.base_url)
    summary = run_generation(
        train_records, work / "generated", types=g.types, domain=g.domain, backend=backend, concurrency=g.concurrency,
        max_tokens=g.max_tokens, temperature=g.temperature, seed=recipe.train.seed, echo=echo,
    )
    samples = json.loads((work / "generated" / "data.json").read_text())
    echo(f"generated {len(samples)} training conversations ({summary.rejected} rejected, {summary.failed} failed)")
    if recipe.data.caption_pairs:
        write_caption_pairs(train_records, work / "captions.json", seed=recipe.train.seed)
        samples += json.loads((work / "captions.json").read_text())
    eval_source = path / recipe.eval.file if recipe.eval else None
    if recipe.data.vqa_train and eval_source is not None and eval_source.is_file():
        train_images = {str(Path(r.image)) for r in train_records}
        vqa = vqa_samples(eval_source, train_images)
        samples += vqa
        echo(f"added {len(vqa)} VQA question/answer pairs about training images")
    if not samples:
        raise KitError(f"{path}: generation produced no usable conversations (see {work / 'generated' / 'rejects.jsonl'})")
    train_file = work / "train.json"
    write_json_atomic(train_file, samples, indent=1)
    cards.write_card(work, cards.new_card("data", made_by="kit adapt", image_folder=str(path.resolve()), samples=len(samples)))
    eval_file = None
    if recipe.eval and held and (path / recipe.eval.file).is_file():
        eval_file = work / "eval" / "heldout.jsonl"
        eval_file.parent.mkdir(exist_ok=True)
        held_images = {str(Path(r.image)): "\n".join(r.captions + r.findings) for r in records if image_group(r.id) in held}
        n = _write_eval_subset(path / recipe.eval.file, held_images, eval_file, path)
        echo(f"held out {len(held)} of {len({image_group(r.id) for r in records})} images for evaluation ({n} questions)")
        if n == 0:
            eval_file = None
    return train_file, eval_file


def adapt(recipe: Recipe, base: str | None, data: str | None, out: str | None, max_steps: int | None, resume: bool, echo=print) -> Path:
    """The whole pipeline. Raises KitError on bad input before anything is trained."""
    from kit.eval.vqa import compare, evaluate
    from kit.train.run import last_checkpoint, resolve_base, train

    base_path = resolve_base(recipe, base)
    # Output problems surface before minutes of generation, not after.
    if resume and (out is None or last_checkpoint(Path(out)) is None):
        raise KitError(f"--resume: no checkpoint-* folder in {out}; run without --resume to start fresh")
    if not resume and out is not None and Path(out).exists() and any(Path(out).iterdir()):
        raise KitError(f"--out {out} already exists and is not empty; pass --resume to continue it or choose another folder")
    train_file, eval_file = prepare_data(recipe, data, echo)
    before = None
    if eval_file is not None:
        echo("evaluating the base on the held-out images ...")
        before = evaluate(base_path, eval_file, max_new_tokens=recipe.eval.max_new_tokens, echo=lambda m: None)
    result = train(recipe, base=str(base_path), data=str(train_file), out=out, max_steps=max_steps, resume=resume, echo=echo)
    if eval_file is not None:
        echo("evaluating the adapted model ...")
        after = evaluate(result, eval_file, max_new_tokens=recipe.eval.max_new_tokens, echo=lambda m: None)
        echo(compare(before, after))
        card = cards.read_card(result) or {}
        card["evaluation"] = {
            "data": str(eval_file),
            "base": {k: v for k, v in before.items() if k != "predictions"},
            "adapted": {k: v for k, v in after.items() if k != "predictions"},
        }
        cards.write_card(result, card)
    return result
