"""`inspect FILE`: what a network file holds, without loading a model.

Before sharing or loading a file, the questions are always the same: which algorithm and
rank, which parts of the model it touches, what it was trained on and for how long, and
which hashes A1111 and civitai will show for it. Everything comes from the safetensors
header and the small `alpha` scalars, after the checks generate, merge and training
apply to any network file (`meebs.network.network_file`), so a file they would refuse
is refused here with the same line. Those checks read every tensor once, one at a time,
for NaN and inf.

The file may come from anyone: a metadata value is shown cut to a few hundred characters
(kohya's `ss_tag_frequency` can be megabytes), with control characters escaped, and never
read as rich markup.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text
from safetensors import safe_open

from meebs.network.apply import TE_PREFIX, UNET_PREFIX, algo_of
from meebs.network.build import _RANK_SUFFIXES
from meebs.network.network_file import check_values, read_network_header

# Characters of a metadata value shown in a cell; the rest is counted, not printed.
CELL_LIMIT = 200
TOP_TAGS = 8


def describe(path: Path) -> list[tuple[str, str]]:
    """(field, value) rows describing the network file at `path`."""
    path = Path(path)
    header = read_network_header(path)
    check_values(path, header)
    shapes, metadata = header.shapes, header.metadata
    modules = {key.split(".")[0] for key in shapes}
    ranks = sorted({shape[0] for key, shape in shapes.items() if key.endswith(_RANK_SUFFIXES)})
    with safe_open(path, framework="pt") as stream:
        alphas = sorted(
            {stream.get_tensor(key).float().item() for key in shapes if key.endswith(".alpha")}
        )
    base_hash = metadata.get("ss_new_sd_model_hash") or metadata.get("ss_sd_model_hash", "")
    rows = [
        ("size", f"{path.stat().st_size / 2**20:.2f} MiB"),
        ("keys", str(len(shapes))),
        ("modules", _count(modules, UNET_PREFIX, "UNet") + ", " + _count(modules, TE_PREFIX, "TE")),
        ("algo", algo_of(list(shapes))),
        ("ranks", ", ".join(map(str, ranks)) or "-"),
        ("alphas", ", ".join(f"{alpha:g}" for alpha in alphas) or "-"),
        ("dtype", ", ".join(sorted(set(header.dtypes.values())))),
        ("recipe name", _recipe_name(metadata.get("meebs_recipe", "{}"))),
        ("output name", metadata.get("ss_output_name", "-")),
        ("comment", metadata.get("ss_training_comment", "") or "-"),
        ("steps", metadata.get("ss_steps", "-")),
        ("epoch", f"{metadata.get('ss_epoch', '-')} of {metadata.get('ss_num_epochs', '-')}"),
        ("tags", _top_tags(metadata.get("ss_tag_frequency"))),
        ("metadata", _metadata_size(metadata)),
        ("base model hash", base_hash or "-"),
        ("sshs hash", metadata.get("sshs_model_hash", "-")),
    ]
    return [("file", str(path)), *((field, clip(value)) for field, value in rows)]


def inspect_file(path: Path, console: Console) -> None:
    """Print `describe(path)` as a table; no value is read as markup."""
    table = Table(title=Text(path.name))
    table.add_column("field")
    table.add_column("value", overflow="fold")  # hashes and paths in full
    for field, value in describe(path):
        table.add_row(field, Text(value))
    console.print(table)


def clip(text: str, limit: int = CELL_LIMIT) -> str:
    """A stranger's metadata value as one cell: control characters escaped (a terminal
    would obey an escape sequence), cut to `limit` characters with the full length said."""
    shown = "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        for char in text[:limit]
    )
    return shown if len(text) <= limit else f"{shown}… ({len(text):,} characters)"


def _recipe_name(text: str) -> str:
    """`output.name` of the recorded meebs recipe; "-" when there is none to read."""
    try:
        recipe = json.loads(text)
    except (ValueError, RecursionError):
        return "- (meebs_recipe is not JSON)"
    output = recipe.get("output") if isinstance(recipe, dict) else None
    name = output.get("name") if isinstance(output, dict) else None
    return name if isinstance(name, str) else "-"


def _top_tags(text: str | None) -> str:
    """kohya's `ss_tag_frequency` ({folder: {tag: count}}) as its most frequent tags."""
    if not text:
        return "-"
    try:
        folders = json.loads(text)
        counts: Counter[str] = Counter()
        for tags in folders.values():
            counts.update({str(tag): int(count) for tag, count in tags.items()})
    except (ValueError, TypeError, AttributeError, RecursionError, OverflowError):
        return text  # clipped like any other value
    return ", ".join(f"{tag} ({count})" for tag, count in counts.most_common(TOP_TAGS)) or "-"


def _metadata_size(metadata: dict[str, str]) -> str:
    """How much metadata there is, and its largest value when that is over 64 KiB."""
    sizes = {key: len(value.encode("utf-8")) for key, value in metadata.items()}
    text = f"{len(sizes)} keys, {sum(sizes.values()) / 2**10:,.1f} KiB"
    largest = max(sizes, key=sizes.__getitem__, default=None)
    if largest is not None and sizes[largest] > 2**16:
        text += f"; largest {largest} ({sizes[largest] / 2**20:.1f} MiB)"
    return text


def _count(modules: set[str], prefix: str, part: str) -> str:
    return f"{sum(name.startswith(prefix) for name in modules)} {part}"
