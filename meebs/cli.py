"""Command line: argument parsing and one-line errors, nothing else.

    python entrypoint.py plan  recipes/demo.yaml [section.key=value ...]
    python entrypoint.py train recipes/demo.yaml [section.key=value ...]
    python entrypoint.py train --resume outputs/meebs_demo/RUN   # continue where it stopped
    python entrypoint.py reproduce outputs/meebs_demo/RUN         # rerun, prove or explain
    python entrypoint.py reproduce --recipe demo   # against results/demo/<machine>.json
    python entrypoint.py compare A B               # two network files or two runs
    python entrypoint.py record outputs/meebs_demo/RUN   # into results/<recipe>/
    python entrypoint.py keys          # every recipe key, its default and meaning
    python entrypoint.py fetch-model sd15 [--dest models]   # download a pinned base model
    python entrypoint.py merge net.safetensors:0.8 --into merged.safetensors --model PATH  # bake in
    python entrypoint.py import-kohya config.json > recipes/x.yaml   # kohya_ss GUI config
    python entrypoint.py export-kohya recipes/1.3.yaml > config.json # for the kohya_ss GUI
    python entrypoint.py tensorboard   # TensorBoard on outputs/ [--host H] [--port P]
    python entrypoint.py generate "a drawing of meeb <lyco:meebs_demo:1>" --seed 1
    python entrypoint.py grid outputs/meebs_demo/RUN [--weights 0.5,1] [--seeds 1,2]
    python entrypoint.py verdict outputs/meebs_demo_learn   # meeb rate per epoch (latest run)
    python entrypoint.py inspect outputs/meebs_demo/RUN/meebs_demo.safetensors
    python entrypoint.py prep check data/img_1.0          # a dataset's problems, no changes
    python entrypoint.py prep data/img_1.0 --to NEWDIR ... # a cleaned copy and its record

A problem the user can fix (`MeebsError`) is printed on one line and exits with status
2; Ctrl-C exits with 130 and SIGTERM with 143 (a run saves its last step first).
`reproduce` and `compare` exit 0 when bit-identical, 1 when they differ. Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from meebs.errors import MeebsError
from meebs.models.quiet import quiet_libraries
from meebs.training.stop import StopNow, signal_name, stop_at_once_on_sigterm


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="entrypoint.py", description="Train Stable Diffusion 1.5 LyCORIS networks."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("plan", "show data, steps and the files a recipe will write; train nothing"),
        ("train", "train the recipe, or continue an interrupted run with --resume RUN"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument(
            "recipe",
            nargs="?" if name == "train" else None,
            help="recipe YAML, e.g. recipes/demo.yaml",
        )
        sub.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=3")
    train = commands.choices["train"]
    train.add_argument("--resume", metavar="RUN", help="run folder to continue where it stopped")
    train.add_argument(
        "--gpus", type=int, metavar="N", help="N data-parallel processes via accelerate launch"
    )
    text = "rerun a recorded run and report bit-identical, or what differs and by how much"
    reproduce = commands.add_parser("reproduce", help=text, description=text)
    reproduce.add_argument("run", nargs="?", help="run folder or results file")
    reproduce.add_argument("overrides", nargs="*", help="section.key=value for the rerun")
    reproduce.add_argument("--recipe", help="rerun results/RECIPE/<this machine's class>.json")
    reproduce.add_argument("--results", default="results", help="default: %(default)s")
    text = "compare two network files or two runs (max/relative/cosine weight differences)"
    compare = commands.add_parser("compare", help=text, description=text)
    compare.add_argument("a", help="network file, run folder or manifest")
    compare.add_argument("b", help="network file, run folder or manifest")
    text = "copy a finished run's manifest to results/<recipe>/<hardware class>.json"
    record = commands.add_parser("record", help=text, description=text)
    record.add_argument("run", help="finished run folder")
    record.add_argument("--results", default="results", help="default: %(default)s")
    record.add_argument("--replace", action="store_true", help="re-record an existing result")
    keys = commands.add_parser("keys", help="list every recipe key with its default")
    keys.add_argument("--markdown", action="store_true", help="as the table in docs/recipes.md")
    for name, source, text in (
        ("import-kohya", "config", "a kohya_ss GUI config JSON as recipe YAML on stdout"),
        ("export-kohya", "recipe", "a recipe as a kohya_ss GUI config JSON on stdout"),
    ):
        convert = commands.add_parser(name, help=text, description=text)
        convert.add_argument(source, help="the file to convert; unconverted keys go to stderr")
    text = "download a base model pinned in models.lock.yaml and verify its sha256"
    fetch = commands.add_parser("fetch-model", help=text, description=text)
    fetch.add_argument("name", help="model name in models.lock.yaml, e.g. sd15")
    fetch.add_argument("--dest", default="models", help="folder (default: %(default)s)")
    fetch.add_argument(
        "--pins", default=None, help="pins file (default: meebs/configs/models.lock.yaml)"
    )
    text = "bake networks into the base model: a pinned checkpoint file (A1111/ComfyUI) or folder"
    merge = commands.add_parser("merge", help=text, description=text)
    merge.add_argument("networks", nargs="+", metavar="NETWORK[:W]", help="weight W default 1")
    merge.add_argument(
        "--into",
        required=True,
        metavar="FILE.safetensors|DIR",
        help="new LDM single file, or a diffusers folder if no suffix (must not exist)",
    )
    merge.add_argument("--model", required=True, help="builtin:NAME or a checkpoint PATH")
    merge.add_argument("--sha256", default=None, help="the base model's pin, checked first")
    merge.add_argument(
        "--save-precision",
        choices=("fp16", "fp32"),
        default=None,
        help="weights' dtype (default: fp16 for a .safetensors file, fp32 for a folder)",
    )
    _add_generate(commands)
    text = "one labelled PNG: a run's sample prompts x its epoch files [x weights]"
    grid = commands.add_parser("grid", help=text, description=text)
    grid.add_argument("run", help="run folder, e.g. outputs/meebs_demo/RUN")
    grid.add_argument("--weights", help="comma-separated multipliers, e.g. 0.25,0.5,0.75,1")
    grid.add_argument("--seeds", help="comma-separated seeds (default: the prompts' own)")
    grid.add_argument("--out", help="PNG to write (default: RUN/grid.png)")
    text = "score a run on the tiny-trained base: meeb rate and class kept per epoch, a grid"
    verdict = commands.add_parser("verdict", help=text, description=text)
    verdict.add_argument("run", help="run folder, or outputs/NAME for its latest run")
    verdict.add_argument("--scorers", help="folder of the scorer files (default: the built-in)")
    text = "show what a network file holds: modules, algo, ranks, alphas, training metadata"
    inspect = commands.add_parser("inspect", help=text, description=text)
    inspect.add_argument("file", help="a .safetensors network file")
    from meebs.use import tensorboard as tb

    text = "serve TensorBoard on the runs' logs (the compose sidecar)"
    board = commands.add_parser("tensorboard", help=text, description=text)
    board.add_argument("--host", default=tb.DEFAULT_HOST, help="default: %(default)s")
    board.add_argument("--port", type=int, default=tb.DEFAULT_PORT, help="default: %(default)s")
    board.add_argument("--logdir", default=tb.DEFAULT_LOGDIR, help="default: %(default)s")
    text = "prep check DIR: report a dataset's problems; prep DIR --to NEWDIR: a cleaned copy"
    prep = commands.add_parser("prep", help=text, description=text)
    prep.add_argument("words", nargs="+", metavar="[check] DIR", help="dataset folder")
    prep.add_argument("--resolution", type=int, help="check: training size (default 512)")
    prep.add_argument("--batch-size", type=int, help="check: batch size (default 2)")
    prep.add_argument("--to", metavar="NEWDIR", help="the new folder to write (must not exist)")
    prep.add_argument("--flatten", choices=("alternate", "white", "black"), help="transparency")
    prep.add_argument("--cull-colour-variants", action="store_true", help="one per drawing")
    prep.add_argument("--drop", metavar="FILE", help="reviewed YAML drop list, a reason each")
    prep.add_argument("--trim-to-batch", type=int, metavar="N", help="count a multiple of N")
    prep.add_argument("--repeats", type=int, metavar="N", help="new folder repeats")
    prep.add_argument("--class-token", choices=("keep", "none"), default="keep")
    return parser


def _without_option(argv: list[str], option: str) -> list[str]:
    """`argv` less `option VALUE` / `option=VALUE`: the launched processes' arguments."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            kept.append(arg)
    return kept


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    args.command_line = shlex.join(["entrypoint.py", *argv])  # recorded in the manifest
    args.without_gpus = _without_option(argv[1:], "--gpus")
    console = Console(soft_wrap=True)  # a path or command to copy is never cut in two
    quiet_libraries()
    try:
        with stop_at_once_on_sigterm():
            return _run(args, console)
    except MeebsError as exc:
        Console(stderr=True, soft_wrap=True).print(
            f"[red]error:[/red] {escape(str(exc))}", highlight=False
        )
        return 2
    except KeyboardInterrupt as exc:
        stop = exc if isinstance(exc, StopNow) else StopNow()
        if not stop.reported:
            Console(stderr=True, soft_wrap=True).print(
                f"[yellow]stopped ({signal_name(stop.signum)})[/yellow]: nothing new was saved"
            )
        return stop.exit_status


