"""`kit merge`, `kit chat`, `kit serve`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kit.core import options
from kit.core.options import choices
from kit.cli.app import app, echo_err


@app.command()
def chat(model: Annotated[Path, typer.Argument(help="Model folder or adapter folder (only the path is needed).")],
         image: Annotated[Optional[Path], typer.Option(help="Image to ask about (attached to the first message).")] = None,
         prompt: Annotated[Optional[str], typer.Option(help="Ask once, print the answer and exit; without it, chat on stdin.")] = None,
         max_new_tokens: Annotated[int, typer.Option(help="Answer length cap, in tokens.")] = options.CHAT_MAX_NEW_TOKENS,
         temperature: Annotated[float, typer.Option(help="0 answers greedily (reproducible); higher samples.")] = options.CHAT_TEMPERATURE,
         system: Annotated[Optional[str], typer.Option(help="System message (default: the one the model was trained with).")] = None,
         seed: Annotated[Optional[int], typer.Option(help="Sampling seed, for reproducible answers at temperature > 0.")] = None) -> None:
    """Talk to a model or adapter offline: one answer with --prompt, else a conversation (/image PATH, /reset, /exit)."""
    from kit.serve.chat import chat as run_chat

    run_chat(model, image=image, prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature, echo=echo_err,
             system=system, seed=seed)


@app.command()
def serve(model: Annotated[Path, typer.Argument(help="Base model folder, or an adapter folder (its base is served too).")],
          adapters: Annotated[Optional[list[str]], typer.Argument(help="More adapters on the same base: PATH or NAME=PATH.")] = None,
          host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback is reachable from other machines.")] = options.SERVE_HOST,
          port: Annotated[int, typer.Option(help="Port (0 picks a free one).")] = options.SERVE_PORT,
          api_key: Annotated[Optional[str], typer.Option(envvar="KIT_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 and /health. Prefer KIT_API_KEY or --api-key-file: a key on the command line shows in `ps`.")] = None,
          api_key_file: Annotated[Optional[Path], typer.Option(help="Read the API key from the first line of this file.")] = None,
          image_root: Annotated[Optional[Path], typer.Option(help="Allow image file paths / file:// URLs below this folder (default: none).")] = None,
          max_request_bytes: Annotated[int, typer.Option(help="Largest request body accepted (413 above).")] = options.MAX_REQUEST_BYTES,
          max_tokens_limit: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for (400 above).")] = options.MAX_TOKENS_LIMIT,
          max_queue: Annotated[int, typer.Option(help="Requests running or waiting for the model at once (429 with Retry-After above).")] = options.MAX_QUEUE,
          max_batch: Annotated[int, typer.Option(help="Rows decoded together at most; requests join between steps (1: one at a time).")] = options.MAX_BATCH) -> None:
    """OpenAI-compatible chat server (POST /v1/chat/completions, GET /v1/models) for a base and its adapters, offline."""
    from kit.serve.run import serve as run_serve

    run_serve(model, adapters or [], host=host, port=port, api_key=api_key, image_root=image_root,
              max_request_bytes=max_request_bytes, max_tokens_limit=max_tokens_limit, max_queue=max_queue, echo=echo_err,
              api_key_file=api_key_file, max_batch=max_batch)


@app.command()
def merge(adapters: Annotated[list[Path], typer.Argument(help="Adapter folder(s) written by kit (only the paths are needed).")],
          out: Annotated[Path, typer.Option(help="Folder to write the merged model (or, with --as-adapter, adapter) to.")],
          base_precision: Annotated[str, typer.Option(help="QLoRA adapters: 'dequantized' (the nf4 weights it was trained on, faithful) or 'full' (the original weights).")] = options.MERGE_PRECISIONS[0],
          weights: Annotated[Optional[list[str]], typer.Option(help="Several adapters: one weight each, '0.6,0.4' or repeated (default: equal, summing to 1).")] = None,
          method: Annotated[str, typer.Option(help=f"Several adapters: {choices(options.MERGE_METHODS)} (linear: exact Σ w_i ΔW_i).")] = options.MERGE_METHODS[0],
          rank: Annotated[Optional[int], typer.Option(help="Truncate each combined ΔW to this rank (--method svd, --as-adapter).")] = None,
          as_adapter: Annotated[bool, typer.Option("--as-adapter", help="Write one LoRA adapter of rank --rank instead of a full model.")] = False,
          density: Annotated[float, typer.Option(help="ties/dare: fraction of each ΔW kept.")] = options.MERGE_DENSITY,
          seed: Annotated[int, typer.Option(help="dare: seed of the random drop.")] = 0,
          tolerance: Annotated[Optional[float], typer.Option(help=f"Max |Δlogit| vs the unmerged model before the merge fails (default {options.MERGE_TOLERANCE}).")] = None,
          force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out.")] = False) -> None:
    """Merge an adapter into its base (standalone HF model), or combine several adapters; always verified."""
    from kit.merge.run import run

    typer.echo(str(run(adapters, out, weights=weights, method=method, rank=rank, as_adapter=as_adapter, density=density,
                       seed=seed, base_precision=base_precision, tolerance=tolerance, force=force, echo=echo_err)))


@app.command()
def export(model: Annotated[Path, typer.Argument(help="Model folder or adapter folder (an adapter is merged first, verified).")],
           out: Annotated[Path, typer.Option(help="Folder to write the GGUF files, Modelfile and card to.")],
           format: Annotated[str, typer.Option("--format", help="gguf: llama.cpp / Ollama (LLM file + mmproj file).")] = options.EXPORT_FORMATS[0],
           quant: Annotated[str, typer.Option(help=f"The LLM's weights: {choices(options.EXPORT_QUANTS)} (quantized ones made by llama.cpp; need llama-cpp-python).")] = options.EXPORT_QUANTS[0],
           text_only: Annotated[bool, typer.Option("--text-only", help="Write the LLM alone (no vision tower), e.g. for a tower llama.cpp cannot run.")] = False,
           tolerance: Annotated[Optional[float], typer.Option(help=f"Adapters: max |Δlogit| of the merge vs the unmerged adapter (default {options.MERGE_TOLERANCE}).")] = None,
           force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out written by kit.")] = False,
           eval_file: Annotated[Optional[Path], typer.Option("--eval", help="Evaluation JSONL: score the HF model and the written GGUF (llama.cpp) on it; both go into the card and README.")] = None,
           max_drop: Annotated[Optional[float], typer.Option(help="With --eval: fail (nothing written) when the GGUF scores more than this many points below the HF model, the interval excluding 0.")] = None) -> None:
    """Export a model or adapter for llama.cpp and Ollama: GGUF LLM + mmproj, Modelfile, card."""
    from kit.export.run import export as run_export

    typer.echo(str(run_export(model, out, fmt=format, quant=quant, text_only=text_only, force=force, tolerance=tolerance,
                              echo=echo_err, eval_data=eval_file, max_drop=max_drop)))
