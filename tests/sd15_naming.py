"""How AUTOMATIC1111 and ComfyUI place kohya-named network modules on SD 1.5 layers.

Written from the rules in REFERENCE.md section 6 (AUTOMATIC1111's Lora extension
v1.10.1 `convert_diffusers_name_to_compvis`, ComfyUI 0.3.64's key map). Neither tool
complains about a key it cannot place, so the tests check our keys against these rules.
Names are returned in the loaders' flattened form: the LDM module path with "." -> "_",
relative to `model.diffusion_model` (UNet) or to the CLIP `transformer` (text encoder).
"""

from __future__ import annotations

import re
from pathlib import Path

# AUTOMATIC1111 renames ResnetBlock2D layers to their LDM names; attention layers keep
# their diffusers names (proj_in, transformer_blocks_0_attn1_to_q, ...).
_RESNET_SUFFIXES = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "norm1": "in_layers_0",
    "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}

_COMFYUI_TEXT_ENCODER = re.compile(
    r"lora_te_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])"
)


def a1111_target(module_key: str) -> str | None:
    """The flattened LDM layer AUTOMATIC1111 patches for a kohya module key, or None.

    `module_key` is a tensor key without its tensor suffix, e.g.
    `lora_unet_down_blocks_0_resnets_1_conv1` -> `input_blocks_2_0_in_layers_2`.
    None means AUTOMATIC1111 has no rule for it and drops it (at debug log level).
    """
    if module_key.startswith("lora_te_"):
        return _a1111_text_encoder_target(module_key)
    return _a1111_unet_target(module_key)


def comfyui_accepts_text_encoder_key(module_key: str) -> bool:
    """ComfyUI only maps these text-encoder layers of SD 1.x; other lora_te_ keys are lost."""
    return _COMFYUI_TEXT_ENCODER.fullmatch(module_key) is not None


def _a1111_text_encoder_target(module_key: str) -> str | None:
    match = re.fullmatch(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", module_key)
    if match is None:
        return None
    layer, rest = match.groups()
    return f"text_model_encoder_layers_{layer}_{rest}"


def _a1111_unet_target(module_key: str) -> str | None:
    for pattern, convert in _UNET_RULES:
        match = re.fullmatch(pattern, module_key)
        if match is not None:
            return convert(*(int(g) if g.isdigit() else g for g in match.groups()))
    return None


def _suffix(kind: str, rest: str) -> str:
    return _RESNET_SUFFIXES.get(rest, rest) if kind == "resnets" else rest


def _part(kind: str) -> int:
    """Inside an LDM block, the resnet is module 0 and the attention module 1."""
    return 1 if kind == "attentions" else 0


_UNET_RULES = [
    (r"lora_unet_conv_in", lambda: "input_blocks_0_0"),
    (r"lora_unet_conv_out", lambda: "out_2"),
    (r"lora_unet_time_embedding_linear_(\d+)", lambda n: f"time_embed_{2 * n - 2}"),
    (
        r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
        lambda i, kind, j, rest: (
            f"input_blocks_{1 + 3 * i + j}_{_part(kind)}_{_suffix(kind, rest)}"
        ),
    ),
    (
        r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
        lambda kind, j, rest: (
            f"middle_block_{1 if kind == 'attentions' else 2 * j}_{_suffix(kind, rest)}"
        ),
    ),
    (
        r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
        lambda i, kind, j, rest: f"output_blocks_{3 * i + j}_{_part(kind)}_{_suffix(kind, rest)}",
    ),
    (
        r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv",
        lambda i: f"input_blocks_{3 + 3 * i}_0_op",
    ),
    (
        r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
        lambda i: f"output_blocks_{2 + 3 * i}_{2 if i > 0 else 1}_conv",
    ),
]


REFERENCE = Path(__file__).parent / "reference_sd15"


def reference_layers(file_name: str) -> dict[str, tuple[int, ...]]:
    """Flattened layer name ("." -> "_", as the loaders match them) -> weight shape, from
    one of the reference lists in tests/reference_sd15/."""
    layers = {}
    for line in (REFERENCE / file_name).read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split()
            layers[name.replace(".", "_")] = tuple(int(size) for size in shape.split("x"))
    return layers
