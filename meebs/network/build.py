"""The LyCORIS network to train on SD 1.5: its arguments (`NetworkSpec`), the SD 1.5
presets, and creating it on the model.

AUTOMATIC1111 and ComfyUI find a network's layers by kohya key names (`lora_unet_…`,
`lora_te_text_model_encoder_layers_…`) and rebuild the LoHA delta themselves; a key they
cannot place is dropped with at most a warning. lycoris-lora 4.1.3 gets two things wrong
for SD 1.5 out of the box, and both are handled here (for loading a file back too,
`meebs.network.load_file`):

* its built-in "full" preset crashes on SD 1.x UNets (`TimestepEmbedding` is both a
  target class and the parent of two target names: "duplicated lora name"), so we apply
  an explicit SD 1.5 preset, every time, because presets are class-level state that any
  other code (or an earlier network) may have changed;
* transformers 5's CLIPTextModel has no `.text_model` level, so lycoris would name the
  text-encoder keys `lora_te_encoder_layers_…`, which both loaders silently ignore; lycoris
  is handed a wrapper that restores the level.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

from lycoris.kohya import LycorisNetworkKohya
from torch import nn

from meebs.errors import RecipeError
from meebs.recipe.options import DROPOUT_ALGOS, option_problem

# lycoris sets its logger to INFO when imported and logs every module it creates: keep
# its warnings, drop the chatter.
logging.getLogger("LyCORIS").setLevel(logging.WARNING)

# lycoris-lora's names; "lora" and "locon" are the same module (LoCon). The recipe's
# network.algo takes the same list (meebs.recipe.schema.ALGOS).
ALGOS = ("loha", "locon", "lora", "lokr", "glora", "diag-oft", "full", "ia3")

PRESET_NAME = "full"
# LyCORIS' "full" preset restricted to the classes and names SD 1.5 has (REFERENCE §4):
# 282 UNet modules and 72 text-encoder modules. Every key is spelled out so that no
# setting of a preset applied earlier in the process survives.
SD15_PRESET = {
    "enable_conv": True,
    "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
    "unet_target_name": [
        "conv_in",
        "conv_out",
        "time_embedding.linear_1",
        "time_embedding.linear_2",
    ],
    "text_encoder_target_module": ["CLIPAttention", "CLIPMLP"],
    "text_encoder_target_name": [],
    "module_algo_map": {},
    "name_algo_map": {},
    "use_fnmatch": False,
    "exclude_name": [],
}
# (IA)^3 scales keys, values and the feed-forward's inner activation (the paper's three
# vectors; lycoris' own "ia3" preset names the same layers, but as bare names that its
# `re.match` never finds in a diffusers UNet). 80 UNet + 36 text-encoder Linear layers;
# AUTOMATIC1111's network_ia3.py scales any Linear, so all of them load there.
IA3_PRESET_NAME = "ia3"
SD15_IA3_PRESET = {
    "enable_conv": False,
    "unet_target_module": [],
    "unet_target_name": [r".*\.attn[12]\.to_[kv]$", r".*\.ff\.net\.2$"],
    "text_encoder_target_module": [],
    "text_encoder_target_name": [r".*\.self_attn\.[kv]_proj$", r".*\.mlp\.fc2$"],
    "module_algo_map": {},
    # the second feed-forward Linear is scaled on its input: the inner activation
    "name_algo_map": {
        r".*\.ff\.net\.2$": {"train_on_input": True},
        r".*\.mlp\.fc2$": {"train_on_input": True},
    },
    "use_fnmatch": False,
    "exclude_name": [],
}


@dataclass(frozen=True)
class NetworkSpec:
    """What kind of network to train: the kohya/LyCORIS network arguments, typed.

    `alpha` 0 means alpha = dim, as in kohya and LyCORIS. `conv_dim` 0 leaves k x k
    convolutions alone. "lora" and "locon" are the same LyCORIS module (LoCon). For
    diag-oft `dim`/`conv_dim` are the block size; full and ia3 use neither dims nor alphas.
    The fields after `dropout` came later (recipe keys network.dora_wd ... rescaled): at
    their defaults they change nothing, not even a byte of the file's metadata.
    """

    algo: str = "loha"
    dim: int = 4
    alpha: float = 1.0
    conv_dim: int = 4
    conv_alpha: float = 1.0
    use_tucker: bool = False
    dropout: float = 0.0
    dora_wd: bool = False
    factor: int = -1
    decompose_both: bool = False
    full_matrix: bool = False
    use_scalar: bool = False
    constraint: float = 0.0
    rescaled: bool = False

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise RecipeError(f"network algo {self.algo!r} is not one of {', '.join(ALGOS)}")
        if self.dim < 1 or self.conv_dim < 0:
            raise RecipeError(
                f"network dim must be >= 1 and conv_dim >= 0, not {self.dim}/{self.conv_dim}"
            )
        if self.alpha < 0 or self.conv_alpha < 0:
            raise RecipeError("network alpha and conv_alpha must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise RecipeError(f"network dropout must be in [0, 1), not {self.dropout}")
        if self.dropout and self.algo not in DROPOUT_ALGOS:
            raise RecipeError(
                f"LyCORIS {self.algo} ignores dropout (lycoris-lora 4.1.3); set it to 0"
            )
        problem = option_problem(self)
        if problem:
            key, message = problem
            raise RecipeError(f"{key}: {message}")

    @property
    def preset(self) -> dict:
        """lycoris' class-level targets for this algorithm on SD 1.5."""
        return SD15_IA3_PRESET if self.algo == "ia3" else SD15_PRESET

    def lycoris_kwargs(self) -> dict:
        """The module arguments, by lycoris' own keyword names (`LycorisNetworkKohya`)."""
        return {
            "lora_dim": self.dim,
            "alpha": self.alpha,
            "conv_lora_dim": self.conv_dim,
            "conv_alpha": self.conv_alpha,
            "use_tucker": self.use_tucker,
            "dropout": self.dropout,
            "network_module": self.algo,
            "weight_decompose": self.dora_wd,
            "factor": self.factor,
            "decompose_both": self.decompose_both,
            "full_matrix": self.full_matrix,
            "use_scalar": self.use_scalar,
            "constraint": self.constraint,
            "rescaled": self.rescaled,
            # DoRA's magnitude per input column, the DoRA paper's and the only layout
            # AUTOMATIC1111 applies right (lycoris' default is per output row)
            **({"wd_on_out": False} if self.dora_wd else {}),
        }

    def to_network_args(self) -> dict[str, str]:
        """The content of kohya's `ss_network_args`: strings, as kohya's parser leaves them.

        Only `use_tucker` is written (never `use_cp`/`use_conv_cp`): LyCORIS ORs all of
        them, parsed from strings, so a second spelling could only cause confusion. The
        later options are written only when set, so a file of an earlier recipe keeps
        its bytes; their names are the ones `lycoris.kohya.create_network` reads
        (`wd_on_output: False` goes with `dora_wd`: DoRA's magnitude per input column).
        """
        args = {
            "algo": self.algo,
            "conv_dim": _number(self.conv_dim),
            "conv_alpha": _number(self.conv_alpha),
            "use_tucker": str(self.use_tucker),
            "preset": IA3_PRESET_NAME if self.algo == "ia3" else PRESET_NAME,
        }
        if self.dropout:
            args["dropout"] = _number(self.dropout)
        later = {
            "dora_wd": (self.dora_wd, "True"),
            "wd_on_output": (self.dora_wd, "False"),
            "factor": (self.factor != -1, str(self.factor)),
            "decompose_both": (self.decompose_both, "True"),
            "full_matrix": (self.full_matrix, "True"),
            "use_scalar": (self.use_scalar, "True"),
            "constraint": (self.constraint != 0, _number(self.constraint)),
            "rescaled": (self.rescaled, "True"),
        }
        args.update({key: text for key, (is_set, text) in later.items() if is_set})
        return args


