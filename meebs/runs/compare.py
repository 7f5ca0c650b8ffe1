"""What differs between two runs: their inputs (from the manifests) and their weights.

Two runs of the same inputs on machines of the same kind give identical bytes; anything
else should be explained. The input report names each kind of difference (recipe keys,
data files, base model, packages, hardware, threads, determinism settings); the weight
report says for each network file how far apart the two are: the largest absolute
difference, the relative L2 difference and the cosine similarity of all weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from meebs.errors import MeebsError
from meebs.files.hash_cache import hash_file
from meebs.recipe.keys import recipe_differences
from meebs.recipe.loading import recipe_from_dict

# --------------------------------------------------------------------------- inputs


def data_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`path: added/removed/image changed/caption changed/repeats a -> b`, by data path."""
    if old["sha256"] == new["sha256"]:
        return []
    before = {f["path"]: f for f in old["files"]}
    after = {f["path"]: f for f in new["files"]}
    lines = []
    for path in sorted(before.keys() | after.keys()):
        a, b = before.get(path), after.get(path)
        if a is None:
            lines.append(f"{path}: added")
        elif b is None:
            lines.append(f"{path}: removed")
        else:
            if a["sha256"] != b["sha256"]:
                lines.append(
                    f"{path}: image changed (sha256 {a['sha256'][:12]} -> {b['sha256'][:12]})"
                )
            if a["caption"] != b["caption"]:
                lines.append(f"{path}: caption changed ({a['caption']!r} -> {b['caption']!r})")
            if a["repeats"] != b["repeats"]:
                lines.append(f"{path}: repeats {a['repeats']} -> {b['repeats']}")
    return lines


def input_differences(
    manifest: dict[str, Any], data: dict[str, Any], base_sha256: str
) -> list[str]:
    """What a resume would train on differently: the data and the base model."""
    lines = data_differences(manifest["data"], data)
    recorded = manifest["base_model"]["sha256"]
    if recorded != base_sha256:
        lines.append(f"base model sha256 {recorded[:12]} -> {base_sha256[:12]}")
    return lines


def manifest_differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, list[str]]:
    """Every recorded input that differs, by kind; times and performance are left out."""
    recipe_a = recipe_from_dict(a["recipe"], where="first manifest")
    recipe_b = recipe_from_dict(b["recipe"], where="second manifest")
    threads_a, threads_b = a["hardware"]["threads"], b["hardware"]["threads"]
    kinds = {
        "recipe": recipe_differences(recipe_a, recipe_b),
        "data": data_differences(a["data"], b["data"]),
        "base model": _changed(
            {"sha256": a["base_model"]["sha256"]}, {"sha256": b["base_model"]["sha256"]}
        ),
        "threads": [f"threads: {threads_a} -> {threads_b}"] if threads_a != threads_b else [],
        "hardware": _changed(
            {**a["hardware"], "class": a["hardware_class"]},
            {**b["hardware"], "class": b["hardware_class"]},
            skip=("threads", "cpu_count"),
        ),
        "determinism": _changed(a["determinism"], b["determinism"], skip=("threads",)),
        "python": _changed({"python": a["python"]}, {"python": b["python"]}),
        "packages": _changed(a["packages"], b["packages"]),
        "code": _changed(a["code"], b["code"]),
        "image": _changed({"digest": a.get("image_digest")}, {"digest": b.get("image_digest")}),
    }
    return {kind: lines for kind, lines in kinds.items() if lines}


def _changed(a: dict[str, Any], b: dict[str, Any], skip: tuple[str, ...] = ()) -> list[str]:
    keys = sorted((a.keys() | b.keys()) - set(skip))
    return [
        f"{k}: {a.get(k, '(none)')} -> {b.get(k, '(none)')}" for k in keys if a.get(k) != b.get(k)
    ]


# --------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class WeightDiff:
    max_abs: float
    rel_l2: float
    cosine: float
    problems: tuple[str, ...] = ()  # keys only on one side, shape mismatches


def compare_weights(a: Path, b: Path) -> WeightDiff:
    """Distance between the tensors of two network files, over the keys they share."""
    with _open(a) as fa, _open(b) as fb:
        keys_a, keys_b = set(fa.keys()), set(fb.keys())
        problems = [f"only in {a.name}: {k}" for k in sorted(keys_a - keys_b)]
        problems += [f"only in {b.name}: {k}" for k in sorted(keys_b - keys_a)]
        max_abs = dot = norm_a = norm_b = norm_diff = 0.0
        for key in sorted(keys_a & keys_b):
            x, y = fa.get_tensor(key).double(), fb.get_tensor(key).double()
            if x.shape != y.shape:
                problems.append(f"{key}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
                continue
            delta = x - y
            max_abs = max(max_abs, delta.abs().max().item() if delta.numel() else 0.0)
            dot += torch.dot(x.flatten(), y.flatten()).item()
            norm_a += x.square().sum().item()
            norm_b += y.square().sum().item()
            norm_diff += delta.square().sum().item()
    rel_l2 = math.sqrt(norm_diff / norm_a) if norm_a else math.sqrt(norm_diff)
    cosine = dot / math.sqrt(norm_a * norm_b) if norm_a and norm_b else float("nan")
    return WeightDiff(max_abs, rel_l2, cosine, tuple(problems))


def _open(path: Path):
    try:
        return safe_open(str(path), "pt")
    except (OSError, SafetensorError) as exc:
        raise MeebsError(f"{path}: not a readable safetensors file ({exc})") from None


@dataclass(frozen=True)
class FileComparison:
    name: str
    status: str  # identical, differs, missing (in the rerun), extra (only in the rerun)
    sha_a: str | None
    sha_b: str | None
    weights: WeightDiff | None = None  # when both files are at hand and differ


def compare_outputs(
    outputs_a: dict[str, str], outputs_b: dict[str, str], dir_a: Path | None, dir_b: Path
) -> list[FileComparison]:
    """Network files matched by name. `dir_a` is None when only hashes are known (a
    results file): then a difference is reported by sha256 alone."""
    rows = []
    for name in sorted(outputs_a.keys() | outputs_b.keys()):
        sha_a, sha_b = outputs_a.get(name), outputs_b.get(name)
        if sha_b is None:
            rows.append(FileComparison(name, "missing", sha_a, None))
        elif sha_a is None:
            rows.append(FileComparison(name, "extra", None, sha_b))
        elif sha_a == sha_b:
            rows.append(FileComparison(name, "identical", sha_a, sha_b))
        else:
            here = dir_a is not None and (dir_a / name).is_file() and (dir_b / name).is_file()
            weights = compare_weights(dir_a / name, dir_b / name) if here else None
            rows.append(FileComparison(name, "differs", sha_a, sha_b, weights))
    return rows


def compare_files(a: Path, b: Path) -> FileComparison:
    """Two network files given by path (`compare A.safetensors B.safetensors`)."""
    sha_a, sha_b = hash_file(a), hash_file(b)
    if sha_a == sha_b:
        return FileComparison(f"{a.name} / {b.name}", "identical", sha_a, sha_b)
    return FileComparison(f"{a.name} / {b.name}", "differs", sha_a, sha_b, compare_weights(a, b))
