"""The reviewed drop list: images a person decided to leave out, each with its reason.

Some problems only a person sees (a drawing that is off-model, a wrong pose), so prep
takes them from a small YAML file rather than guessing. Every entry needs a reason, so
the prep record can say why each image went.

    drop:
      "2_meeb person/meeb_024.png": "cyclops: drawn with one eye"
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import yaml

from meebs.errors import DataError
from meebs.files.text_files import load_yaml, read_text

EXAMPLE = '"2_meeb person/meeb_024.png": "cyclops: drawn with one eye"'


def read_drop_list(path: Path, images: Collection[str]) -> dict[str, str]:
    """{image path relative to the dataset: reason} from `path`, each image one of `images`."""
    try:
        document = load_yaml(read_text(path, "drop list", DataError))
    except yaml.YAMLError as error:
        reason = " ".join(str(error).split())
        raise DataError(f"drop list {path} is not valid YAML: {reason}") from error
    entries = document.get("drop") if isinstance(document, dict) else None
    if not isinstance(entries, dict):
        raise DataError(
            f"drop list {path} needs a mapping 'drop:' of image: reason, e.g. {EXAMPLE}"
        )
    for name, reason in entries.items():
        if not isinstance(reason, str) or not reason.strip():
            raise DataError(f"drop list {path}: {name} has no reason; write why it goes")
        if name not in images:
            raise DataError(
                f"drop list {path} names {name}, which is not an image of the dataset: "
                "write paths relative to the dataset folder, e.g. '2_meeb person/x.png'"
            )
    return {name: reason.strip() for name, reason in entries.items()}
