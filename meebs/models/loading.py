"""Loading the base model a recipe names, from one of three places:

- a built-in (`tiny` for demos and tests, `sd15-random` for benchmarks), built from the
  configs shipped in `meebs/configs/` with seeded random weights
  (`meebs.models.builtin_models`);
- a single-file checkpoint in the original LDM layout (`.safetensors`; pickle files
  only when the recipe allows them), converted with diffusers' own key mapping but
  configured only from `meebs/configs/sd15/`, so nothing is ever fetched from a hub
  (`meebs.models.single_file`);
- a diffusers folder (`unet/`, `vae/`, `text_encoder/`, optional `tokenizer/`;
  `meebs.models.diffusers_folder`).

Every source is identified by a sha256 that a recipe can pin. The pin and the
architecture (SD 1.x only) are checked before any weights are read, so a wrong or unsafe
file fails in one line instead of after minutes of loading.
"""

from __future__ import annotations

from pathlib import Path

from meebs.errors import ModelError
from meebs.models.base import BaseModel, check_pin
from meebs.models.builtin_models import load_builtin
from meebs.models.diffusers_folder import load_folder
from meebs.models.single_file import load_file


def load_base_model(
    *, builtin: str | None, path: Path | None, sha256: str | None, allow_pickle: bool
) -> BaseModel:
    """Load the base model a recipe names: exactly one of `builtin` or `path`.

    `sha256`, when given, must match (see `folder_sha256` for what a folder's hash is).
    """
    if (builtin is None) == (path is None):
        raise ModelError("set exactly one of model.builtin and model.path in the recipe")
    if builtin is not None:
        model = load_builtin(builtin)
        check_pin(model.source, model.sha256, sha256)
        return model
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelError(f"base model {path} does not exist: check model.path in the recipe")
    if path.is_dir():
        return load_folder(path, sha256, allow_pickle)
    return load_file(path, sha256, allow_pickle)
