"""Single-file base models: one checkpoint in the original LDM layout, read as SD 1.x.

`.safetensors` files, and pickle files only when the recipe allows them. The file carries
no config: the parts are built from `meebs/configs/sd15/` and its keys are converted with
diffusers' own single-file mapping, so nothing is ever fetched from a hub. The pin and the
architecture are checked before any weights are read, and loading is strict.

`open_single_file` reads a `.safetensors` checkpoint the same way without its weights:
the parts get one-element placeholders that say which tensor of the file each parameter
is, and `SingleFile.reader` reads those tensors one at a time (what `merge` streams).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import CLIPTextModel

from meebs.errors import ModelError
from meebs.files.safetensors_io import Header, UnreadableFile, read_header, shown
from meebs.models.base import (
    SD15_CONFIGS,
    BaseModel,
    check_pin,
    first_line,
    kohya_model_hash,
    noise_scheduler,
    not_sd1,
    parts_from_configs,
    refuse_pickle,
    sha256_file,
    unreadable,
)
from meebs.models.tokenizer import clip_tokenizer

PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin"})

# Key prefixes of the three SD 1.x parts in a single-file (LDM layout) checkpoint.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
# The first cross-attention key projection: its input width is the text context width,
# 768 for SD 1.x (CLIP ViT-L), 1024 for SD 2.x (OpenCLIP ViT-H).
CROSS_ATTENTION_KEY = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
CONV_IN_KEY = UNET_PREFIX + "input_blocks.0.0.weight"
SD1_CONTEXT_WIDTH = 768
WEIGHT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
# safetensors dtype names -> torch (those torch has; a weight of another dtype is refused).
_TORCH_DTYPES = {
    name: dtype
    for name, dtype in {
        "BOOL": torch.bool,
        "U8": torch.uint8,
        "I8": torch.int8,
        "I16": torch.int16,
        "U16": getattr(torch, "uint16", None),
        "I32": torch.int32,
        "U32": getattr(torch, "uint32", None),
        "I64": torch.int64,
        "U64": getattr(torch, "uint64", None),
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F32": torch.float32,
        "F64": torch.float64,
        "C64": torch.complex64,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
    }.items()
    if dtype is not None
}
# A reader closes and reopens the file after this many bytes: the pages an mmap has
# touched stay resident (and counted) until it is unmapped.
_REOPEN_BYTES = 64 << 20


def load_file(path: Path, pin: str | None, allow_pickle: bool) -> BaseModel:
    suffix = path.suffix.lower()
    is_pickle = suffix in PICKLE_SUFFIXES
    if not is_pickle and suffix != ".safetensors":
        raise unreadable(path, "expected .safetensors or a diffusers folder")
    if is_pickle and not allow_pickle:
        refuse_pickle(path)
    digest = sha256_file(path)
    check_pin(path, digest, pin)
    if is_pickle:
        state = _read_pickle(path)
        check_sd1_layout(path, {key: tuple(value.shape) for key, value in state.items()})
    else:
        check_sd1_layout(path, _safetensors_shapes(path))
        state = _read_safetensors(path)
    check_weight_dtypes(path, state)
    unet, vae, text_encoder = parts_from_ldm(state, SD15_CONFIGS, path)
    return BaseModel(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        noise_scheduler=noise_scheduler(),
        sha256=digest,
        name=path.stem,
        legacy_hash=kohya_model_hash(path),
        source=str(path),
    )


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the header only (checked: `read_header`)."""
    return {key: entry.shape for key, entry in _checked_header(path).tensors.items()}


def _checked_header(path: Path) -> Header:
    try:
        return read_header(path)
    except UnreadableFile as err:
        raise unreadable(path, f"bad safetensors header: {err.reason}") from None


