"""kohya module names (`lora_unet_…`, `lora_te_text_model_…`) -> the layers of a base model.

A network file names each patched layer by its diffusers module path with "." -> "_",
under `lora_unet_` for the UNet and `lora_te_` for the text encoder seen with its
`text_model.` level (REFERENCE §4). Merging needs the inverse: from a key back to the
live `nn.Module`. The table is built from the model itself, so every name it holds is a
real layer with weights, and anything else is reported instead of being guessed.
"""

from __future__ import annotations

from torch import nn

from meebs.network.build import lycoris_text_encoder

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"
# Prefixes that kohya uses for SDXL (two text encoders, LDM-named UNet blocks).
_SDXL_PREFIXES = (
    "lora_te1_",
    "lora_te2_",
    "lora_unet_input_blocks_",
    "lora_unet_middle_block_",
    "lora_unet_output_blocks_",
)


def kohya_layers(unet: nn.Module, text_encoder: nn.Module) -> dict[str, nn.Module]:
    """Every Linear/Conv2d of the two parts under the kohya name a network would use."""
    parts = ((UNET_PREFIX, unet), (TEXT_ENCODER_PREFIX, lycoris_text_encoder(text_encoder)))
    return {
        prefix + name.replace(".", "_"): module
        for prefix, part in parts
        for name, module in part.named_modules()
        if isinstance(module, nn.Linear | nn.Conv2d)
    }


def looks_like_sdxl(module_key: str) -> bool:
    """kohya's SDXL naming: AUTOMATIC1111 and ComfyUI would not place it on SD 1.x either."""
    return module_key.startswith(_SDXL_PREFIXES)
