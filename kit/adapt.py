"""`kit adapt`: ingest -> generate -> check -> train -> evaluate, privately, from one command.

With a manifest folder (or a recipe's sample set) as data, the images are split into training and
held-out groups (augmented copies of one image stay together), instruction data is generated for
the training images only, the base is evaluated on the held-out VQA items, adapted, and evaluated
again. A LLaVA JSON file as data skips the generation and split. The one module that composes
stages; each stage lives in its own package.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kit.core.cards import Card
from kit.core.errors import KitError
from kit.core.files import read_json, read_jsonl, write_json_atomic, write_jsonl_atomic
from kit.core.recipes import Recipe
from kit.core.stages import Stages
from kit.core.templates import IMAGE_TOKEN
from kit.data.reviewed import REVIEW_LOG, ReviewCounts, is_generated_folder, reviewed_samples
from kit.data.vqa import ANSWER_TYPES, ask
from kit.eval.metrics import PROMPT_STYLE
from kit.eval.vqa import before_after_table, changes, evaluate
from kit.eval.hallucination import hallucination_changes
from kit.generate.replicas import backend_for
from kit.generate.report import failures_error
from kit.generate.runner import run_generation
from kit.generate.settings import GenerationSettings
from kit.ground.policy import resolve_vocab
from kit.ground.probes import build_probes
from kit.ground.vocab import load_vocab
from kit.ingest.pairs import write_caption_pairs
from kit.ingest.records import Record
from kit.ingest.samples.write import write_sample
from kit.ingest.sources import from_manifest
from kit.ingest.split import held_out_groups, image_group, sample_folder
from kit.prefer.pairs import build_pairs, load_prompts, record_answers
from kit.train.plan import RunPlan, data_file, image_folder, plan_output, resolve_base
from kit.train.run import run


def _resolve_data(recipe: Recipe, data: str | None, echo) -> Path:
    if data is not None:
        path = Path(data)
        if not path.exists():
            raise KitError(f"--data {path} does not exist; give a manifest folder (private_data/README.md) or a LLaVA .json/.jsonl file")
        return path
    if not recipe.data.sample:
        raise KitError(f"recipe '{recipe.name}' names no sample set; pass --data (a manifest folder or a LLaVA .json file)")
    folder = sample_folder(recipe.data.sample)
    if not (folder / "manifest.jsonl").is_file():
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
    Card.new("data", made_by="kit adapt", image_folder=str(data_root.resolve())).write(dest.parent)
    return len(kept)


def probe_vocab(recipe: Recipe) -> str:
    """The vocabulary a run's probes are built with: its generation's, else its preference stage's
    (so `medical-dpo` probes as `medical` does), else general."""
    if recipe.generate is not None:
        return resolve_vocab(recipe.generate.vocab, recipe.generate.domain)
    if recipe.preference is not None:
        return recipe.preference.vocab
    return "general"


def _add_probes(eval_file: Path, held: list[Record], data_root: Path, recipe: Recipe) -> int:
    """Append POPE probes and describe items about the held-out images that have boxes or findings
    (kit.ground.probes) to the held-out file; how many were added. Augmented copies of an image
    share its facts, so one copy per image is probed."""
    groups: dict[str, Record] = {}
    for r in held:
        if r.boxes or r.findings:
            groups.setdefault(image_group(r.id), r)
    annotated = list(groups.values())
    if not annotated:
        return 0
    vocab = load_vocab(probe_vocab(recipe))
    items = build_probes(annotated, vocab, data_root, seed=recipe.train.seed, per_image=recipe.eval.probes_per_image)
    existing = [line for _, line in read_jsonl(eval_file, "evaluation file", allow_empty=True)]
    write_jsonl_atomic(eval_file, existing + items)
    return len(items)


def vqa_samples(eval_file: Path, images: set[str], style: str = "as-written") -> list[dict]:
    """The eval file's items about `images` as training conversations, asked exactly as kit eval
    asks with the recipe's metric (`style`: kit.data.vqa.ask)."""
    out = []
    for lineno, item in read_jsonl(eval_file, "evaluation file", allow_empty=True):
        if str(Path(str(item.get("image", "")))) not in images:
            continue
        kind = item.get("answer_type")
        if kind == "describe":  # no answer to train on
            continue
        if kind not in ANSWER_TYPES:
            raise KitError(f"{eval_file}:{lineno}: answer_type must be closed or open")
        answer = str(item["answer"]).strip()
        answer = answer.capitalize() + "." if kind == "closed" and answer.lower() in ("yes", "no") else answer
        out.append({
            "id": f"{item.get('id', lineno)}-vqa",
            "image": item["image"],
            "conversations": [
                {"from": "human", "value": f"{IMAGE_TOKEN}\n{ask(str(item['question']), answer, kind, style=style)}"},
                {"from": "gpt", "value": answer},
            ],
        })
    return out