class _TextModelLevel(nn.Module):
    """Shows lycoris the text encoder under `.text_model`, so its keys get that level."""

    def __init__(self, text_model: nn.Module) -> None:
        super().__init__()
        self.text_model = text_model


def lycoris_text_encoder(text_encoder: nn.Module) -> nn.Module:
    """The module to hand lycoris as "text encoder" so keys read `lora_te_text_model_…`.

    The wrapper only holds a reference: the real text encoder object is not changed.
    transformers <= 4 still has the level itself, and its inner model is used then.
    """
    return _TextModelLevel(getattr(text_encoder, "text_model", text_encoder))


def apply_sd15_preset(preset: dict = SD15_PRESET) -> None:
    """Set lycoris' class-level targets to `preset` (SD15_PRESET, or SD15_IA3_PRESET for
    (IA)^3); needed before creating or loading."""
    LycorisNetworkKohya.apply_preset(copy.deepcopy(preset))


def build_network(
    unet: nn.Module,
    text_encoder: nn.Module,
    spec: NetworkSpec,
    *,
    train_unet: bool = True,
    train_text_encoder: bool = True,
    multiplier: float = 1.0,
) -> LycorisNetworkKohya:
    """Create the network on `unet` and `text_encoder` and hook it into their forwards.

    A part that is not trained (its learning rate is 0) gets no modules, so the file has
    no keys for it. Initial values come from torch's global RNG (the caller seeds it):
    text-encoder modules are drawn first, then UNet modules, and both are always drawn,
    so the UNet init does not depend on whether the text encoder is trained.

    The class is built directly rather than through `lycoris.kohya.create_network`,
    which would re-apply one of lycoris' own presets over ours and reads its Tucker flags
    as an `or` of raw strings (where "False" is truthy); here every argument is typed.
    """
    if not (train_unet or train_text_encoder):
        raise RecipeError("nothing to train: the UNet and text-encoder learning rates are both 0")
    apply_sd15_preset(spec.preset)
    wrapped_text_encoder = lycoris_text_encoder(text_encoder)
    network = LycorisNetworkKohya(
        wrapped_text_encoder, unet, multiplier=multiplier, **spec.lycoris_kwargs()
    )
    network.apply_to(
        wrapped_text_encoder,
        unet,
        apply_text_encoder=train_text_encoder,
        apply_unet=train_unet,
    )
    return network


def count_modules(network: LycorisNetworkKohya) -> tuple[int, int]:
    """(UNet modules, text-encoder modules) of a network, printed when training starts."""
    return len(network.unet_loras), len(network.text_encoder_loras)


def _number(value: float) -> str:
    """A number as a kohya command line would give it: 4, 1, 0.5 (no trailing .0)."""
    return str(int(value)) if float(value).is_integer() else str(value)
