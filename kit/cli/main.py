"""`kit` command line. Commands only parse and call into the library; `main()` is the one place
that turns known errors into one-line messages and exit codes. Heavy imports (torch,
transformers) happen inside commands so `kit --help` is instant."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Private, parameter-efficient LLaVA adaptation on one GPU.")
base_app = typer.Typer(no_args_is_help=True, help="Build LLaVA bases from parts, or the embedded mini base.")
recipes_app = typer.Typer(no_args_is_help=True, help="List and show shipped recipes.")
data_app = typer.Typer(no_args_is_help=True, help="Check, sample and ingest data.")
adapters_app = typer.Typer(no_args_is_help=True, help="List and inspect trained adapters.")
app.add_typer(base_app, name="base")
app.add_typer(recipes_app, name="recipes")
app.add_typer(data_app, name="data")
app.add_typer(adapters_app, name="adapters")

RecipeOpt = Annotated[str, typer.Option("--recipe", "-r", help="Recipe name (kit recipes list) or path to a .yaml file.")]
BaseOpt = Annotated[Optional[str], typer.Option(help="Base model folder, or 'mini' (the embedded default).")]
DataOpt = Annotated[Optional[str], typer.Option(help="LLaVA .json/.jsonl data file; image paths are relative to its folder unless data.image_folder is set.")]
OutOpt = Annotated[Optional[str], typer.Option(help="Output folder (default: outputs/<recipe>-<time> or adapters/<recipe>-<time>).")]
StepsOpt = Annotated[Optional[int], typer.Option("--max-steps", help="Stop after N optimizer steps.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in --out.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe key, e.g. --set train.lr=2e-5 (repeatable).")]
SourceOpt = Annotated[str, typer.Option(help="coco | manifest | dicom | figures")]
InputOpt = Annotated[Path, typer.Option("--input", help="COCO captions file, manifest folder, DICOM folder or figures JSONL.")]
ImagesOpt = Annotated[Optional[Path], typer.Option(help="Image folder (COCO, figures).")]
InstancesOpt = Annotated[Optional[Path], typer.Option(help="COCO instances file (object boxes).")]


def _echo(msg: str) -> None:
    typer.echo(msg, err=True)


def _train(stage: str, recipe: str, base, data, out, max_steps, resume, overrides) -> None:
    from kit.core.errors import KitError
    from kit.core.recipes import load_recipe

    r = load_recipe(recipe, overrides or [])
    if r.stage != stage:
        raise KitError(f"recipe '{r.name}' is a {r.stage} recipe; run it with `kit {r.stage}`")
    from kit.train.run import train

    path = train(r, base=base, data=data, out=out, max_steps=max_steps, resume=resume, echo=_echo)
    typer.echo(str(path))


@app.command()
def pretrain(recipe: RecipeOpt, base: BaseOpt = None, data: DataOpt = None, out: OutOpt = None,
             max_steps: StepsOpt = None, resume: ResumeOpt = False, set_: SetOpt = None) -> None:
    """Stage 1: align the projector on image-caption pairs (vision tower and LLM frozen)."""
    _train("pretrain", recipe, base, data, out, max_steps, resume, set_)


@app.command()
def finetune(recipe: RecipeOpt, base: BaseOpt = None, data: DataOpt = None, out: OutOpt = None,
             max_steps: StepsOpt = None, resume: ResumeOpt = False, set_: SetOpt = None) -> None:
    """Stage 2: visual instruction tuning of projector + LLM (full or LoRA)."""
    _train("finetune", recipe, base, data, out, max_steps, resume, set_)


@app.command()
def adapt(recipe: RecipeOpt, base: BaseOpt = None,
          data: Annotated[Optional[str], typer.Option(help="Manifest folder (private_data/README.md) or LLaVA .json file; default: the recipe's sample set.")] = None,
          out: OutOpt = None, max_steps: StepsOpt = None, resume: ResumeOpt = False, set_: SetOpt = None) -> None:
    """Adapt a LLaVA to your domain: sample/ingest -> generate -> check -> QLoRA -> before/after evaluation."""
    from kit.core.errors import KitError
    from kit.core.recipes import load_recipe

    r = load_recipe(recipe, set_ or [])
    if r.stage != "adapt":
        raise KitError(f"recipe '{r.name}' is a {r.stage} recipe; run it with `kit {r.stage}`")
    if (base or r.model.base or "mini") in ("mini", "mini-raw"):
        import torch

        if not torch.cuda.is_available():
            r = load_recipe(recipe, set_ or [], embedded=True)
            _echo("embedded mini base on CPU: applying the recipe's `embedded` settings")
    from kit.adapt import adapt as run_adapt

    path = run_adapt(r, base, data, out, max_steps, resume, echo=_echo)
    _echo(f"next: kit chat {path} --image IMG --prompt '...'  |  kit serve {path}  |  kit merge {path} --out DIR")
    typer.echo(str(path))


@app.command("eval")
def eval_(model: Annotated[Path, typer.Argument(help="Model folder or adapter folder (only the path is needed).")],
          data: Annotated[Path, typer.Option(help="VQA JSONL: image, question, answer, answer_type closed|open (optional for --judge: context, category).")],
          limit: Annotated[Optional[int], typer.Option(help="Only the first N items.")] = None,
          out: Annotated[Optional[Path], typer.Option(help="Write predictions JSONL here.")] = None,
          baseline: Annotated[Optional[Path], typer.Option(help="Also evaluate this model (e.g. the base) and print both side by side.")] = None,
          judge: Annotated[Optional[str], typer.Option(help="Also score free-form answers with a text-only judge (LLaVA-Bench relative score): openai, an OpenAI-compatible URL (http://127.0.0.1:8000/v1), or hf:PATH (hf: = packaged SmolLM2).")] = None,
          judge_model: Annotated[Optional[str], typer.Option(help="Judge model name (openai: default gpt-4o-2024-08-06; a URL: the name it serves).")] = None,
          allow_remote: Annotated[bool, typer.Option("--allow-remote", help="Allow the private questions, answers and context to go to a non-loopback judge.")] = False) -> None:
    """Closed-question accuracy and open-question token recall (LLaVA-Med's VQA metrics); with --judge, a judged relative score."""
    from kit.eval.command import eval_command

    eval_command(model, data, limit=limit, out=out, echo=typer.echo, baseline=baseline,
                 judge=judge, judge_model=judge_model, allow_remote=allow_remote)


@base_app.command("build")
def base_build(
    out: Annotated[Path, typer.Option(help="Folder to write the HF-native model + processor to.")],
    vision: Annotated[Optional[Path], typer.Option(help="Vision tower folder (CLIP/SigLIP, safetensors).")] = None,
    llm: Annotated[Optional[Path], typer.Option(help="Causal LM folder (safetensors + tokenizer).")] = None,
    preset: Annotated[Optional[str], typer.Option(help="'mini': the embedded default from pip packages.")] = None,
    projector: Annotated[str, typer.Option(help="linear (LLaVA-1) or mlp2x_gelu (LLaVA-1.5).")] = "mlp2x_gelu",
    vision_layer: Annotated[int, typer.Option(help="Vision layer whose features feed the projector.")] = -2,
    image_aspect: Annotated[str, typer.Option(help="pad (LLaVA-1.5) or crop.")] = "pad",
    aligned: Annotated[bool, typer.Option(help="With --preset mini: use the shipped stage-1 projector.")] = True,
) -> None:
    """Assemble a LLaVA from a vision tower and a causal LM (or --preset mini)."""
    from kit.base.build import build

    typer.echo(str(build(out, vision, llm, preset, projector, vision_layer, image_aspect, aligned)))


@base_app.command("align-mini")
def base_align_mini(
    work: Annotated[Path, typer.Option(help="Working folder (data, run, evaluation).")] = Path("outputs/align-mini"),
    steps: Annotated[int, typer.Option(help="Optimizer steps (the shipped projector used 200).")] = 200,
    train_images: Annotated[int, typer.Option(help="Drawn training images (one epoch of 200 steps x 8).")] = 1600,
    eval_images: Annotated[int, typer.Option(help="Held-out drawn images to caption.")] = 100,
    projector_out: Annotated[Optional[Path], typer.Option(help="Where to write the aligned projector (default: only inside --work).")] = None,
) -> None:
    """Reproduce the mini base's stage-1 alignment and print colour/shape/position accuracies."""
    from kit.train.mini_align import align_mini

    align_mini(work, steps, train_images, eval_images, projector_out, echo=_echo)


@base_app.command("eval-mini")
def base_eval_mini(
    model: Annotated[Optional[Path], typer.Option(help="Model folder (default: the cached aligned mini base).")] = None,
    images: Annotated[int, typer.Option(help="Held-out drawn images to caption.")] = 100,
) -> None:
    """Caption held-out drawn shapes greedily and print colour/shape/position accuracy vs chance."""
    from kit.train.mini_align import evaluate_mini

    evaluate_mini(model, images, echo=_echo)


@recipes_app.command("list")
def recipes_list() -> None:
    """Shipped recipes (and those on KIT_RECIPES_PATH)."""
    from kit.core.recipes import available_recipes, load_recipe

    for name, path in available_recipes().items():
        r = load_recipe(str(path))
        typer.echo(f"{name:24} {r.stage:9} {r.description}")


@recipes_app.command("show")
def recipes_show(recipe: Annotated[str, typer.Argument(help="Recipe name or path.")],
                 set_: SetOpt = None) -> None:
    """Print a recipe fully resolved (defaults filled in, overrides applied)."""
    from kit.core.recipes import load_recipe

    typer.echo(load_recipe(recipe, set_ or []).to_yaml(), nl=False)


@data_app.command("check")
def data_check(recipe: RecipeOpt, base: BaseOpt = None, data: DataOpt = None, set_: SetOpt = None,
               gpu: Annotated[Optional[str], typer.Option(help="Card memory to check the estimate against, e.g. 24GB.")] = None) -> None:
    """Pre-flight: sample count, image problems, token lengths (image tokens included), truncation, GPU memory."""
    from kit.train.check import check
    from kit.core.recipes import load_recipe

    ok = check(load_recipe(recipe, set_ or []), base, data, echo=typer.echo, gpu=gpu)
    if not ok:
        raise typer.Exit(1)


@app.command()
def generate(
    source: SourceOpt,
    input: InputOpt,
    out: Annotated[Path, typer.Option(help="Output folder: data.json, rejects.jsonl, summary.json, ledger.jsonl, kit.json.")],
    images: ImagesOpt = None,
    instances: InstancesOpt = None,
    types: Annotated[str, typer.Option(help="Comma-separated: conversation, detail, complex.")] = "conversation,detail,complex",
    domain: Annotated[str, typer.Option(help="Prompt set: general, medical, ...")] = "general",
    backend: Annotated[str, typer.Option(help="openai (GPT-4 family or any OpenAI-compatible --base-url) or hf (in-process).")] = "hf",
    model: Annotated[Optional[str], typer.Option(help="Model name (openai) or folder (hf; default: packaged SmolLM2).")] = None,
    base_url: Annotated[Optional[str], typer.Option(help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (vLLM, llama.cpp, Ollama).")] = None,
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once.")] = 8,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N records.")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed (per task).")] = 0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the prompts and a token / cost estimate; call nothing.")] = False,
    allow_remote: Annotated[bool, typer.Option("--allow-remote", help="Allow private records to go to a non-loopback backend.")] = False,
    max_tokens: Annotated[int, typer.Option(help="Reply length cap.")] = 1024,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.7,
) -> None:
    """Write LLaVA instruction data from captions, boxes and findings with GPT-4 or a local model.

    Rerunning the same command resumes: finished tasks are kept, failed ones retried.
    """
    from kit.generate.command import generate_command

    generate_command(source, input, out, images, instances, types, domain, backend, model, base_url, concurrency,
                     limit, seed, dry_run, allow_remote, max_tokens, temperature, echo=_echo)


