"""`kit pretrain`, `kit finetune`, `kit adapt`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from kit.cli.app import BaseOpt, DataOpt, FromOpt, OutOpt, RecipeOpt, ResumeOpt, SetOpt, StepsOpt, app, echo_err


def _overrides(overrides: list[str] | None, start: str | None) -> list[str]:
    return [*(overrides or []), *([f"model.adapter={start}"] if start else [])]


def _train(stage: str, recipe: str, base, data, out, max_steps, resume, overrides) -> None:
    from kit.core.recipes import load_recipe
    from kit.train.run import train

    r = load_recipe(recipe, overrides, stage=stage)
    path = train(r, base=base, data=data, out=out, max_steps=max_steps, resume=resume, echo=echo_err)
    typer.echo(str(path))


@app.command()
def pretrain(recipe: RecipeOpt, base: BaseOpt = None, data: DataOpt = None, out: OutOpt = None,
             max_steps: StepsOpt = None, resume: ResumeOpt = False, set_: SetOpt = None) -> None:
    """Stage 1: align the projector on image-caption pairs (vision tower and LLM frozen)."""
    _train("pretrain", recipe, base, data=data, out=out, max_steps=max_steps, resume=resume, overrides=set_ or [])


@app.command()
def finetune(recipe: RecipeOpt, base: BaseOpt = None, data: DataOpt = None, out: OutOpt = None,
             max_steps: StepsOpt = None, resume: ResumeOpt = False, set_: SetOpt = None, start: FromOpt = None) -> None:
    """Stage 2: visual instruction tuning of projector + LLM (full or LoRA), or preference tuning (train.objective: dpo)."""
    _train("finetune", recipe, base, data=data, out=out, max_steps=max_steps, resume=resume, overrides=_overrides(set_, start))


@app.command()
def adapt(recipe: RecipeOpt, base: BaseOpt = None,
          data: Annotated[Optional[str], typer.Option(help="Manifest folder (private_data/README.md), LLaVA .json file, or a reviewed kit generate folder; default: the recipe's sample set.")] = None,
          out: OutOpt = None, max_steps: StepsOpt = None, resume: ResumeOpt = False, set_: SetOpt = None,
          start: FromOpt = None) -> None:
    """Adapt a LLaVA to your domain: sample/ingest -> generate -> check -> QLoRA -> before/after evaluation."""
    from kit.adapt import adapt as run_adapt
    from kit.base.mini import embedded_rule
    from kit.core.recipes import load_recipe

    r = load_recipe(recipe, _overrides(set_, start), embedded_rule(base, echo_err), stage="adapt")

    path = run_adapt(r, base, data, out, max_steps, resume, echo=echo_err)
    echo_err(f"next: kit chat {path} --image IMG --prompt '...'  |  kit serve {path}  |  kit merge {path} --out DIR")
    typer.echo(str(path))
