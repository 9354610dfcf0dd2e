"""`kit review`: the expert's page over generated data, and the export of what should train."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kit.core import options
from kit.cli.app import app, echo_err


@app.command()
def review(folder: Annotated[Path, typer.Argument(help="A kit generate output folder (data.json), e.g. DATA/.kit/RECIPE/generated after kit adapt.")],
           host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback is reachable from other machines and needs a key.")] = options.SERVE_HOST,
           port: Annotated[int, typer.Option(help="Port (0 picks a free one).")] = options.REVIEW_PORT,
           api_key: Annotated[Optional[str], typer.Option(envvar="KIT_API_KEY", help="Require this key (the page asks for it). Prefer KIT_API_KEY or --api-key-file: a key on the command line shows in `ps`.")] = None,
           api_key_file: Annotated[Optional[Path], typer.Option(help="Read the key from the first line of this file.")] = None,
           vocab: Annotated[Optional[str], typer.Option(help="Vocabulary for the claim check (packaged name or YAML file); default: the one generation used.")] = None,
           export: Annotated[Optional[Path], typer.Option(help="Write the LLaVA JSON that should train (accepted and edited conversations) to this file and exit.")] = None,
           undecided: Annotated[str, typer.Option(help="With --export: 'exclude' (default) or 'include' the conversations nobody decided on.")] = options.UNDECIDED[0],
           force: Annotated[bool, typer.Option("--force", help="With --export: replace an existing file.")] = False) -> None:
    """Accept, edit or reject generated conversations beside their source facts, on a local page; or --export the result."""
    if export is None and (undecided != options.UNDECIDED[0] or force):
        from kit.core.errors import KitError

        raise KitError("--undecided and --force apply to --export; add --export OUT.json, or leave them out to open the page")
    if export is not None:
        from kit.review.run import export_reviewed

        counts, note = export_reviewed(folder, export, undecided=undecided, force=force)
        echo_err(counts.line())
        if note:
            echo_err(f"note: {note}")
        typer.echo(str(export))
        return
    from kit.review.run import serve_review

    serve_review(folder, host=host, port=port, api_key=api_key, api_key_file=api_key_file, vocab=vocab, echo=echo_err)
