"""Write and inspect safetensors files the way our outputs need them.

Two properties matter more than speed here:

* Reproducible bytes. safetensors 0.8 writes the `__metadata__` keys in a random order, so
  two identical runs would give files with different sha256. We rewrite the JSON header
  canonically (sorted keys, compact separators, space padding to a multiple of 8 as
  safetensors does); the tensor bytes are left untouched.
* No half-written files. A crash or a full disk must never leave a truncated network at
  the final path, where AUTOMATIC1111 or ComfyUI would pick it up. We write a hidden temp
  file in the same folder, fsync it and `os.replace` it into place.

The hashes are the ones loaders and model sites show: `addnet_hash` is kohya's
`sshs_model_hash` (sha256 of the bytes after the header, so editing metadata keeps it),
`file_sha256` the full-file sha256 (AUTOMATIC1111's AUTOV2 is its first 10 hex digits).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
from torch import Tensor

from meebs.errors import MeebsError, quoted
from meebs.files.atomic_write import write_atomic

_HEADER_LENGTH_BYTES = 8
_HEADER_ALIGNMENT = 8
_HASH_BLOCK = 1 << 20
# safetensors' own limit on the JSON header; its reader refuses anything longer.
MAX_HEADER_BYTES = 100_000_000
# Bits per value of every dtype safetensors 0.8 reads (its Rust `Dtype`).
DTYPE_BITS = {
    **dict.fromkeys(("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0"), 8),
    **dict.fromkeys(("F8_E4M3FNUZ", "F8_E5M2FNUZ"), 8),
    **dict.fromkeys(("I16", "U16", "F16", "BF16"), 16),
    **dict.fromkeys(("I32", "U32", "F32"), 32),
    **dict.fromkeys(("C64", "F64", "I64", "U64"), 64),
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}
_PLAIN_NAME = re.compile(r"[\w.\-]{1,160}", re.ASCII)


def save_file_atomic(
    tensors: dict[str, Tensor],
    path: Path,
    metadata: dict[str, str],
    *,
    overwrite: bool = False,
    add_hashes: bool = False,
) -> None:
    """Write `tensors` and `metadata` to `path` with a canonical header, atomically.

    `add_hashes` puts `sshs_model_hash` into the metadata, as kohya does, so
    AUTOMATIC1111 need not hash the file when it indexes it. An existing `path` is kept
    (MeebsError) unless `overwrite` is set: a finished network is never silently lost.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise MeebsError(f"{path} already exists; refusing to overwrite it")
    serialized = memoryview(safetensors.torch.save(tensors, metadata=metadata))
    header_end = _HEADER_LENGTH_BYTES + _header_length(serialized[:_HEADER_LENGTH_BYTES])
    header = json.loads(bytes(serialized[_HEADER_LENGTH_BYTES:header_end]))
    data = serialized[header_end:]
    if add_hashes:
        header.setdefault("__metadata__", {})["sshs_model_hash"] = _sha256_of(data)
    write_atomic(path, [canonical_header(header), data])


def read_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file ({} when it has none)."""
    return read_header(Path(path)).metadata


def addnet_hash(path: Path) -> str:
    """kohya's `sshs_model_hash`: sha256 of everything after the header.

    This is the hash AUTOMATIC1111 shows for a LoRA/LoHA (its first 12 hex digits); it
    does not change when only metadata is edited.
    """
    header = read_header(Path(path))
    return _sha256_of_file(Path(path), offset=header.data_start)


def file_sha256(path: Path) -> str:
    """sha256 of the whole file, the hash used to pin and verify model files."""
    return _sha256_of_file(Path(path), offset=0)


def _header_length(prefix: bytes | memoryview) -> int:
    return int.from_bytes(prefix, "little")


def canonical_header(header: dict) -> bytes:
    """Header JSON with sorted keys, padded with spaces like safetensors itself does."""
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    encoded = text.encode("utf-8")
    encoded += b" " * (-len(encoded) % _HEADER_ALIGNMENT)
    return len(encoded).to_bytes(_HEADER_LENGTH_BYTES, "little") + encoded


class UnreadableFile(MeebsError):
    """Not a safetensors file, or one whose header does not describe its bytes."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path} is not a readable safetensors file ({reason})")
        self.reason = reason


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header declares it; `begin`/`end` count from `data_start`."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A safetensors header that describes its file exactly (see `read_header`)."""

    data_start: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def read_header(path: Path) -> Header:
    """The header of `path`, checked as strictly as safetensors' own reader and more.

    A file from anyone is read here before safetensors (Rust) or torch see it, so what is
    wrong with it is one line naming the key: a declared length longer than the file, a
    header that is not a JSON object, a key given twice (safetensors keeps the last one,
    silently), an unknown dtype, a shape whose size differs from its byte range, ranges
    that overlap, leave gaps or end past the file, metadata that is not strings. Nothing
    is allocated from a declared size: only the header bytes, which the file holds, are
    read, so a 1 KiB file that declares 100 GB costs 1 KiB.
    """
    path = Path(path)
    if path.exists() and not path.is_file():  # a folder, or a FIFO that would never end
        raise MeebsError(f"{path} is not a file")
    try:
        with path.open("rb") as stream:
            size = path.stat().st_size
            length = _header_length(stream.read(_HEADER_LENGTH_BYTES))
            _check_length(path, size, length)
            raw = stream.read(length)
    except FileNotFoundError:
        raise MeebsError(f"{path} does not exist") from None
    except OSError as error:
        raise MeebsError(f"{path} cannot be read ({error.strerror or error})") from None
    header = _parse_json(path, raw)
    metadata = _metadata(path, header.pop("__metadata__", None))
    data_bytes = size - _HEADER_LENGTH_BYTES - length
    tensors = {name: _entry(path, name, value, data_bytes) for name, value in header.items()}
    _check_layout(path, tensors, data_bytes)
    return Header(_HEADER_LENGTH_BYTES + length, tensors, metadata)


