"""What prep is asked to do (`PrepOptions`) and what it did with each image (`Decision`):
shared by the steps that decide (`prep.py`) and the record that reports (`prep_record.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from meebs.data.folders import parse_subset_name
from meebs.data.image_survey import ImageFacts
from meebs.errors import DataError

FLATTEN_MODES = ("alternate", "white", "black")
CLASS_TOKEN_MODES = ("keep", "none")


@dataclass(frozen=True)
class PrepOptions:
    """What prep changes; the defaults change nothing but copy."""

    flatten: str | None = None
    """alternate, white or black: the background for transparent images; None keeps them."""
    cull_colour_variants: bool = False
    trim_to_batch: int | None = None
    repeats: int | None = None
    """New repeats for every folder; None keeps each folder's own."""
    class_token: str = "keep"
    """keep, or none: drop the class token (`meeb person` -> `meeb`)."""

    def __post_init__(self) -> None:
        if self.flatten not in (None, *FLATTEN_MODES):
            raise DataError(f"--flatten must be one of {', '.join(FLATTEN_MODES)}")
        if self.class_token not in CLASS_TOKEN_MODES:
            raise DataError(f"--class-token must be one of {', '.join(CLASS_TOKEN_MODES)}")
        for name, value in (("--trim-to-batch", self.trim_to_batch), ("--repeats", self.repeats)):
            if value is not None and value < 1:
                raise DataError(f"{name} must be at least 1, got {value}")

    def tokens(self, source_tokens: str) -> str:
        """The folder's tokens after prep: the subject alone when the class is dropped."""
        return source_tokens.split()[0] if self.class_token == "none" else source_tokens

    def target_folder(self, source_folder: str) -> str:
        """The new `{repeats}_{tokens}` name of a source subset folder."""
        repeats, tokens = parse_subset_name(Path(source_folder))
        return f"{self.repeats or repeats}_{self.tokens(tokens)}"


@dataclass
class Decision:
    """What prep did with one source image, and why."""

    source: str
    """Path relative to DIR, e.g. `2_meeb person/meeb_000.png`."""
    step: str = ""
    """The step that dropped it (`drop list`, `colour variant`, `trim`); "" if kept."""
    reason: str = ""
    target: str = ""
    """Path relative to NEWDIR, for a kept image."""
    changes: list[str] = field(default_factory=list)
    facts: ImageFacts | None = None

    @property
    def kept(self) -> bool:
        return not self.step
