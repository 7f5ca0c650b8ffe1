"""Write a base model as one SD 1.x checkpoint in the original LDM ("CompVis") key layout.

AUTOMATIC1111 and ComfyUI load a base model mainly as a single `.safetensors` file from
their checkpoints folder, with `model.diffusion_model.…`, `first_stage_model.…` and
`cond_stage_model.transformer.text_model.…` keys: the layout `meebs.models.single_file` reads.

diffusers 0.42 ships the reverse conversion only as a script outside the wheel;
importable are just its forward converters (used by `meebs.models.single_file.parts_from_ldm`) and
the renames of the top-level layers (`DIFFUSERS_TO_LDM_MAPPING`). So the block renames
are derived here from the UNet and VAE configs, and every export is checked against the
forward converters: the LDM dict we built is converted back and each diffusers key must
come back as the very tensor it started from (same storage, same shape). A wrong rename
therefore stops the export before anything is written, for any config, tiny included.

Not written, though the published SD 1.5 file has them: `model_ema.*` (EMA copies),
`cond_stage_model.transformer.text_model.embeddings.position_ids` (a constant buffer
our loader drops and transformers rebuilds) and the DDPM schedule buffers (`betas`,
`alphas_cumprod`, `posterior_*`, …), which A1111 and ComfyUI rebuild from their config.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders.single_file_utils import (
    DIFFUSERS_TO_LDM_MAPPING,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from torch import Tensor

from meebs.errors import MeebsError
from meebs.files.atomic_write import write_atomic
from meebs.files.safetensors_io import canonical_header
from meebs.models.base import BaseModel
from meebs.models.single_file import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX

# Inside a block the LDM and diffusers names differ only for these layers.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
# LDM's VAE attention is 1x1 convs (4-D weights) where diffusers has Linear layers.
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
_TEXT_MODEL = "text_model."
# What `safetensors.torch.save(..., metadata={"format": "pt"})` writes, which the first
# version of this export used; the streamed writer keeps its bytes exactly.
_METADATA = {"format": "pt"}
_SAFETENSORS_DTYPES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
}


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of a file to write: its shape, known before any data, and how to make it.

    `produce` is called once, when the tensor's turn comes, and must return a tensor of the
    file's dtype and this shape; it is written and dropped before the next one is made.
    """

    shape: tuple[int, ...]
    produce: Callable[[], Tensor]


def ldm_state_dict(model: BaseModel) -> dict[str, Tensor]:
    """The UNet, VAE and text encoder in LDM keys; the tensors are the model's (or views)."""
    return ldm_parts_state_dict(model.unet, model.vae, model.text_encoder)


def ldm_parts_state_dict(
    unet_part: torch.nn.Module, vae_part: torch.nn.Module, text_part: torch.nn.Module
) -> dict[str, Tensor]:
    """`ldm_state_dict` of three parts (which need not form a `BaseModel`)."""
    unet_config, vae_config = dict(unet_part.config), dict(vae_part.config)
    unet = unet_part.state_dict()
    vae = vae_part.state_dict()
    text = {_TEXT_MODEL + k.removeprefix(_TEXT_MODEL): v for k, v in text_part.state_dict().items()}
    state = {UNET_PREFIX + _unet_key(key, unet_config): value for key, value in unet.items()}
    for key, value in vae.items():
        ldm_key = _vae_key(key, vae_config)
        if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)
        state[VAE_PREFIX + ldm_key] = value
    state.update({TEXT_PREFIX + key: value for key, value in text.items()})
    _check_round_trip(state, unet, lambda: convert_ldm_unet_checkpoint(state, unet_config), "UNet")
    _check_round_trip(state, vae, lambda: convert_ldm_vae_checkpoint(state, vae_config), "VAE")
    _check_round_trip(state, text, lambda: convert_ldm_clip_checkpoint(state), "text encoder")
    return state


def save_ldm_file(model: BaseModel, path: Path, dtype: torch.dtype) -> str:
    """Write `model` as a new single-file checkpoint in `dtype`, atomically; return its sha256.

    One tensor is converted to `dtype` at a time, as it is written (`write_ldm_file`).
    """
    planned = {
        key: PlannedTensor(tuple(value.shape), lambda value=value: value.detach().to(dtype))
        for key, value in ldm_state_dict(model).items()
    }
    return write_ldm_file(path, planned, dtype)