@dataclass
class SingleFile:
    """A `.safetensors` checkpoint opened without reading its weights (`open_single_file`).

    `unet`, `vae` and `text_encoder` are the parts as `load_file` would build them, but
    every parameter is a one-element placeholder expanded to its shape, in the file's
    dtype: names, shapes and layers are real, values are not (never compute with them).
    `key_of` says which tensor of the file a parameter (or a view of it) stands for.
    """

    path: Path
    sha256: str
    header: Header
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    _placeholders: dict[str, torch.Tensor] = field(repr=False)
    _sources: dict[int, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._sources = {
            value.untyped_storage().data_ptr(): key for key, value in self._placeholders.items()
        }

    def key_of(self, tensor: torch.Tensor) -> str:
        """The file's key for a placeholder parameter, or a view of one."""
        key = self._sources.get(tensor.untyped_storage().data_ptr())
        if key is None:
            raise ModelError(
                f"{self.path}: a {list(tensor.shape)} weight is no tensor of the file "
                "(diffusers' converter built it): this diffusers version cannot be streamed"
            )
        return key

    def reader(self) -> TensorReader:
        """Reads the file's tensors one at a time; use it in a `with` block."""
        return TensorReader(self.path, self.header)


class TensorReader:
    """One tensor at a time from a safetensors file, through `safe_open` (mmap).

    The file is closed and opened again after every 64 MiB read: the pages a mapping
    has touched stay resident, and counted in the process's memory, until it is closed.
    """

    def __init__(self, path: Path, header: Header) -> None:
        self.path, self.header = path, header
        self._handle: Any = None
        self._read_since_open = 0

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._close()

    def read(self, key: str) -> torch.Tensor:
        """The tensor `key`, in its own memory (a copy, not a view of the mapping)."""
        entry = self.header.tensors[key]
        if self._handle is not None and self._read_since_open >= _REOPEN_BYTES:
            self._close()
        try:
            if self._handle is None:
                self._handle = safe_open(self.path, framework="pt").__enter__()
            tensor = self._handle.get_tensor(key)
        except (SafetensorError, OSError) as err:
            raise unreadable(self.path, f"bad safetensors data: {first_line(err)[:200]}") from None
        self._read_since_open += entry.end - entry.begin
        return tensor

    def _close(self) -> None:
        if self._handle is not None:
            handle, self._handle, self._read_since_open = self._handle, None, 0
            handle.__exit__(None, None, None)


def open_single_file(path: Path, pin: str | None, *, config_dir: Path = SD15_CONFIGS) -> SingleFile:
    """A `.safetensors` checkpoint checked like `load_file` (pin, SD 1.x layout, weight
    dtypes, strict conversion), its parts built with placeholders instead of weights.

    Costs a sha256 of the file and a few MB: nothing but the header is read. The SD 1.x
    layout check runs with the SD 1.5 configs, the only ones a user's file is read with;
    tests read their tiny files with `TINY_CONFIGS`.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise unreadable(path, "expected .safetensors")
    digest = sha256_file(path)
    check_pin(path, digest, pin)
    header = _checked_header(path)
    if config_dir == SD15_CONFIGS:
        check_sd1_layout(path, {key: entry.shape for key, entry in header.tensors.items()})
    prefixes = (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)
    placeholders = {
        key: _placeholder(path, key, entry.dtype, entry.shape)
        for key, entry in header.tensors.items()
        if key.startswith(prefixes)
    }
    check_weight_dtypes(path, placeholders)
    unet, vae, text_encoder = parts_from_ldm(placeholders, config_dir, path)
    return SingleFile(path, digest, header, unet, vae, text_encoder, placeholders)


def _placeholder(path: Path, key: str, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """One element of its own (so its address names it), seen in the tensor's shape."""
    torch_dtype = _TORCH_DTYPES.get(dtype)
    if torch_dtype is None:
        raise _weight_dtype_error(path, key, dtype)
    return torch.zeros((1,) * len(shape), dtype=torch_dtype).expand(shape)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of the three SD parts; EMA copies and other extras are never read."""
    prefixes = (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)
    try:
        with safe_open(path, framework="pt") as handle:
            keys = [key for key in handle.keys() if key.startswith(prefixes)]  # noqa: SIM118
            return {key: handle.get_tensor(key) for key in keys}
    except (SafetensorError, OSError) as err:
        raise unreadable(path, f"bad safetensors data: {first_line(err)[:200]}") from None


def check_weight_dtypes(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Refuse integer, bool and 8-bit weights in the three parts: loaded with `assign=True`
    they would make an integer model that fails at the first step, or a quantized one
    without its scale. `position_ids` is an integer buffer by nature."""
    prefixes = (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)
    for key in sorted(state):
        dtype = state[key].dtype
        weight = key.startswith(prefixes) and not key.endswith("position_ids")
        if weight and dtype not in WEIGHT_DTYPES:
            raise _weight_dtype_error(path, key, str(dtype).removeprefix("torch."))


def _weight_dtype_error(path: Path, key: str, dtype: str) -> ModelError:
    return ModelError(
        f"{path}: {shown(key)} is {dtype}; SD weights must be float16, bfloat16, float32 "
        "or float64: use an unquantized SD 1.x checkpoint"
    )


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Unpickle a checkpoint the user trusts (allow_pickle) and keep its tensors."""
    try:
        checkpoint: Any = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # unpickling a user file can fail in many ways
        raise unreadable(path, f"cannot unpickle it: {first_line(err)}") from None
    while isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise unreadable(path, "it holds no state dict")
    return {key: value for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}


def check_sd1_layout(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse anything but a complete SD 1.x checkpoint, naming what it is instead."""

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in shapes)

    context = shapes.get(CROSS_ATTENTION_KEY)
    width = context[-1] if context and len(context) == 2 else None
    if has("conditioner.embedders."):
        raise not_sd1(path, "an SDXL checkpoint")
    if has("cond_stage_model.model.") or width == 1024:
        raise not_sd1(path, "an SD 2.x checkpoint (OpenCLIP text encoder, 1024-wide context)")
    if width != SD1_CONTEXT_WIDTH:
        raise unreadable(
            path,
            f"no SD 1.x UNet: {CROSS_ATTENTION_KEY} is missing or not {SD1_CONTEXT_WIDTH} wide",
        )
    for prefix, part in ((TEXT_PREFIX + "text_model.", "CLIP text encoder"), (VAE_PREFIX, "VAE")):
        if not has(prefix):
            raise ModelError(
                f"{path} has no {part} weights ({prefix}*): use a full SD 1.x checkpoint, "
                "not a UNet-only file"
            )
    conv_in = shapes.get(CONV_IN_KEY)
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        raise not_sd1(
            path, f"an SD 1.x inpainting or edit model ({conv_in[1]} UNet input channels, not 4)"
        )