def _run(args: argparse.Namespace, console: Console) -> int:
    from meebs.recipe.keys import documented_keys, keys_markdown
    from meebs.recipe.loading import load_recipe

    if args.command == "tensorboard":
        from meebs.use.tensorboard import exec_sidecar

        exec_sidecar(args.logdir, args.host, args.port)  # replaces this process
        return 0
    if args.command == "fetch-model":
        return _fetch_model(args, console)
    if args.command == "merge":
        from meebs.use.merge import run_merge

        return run_merge(args, console)
    if args.command in ("generate", "grid", "inspect", "verdict"):
        return _try_networks(args, console)
    if args.command in ("import-kohya", "export-kohya"):
        return _kohya(args)
    if args.command == "prep":
        from meebs.data.prep_cli import run_prep

        return run_prep(args, console)
    if args.command == "keys" and args.markdown:
        print(keys_markdown())
        return 0
    if args.command == "keys":
        table = Table("key", "type", "default", "meaning")
        for row in documented_keys():
            table.add_row(*row)
        console.print(table)
        return 0
    if args.command in ("reproduce", "compare", "record"):
        return _reproduce(args, console)
    if args.command == "train" and args.gpus is not None:
        from meebs.training.launch import launch

        launch(args.gpus, args.without_gpus)  # returns only for one GPU
    if args.command == "train" and args.resume:
        return _resume(args, console)
    if args.recipe is None:
        raise MeebsError("train: give a recipe, e.g. recipes/demo.yaml, or --resume RUN")
    recipe = load_recipe(args.recipe, args.overrides)
    if args.command == "plan":
        from meebs.models.sampling import recipe_prompts
        from meebs.plan.report import print_plan
        from meebs.plan.steps import make_plan, scan_data

        console.rule(f"recipe {args.recipe} (resolved)")
        console.print(recipe.to_yaml(), markup=False, highlight=False)
        scan = scan_data(recipe)
        recipe_prompts(recipe)  # validates sampler names and prompt flags
        print_plan(recipe, scan, make_plan(recipe, scan), console)
        return 0
    from meebs.runs.manifest import RecipeOrigin
    from meebs.training.train import train

    origin = RecipeOrigin(args.recipe, tuple(args.overrides))
    result = train(recipe, console, command=args.command_line, origin=origin)
    return result.exit_status