@data_app.command("sample")
def data_sample(domain: Annotated[str, typer.Argument(help="Sample set: medical.")],
                out: Annotated[Path, typer.Option(help="Folder to write (manifest layout).")]) -> None:
    """Write real sample images that ship in pip packages, with captions, findings and eval questions."""
    from kit.ingest.samples.write import write_sample

    card = write_sample(domain, out)
    typer.echo(f"{out}: {card.get('images', '?')} images, {card.get('eval_items', '?')} eval questions")


@data_app.command("ingest")
def data_ingest(
    source: SourceOpt,
    input: InputOpt,
    out: Annotated[Path, typer.Option(help="Stage-1 LLaVA JSON to write (image-caption pairs).")],
    images: ImagesOpt = None,
    instances: InstancesOpt = None,
    seed: Annotated[int, typer.Option(help="Chooses the instruction wording per image.")] = 0,
) -> None:
    """Write stage-1 caption pairs from your own sources (LLaVA-Med's concept-alignment data)."""
    from kit.ingest.pairs import ingest

    n = ingest(source, input, out, images, instances, seed)
    typer.echo(f"{n} caption pairs -> {out}")


@adapters_app.command("list")
def adapters_list(root: Annotated[Path, typer.Option(help="Folder to scan.")] = Path("adapters")) -> None:
    """Adapters under adapters/ (or --root): recipe, base, steps, held-out metrics."""
    from kit.infer.load import describe

    folders = sorted(p for p in root.iterdir() if (p / "adapter_config.json").is_file()) if root.is_dir() else []
    if not folders:
        typer.echo(f"no adapters in {root}")
    for p in folders:
        d = describe(p)
        ev = d["evaluation"]
        before, after = (ev.get("base") or {}).get("overall"), (ev.get("adapted") or {}).get("overall")
        held = f"  held-out {100 * before:.1f} -> {100 * after:.1f}" if before is not None and after is not None else ""
        typer.echo(f"{p.name:36} {d.get('recipe') or '?':16} steps {d.get('steps') or '?':>5}{held}  base {d.get('base') or '?'}")


