"""`inspect FILE`: what a network file holds, without loading a model.

Before sharing or loading a file, the questions are always the same: which algorithm,
with which arguments (LoKr's factor, Diag-OFT's blocks and constraint, DoRA...), and
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

from meebs.network.algo_tensors import (
    TE_PREFIX,
    UNET_PREFIX,
    Shape,
    module_algo,
    module_rank,
    modules_of,
)
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
    factors = modules_of(shapes)
    ranks = sorted({rank for f in factors.values() if (rank := module_rank(f)) is not None})
    with safe_open(path, framework="pt") as stream:
        numbers = {
            key: stream.get_tensor(key).float().item()
            for key in shapes
            if key.endswith((".alpha", ".on_input"))
        }
    alphas = sorted({value for key, value in numbers.items() if key.endswith(".alpha")})
    base_hash = metadata.get("ss_new_sd_model_hash") or metadata.get("ss_sd_model_hash", "")
    rows = [
        ("size", f"{path.stat().st_size / 2**20:.2f} MiB"),
        ("keys", str(len(shapes))),
        ("modules", _count(modules, UNET_PREFIX, "UNet") + ", " + _count(modules, TE_PREFIX, "TE")),
        ("algo", algorithms(factors)),
        ("algo args", algo_args(factors, numbers)),
        ("network args", metadata.get("ss_network_args", "-")),
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


def algorithms(factors: dict[str, dict[str, Shape]]) -> str:
    """The file's algorithm(s) by its modules' tensors, e.g. "LoHA" or "LoKr + DoRA"."""
    found = sorted({algo for f in factors.values() if (algo := module_algo(f))})
    dora = any("dora_scale" in f for f in factors.values())
    return " + ".join(found + ["DoRA"] * dora) or "unknown"


def algo_args(factors: dict[str, dict[str, Shape]], numbers: dict[str, float]) -> str:
    """The algorithm's settings as its tensors show them (lycoris' argument names), e.g.
    "LoKr: lokr_w1 6x4 ... (factor), decompose_both on 2 of 40, ..."; "-" for none."""
    by_algo: dict[str, dict[str, dict[str, Shape]]] = {}
    for module, f in sorted(factors.items()):
        algo = module_algo(f)
        if algo:
            by_algo.setdefault(algo, {})[module] = f
    parts = []
    for algo, group in by_algo.items():
        said = [text for text in _args_of(algo, group, numbers) if text]
        if said:
            parts.append(f"{algo}: {', '.join(said)}")
    modules = [f for group in by_algo.values() for f in group.values()]
    doras = [f["dora_scale"] for f in modules if "dora_scale" in f]
    if doras:
        outputs = sum(len(shape) > 1 and shape[1] == 1 for shape in doras)
        per_output = "per output row (wd_on_output True: AUTOMATIC1111 misapplies it)"
        if outputs in (0, len(doras)):
            axis = per_output if outputs else "per input column (wd_on_output False)"
        else:
            axis = (
                f"per output row on {outputs} (AUTOMATIC1111 misapplies those), "
                f"per input column on {len(doras) - outputs}"
            )
        parts.append(f"DoRA (dora_wd) on {len(doras)} of {len(modules)}, magnitude {axis}")
    return "; ".join(parts) or "-"


def _args_of(algo: str, group: dict[str, dict[str, Shape]], numbers: dict[str, float]) -> list[str]:
    """What one algorithm's modules say about the arguments they were trained with."""
    total = len(group)

    def on(count: int, name: str) -> str:
        return f"{name} on {count} of {total}" if count else ""

    def count(*suffixes: str) -> int:
        return sum(all(s in f for s in suffixes) for f in group.values())

    if algo in ("LoHA", "LoRA/LoCon"):
        return [on(count("hada_t1") + count("lora_mid.weight"), "use_tucker")]
    if algo == "LoKr":
        halves = sorted({"x".join(map(str, _w1(f))) for f in group.values()})
        shown = ", ".join(halves[:4]) + (", ..." if len(halves) > 4 else "")
        return [
            f"lokr_w1 {shown} (factor)",
            on(count("lokr_w1_a"), "decompose_both"),
            on(count("lokr_w1", "lokr_w2"), "full_matrix"),
            on(count("lokr_t2"), "use_tucker"),
        ]
    if algo == "Diag-OFT":
        sizes = sorted({f["oft_blocks"][1] for f in group.values()})
        constraints = sorted(
            {v for k, v in numbers.items() if k.endswith(".alpha") and k.split(".")[0] in group}
        )
        return [
            f"block size {', '.join(map(str, sizes))}",
            f"constraint {', '.join(f'{c:.4g}' for c in constraints) or '0'}",
            on(count("rescale"), "rescaled"),
        ]
    if algo == "Full":
        return [on(count("diff_b"), "bias (diff_b)")]
    if algo == "IA3":
        inputs = sum(bool(numbers.get(f"{module}.on_input")) for module in group)
        return [on(inputs, "train_on_input") or "on the outputs"]
    return []


def _w1(f: dict[str, Shape]) -> Shape:
    """LoKr's first Kronecker half: its size is lycoris' `factor`."""
    if "lokr_w1" in f:
        return f["lokr_w1"]
    return f["lokr_w1_a"][0], f["lokr_w1_b"][-1]


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