@dataclass
class Prepared:
    train: Path  # a LLaVA file, or a reviewed kit generate folder
    eval: Path | None = None  # held-out questions and probes
    made: str | None = None  # what generation made
    review: ReviewCounts | None = None  # what a review of the generated conversations decided


def prepare_data(recipe: Recipe, data: str | None, echo=print, stages: Stages | None = None) -> Prepared:
    """The training data and held-out eval file. Generation resumes from its ledger if rerun, and
    a review of its folder (kit review) decides what trains, as for a reviewed folder given as data."""
    stages = stages or Stages(echo=lambda m: None)
    with stages.stage("sample"):
        path = _resolve_data(recipe, data, echo)
    if path.is_file():
        return Prepared(path)
    if is_generated_folder(path):
        if recipe.train.objective == "dpo":
            raise KitError(f"--data {path}: a preference recipe trains pairs; make them with `kit data pairs {path} --out "
                           "PAIRS.json` and pass that file, or give the manifest folder")
        reviewed = reviewed_samples(path, recipe.data.undecided)
        echo(reviewed.counts.line())
        return Prepared(path, review=reviewed.counts)
    with stages.stage("generation"):
        return _prepare_folder(recipe, path, echo)


def _prepare_folder(recipe: Recipe, path: Path, echo) -> Prepared:
    if not (path / "manifest.jsonl").is_file():
        raise KitError(f"--data {path}: a data folder needs a manifest.jsonl (see private_data/README.md), a kit generate "
                       "folder (data.json), or pass a LLaVA .json file")
    records = from_manifest(path)
    fraction = recipe.eval.held_out if recipe.eval else 0.0
    held = held_out_groups({image_group(r.id) for r in records}, fraction)
    train_records = [r for r in records if image_group(r.id) not in held]
    if not train_records:
        raise KitError(f"{path}: every image fell into the held-out split; add images or lower eval.held_out")
    work = path / ".kit" / recipe.name
    work.mkdir(parents=True, exist_ok=True)
    if recipe.train.objective == "dpo":
        return _prepare_pairs(recipe, path, records, train_records=train_records, held=held, work=work, echo=echo)
    g = recipe.generate
    if g is None:
        raise KitError(f"recipe '{recipe.name}' has no generate section; it cannot turn {path} into conversations")
    backend = backend_for(g.backend, g.model, g.base_url)
    settings = GenerationSettings(types=g.types, domain=g.domain, concurrency=g.concurrency, max_tokens=g.max_tokens,
                                  temperature=g.temperature, seed=recipe.train.seed, grounding=g.grounding, vocab=g.vocab)
    summary = run_generation(train_records, work / "generated", backend=backend, settings=settings, echo=echo)
    generated = work / "generated"
    samples = read_json(generated / "data.json", "generated data", expect=list)
    made = generation_line(len(samples), summary.rejected, summary.failed, claims=summary.claims)
    echo(made)
    failed = failures_error(summary)
    if failed is not None:  # training on what happened to finish would hide a broken backend
        raise failed
    review = None
    if (generated / REVIEW_LOG).is_file():
        reviewed = reviewed_samples(generated, recipe.data.undecided)
        samples, review = reviewed.samples, reviewed.counts
        echo(review.line())
    if recipe.data.caption_pairs:
        write_caption_pairs(train_records, work / "captions.json", seed=recipe.train.seed)
        samples += read_json(work / "captions.json", "caption pairs", expect=list)
    eval_source = path / recipe.eval.file if recipe.eval else None
    if recipe.data.vqa_train and eval_source is not None and eval_source.is_file():
        train_images = {str(Path(r.image)) for r in train_records}
        vqa = vqa_samples(eval_source, train_images, PROMPT_STYLE[recipe.eval.metric])
        samples += vqa
        echo(f"added {len(vqa)} VQA question/answer pairs about training images")
    if not samples:
        raise KitError(f"{path}: generation produced no usable conversations (see {work / 'generated' / 'rejects.jsonl'})")
    train_file = work / "train.json"
    write_json_atomic(train_file, samples, indent=1)
    Card.new("data", made_by="kit adapt", image_folder=str(path.resolve()), samples=len(samples)).write(work)
    return Prepared(train_file, _held_out_eval(recipe, path, records, held=held, work=work, echo=echo), made, review=review)