@adapters_app.command("show")
def adapters_show(path: Annotated[Path, typer.Argument(help="Adapter folder.")]) -> None:
    """Everything the adapter's card records (base, quantization, recipe, data, metrics, versions)."""
    import json

    from kit.core.cards import read_card
    from kit.core.errors import KitError

    card = read_card(path)
    if card is None:
        raise KitError(f"{path}: no kit.json card; is this a folder kit wrote?")
    typer.echo(json.dumps(card, indent=2))


@app.command()
def chat(model: Annotated[Path, typer.Argument(help="Model folder or adapter folder (only the path is needed).")],
         image: Annotated[Optional[Path], typer.Option(help="Image to ask about (attached to the first message).")] = None,
         prompt: Annotated[Optional[str], typer.Option(help="Ask once, print the answer and exit; without it, chat on stdin.")] = None,
         max_new_tokens: Annotated[int, typer.Option(help="Answer length cap, in tokens.")] = 256,
         temperature: Annotated[float, typer.Option(help="0 answers greedily (reproducible); higher samples.")] = 0.0,
         system: Annotated[Optional[str], typer.Option(help="System message (default: the one the model was trained with).")] = None,
         seed: Annotated[Optional[int], typer.Option(help="Sampling seed, for reproducible answers at temperature > 0.")] = None) -> None:
    """Talk to a model or adapter offline: one answer with --prompt, else a conversation (/image PATH, /reset, /exit)."""
    from kit.serve.chat import chat as run_chat

    run_chat(model, image=image, prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature, echo=_echo,
             system=system, seed=seed)


