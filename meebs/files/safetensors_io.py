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
from pathlib import Path

import safetensors.torch
from torch import Tensor

from meebs.errors import MeebsError
from meebs.files.atomic_write import write_atomic

_HEADER_LENGTH_BYTES = 8
_HEADER_ALIGNMENT = 8
_HASH_BLOCK = 1 << 20


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
    _, header = _read_header(Path(path))
    return header.get("__metadata__", {})


def addnet_hash(path: Path) -> str:
    """kohya's `sshs_model_hash`: sha256 of everything after the header.

    This is the hash AUTOMATIC1111 shows for a LoRA/LoHA (its first 12 hex digits); it
    does not change when only metadata is edited.
    """
    header_end, _ = _read_header(Path(path))
    return _sha256_of_file(Path(path), offset=header_end)


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


def _read_header(path: Path) -> tuple[int, dict]:
    """(offset of the first tensor byte, parsed header) of a safetensors file."""
    try:
        with path.open("rb") as stream:
            length = _header_length(stream.read(_HEADER_LENGTH_BYTES))
            if length > path.stat().st_size:
                raise ValueError("header length exceeds the file size")
            header = json.loads(stream.read(length))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
    except FileNotFoundError:
        raise MeebsError(f"{path} does not exist") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise MeebsError(f"{path} is not a readable safetensors file ({error})") from None
    return _HEADER_LENGTH_BYTES + length, header


def _sha256_of(data: memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_of_file(path: Path, *, offset: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        stream.seek(offset)
        for block in iter(lambda: stream.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()
