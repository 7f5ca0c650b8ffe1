"""AUTOMATIC1111's network tags in a prompt: `<lora:NAME:W>`, `<lyco:NAME:W>` and friends.

Users copy prompts between A1111 and meebs, so the syntax and its meaning follow A1111's
`extra_networks_lora`: items after the tag type are split on ':'; an item with '=' is
named, the others positional. `<lora:NAME>` is weight 1; `<lora:NAME:W>` applies W to
both text encoder and UNet; `<lora:NAME:TE:UNET>` gives them separately; the named
forms `te=` and `unet=` override the positional ones. The tags are removed from the text
the model sees; the prompt as typed is what the PNG records.

A prompt is stranger input (tests/fuzz/test_fuzz_prompts.py): a tag echoed in a message
goes through `shown`, and the tag pattern only runs up to the last '>', since after it no
tag can end and every '<' there would make the regex scan to the end of the prompt
(quadratic: 11 s for 63 KB of "<a:").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from meebs.errors import MeebsError, quoted
from meebs.files.text_files import shown

TAG_TYPES = ("lora", "lyco")
# A1111's `re_extra_net`: any `<word:...>` is an extra-network tag.
_TAG = re.compile(r"<(\w+):([^>]+)>")
# An opening that `_TAG` did not consume (no closing '>' or nothing after the colon).
_BROKEN = re.compile(r"<\s*(?:" + "|".join(TAG_TYPES) + r")\b", re.IGNORECASE)
# Beyond this |weight| images usually fall apart; allowed, as in A1111, with a warning.
WARN_ABOVE = 2.0


@dataclass(frozen=True)
class NetworkTag:
    """One network to apply: its name and the multipliers for each part of the model."""

    name: str
    te: float
    unet: float
    text: str  # the tag as typed, for messages


def parse_prompt(prompt: str) -> tuple[str, list[NetworkTag]]:
    """(prompt without tags, the tags in order); MeebsError for a tag we cannot honour."""
    end = prompt.rfind(">") + 1
    head, tail = prompt[:end], prompt[end:]
    tags = [_parse_tag(match) for match in _TAG.finditer(head)]
    text = _TAG.sub("", head) + tail
    broken = _BROKEN.search(text)
    if broken:
        rest = text[broken.start() : broken.start() + 40]
        raise MeebsError(f"malformed network tag {rest!r}: write <lora:NAME:WEIGHT>")
    return text.strip(), tags


def weight_warnings(tags: list[NetworkTag]) -> list[str]:
    """One line per multiplier so large that the image will likely be noise."""
    return [
        f"{shown(tag.text)}: {part} multiplier {value:g} is above {WARN_ABOVE:g} in size; "
        "expect a distorted image"
        for tag in tags
        for part, value in (("te", tag.te), ("unet", tag.unet))
        if abs(value) > WARN_ABOVE
    ]


def _parse_tag(match: re.Match[str]) -> NetworkTag:
    kind, body, text = match.group(1), match.group(2), shown(match.group(0))
    if kind.lower() not in TAG_TYPES:
        raise MeebsError(
            f"{text}: unsupported tag type {quoted(kind)}; use <lora:...> or <lyco:...>"
        )
    items = [item.strip() for item in body.split(":")]
    positional = [item for item in items if "=" not in item]
    named = dict(item.split("=", 1) for item in items if "=" in item)
    named = {key.strip().lower(): value.strip() for key, value in named.items()}
    unknown = sorted(set(named) - {"te", "unet"})
    if unknown:
        raise MeebsError(f"{text}: unknown option {shown(unknown[0])}=; allowed: te=, unet=")
    if not positional or not positional[0] or len(positional) > 3:
        raise MeebsError(f"malformed network tag {text}: write <{kind}:NAME:WEIGHT[:UNET_WEIGHT]>")
    name, *weights = positional
    te = _weight(text, weights[0]) if weights else 1.0
    te = _weight(text, named["te"]) if "te" in named else te
    unet = _weight(text, weights[1]) if len(weights) > 1 else te
    unet = _weight(text, named["unet"]) if "unet" in named else unet
    return NetworkTag(name=name, te=te, unet=unet, text=match.group(0))


def _weight(tag: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise MeebsError(f"{tag}: weight {quoted(raw)} is not a number") from None
    if not math.isfinite(value):
        raise MeebsError(f"{tag}: weight {quoted(raw)} must be a finite number")
    return value
