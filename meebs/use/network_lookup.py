"""Find the network file a prompt tag names, the way a user thinks of it: by file name.

`<lyco:meebs_demo:1>` means `meebs_demo.safetensors` from any run under outputs/ (runs are
`outputs/<recipe name>/<run id>/`) or from the folders given with `--networks`. Several
runs usually hold a file of that name; the most recently written one wins, and the
caller prints which, so an older run is never picked silently.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from meebs.errors import MeebsError

SUFFIX = ".safetensors"


@dataclass(frozen=True)
class Found:
    """The chosen file and how many files of that name there were to choose from."""

    path: Path
    candidates: int


def find_network(name: str, roots: Iterable[Path]) -> Found:
    """The newest `<name>.safetensors` under `roots`, searched recursively."""
    roots = [Path(root) for root in roots]
    files = [path for root in roots if root.is_dir() for path in root.rglob(f"*{SUFFIX}")]
    wanted = name.removesuffix(SUFFIX)
    matches = [path for path in files if path.name == wanted + SUFFIX]
    if not matches:
        searched = ", ".join(str(root) for root in roots)
        stems = sorted({path.name.removesuffix(SUFFIX) for path in files})
        near = difflib.get_close_matches(wanted, stems, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise MeebsError(f"no network named {wanted!r} in {searched}{hint}")
    newest = max(matches, key=lambda path: (path.stat().st_mtime_ns, str(path)))
    return Found(newest, len(matches))