def _resume(args: argparse.Namespace, console: Console) -> int:
    from pathlib import Path

    from meebs.recipe.loading import load_recipe
    from meebs.training.train import resume

    recipe = None
    if args.recipe is not None:
        if "=" in args.recipe:
            raise MeebsError("train --resume: a resumed run keeps its recipe; drop the overrides")
        recipe = load_recipe(args.recipe, args.overrides)
    result = resume(Path(args.resume), console, command=args.command_line, recipe=recipe)
    return result.exit_status


def _reproduce(args: argparse.Namespace, console: Console) -> int:
    """reproduce / compare / record; exit 0 identical, 1 differs, 2 could not run."""
    from pathlib import Path

    from meebs.repro import reproduce

    if args.command == "compare":
        return reproduce.compare(Path(args.a), Path(args.b), console)
    if args.command == "record":
        reproduce.record(Path(args.run), Path(args.results), args.replace, console)
        return 0
    run, overrides = args.run, list(args.overrides)
    if args.recipe:
        if run is not None:  # argparse took the first override for RUN
            overrides.insert(0, run)
        path = reproduce.find_results(args.recipe, Path(args.results), console)
    elif run is None:
        raise MeebsError("reproduce: give a run folder or results file, or --recipe NAME")
    else:
        path = Path(run)
    return reproduce.reproduce(path, overrides, console, command=args.command_line)