@app.command()
def serve(model: Annotated[Path, typer.Argument(help="Base model folder, or an adapter folder (its base is served too).")],
          adapters: Annotated[Optional[list[str]], typer.Argument(help="More adapters on the same base: PATH or NAME=PATH.")] = None,
          host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback is reachable from other machines.")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="Port (0 picks a free one).")] = 8000,
          api_key: Annotated[Optional[str], typer.Option(envvar="KIT_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 (or set KIT_API_KEY).")] = None,
          image_root: Annotated[Optional[Path], typer.Option(help="Allow image file paths / file:// URLs below this folder (default: none).")] = None,
          max_request_bytes: Annotated[int, typer.Option(help="Largest request body accepted (413 above).")] = 20 * 2**20,
          max_tokens_limit: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for (400 above).")] = 1024,
          max_queue: Annotated[int, typer.Option(help="Requests running or waiting for the model at once (429 with Retry-After above).")] = 64) -> None:
    """OpenAI-compatible chat server (POST /v1/chat/completions, GET /v1/models) for a base and its adapters, offline."""
    from kit.serve.app import serve as run_serve

    run_serve(model, adapters or [], host=host, port=port, api_key=api_key, image_root=image_root,
              max_request_bytes=max_request_bytes, max_tokens_limit=max_tokens_limit, max_queue=max_queue, echo=_echo)


