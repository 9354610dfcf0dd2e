"""`kit base build | align-mini | eval-mini`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kit.cli.app import base_app, echo_err


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

    typer.echo(str(build(out, vision, llm, preset=preset, projector=projector, vision_layer=vision_layer, image_aspect=image_aspect, aligned=aligned)))


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

    align_mini(work, steps, train_images, n_eval=eval_images, projector_out=projector_out, echo=echo_err)


@base_app.command("eval-mini")
def base_eval_mini(
    model: Annotated[Optional[Path], typer.Option(help="Model folder (default: the cached aligned mini base).")] = None,
    images: Annotated[int, typer.Option(help="Held-out drawn images to caption.")] = 100,
) -> None:
    """Caption held-out drawn shapes greedily and print colour/shape/position accuracy vs chance."""
    from kit.train.mini_align import evaluate_mini

    evaluate_mini(model, images, echo=echo_err)