def shown(name: str) -> str:
    """A tensor or metadata name from a file, as a one-line message may echo it: as is
    when it is a plain name (`lora_unet_conv_in.alpha`), else repr'd and cut."""
    return name if _PLAIN_NAME.fullmatch(name) else quoted(name)


def _check_length(path: Path, size: int, length: int) -> None:
    if size < _HEADER_LENGTH_BYTES:
        raise UnreadableFile(path, f"it is {size} bytes long, shorter than a header length")
    if length > MAX_HEADER_BYTES:
        raise UnreadableFile(
            path, f"it declares a {length:,}-byte header, over safetensors' 100 MB"
        )
    if length > size - _HEADER_LENGTH_BYTES:
        raise UnreadableFile(path, f"it declares a {length:,}-byte header in a {size:,}-byte file")


def _parse_json(path: Path, raw: bytes) -> dict:
    """The header object. Like safetensors (serde_json), an escaped lone UTF-16 surrogate
    (`\\ud800`) is refused: Python would accept it and fail later, printing it."""
    try:
        text = raw.decode("utf-8")
        header = json.loads(text, object_pairs_hook=_no_duplicates)
        if "\\u" in text:
            json.dumps(header, ensure_ascii=False).encode("utf-8")
    except UnicodeDecodeError:
        raise UnreadableFile(path, "the header is not UTF-8 text") from None
    except UnicodeEncodeError:
        raise UnreadableFile(path, "the header escapes a lone UTF-16 surrogate") from None
    except RecursionError:
        raise UnreadableFile(path, "the header JSON is nested too deeply") from None
    except ValueError as error:  # json.JSONDecodeError, and the duplicate keys below
        raise UnreadableFile(path, f"the header is not valid JSON: {str(error)[:200]}") from None
    if not isinstance(header, dict):
        raise UnreadableFile(path, f"the header is a JSON {type(header).__name__}, not an object")
    return header


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object that names a key twice is refused: which value counts is undefined."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"key {shown(twice)} appears twice")
    return result


def _metadata(path: Path, value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UnreadableFile(path, "__metadata__ is not a JSON object")
    for key, item in value.items():
        if not isinstance(item, str):
            raise UnreadableFile(path, f"metadata {shown(key)} is not a string")
    return value


def _entry(path: Path, name: str, value: object, data_bytes: int) -> TensorEntry:
    """One tensor's header entry, its size checked against its byte range."""
    where = f"tensor {shown(name)}"
    if not isinstance(value, dict):
        raise UnreadableFile(path, f"{where}: its entry is not a JSON object")
    dtype, shape, offsets = (value.get(key) for key in ("dtype", "shape", "data_offsets"))
    if not (isinstance(dtype, str) and dtype in DTYPE_BITS):
        raise UnreadableFile(path, f"{where}: unknown dtype {quoted(dtype, 40)}")
    if not _naturals(shape):
        raise UnreadableFile(path, f"{where}: shape {quoted(shape, 60)} is not a list of sizes")
    if not (_naturals(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
        raise UnreadableFile(
            path, f"{where}: data_offsets {quoted(offsets, 60)} are not [begin, end]"
        )
    if offsets[1] > data_bytes:
        raise UnreadableFile(
            path, f"{where}: its data_offsets end past the {data_bytes:,} bytes of data in the file"
        )
    bits = _bits(shape, DTYPE_BITS[dtype], limit=8 * data_bytes)
    if bits is None or bits != 8 * (offsets[1] - offsets[0]):
        size = "more bytes than the file holds" if bits is None else f"{bits / 8:g} bytes"
        raise UnreadableFile(
            path,
            f"{where}: {dtype} of shape {quoted(shape, 60)} needs {size}, its data_offsets "
            f"hold {offsets[1] - offsets[0]:,}",
        )
    return TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])


def _naturals(value: object) -> bool:
    """A JSON list of integers >= 0 (true and false are ints to Python, not sizes)."""
    return isinstance(value, list) and all(type(item) is int and item >= 0 for item in value)


def _bits(shape: list[int], bits_per_value: int, limit: int) -> int | None:
    """Bits the shape needs; None once past `limit`, so a declared [2**40, 2**40, ...] of a
    hundred thousand sizes is refused after a few multiplications, not computed."""
    if 0 in shape:
        return 0
    total = bits_per_value
    for size in shape:
        total *= size
        if total > limit:
            return None
    return total


def _check_layout(path: Path, tensors: dict[str, TensorEntry], data_bytes: int) -> None:
    """The byte ranges tile the data exactly, as safetensors requires: no overlap, no gap,
    and no unclaimed bytes after the last tensor."""
    end = 0
    for name, entry in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != end:
            where = "overlaps the one before" if entry.begin < end else "leaves a gap before it"
            raise UnreadableFile(path, f"tensor {shown(name)}: its data_offsets {where}")
        end = entry.end
    if end != data_bytes:
        raise UnreadableFile(
            path, f"the tensors declare {end:,} bytes of data and the file holds {data_bytes:,}"
        )


def _sha256_of(data: memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_of_file(path: Path, *, offset: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        stream.seek(offset)
        for block in iter(lambda: stream.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()
