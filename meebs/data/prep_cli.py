"""The `prep` command's two forms, from parsed arguments to printed results.

    prep check DIR [--resolution 512] [--batch-size 2]      report, change nothing
    prep DIR --to NEWDIR [--flatten ...] [--cull-colour-variants] [--drop FILE]
         [--trim-to-batch N] [--repeats N] [--class-token none|keep]

The CLI only declares the options; which combinations make sense is decided here, so a
wrong combination is one clear line rather than a silently ignored option.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from rich.console import Console

from meebs.data.prep import prepare
from meebs.data.prep_check import DEFAULT_BATCH_SIZE, DEFAULT_RESOLUTION, check_dataset, print_check
from meebs.data.prep_options import PrepOptions
from meebs.data.prep_record import MARKDOWN_NAME
from meebs.errors import MeebsError

_CLEAN_OPTIONS = ("to", "flatten", "cull_colour_variants", "drop", "trim_to_batch", "repeats")


def run_prep(args: argparse.Namespace, console: Console) -> int:
    """`prep check DIR` or `prep DIR --to NEWDIR ...`; 0 when it ran (findings included)."""
    if len(args.words) == 2 and args.words[0] == "check":
        return _check(args, console)
    if len(args.words) != 1 or not args.to:
        raise MeebsError("use: prep check DIR, or prep DIR --to NEWDIR [options]")
    return _clean(args, console)


def _check(args: argparse.Namespace, console: Console) -> int:
    given = [f"--{name.replace('_', '-')}" for name in _CLEAN_OPTIONS if getattr(args, name)]
    if given or args.class_token != "keep":
        raise MeebsError(f"prep check changes nothing: drop {' '.join(given) or '--class-token'}")
    resolution = DEFAULT_RESOLUTION if args.resolution is None else args.resolution
    batch_size = DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size
    report = check_dataset(Path(args.words[1]), resolution, batch_size)
    print_check(report, resolution, batch_size, console)
    return 0


def _clean(args: argparse.Namespace, console: Console) -> int:
    if args.resolution is not None or args.batch_size is not None:
        raise MeebsError(
            "--resolution and --batch-size are for prep check; prep trims with --trim-to-batch N"
        )
    options = PrepOptions(
        flatten=args.flatten,
        cull_colour_variants=args.cull_colour_variants,
        trim_to_batch=args.trim_to_batch,
        repeats=args.repeats,
        class_token=args.class_token,
    )
    target = Path(args.to)
    drop_file = Path(args.drop) if args.drop else None
    decisions = prepare(Path(args.words[0]), target, options, drop_file)
    dropped = Counter(decision.step for decision in decisions if not decision.kept)
    kept = len(decisions) - dropped.total()
    why = ", ".join(f"{count} {step}" for step, count in sorted(dropped.items())) or "none"
    console.print(
        f"wrote {target}: kept {kept} of {len(decisions)} images (dropped: {why}); "
        f"every decision is in {target / MARKDOWN_NAME}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    return 0
