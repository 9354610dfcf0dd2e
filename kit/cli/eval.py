"""`kit eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kit.cli.app import app


@app.command("eval")
def eval_(model: Annotated[Path, typer.Argument(help="Model folder, adapter folder, or `kit export` folder (answered by llama.cpp).")],
          data: Annotated[Path, typer.Option(help="VQA JSONL: image, question, answer, answer_type closed|open (optional for --judge: context, category); probes from kit data probes add POPE and CHAIR.")],
          limit: Annotated[Optional[int], typer.Option(help="Only the first N items.")] = None,
          out: Annotated[Optional[Path], typer.Option(help="Write predictions JSONL here.")] = None,
          baseline: Annotated[Optional[Path], typer.Option(help="Also evaluate this model (e.g. the base, or the HF model an export came from) and print both side by side.")] = None,
          judge: Annotated[Optional[str], typer.Option(help="Also score free-form answers with a text-only judge (LLaVA-Bench relative score): openai, an OpenAI-compatible URL (http://127.0.0.1:8000/v1), or hf:PATH (hf: = packaged SmolLM2).")] = None,
          judge_model: Annotated[Optional[str], typer.Option(help="Judge model name (openai: default gpt-4o-2024-08-06; a URL: the name it serves).")] = None,
          allow_remote: Annotated[bool, typer.Option("--allow-remote", help="Allow the private questions, answers and context to go to a non-loopback judge.")] = False,
          metric: Annotated[str, typer.Option(help="llava-med: LLaVA-Med v1.0.0's scorer, questions as written (comparable with its VQA-RAD/SLAKE/PathVQA tables); strict: kit's stricter scoring, short-answer prompts.")] = "llava-med") -> None:
    """Closed-question accuracy and open-question recall with 95% intervals (LLaVA-Med's scorer by default); with --judge, a judged relative score."""
    from kit.eval.command import eval_command

    eval_command(model, data, limit=limit, out=out, echo=typer.echo, baseline=baseline,
                 judge=judge, judge_model=judge_model, allow_remote=allow_remote, metric=metric)
