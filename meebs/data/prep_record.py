"""The prep record: every source image, whether it was kept, and why or what changed.

Written into the new dataset folder beside its subset folders (the dataset scan ignores
files there), as `prep_record.json` for tools and `prep_record.md` for people. It holds
no dates and no absolute paths, so the same prep of the same data gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from meebs.data.prep_options import Decision, PrepOptions
from meebs.files.atomic_write import write_text_atomic

JSON_NAME = "prep_record.json"
MARKDOWN_NAME = "prep_record.md"


def write_record(
    folder: Path,
    source_name: str,
    decisions: Sequence[Decision],
    options: PrepOptions,
    drop_file: Path | None,
) -> None:
    """Write both forms of the record into `folder`."""
    record = {
        "source": source_name,
        "options": asdict(options),
        "drop_list": _drop_list_info(drop_file),
        "counts": _counts(decisions),
        "images": [_entry(decision) for decision in decisions],
    }
    write_text_atomic(folder / JSON_NAME, json.dumps(record, indent=2) + "\n")
    write_text_atomic(folder / MARKDOWN_NAME, _markdown(record))


def _drop_list_info(drop_file: Path | None) -> dict[str, str] | None:
    if drop_file is None:
        return None
    return {"name": drop_file.name, "sha256": hashlib.sha256(drop_file.read_bytes()).hexdigest()}


def _counts(decisions: Sequence[Decision]) -> dict[str, int]:
    steps = Counter(decision.step for decision in decisions if not decision.kept)
    counts = {"source images": len(decisions), "kept": len(decisions) - steps.total()}
    return counts | {f"dropped: {step}": count for step, count in sorted(steps.items())}


def _entry(decision: Decision) -> dict[str, object]:
    if decision.kept:
        return {
            "source": decision.source,
            "result": "kept",
            "target": decision.target,
            "changes": decision.changes,
        }
    return {
        "source": decision.source,
        "result": "dropped",
        "step": decision.step,
        "reason": decision.reason,
    }


def _markdown(record: dict) -> str:
    options = ", ".join(f"{key}={value}" for key, value in record["options"].items())
    drop_list = record["drop_list"]["name"] if record["drop_list"] else "none"
    lines = [
        f"# prep record: {record['source']}",
        "",
        f"Options: {options}; drop list: {drop_list}.",
        "",
        "| | images |",
        "| --- | ---: |",
        *(f"| {name} | {count} |" for name, count in record["counts"].items()),
        "",
        "| source image | result | why, or what changed |",
        "| --- | --- | --- |",
    ]
    for entry in record["images"]:
        if entry["result"] == "kept":
            detail = "; ".join(entry["changes"]) or "copied unchanged"
            lines.append(f"| {entry['source']} | kept as {entry['target']} | {detail} |")
        else:
            lines.append(f"| {entry['source']} | dropped ({entry['step']}) | {entry['reason']} |")
    return "\n".join(lines) + "\n"