def _held_out_eval(recipe: Recipe, path: Path, records: list[Record], held: set[str], work: Path, echo) -> Path | None:
    """The eval file's questions about the held-out images, plus hallucination probes; None when none."""
    if not (recipe.eval and held and (path / recipe.eval.file).is_file()):
        return None
    eval_file = work / "eval" / "heldout.jsonl"
    eval_file.parent.mkdir(exist_ok=True)
    held_images = {str(Path(r.image)): "\n".join(r.captions + r.findings) for r in records if image_group(r.id) in held}
    n = _write_eval_subset(path / recipe.eval.file, held_images, eval_file, data_root=path)
    echo(f"held out {len(held)} of {len({image_group(r.id) for r in records})} images for evaluation ({n} questions)")
    if recipe.eval.probes:
        probed = _add_probes(eval_file, [r for r in records if image_group(r.id) in held], path, recipe=recipe)
        if probed:
            echo(f"hallucination probes: {probed} yes/no questions and descriptions about the held-out images")
            n += probed
    return eval_file if n else None


def _prepare_pairs(recipe: Recipe, path: Path, records: list[Record], train_records: list[Record], held: set[str],
                   work: Path, echo) -> Prepared:
    """Preference pairs from the training images' own captions, findings and boxes (kit data pairs),
    written to the work folder; the held-out images stay out of them and are evaluated."""
    vocab = load_vocab(recipe.preference.vocab)
    answers = record_answers(train_records, vocab, load_prompts())
    result = build_pairs(answers, vocab, per_answer=recipe.preference.per_answer, seed=recipe.train.seed, records=train_records)
    made = result.line()
    echo(made)
    if not result.pairs:
        raise KitError(f"{path}: no preference pair could be made from the training images ({made}); their captions, findings "
                       f"and boxes must name concepts of the '{vocab.name}' vocabulary (preference.vocab)")
    pairs_file = work / "pairs.json"
    write_json_atomic(pairs_file, result.pairs, indent=1)
    Card.new("data", made_by="kit adapt", image_folder=str(path.resolve()), files=[pairs_file.name],
             pairs={**result.summary(), "vocabulary": vocab.source}).write(work)
    return Prepared(pairs_file, _held_out_eval(recipe, path, records, held=held, work=work, echo=echo), made)


def gate_verdict(gate, before: dict, after: dict) -> dict | None:
    """Which of the recipe's eval.gate limits the adapted model broke (a change past the limit whose
    95% interval excludes zero), or None without a gate."""
    if gate is None:
        return None
    failed, checked = [], []
    hall = hallucination_changes(before, after)
    vqa = changes(before, after) or {}
    tests = [("POPE F1", gate.pope_f1_drop, hall.get("pope_f1_all"), -1), ("CHAIR_i", gate.chair_i_rise, hall.get("chair_i"), +1),
             ("closed accuracy", gate.closed_drop, vqa.get("closed_accuracy"), -1)]
    for label, limit, change, worse in tests:
        if limit is None or change is None or change.get("change") is None or change.get("ci") is None:
            continue
        checked.append(label)
        points = 100 * change["change"] * worse
        lo, hi = (100 * v for v in change["ci"])
        beyond_noise = hi < 0 if worse < 0 else lo > 0
        if points > limit and beyond_noise:
            word = "dropped" if worse < 0 else "rose"
            failed.append(f"{label} {word} {points:.1f} points (limit {limit:g}, 95% interval of the change [{lo:+.1f}, {hi:+.1f}])")
    return {"checked": checked, "failed": failed, "passed": not failed}