def parts_from_ldm(
    state: dict[str, torch.Tensor], config_dir: Path, path: Path
) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """Build the three parts from the shipped configs and an LDM-layout state dict.

    The modules are created without initialising weights (the checkpoint replaces them),
    the keys are converted with diffusers' single-file mapping, and loading is strict: a
    missing or unexpected key is an error, never a silently random weight.
    """
    with init_empty_weights():
        unet, vae, text_encoder = parts_from_configs(config_dir)
    _load_strict(unet, lambda: convert_ldm_unet_checkpoint(state, dict(unet.config)), path, "UNet")
    _load_strict(vae, lambda: convert_ldm_vae_checkpoint(state, dict(vae.config)), path, "VAE")
    _load_strict(text_encoder, lambda: _ldm_text_state(state), path, "text encoder")
    return unet, vae, text_encoder


def _ldm_text_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LDM `cond_stage_model.transformer.text_model.*` keys as transformers 5 names them.

    transformers 5's CLIPTextModel has no `text_model.` level, and `position_ids` is a
    constant buffer some checkpoints carry but the model does not save.
    """
    converted = convert_ldm_clip_checkpoint(state)
    return {
        key.removeprefix("text_model."): value
        for key, value in converted.items()
        if not key.endswith("position_ids")
    }


def _load_strict(
    module: nn.Module, convert: Callable[[], dict[str, torch.Tensor]], path: Path, part: str
) -> None:
    """Convert and assign weights; any key or shape mismatch becomes a one-line ModelError."""
    try:
        result = module.load_state_dict(convert(), strict=False, assign=True)
    except (KeyError, IndexError, RuntimeError) as err:
        raise ModelError(f"{path}: its {part} weights do not fit SD 1.5 ({_detail(err)})") from None
    if result.missing_keys or result.unexpected_keys:
        raise ModelError(
            f"{path}: its {part} weights do not match SD 1.5 "
            f"({_sample(result.missing_keys)} missing, {_sample(result.unexpected_keys)} "
            "unexpected): use an unmodified SD 1.x checkpoint"
        )


def _detail(err: BaseException) -> str:
    """torch's "Error(s) in loading state_dict for X:" says nothing; the line after it
    names the first key and both shapes."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 and lines[0].endswith(":") else first_line(err)
    return detail[:300]


def _sample(keys: Collection[str]) -> str:
    ordered = sorted(keys)
    return f"{len(ordered)} (e.g. {ordered[0]})" if ordered else "0"
