"""`kit` command line. Commands only parse and call into the library (one module per noun here);
`main()` is the one place that turns known errors into one-line messages and exit codes. Heavy
imports (torch, transformers) happen inside commands so `kit --help` is instant."""

from __future__ import annotations

import os
import sys

import typer

# Each module registers its commands on the app when imported.
from kit.cli import adapters, base, data, deploy, eval, recipes, review, train  # noqa: F401
from kit.cli.app import app


def main() -> None:
    import logging
    import warnings

    from kit.core.errors import KitError
    from kit.core.network import go_offline

    # kit only loads local folders: with HF_HUB_OFFLINE a folder missing its weights is an error,
    # never a download (the user's own setting wins).
    go_offline()

    # bitsandbytes' CPU backend warns at import that it could not fetch an optional kernel from the
    # Hub; kit never lets it download anything, so the warning is only noise.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # That same attempt goes through the `kernels` package, which warns that offline mode skips its
    # publisher check for a kernel it then does not load.
    logging.getLogger("kernels").setLevel(logging.ERROR)
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
