"""The `kit` app, its sub-commands and the option types the commands share."""

from __future__ import annotations

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
DataOpt = Annotated[Optional[str], typer.Option(help="LLaVA .json/.jsonl data file (image paths relative to its folder unless data.image_folder is set), or a kit generate folder: what its review (kit review) kept.")]
OutOpt = Annotated[Optional[str], typer.Option(help="Output folder (default: outputs/<recipe>-<time> or adapters/<recipe>-<time>).")]
StepsOpt = Annotated[Optional[int], typer.Option("--max-steps", help="Stop after N optimizer steps.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in --out.")]
FromOpt = Annotated[Optional[str], typer.Option("--from", help="Start from this LoRA adapter kit trained (its base is the base); e.g. preference tuning after kit adapt.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe key, e.g. --set train.lr=2e-5 (repeatable).")]
SourceOpt = Annotated[str, typer.Option(help="coco | manifest | dicom | figures")]
InputOpt = Annotated[Path, typer.Option("--input", help="COCO captions file, manifest folder, DICOM folder or figures JSONL.")]
ImagesOpt = Annotated[Optional[Path], typer.Option(help="Image folder (COCO, figures).")]
InstancesOpt = Annotated[Optional[Path], typer.Option(help="COCO instances file (object boxes).")]


def echo_err(msg: str) -> None:
    """Progress and notes go to stderr; a command's result (a path, a table) to stdout."""
    typer.echo(msg, err=True)