def generation_line(kept: int, rejected: dict[str, int], failed: dict[str, int], claims: dict[str, int] | None = None) -> str:
    """`conversations: 7 generated, 11 rejected (8 claims, 1 truncated, ...), 0 failed; claims not in the
    source: 9 unsupported object, 2 contradicted object`."""
    why = ", ".join(f"{n} {reason}" for reason, n in sorted(rejected.items(), key=lambda kv: -kv[1]))
    line = (f"conversations: {kept} generated, {sum(rejected.values())} rejected{f' ({why})' if why else ''}, "
            f"{sum(failed.values())} failed")
    if claims:
        line += "; claims not in the source: " + ", ".join(f"{n} {kind}" for kind, n in sorted(claims.items(), key=lambda kv: -kv[1]))
    return line


def adapt(recipe: Recipe, base: str | None, data: str | None, out: str | None, max_steps: int | None, resume: bool, echo=print) -> Path:
    """The whole pipeline, one `stage NAME: seconds, peak memory` line per stage. Raises KitError
    on bad input before anything is trained."""
    stages = Stages(echo=echo)
    with stages.stage("base"):
        base_folder = resolve_base(recipe, base)
    # Output problems surface before minutes of generation, not after.
    out_path = plan_output(recipe, out, resume)
    prepared = prepare_data(recipe, data, echo, stages=stages)
    train_file, eval_file, made = prepared.train, prepared.eval, prepared.made
    before = None
    # A run that goes on from an adapter is measured against that adapter, not the bare base.
    start = Path(recipe.model.adapter) if recipe.model.adapter else base_folder.path
    labels = ("start", "after") if recipe.model.adapter else ("base", "adapted")
    if eval_file is not None:
        echo(f"evaluating the {'starting adapter' if recipe.model.adapter else 'base'} on the held-out images ...")
        with stages.stage("evaluation before"):
            before = evaluate(start, eval_file, max_new_tokens=recipe.eval.max_new_tokens, echo=lambda m: None, metric=recipe.eval.metric)
    # Trained from the merged train.json: the card says what the review of its conversations decided.
    reviewed = {"review": prepared.review.to_json()} if prepared.review is not None and prepared.train.is_file() else {}
    plan = RunPlan(recipe, base_folder, data_file(recipe, str(train_file)), image_folder=image_folder(recipe), out=out_path, resume=resume, card_extra=reviewed)
    result = run(plan, max_steps, echo=echo, stages=stages)
    if eval_file is not None:
        echo("evaluating the adapted model ...")
        with stages.stage("evaluation after"):
            after = evaluate(result, eval_file, max_new_tokens=recipe.eval.max_new_tokens, echo=lambda m: None, metric=recipe.eval.metric)
        echo(before_after_table(before, after, labels))
        card = Card.read(result) or Card.new("adapter", made_by="kit adapt")
        gate = gate_verdict(recipe.eval.gate, before, after)
        card.evaluation = {
            "data": str(eval_file),
            "metric": after["metric"],
            "prompts": after["prompts"],
            "change": changes(before, after),
            "hallucination_change": hallucination_changes(before, after),
            "before": str(start),
            "base": {k: v for k, v in before.items() if k not in ("predictions", "answer_tokens")},
            "adapted": {k: v for k, v in after.items() if k not in ("predictions", "answer_tokens")},
            **({"gate": gate} if gate is not None else {}),
        }
        card.write(result)
        if gate is not None and gate["failed"]:
            raise KitError(f"release gate failed: {'; '.join(gate['failed'])}; the adapter is kept at {result} and its card records "
                           "the gate (raise the limit in eval.gate, or fix the data)", exit_code=1)
    if made:
        echo(made)
    peak = max(p for _, _, p in stages.done)
    echo(f"total: {stages.total() / 60:.1f} min over {len(stages.done)} stages, peak memory {peak / 1e9:.2f} GB")
    return result