def write_ldm_file(path: Path, planned: dict[str, PlannedTensor], dtype: torch.dtype) -> str:
    """Write a safetensors file tensor by tensor, atomically; return its sha256.

    The bytes are those `safetensors.torch.save(tensors, metadata={"format": "pt"})`
    would give, with our canonical header (`canonical_header`): one dtype, so the data
    is in key order without padding, and the header, which must come first, follows
    from the shapes alone. Each tensor is made (`PlannedTensor.produce`), written and
    dropped in turn, so memory holds a tensor or two, never the file (SD 1.5's
    largest is the 76 MB fp16 token embedding). The temp file is fsynced and renamed
    into place (`write_atomic`); an error or Ctrl-C while writing removes it, so `path`
    is either complete or absent. The sha256 is computed from the bytes as written.
    """
    path = Path(path)
    if path.exists():
        raise MeebsError(f"{path} already exists; refusing to overwrite it")
    order = sorted(planned)  # safetensors' order for tensors of one dtype
    header: dict[str, Any] = {"__metadata__": _METADATA}
    offset = 0
    for key in order:
        size = math.prod(planned[key].shape) * dtype.itemsize
        header[key] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(planned[key].shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    digest = hashlib.sha256()

    def chunks() -> Iterator[bytes | memoryview]:
        head = canonical_header(header)
        digest.update(head)
        yield head
        for key in order:
            tensor = planned[key].produce()
            if tensor.dtype != dtype or tuple(tensor.shape) != planned[key].shape:
                raise MeebsError(
                    f"internal error: {key} came out {tensor.dtype} {list(tensor.shape)}, "
                    f"planned {dtype} {list(planned[key].shape)}; nothing was written"
                )
            data = memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
            digest.update(data)
            yield data
            del tensor, data

    write_atomic(path, chunks())
    return digest.hexdigest()


def _unet_key(key: str, config: dict[str, Any]) -> str:
    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"].get(key)
    if top is not None:
        return top
    return _renamed(key, _unet_blocks(config), _UNET_RESNET, {})


def _vae_key(key: str, config: dict[str, Any]) -> str:
    top = DIFFUSERS_TO_LDM_MAPPING["vae"].get(key)
    if top is not None:
        return top
    return _renamed(key, _vae_blocks(config), _VAE_RESNET, _VAE_ATTENTION)


def _renamed(
    key: str, blocks: dict[str, str], resnet: dict[str, str], attention: dict[str, str]
) -> str:
    """Swap the block prefix, then the layer name inside a resnet or attention block."""
    prefix = max((p for p in blocks if key.startswith(p)), key=len, default=None)
    if prefix is None:
        raise MeebsError(f"cannot name {key} in the LDM layout: not an SD 1.x layer")
    rest = key[len(prefix) :]
    inner = resnet if ".resnets." in prefix else attention if ".attentions." in prefix else {}
    layer, dot, suffix = rest.rpartition(".")
    return blocks[prefix] + inner.get(layer, layer) + dot + suffix


def _unet_blocks(config: dict[str, Any]) -> dict[str, str]:
    """diffusers block prefix -> LDM prefix, numbered the way LDM's UNetModel builds them.

    input_blocks: conv_in, then per down block `layers_per_block` (resnet, attention?)
    pairs and a downsampler except after the last; output_blocks: per up block one layer
    more, the upsampler riding on the block's last layer after its attention.
    """
    layers = config["layers_per_block"]
    downs, ups = config["down_block_types"], config["up_block_types"]
    blocks = {
        "mid_block.resnets.0.": "middle_block.0.",
        "mid_block.attentions.0.": "middle_block.1.",
        "mid_block.resnets.1.": "middle_block.2.",
    }
    index = 1
    for i in range(len(downs)):
        for j in range(layers):
            blocks[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{index}.0."
            blocks[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{index}.1."
            index += 1
        if i < len(downs) - 1:
            blocks[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{index}.0.op."
            index += 1
    index = 0
    for i, kind in enumerate(ups):
        for j in range(layers + 1):
            blocks[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{index}.0."
            blocks[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{index}.1."
            index += 1
        if i < len(ups) - 1:
            slot = 2 if "CrossAttn" in kind else 1
            blocks[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{index - 1}.{slot}."
    return blocks


def _vae_blocks(config: dict[str, Any]) -> dict[str, str]:
    """The VAE decoder numbers its up blocks in reverse: diffusers up_blocks.0 is LDM up.3."""
    layers, count = config["layers_per_block"], len(config["down_block_types"])
    blocks = {}
    for coder in ("encoder", "decoder"):
        blocks[f"{coder}.mid_block.attentions.0."] = f"{coder}.mid.attn_1."
        for k in range(2):
            blocks[f"{coder}.mid_block.resnets.{k}."] = f"{coder}.mid.block_{k + 1}."
    for i in range(count):
        for j in range(layers):
            blocks[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        for j in range(layers + 1):
            blocks[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{count - 1 - i}.block.{j}."
        blocks[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        blocks[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{count - 1 - i}.upsample."
    return blocks


def _check_round_trip(
    state: dict[str, Tensor],
    original: dict[str, Tensor],
    convert: Callable[[], dict[str, Tensor]],
    part: str,
) -> None:
    """diffusers' forward converter must give back exactly `original`, tensor for tensor."""
    back = {k: v for k, v in convert().items() if not k.endswith("position_ids")}
    wrong = sorted(
        key
        for key in original.keys() | back.keys()
        if key not in back
        or key not in original
        or back[key].data_ptr() != original[key].data_ptr()
        or back[key].shape != original[key].shape
    )
    if wrong:
        raise MeebsError(
            f"the {part} does not convert back from the LDM layout ({len(wrong)} keys differ, "
            f"e.g. {wrong[0]}): this diffusers version maps keys differently; nothing was written"
        )
