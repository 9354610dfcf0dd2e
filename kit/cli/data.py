"""`kit data check | sample | ingest` and `kit generate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kit.core.strategies import STRATEGIES, STRATEGY_HELP
from kit.core import options
from kit.cli.app import BaseOpt, DataOpt, ImagesOpt, InputOpt, InstancesOpt, RecipeOpt, SetOpt, SourceOpt, app, data_app, echo_err


@data_app.command("check")
def data_check(recipe: RecipeOpt, base: BaseOpt = None, data: DataOpt = None, set_: SetOpt = None,
               gpu: Annotated[Optional[str], typer.Option(help="Card memory to check the estimate against, e.g. 24GB.")] = None,
               gpus: Annotated[int, typer.Option(min=1, help="GPUs the run spreads over: the estimate is per GPU.")] = 1,
               strategy: Annotated[str, typer.Option(help="How the run spreads over --gpus: "
                                                     + "; ".join(f"{k}: {v}" for k, v in STRATEGY_HELP.items()) + ".")] = STRATEGIES[0]) -> None:
    """Pre-flight: sample count, image problems, token lengths (image tokens included), truncation, GPU memory
    (per GPU with --gpus N; with --gpu as well, which strategy fits)."""
    from kit.base.mini import embedded_rule
    from kit.core.recipes import load_recipe
    from kit.train.check import GpuPlan, check

    ok = check(load_recipe(recipe, set_ or [], embedded_rule(base, echo_err)), base, data, echo=typer.echo, memory=GpuPlan(gpus=gpus, strategy=strategy, gpu=gpu))
    if not ok:
        raise typer.Exit(1)


BurnedInOpt = Annotated[bool, typer.Option("--burned-in-checked", help="DICOM: use images marked BurnedInAnnotation=YES; "
                                              "only after checking that their pixels show no identifying text.")]
PublicOpt = Annotated[bool, typer.Option("--public", help="COCO / figures: the images and texts are public data. "
                                           "Without it every source is private: it never goes to a remote backend without --allow-remote.")]


@data_app.command("pairs")
def data_pairs(
    source: Annotated[Path, typer.Argument(help="A kit generate folder (reviewed or not), a manifest folder, or a COCO captions file (with --instances, --images).")],
    out: Annotated[Path, typer.Option(help="The pairs file to write (.json); a data card naming the image folder goes beside it.")],
    vocab: Annotated[Optional[str], typer.Option(help="Vocabulary the edits and checks use (default: the folder's own, else general).")] = None,
    per_answer: Annotated[int, typer.Option(help="Pairs per grounded answer at most (edit kinds balanced over the set).")] = 2,
    seed: Annotated[int, typer.Option(help="Seed for the choice among equally good edits.")] = 0,
    images: ImagesOpt = None,
    instances: InstancesOpt = None,
    undecided: Annotated[str, typer.Option(help="A reviewed folder: 'exclude' (default) or 'include' conversations nobody decided on.")] = options.UNDECIDED[0],
    prompts: Annotated[Optional[Path], typer.Option(help="Questions for answers composed from manifest / COCO records (a copy of kit/prefer/prompts.yaml).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
    from_model: Annotated[Optional[Path], typer.Option(help="Also ask this model or adapter the prompts (greedy, on this machine): its answers the claim check flags become rejected answers.")] = None,
) -> None:
    """Preference pairs from your own annotations: a grounded answer vs the same answer with one fact made false."""
    from kit.prefer.pairs import write_pairs

    write_pairs(source, out, vocab=vocab, seed=seed, per_answer=per_answer, images=images, instances=instances,
                undecided=undecided, prompts=prompts, force=force, from_model=from_model, echo=echo_err)
    typer.echo(str(out))


@app.command()
def generate(
    source: SourceOpt,
    input: InputOpt,
    out: Annotated[Path, typer.Option(help="Output folder: data.json, rejects.jsonl, sources.jsonl, summary.json, ledger.jsonl, kit.json.")],
    images: ImagesOpt = None,
    instances: InstancesOpt = None,
    types: Annotated[str, typer.Option(help=f"Comma-separated: {', '.join(options.GENERATE_TYPES)}.")] = ",".join(options.GENERATE_TYPES),
    domain: Annotated[str, typer.Option(help="Prompt set: general, medical, ...")] = options.GENERATE_DOMAIN,
    backend: Annotated[str, typer.Option(help="openai (GPT-4 family or any OpenAI-compatible --base-url) or hf (in-process).")] = options.GENERATE_BACKEND,
    model: Annotated[Optional[str], typer.Option(help="Model name (openai) or folder (hf; default: packaged SmolLM2).")] = None,
    base_url: Annotated[Optional[list[str]], typer.Option(help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (vLLM, llama.cpp, Ollama); repeat it for replicas of one model: requests are spread over them.")] = None,
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once, per server.")] = options.GENERATE_CONCURRENCY,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N records.")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed (per task).")] = 0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the prompts and a token / cost estimate; call nothing.")] = False,
    allow_remote: Annotated[bool, typer.Option("--allow-remote", help="Allow private records to go to a non-loopback backend.")] = False,
    max_tokens: Annotated[int, typer.Option(help="Reply length cap.")] = options.GENERATE_MAX_TOKENS,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = options.GENERATE_TEMPERATURE,
    public: PublicOpt = False,
    burned_in_checked: BurnedInOpt = False,
    force: Annotated[bool, typer.Option("--force", help="Start over in an --out an earlier kit generate wrote, instead of resuming it.")] = False,
    grounding: Annotated[str, typer.Option(help=f"{' | '.join(options.GROUNDING)}: what to do with conversations that claim what the image's own facts do not support.")] = options.GROUNDING[0],
    vocab: Annotated[Optional[str], typer.Option(help="Claim vocabulary: general, medical, industrial, documents, or a YAML file (default: the one named like --domain).")] = None,
) -> None:
    """Write LLaVA instruction data from captions, boxes and findings with GPT-4 or a local model.

    Rerunning the same command resumes: finished tasks are kept, failed ones retried. Exits 1 when
    tasks failed for good (what finished is saved).
    """
    from kit.generate.command import generate_command

    generate_command(source=source, input=input, out=out, images=images, instances=instances, types=types, domain=domain,
                     backend=backend, model=model, base_url=base_url, concurrency=concurrency, limit=limit, seed=seed,
                     dry_run=dry_run, allow_remote=allow_remote, max_tokens=max_tokens, temperature=temperature, echo=echo_err,
                     public=public, burned_in_checked=burned_in_checked, force=force, grounding=grounding, vocab=vocab)


@data_app.command("sample")
def data_sample(domain: Annotated[str, typer.Argument(help="Sample set: medical.")],
                out: Annotated[Path, typer.Option(help="Folder to write (manifest layout).")]) -> None:
    """Write real sample images that ship in pip packages, with captions, findings and eval questions."""
    from kit.ingest.samples.write import write_sample

    card = write_sample(domain, out)
    typer.echo(f"{out}: {getattr(card, 'images', '?')} images, {getattr(card, 'eval_items', '?')} eval questions")


@data_app.command("ingest")
def data_ingest(
    source: SourceOpt,
    input: InputOpt,
    out: Annotated[Path, typer.Option(help="Stage-1 LLaVA JSON to write (image-caption pairs).")],
    images: ImagesOpt = None,
    instances: InstancesOpt = None,
    seed: Annotated[int, typer.Option(help="Chooses the instruction wording per image.")] = 0,
    public: PublicOpt = False,
    burned_in_checked: BurnedInOpt = False,
) -> None:
    """Write stage-1 caption pairs from your own sources (LLaVA-Med's concept-alignment data)."""
    from kit.ingest.pairs import ingest

    n = ingest(source, input, out, images=images, instances=instances, seed=seed, public=public, burned_in_checked=burned_in_checked, echo=echo_err)
    typer.echo(f"{n} caption pairs -> {out}")


@data_app.command("probes")
def data_probes(
    source: Annotated[Path, typer.Argument(help="A manifest folder, or a COCO captions file (with --instances and --images).")],
    out: Annotated[Path, typer.Option(help="JSONL to write (kit eval items); put it in the image folder.")],
    vocab: Annotated[str, typer.Option(help="Concepts to probe: general, medical, industrial, documents, or a YAML file.")] = "general",
    seed: Annotated[int, typer.Option(help="Chooses the probed concepts and the random negatives.")] = 0,
    per_image: Annotated[int, typer.Option(help="Yes questions per image and set (as many no questions).")] = 3,
    images: ImagesOpt = None,
    instances: InstancesOpt = None,
) -> None:
    """Write POPE-style yes/no probes (random, popular, adversarial negatives) and describe items from your annotations."""
    from kit.ground.probes import write_probes

    write_probes(source, out, vocab=vocab, seed=seed, per_image=per_image, images=images, instances=instances, echo=echo_err)


@data_app.command("import-vqa")
def data_import_vqa(
    name: Annotated[str, typer.Argument(help="vqa-rad | slake | pathvqa")],
    root: Annotated[Path, typer.Argument(help="The unpacked release: VQA-RAD's folder, Slake1.0/, or PathVQA's pvqa/.")],
    out: Annotated[Path, typer.Option(help="New folder: <split>.jsonl (kit eval) and <split>.json (kit adapt / train) per split.")],
    language: Annotated[str, typer.Option(help="SLAKE: questions in this language (en, zh) or all.")] = "en",
) -> None:
    """Convert a medical VQA benchmark, in its published layout, into kit's eval and training files."""
    from kit.ingest.vqa_sets import import_vqa_set

    counts = import_vqa_set(name, root, out, language=language)
    typer.echo(f"{name}: " + ", ".join(f"{split} {n} questions" for split, n in counts.items()) + f" -> {out}")
    if "test" in counts:
        typer.echo(f"evaluate: kit eval MODEL --data {out / 'test.jsonl'}; train: kit adapt --recipe medical --data {out / 'train.json'}")

