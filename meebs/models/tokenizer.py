"""The SD 1.5 CLIP tokenizer, built offline from the BPE file we ship.

SD 1.5 uses OpenAI CLIP's byte-level BPE vocabulary (49408 tokens). Instead of fetching
`tokenizer/` from a model hub, we derive the vocabulary and merge list from
`assets/bpe_simple_vocab_16e6.txt.gz` with the same rules as OpenAI's `simple_tokenizer.py`,
so token ids match what the base model was trained with and no network is ever needed.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

from transformers import CLIPTokenizer

BPE_FILE = Path(__file__).parent.parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# simple_tokenizer.py keeps the merges on lines 1 .. 49152 - 256 - 2 of the file.
_MERGE_COUNT = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI's byte -> printable character table; its order fixes ids 0..255."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """The merge rules, in priority order, as simple_tokenizer.py reads them."""
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1 : _MERGE_COUNT + 1]]


def _build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Byte chars, then byte chars + '</w>', then one token per merge, then the two specials."""
    byte_chars = list(_bytes_to_unicode().values())
    tokens = [
        *byte_chars,
        *(char + "</w>" for char in byte_chars),
        *("".join(merge) for merge in merges),
        BOS_TOKEN,
        EOS_TOKEN,
    ]
    return {token: index for index, token in enumerate(tokens)}


@functools.cache
def clip_tokenizer() -> CLIPTokenizer:
    """The SD 1.5 tokenizer: 49408 tokens, bos 49406, eos = pad 49407, 77 positions.

    Built once per process (about 0.1 s) straight from the in-memory vocabulary, so no
    vocab.json/merges.txt is written anywhere. The instance is shared: never add tokens
    to it. `model_max_length` must be set: without it
    padding to the text encoder's 77 positions fails.
    """
    merges = _read_merges(BPE_FILE)
    return CLIPTokenizer(
        vocab=_build_vocab(merges),
        merges=merges,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=MAX_LENGTH,
    )
