"""Deterministic kernels: the settings that make a rerun give the same bits.

Seeds alone are not enough (kohya sets a seed and same-seed runs still diverge): GPU
kernels may pick algorithms by benchmark, use TF32, or add with atomics in any order, and
the CPU's result depends on the thread count. `apply_determinism` fixes all of that from
the recipe and returns what it set, which the run's manifest records.

`torch.use_deterministic_algorithms` runs in warn-only mode: an op that has no
deterministic implementation (some CUDA backward kernels) warns instead of stopping a
long run. `NondeterminismWatch` collects those warnings, so the run can say which ops
may have changed the low bits and the manifest can record them.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from meebs.recipe.schema import Recipe

# cuBLAS needs a fixed workspace to be deterministic (CUDA >= 10.2); it must be set before
# the first cuBLAS call, so it is set before anything touches the GPU.
CUBLAS_WORKSPACE = ":4096:8"
XFORMERS_BACKWARD = "xformers memory-efficient attention backward (atomic adds)"
_NONDETERMINISTIC_OP = re.compile(r"^(\S+) does not have a deterministic implementation")


def apply_determinism(recipe: Recipe) -> dict[str, Any]:
    """Set threads and kernel choices from the recipe; return them for the manifest.

    Runs before anything touches the GPU (cuBLAS reads its workspace setting once)."""
    train = recipe.train
    torch.set_num_threads(train.threads)
    deterministic = train.deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic
    return {
        "deterministic_algorithms": deterministic,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "cudnn_deterministic": deterministic,
        "cudnn_benchmark": not deterministic,
        "tf32": not deterministic,
        "threads": torch.get_num_threads(),
        "nondeterministic_backends": [],  # filled in by the run (XFORMERS_BACKWARD)
    }


def nondeterminism_warnings(settings: dict[str, Any], ops: set[str]) -> list[str]:
    """The lines a user must see when the run may not repeat bit for bit."""
    lines = []
    if not settings["deterministic_algorithms"]:
        lines.append("train.deterministic is off: a rerun may differ in the low bits")
    lines += [f"{what} is not deterministic" for what in settings["nondeterministic_backends"]]
    return lines + op_warnings(ops)


def op_warnings(ops: set[str]) -> list[str]:
    """The ops torch reported during the run (known only once it has run)."""
    return [f"{op} has no deterministic implementation" for op in sorted(ops)]


class NondeterminismWatch:
    """Collects the ops torch reports as nondeterministic while the watch is on; other
    warnings go through unchanged."""

    def __init__(self) -> None:
        self.ops: set[str] = set()

    @contextmanager
    def watching(self) -> Iterator[NondeterminismWatch]:
        previous = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            match = _NONDETERMINISTIC_OP.match(str(message))
            if match:
                self.ops.add(match.group(1))
            else:
                previous(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("always", message=_NONDETERMINISTIC_OP.pattern)
                yield self
        finally:
            warnings.showwarning = previous
