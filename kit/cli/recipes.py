"""`kit recipes list | show`."""

from __future__ import annotations

from typing import Annotated

import typer

from kit.cli.app import SetOpt, recipes_app


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
