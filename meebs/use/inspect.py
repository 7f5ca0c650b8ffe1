"""`inspect FILE`: what a network file holds, without loading a model.

Before sharing or loading a file, the questions are always the same: which algorithm and
rank, which parts of the model it touches, what it was trained on and for how long, and
which hashes A1111 and civitai will show for it. Everything comes from the safetensors
header and the small `alpha` scalars; no weight matrix is read.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table
from safetensors import safe_open

from meebs.network.apply import TE_PREFIX, UNET_PREFIX, algo_of, read_shapes
from meebs.network.build import _RANK_SUFFIXES


def describe(path: Path) -> list[tuple[str, str]]:
    """(field, value) rows describing the network file at `path`."""
    shapes, metadata = read_shapes(path)
    modules = {key.split(".")[0] for key in shapes}
    ranks = sorted({shape[0] for key, shape in shapes.items() if key.endswith(_RANK_SUFFIXES)})
    with safe_open(path, framework="pt") as stream:
        dtypes = sorted({stream.get_slice(key).get_dtype() for key in shapes})
        alphas = sorted(
            {stream.get_tensor(key).float().item() for key in shapes if key.endswith(".alpha")}
        )
    recipe = json.loads(metadata.get("meebs_recipe", "{}"))
    base_hash = metadata.get("ss_new_sd_model_hash") or metadata.get("ss_sd_model_hash", "")
    rows = [
        ("file", str(path)),
        ("size", f"{path.stat().st_size / 2**20:.2f} MiB"),
        ("keys", str(len(shapes))),
        ("modules", _count(modules, UNET_PREFIX, "UNet") + ", " + _count(modules, TE_PREFIX, "TE")),
        ("algo", algo_of(list(shapes))),
        ("ranks", ", ".join(map(str, ranks)) or "-"),
        ("alphas", ", ".join(f"{alpha:g}" for alpha in alphas) or "-"),
        ("dtype", ", ".join(dtypes)),
        ("recipe name", recipe.get("output", {}).get("name", "-")),
        ("output name", metadata.get("ss_output_name", "-")),
        ("comment", metadata.get("ss_training_comment", "") or "-"),
        ("steps", metadata.get("ss_steps", "-")),
        ("epoch", f"{metadata.get('ss_epoch', '-')} of {metadata.get('ss_num_epochs', '-')}"),
        ("base model hash", base_hash or "-"),
        ("sshs hash", metadata.get("sshs_model_hash", "-")),
    ]
    return rows


def inspect_file(path: Path, console: Console) -> None:
    """Print `describe(path)` as a table."""
    table = Table(title=path.name)
    table.add_column("field")
    table.add_column("value", overflow="fold")  # hashes and paths in full
    for field, value in describe(path):
        table.add_row(field, value)
    console.print(table)


def _count(modules: set[str], prefix: str, part: str) -> str:
    return f"{sum(name.startswith(prefix) for name in modules)} {part}"
