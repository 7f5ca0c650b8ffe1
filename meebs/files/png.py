"""PNG files whose bytes depend only on their pixels.

The committed data sets are regenerated and compared byte for byte, so every PNG we write
uses the same fixed settings and carries no metadata chunks (no time, no software name),
and is written atomically like every other output.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from meebs.files.atomic_write import write_atomic


def png_bytes(image: Image.Image) -> bytes:
    """The image as PNG with fixed compression and no metadata."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=9)
    return buffer.getvalue()


def write_png(path: Path, image: Image.Image) -> None:
    """Write `image` to `path` as PNG, complete or not at all."""
    write_atomic(path, [png_bytes(image)])
