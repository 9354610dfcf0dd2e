"""`kit adapters list | show`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kit.cli.app import adapters_app


@adapters_app.command("list")
def adapters_list(root: Annotated[Path, typer.Option(help="Folder to scan.")] = Path("adapters")) -> None:
    """Adapters under adapters/ (or --root): recipe, base, steps, held-out metrics."""
    from kit.infer.load import describe_folder

    folders = sorted(p for p in root.iterdir() if (p / "adapter_config.json").is_file()) if root.is_dir() else []
    if not folders:
        typer.echo(f"no adapters in {root}")
    for p in folders:
        d = describe_folder(p)
        ev = d["evaluation"]
        before, after = (ev.get("base") or {}).get("overall"), (ev.get("adapted") or {}).get("overall")
        held = f"  held-out {100 * before:.1f} -> {100 * after:.1f}" if before is not None and after is not None else ""
        typer.echo(f"{p.name:36} {d.get('recipe') or '?':16} steps {d.get('steps') or '?':>5}{held}  base {d.get('base') or '?'}")


@adapters_app.command("show")
def adapters_show(path: Annotated[Path, typer.Argument(help="Adapter folder.")]) -> None:
    """Everything the adapter's card records (base, quantization, recipe, data, metrics, versions)."""
    import json

    from kit.core.cards import Card
    from kit.core.errors import KitError

    card = Card.read(path)
    if card is None:
        raise KitError(f"{path}: no kit.json card; is this a folder kit wrote?")
    typer.echo(json.dumps(card.model_dump(mode="json", exclude_unset=True), indent=2))
