"""Command line: argument parsing and one-line errors, nothing else.

    python entrypoint.py plan  recipes/demo.yaml [section.key=value ...]
    python entrypoint.py train recipes/demo.yaml [section.key=value ...]
    python entrypoint.py keys          # every recipe key, its default and meaning
    python entrypoint.py fetch-model sd15 [--dest models]   # download a pinned base model
    python entrypoint.py tensorboard   # TensorBoard on outputs/ [--host H] [--port P]

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
    text = "download a base model pinned in models.lock.yaml and verify its sha256"
    fetch = commands.add_parser("fetch-model", help=text, description=text)
    fetch.add_argument("name", help="model name in models.lock.yaml, e.g. sd15")
    fetch.add_argument("--dest", default="models", help="folder (default: %(default)s)")
    fetch.add_argument("--pins", default=None, help="pins file (default: models.lock.yaml)")
    from meebs import tensorboard as tb

    text = "serve TensorBoard on the runs' logs (the compose sidecar)"
    board = commands.add_parser("tensorboard", help=text, description=text)
    board.add_argument("--host", default=tb.DEFAULT_HOST, help="default: %(default)s")
    board.add_argument("--port", type=int, default=tb.DEFAULT_PORT, help="default: %(default)s")
    board.add_argument("--logdir", default=tb.DEFAULT_LOGDIR, help="default: %(default)s")
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

    if args.command == "tensorboard":
        from meebs.tensorboard import exec_sidecar

        exec_sidecar(args.logdir, args.host, args.port)  # replaces this process
        return 0
    if args.command == "fetch-model":
        return _fetch_model(args, console)
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


def _fetch_model(args: argparse.Namespace, console: Console) -> int:
    """The only command that uses the network: download, verify, say where the file is."""
    from pathlib import Path

    from meebs.fetch import PINS_FILE, fetch_model
    from meebs.hash_cache import cached_sha256

    def say(line: str) -> None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    pins = Path(args.pins) if args.pins else PINS_FILE
    path = fetch_model(args.name, Path(args.dest), pins, notify=say)
    digest = cached_sha256(path)  # verified just now: from the hash cache
    say(f"{path}\nsha256 {digest}")
    say(f"train on it with: model.path={path} model.sha256={digest}")
    return 0


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