def _add_generate(commands: argparse._SubParsersAction) -> None:
    """Options left out stay None, so `meebs.use.generate.Request` supplies the defaults."""
    text = "draw images from a prompt with <lyco:NAME:W> tags, A1111-style PNGs"
    gen = commands.add_parser("generate", help=text, description=text)
    gen.add_argument("prompt", help='e.g. "a drawing of meeb <lyco:meebs_demo:1>"')
    gen.add_argument("--negative", help="negative prompt")
    gen.add_argument("--seed", type=int, help="first seed (default: random)")
    gen.add_argument("--steps", type=int, help="default: 20")
    gen.add_argument("--cfg", type=float, help="default: 7")
    gen.add_argument("--sampler", help="A1111 name, e.g. 'DPM++ 2M Karras' (default: Euler a)")
    gen.add_argument("--size", help="WxH (default: the network's training size, else 512x512)")
    gen.add_argument("--count", type=int, help="images, seeds seed, seed+1, ... (default: 1)")
    gen.add_argument("--networks", action="append", help="extra folder to find NAME in")
    gen.add_argument("--out", help="folder (default: outputs/generated)")
    gen.add_argument("--model", help="builtin:tiny or a checkpoint (default: network's base)")
    gen.add_argument("--sha256", help="pin the base model's sha256")


def _try_networks(args: argparse.Namespace, console: Console) -> int:
    """generate / grid / inspect / verdict: use trained networks without a UI."""
    from pathlib import Path

    if args.command == "verdict":
        from meebs.tiny.verdict import SCORER_DIR, latest_run, make_verdict

        scorers = Path(args.scorers) if args.scorers else SCORER_DIR
        make_verdict(latest_run(Path(args.run)), console, scorer_dir=scorers)
        return 0
    if args.command == "inspect":
        from meebs.use.inspect import inspect_file

        inspect_file(Path(args.file), console)
        return 0
    if args.command == "grid":
        from meebs.use.grid import make_grid, parse_numbers

        make_grid(
            Path(args.run),
            console,
            weights=parse_numbers("--weights", args.weights, float),
            seeds=parse_numbers("--seeds", args.seeds, int),
            out=Path(args.out) if args.out else None,
        )
        return 0
    from meebs.use.generate import Request, generate

    options = {
        name: getattr(args, name)
        for name in (
            *("prompt", "negative", "seed", "steps", "cfg", "sampler", "size", "count"),
            *("model", "sha256"),
        )
    }
    options["networks"] = [Path(folder) for folder in args.networks or []]
    options["out"] = Path(args.out) if args.out else None
    request = Request(**{name: value for name, value in options.items() if value is not None})
    generate(request, console)
    return 0


def _kohya(args: argparse.Namespace) -> int:
    """The converted file on stdout (to redirect into a file), what was not converted on stderr."""
    from pathlib import Path

    from meebs.interop.kohya_export import export_kohya
    from meebs.interop.kohya_import import import_kohya

    if args.command == "import-kohya":
        result = import_kohya(Path(args.config))
    else:
        result = export_kohya(Path(args.recipe))
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    sys.stdout.write(result.text)
    return 0


def _fetch_model(args: argparse.Namespace, console: Console) -> int:
    """The only command that uses the network: download, verify, say where the file is."""
    from pathlib import Path

    from meebs.files.hash_cache import cached_sha256
    from meebs.models.fetch import PINS_FILE, fetch_model

    def say(line: str) -> None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    pins = Path(args.pins) if args.pins else PINS_FILE
    path = fetch_model(args.name, Path(args.dest), pins, notify=say)
    digest = cached_sha256(path)  # verified just now: from the hash cache
    say(f"{path}\nsha256 {digest}")
    say(f"train on it with: model.path={path} model.sha256={digest}")
    return 0
