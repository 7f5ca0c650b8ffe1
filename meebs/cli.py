"""Command line: argument parsing and one-line errors, nothing else.

    python entrypoint.py plan  recipes/demo.yaml [section.key=value ...]
    python entrypoint.py train recipes/demo.yaml [section.key=value ...]
    python entrypoint.py keys          # every recipe key, its default and meaning

A problem the user can fix (`MeebsError`) is printed on one line and exits with status
2; Ctrl-C exits with 130. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import warnings

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from meebs.errors import MeebsError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="entrypoint.py", description="Train Stable Diffusion 1.5 LyCORIS networks."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("plan", "show data, steps and the files a recipe will write; train nothing"),
        ("train", "train the recipe"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("recipe", help="recipe YAML, e.g. recipes/demo.yaml")
        sub.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=3")
    keys = commands.add_parser("keys", help="list every recipe key with its default")
    keys.add_argument("--markdown", action="store_true", help="as the README's table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console()
    quiet_libraries()
    try:
        return _run(args, console)
    except MeebsError as exc:
        Console(stderr=True, soft_wrap=True).print(
            f"[red]error:[/red] {escape(str(exc))}", highlight=False
        )
        return 2
    except KeyboardInterrupt:
        Console(stderr=True).print("[yellow]interrupted[/yellow]: nothing was saved")
        return 130


def _run(args: argparse.Namespace, console: Console) -> int:
    from meebs.recipe import documented_keys, keys_markdown, load_recipe

    if args.command == "keys" and args.markdown:
        print(keys_markdown())
        return 0
    if args.command == "keys":
        table = Table("key", "type", "default", "meaning")
        for row in documented_keys():
            table.add_row(*row)
        console.print(table)
        return 0
    recipe = load_recipe(args.recipe, args.overrides)
    if args.command == "plan":
        from meebs.plan import make_plan, print_plan, scan_data
        from meebs.sampling import recipe_prompts

        console.rule(f"recipe {args.recipe} (resolved)")
        console.print(recipe.to_yaml(), markup=False, highlight=False)
        scan = scan_data(recipe)
        recipe_prompts(recipe)  # validates sampler names and prompt flags
        print_plan(recipe, scan, make_plan(recipe, scan), console)
        return 0
    from meebs.train import train

    result = train(recipe, console, command=shlex.join(["entrypoint.py", *sys.argv[1:]]))
    return 130 if result.interrupted else 0


def quiet_libraries() -> None:
    """The libraries' INFO chatter hides our own output; their warnings stay visible."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # transformers warns at import that torchvision is missing (we need none of its image
    # processors); bitsandbytes that an optional 4-bit kernel package is missing.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for name in ("diffusers", "accelerate"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