@app.command()
def merge(adapters: Annotated[list[Path], typer.Argument(help="Adapter folder(s) written by kit (only the paths are needed).")],
          out: Annotated[Path, typer.Option(help="Folder to write the merged model (or, with --as-adapter, adapter) to.")],
          base_precision: Annotated[str, typer.Option(help="QLoRA adapters: 'dequantized' (the nf4 weights it was trained on, faithful) or 'full' (the original weights).")] = "dequantized",
          weights: Annotated[Optional[list[str]], typer.Option(help="Several adapters: one weight each, '0.6,0.4' or repeated (default: equal, summing to 1).")] = None,
          method: Annotated[str, typer.Option(help="Several adapters: linear (exact Σ w_i ΔW_i), ties, dare or svd.")] = "linear",
          rank: Annotated[Optional[int], typer.Option(help="Truncate each combined ΔW to this rank (--method svd, --as-adapter).")] = None,
          as_adapter: Annotated[bool, typer.Option("--as-adapter", help="Write one LoRA adapter of rank --rank instead of a full model.")] = False,
          density: Annotated[float, typer.Option(help="ties/dare: fraction of each ΔW kept.")] = 0.5,
          seed: Annotated[int, typer.Option(help="dare: seed of the random drop.")] = 0,
          tolerance: Annotated[Optional[float], typer.Option(help="Max |Δlogit| vs the unmerged model before the merge fails (default 0.5).")] = None,
          force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out.")] = False) -> None:
    """Merge an adapter into its base (standalone HF model), or combine several adapters; always verified."""
    from kit.merge.single import run

    typer.echo(str(run(adapters, out, weights=weights, method=method, rank=rank, as_adapter=as_adapter, density=density,
                       seed=seed, base_precision=base_precision, tolerance=tolerance, force=force, echo=_echo)))


def main() -> None:
    import logging
    import warnings

    from kit.core.errors import KitError

    # bitsandbytes' CPU backend warns at import that it could not fetch an optional kernel from the
    # Hub; kit never lets it download anything, so the warning is only noise.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # Weight-loading progress bars flood a chat or server log; training keeps its own progress bar.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    try:
        app()
    except KitError as e:
        if os.environ.get("KIT_DEBUG"):
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the CLI's promise: no bare tracebacks
        if os.environ.get("KIT_DEBUG"):
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        typer.echo(f"error: unexpected {type(e).__name__}: {first} (set KIT_DEBUG=1 to see the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
