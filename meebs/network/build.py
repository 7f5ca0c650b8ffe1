"""The LyCORIS network: create it on SD 1.5, save it in kohya's format, load it back.

AUTOMATIC1111 and ComfyUI find a network's layers by kohya key names (`lora_unet_…`,
`lora_te_text_model_encoder_layers_…`) and rebuild the LoHA delta themselves; a key they
cannot place is dropped with at most a warning. lycoris-lora 4.1.3 gets two things wrong
for SD 1.5 out of the box, and both are handled here:

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
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights
from lycoris.modules.diag_oft import DiagOFTModule
from lycoris.modules.full import FullModule
from lycoris.modules.ia3 import IA3Module
from torch import Tensor, nn

from meebs.errors import MeebsError, RecipeError, TrainingDiverged
from meebs.files.safetensors_io import save_file_atomic, shown
from meebs.network.network_file import (
    change_text,
    dora_on_output,
    load_network_tensors,
    misfit,
    modules_of,
    with_implied_alphas,
)
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

# Tensors whose first dimension is the module's rank, in LoHA (with or without Tucker)
# and LoCon/LoRA files alike.
_RANK_SUFFIXES = (".hada_w1_b", ".hada_w2_b", ".lora_down.weight")


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
        problem = option_problem(
            self.algo,
            dora_wd=self.dora_wd,
            use_tucker=self.use_tucker,
            use_scalar=self.use_scalar,
            factor=self.factor,
            decompose_both=self.decompose_both,
            full_matrix=self.full_matrix,
            constraint=self.constraint,
            rescaled=self.rescaled,
        )
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


# output.save_precision -> the dtype of the saved tensors
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def network_state_dict(network: LycorisNetworkKohya, dtype: torch.dtype) -> dict[str, Tensor]:
    """The kohya-named tensors, cast to the save precision: CPU, contiguous, copies."""
    return {
        key: value.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()
        for key, value in network.state_dict().items()
    }


def save_network(
    network: LycorisNetworkKohya,
    path: Path,
    metadata: dict[str, str],
    dtype: torch.dtype,
    *,
    overwrite: bool = False,
) -> None:
    """Write the network as kohya does (with `sshs_model_hash`), atomically, reproducibly;
    never a file with a NaN or inf in it (`refuse_non_finite`)."""
    tensors = network_state_dict(network, dtype)
    refuse_non_finite(tensors, path, network.state_dict())
    save_file_atomic(tensors, path, metadata, overwrite=overwrite, add_hashes=True)


def train_state(network: LycorisNetworkKohya) -> dict[str, Tensor]:
    """The network's state for `resume.state`: `state_dict()`, except that a full module
    keeps its trained weight and bias themselves (`.weight`, `.bias`): the `diff` it
    saves, weight - original, does not give the weight back bit for bit."""
    state = network.state_dict()
    for lora in network.loras:
        if isinstance(lora, FullModule):
            name = lora.lora_name
            state.pop(f"{name}.diff")
            state.pop(f"{name}.diff_b", None)
            state[f"{name}.weight"] = lora.weight.detach()
            if lora.bias is not None:
                state[f"{name}.bias"] = lora.bias.detach()
    return state


def load_train_state(network: LycorisNetworkKohya, state: dict[str, Tensor]) -> None:
    """Load what `train_state` gave: every tensor, and nothing else, has its place."""
    by_module = modules_of(state)
    unknown = sorted(set(by_module) - {lora.lora_name for lora in network.loras})
    if unknown:
        raise MeebsError(f"the saved state has modules this network lacks, e.g. {unknown[0]}")
    with torch.no_grad():
        for lora in network.loras:
            own = by_module.get(lora.lora_name, {})
            _check_state_shapes(lora, own)
            if not isinstance(lora, FullModule):
                lora.load_state_dict(own)
                continue
            lora.weight.copy_(own["weight"])
            if lora.bias is not None:
                lora.bias.copy_(own["bias"])


def _check_state_shapes(lora: nn.Module, own: dict[str, Tensor]) -> None:
    """A saved tensor of another shape than the network's, named (not torch's size error)."""
    expected = lora.state_dict()
    for key, tensor in sorted(own.items()):
        want = expected.get(key)
        if want is None or want.shape == tensor.shape:
            continue
        why = (
            ": a run from before meebs trained DoRA per input column (wd_on_output False) "
            "cannot resume; train it again"
            if key == "dora_scale"
            else ""
        )
        raise MeebsError(
            f"the saved state's {lora.lora_name}.{key} is {list(tensor.shape)}, this "
            f"network's is {list(want.shape)}{why}"
        )


def refuse_non_finite(saved: dict[str, Tensor], path: Path, trained: dict[str, Tensor]) -> None:
    """Stop before writing `saved` (the tensors as cast to the save precision) if any
    value is NaN or inf. A loader would apply such a file without a word and draw black
    or noise; the cause is nearly always a learning rate too high, either for the
    weights themselves or for the save dtype's range (fp16 ends at 65504)."""
    bad = sum(int((~torch.isfinite(t)).sum()) for t in saved.values() if t.is_floating_point())
    if not bad:
        return
    total = sum(t.numel() for t in saved.values())
    dtype = next(t.dtype for t in saved.values() if t.is_floating_point())
    if all(torch.isfinite(t).all() for t in trained.values() if t.is_floating_point()):
        largest = max(float(t.detach().abs().max()) for t in trained.values() if t.numel())
        raise TrainingDiverged(
            f"{path}: not written: {bad:,} of {total:,} values overflow {_name(dtype)} to inf "
            f"(largest |value| {largest:.3g}, {_name(dtype)} holds up to "
            f"{torch.finfo(dtype).max:.5g}); lower the learning rate, or save in a wider "
            "type (output.save_precision: bf16 or fp32)"
        )
    raise TrainingDiverged(
        f"{path}: not written: {bad:,} of {total:,} values are NaN or inf, so training has "
        "diverged; lower the learning rate and train again"
    )


def _name(dtype: torch.dtype) -> str:
    return next((name for name, known in SAVE_DTYPES.items() if known == dtype), str(dtype))


def load_network_weights(network: LycorisNetworkKohya, path: Path) -> None:
    """Start training from an existing network file (kohya's `network_weights`).

    The file is checked as every network file is (`load_network_tensors`: dtypes, NaN,
    factors that multiply). Every tensor must have a place of the same shape in
    `network`, and the alphas must agree (lycoris fixes each module's scale when it is
    built, so a copied alpha would be ignored). Modules the file lacks keep their init.
    """
    path = Path(path)
    stored = with_implied_alphas(load_network_tensors(path))
    _check_fits(network, path, stored)
    # float32 first: lycoris' full module adds the file's `diff` to the layer's weight in
    # the file's dtype, which would round the frozen weight itself to fp16
    by_module = modules_of(
        {
            key: value.float() if value.is_floating_point() else value
            for key, value in stored.items()
            if not key.endswith(".alpha")
        }
    )
    # Module by module: lycoris' full module turns its `diff` back into a weight in a
    # load hook that expects its own keys, so a module the file lacks is not touched.
    with torch.no_grad():
        for lora in network.loras:
            if lora.lora_name in by_module:
                lora.load_state_dict(by_module[lora.lora_name], strict=False)


def load_network_file(
    path: Path, unet: nn.Module, text_encoder: nn.Module, *, multiplier: float = 1.0
) -> LycorisNetworkKohya:
    """Apply a saved network to `unet` and `text_encoder` for generation.

    diffusers cannot load LoHA files, so this goes through lycoris' kohya loader, with our
    preset and text-encoder naming. Unlike AUTOMATIC1111 and ComfyUI, a module that
    matches no layer of the model is an error here, not a silently dropped key.
    """
    path = Path(path)
    weights = with_implied_alphas(load_network_tensors(path))
    apply_sd15_preset()
    wrapped_text_encoder = lycoris_text_encoder(text_encoder)
    ia3 = {key.split(".")[0] for key in weights if key.endswith(".on_input")}
    others = {key: value for key, value in weights.items() if key.split(".")[0] not in ia3}
    per_input = _per_input_dora(others, wrapped_text_encoder, unet)
    try:
        network, _ = create_network_from_weights(
            multiplier, str(path), None, wrapped_text_encoder, unet, weights_sd=others
        )
        _set_per_input_dora(network, weights, per_input)
        _add_ia3_modules(network, weights, ia3, wrapped_text_encoder, unet, multiplier)
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as error:
        # A module whose shapes do not fit the layer it names.
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise MeebsError(f"{path}: lycoris cannot build a module from it ({reason})") from None
    network.loras = network.text_encoder_loras + network.unet_loras
    loaded = {lora.lora_name for lora in network.loras}
    unplaced = sorted({key.split(".")[0] for key in weights} - loaded)
    if unplaced:
        raise MeebsError(
            f"{path}: {len(unplaced)} modules match no layer of this model, "
            f"e.g. {shown(unplaced[0])}"
        )
    network.apply_to(wrapped_text_encoder, unet, apply_text_encoder=True, apply_unet=True)
    return network


def _named_layers(text_encoder: nn.Module, unet: nn.Module) -> dict[str, nn.Module]:
    """Every layer of both parts by its kohya module name (`lora_unet_…`, `lora_te_…`)."""
    parts = (
        (LycorisNetworkKohya.LORA_PREFIX_TEXT_ENCODER, text_encoder),
        (LycorisNetworkKohya.LORA_PREFIX_UNET, unet),
    )
    return {
        f"{prefix}_{name}".replace(".", "_"): layer
        for prefix, part in parts
        for name, layer in part.named_modules()
    }


def _per_input_dora(
    weights: dict[str, Tensor], text_encoder: nn.Module, unet: nn.Module
) -> set[str]:
    """The DoRA modules whose magnitude is per input column ([1, in, ...]: meebs' own,
    lycoris' `wd_on_out=False`). lycoris 4.1.3's loader builds every DoRA module per
    output row and cannot copy such a magnitude into it, so each of these gets, in
    `weights` (a copy the caller owns), a stand-in of the per-output shape, replaced by
    the file's own magnitude and axis once lycoris has built the module
    (`_set_per_input_dora`)."""
    layers = _named_layers(text_encoder, unet)
    found = set()
    for key in [key for key in weights if key.endswith(".dora_scale")]:
        name = key.split(".")[0]
        weight = getattr(layers.get(name), "weight", None)
        if weight is None or weight.dim() < 2:
            continue  # no such layer: reported as unplaced by the caller
        if not dora_on_output(tuple(weights[key].shape), tuple(weight.shape)):
            weights[key] = torch.ones(weight.shape[0], *[1] * (weight.dim() - 1))
            found.add(name)
    return found


def _set_per_input_dora(
    network: LycorisNetworkKohya, weights: dict[str, Tensor], names: set[str]
) -> None:
    """Give the modules `_per_input_dora` found their own magnitude, per input column, as
    lycoris' `wd_on_out=False` builds it (the only difference from a per-output module:
    `weight_decompose` reads `wd_on_out` and the magnitude's shape)."""
    for lora in network.unet_loras + network.text_encoder_loras:
        if lora.lora_name not in names:
            continue
        stored = weights[f"{lora.lora_name}.dora_scale"]
        lora.wd_on_out = False
        lora.dora_scale = nn.Parameter(stored.to(lora.dora_scale.dtype).clone())


def _add_ia3_modules(
    network: LycorisNetworkKohya,
    weights: dict[str, Tensor],
    names: set[str],
    text_encoder: nn.Module,
    unet: nn.Module,
    multiplier: float,
) -> None:
    """(IA)^3 modules, built here: lycoris 4.1.3's `IA3Module.make_module_from_state_dict`
    takes one tensor where its loader hands it two (`weight`, `on_input`), and would
    drop `on_input` anyway."""
    parts = (
        (LycorisNetworkKohya.LORA_PREFIX_TEXT_ENCODER, text_encoder, network.text_encoder_loras),
        (LycorisNetworkKohya.LORA_PREFIX_UNET, unet, network.unet_loras),
    )
    for prefix, part, loras in parts:
        for name, layer in part.named_modules():
            lora_name = f"{prefix}_{name}".replace(".", "_")
            if lora_name not in names:
                continue
            on_input = bool(weights[f"{lora_name}.on_input"].item())
            module = IA3Module(lora_name, layer, multiplier, train_on_input=on_input)
            with torch.no_grad():
                module.weight.copy_(weights[f"{lora_name}.weight"])
            loras.append(module)


def _number(value: float) -> str:
    """A number as a kohya command line would give it: 4, 1, 0.5 (no trailing .0)."""
    return str(int(value)) if float(value).is_integer() else str(value)


def _check_fits(network: LycorisNetworkKohya, path: Path, stored: dict[str, Tensor]) -> None:
    """Raise MeebsError naming the first way the file's tensors do not fit `network`."""
    expected = network.state_dict()
    foreign = sorted(set(stored) - set(expected))
    if foreign:
        raise MeebsError(
            f"{path} does not fit this network: {len(foreign)} tensors such as "
            f"{shown(foreign[0])} "
            "have no place in it (trained with another algo, preset, use_tucker or parts?)"
        )
    layers = {lora.lora_name: tuple(lora.shape) for lora in network.loras}
    shapes = {key: tuple(tensor.shape) for key, tensor in stored.items()}
    for module, factors in sorted(modules_of(shapes).items()):
        problem = misfit(module, factors, layers[module]) if module in layers else None
        if problem:
            have, why = problem
            raise MeebsError(
                f"{path}: {module}.* makes a {change_text(have)} change, but that layer of "
                f"this model is {list(layers[module])} ({why})"
            )
    for key in sorted(stored, key=lambda name: not name.endswith(_RANK_SUFFIXES)):
        have, want = stored[key], expected[key]
        alpha = key.endswith(".alpha")  # one number (checked), [] or [1]
        if have.shape != want.shape and not alpha:
            raise MeebsError(f"{path} {_shape_mismatch(network, key, have, want)}")
        if alpha and not math.isclose(have.item(), want.item(), rel_tol=1e-3):
            module = key.split(".")[0]
            oft = any(isinstance(m, DiagOFTModule) for m in network.loras if m.lora_name == module)
            name = "constraint" if oft else "alpha"  # diag-oft keeps its constraint as alpha
            raise MeebsError(
                f"{path} was trained with {name} {have.item():g}, the recipe says "
                f"{name} {want.item():g} ({key})"
            )


def _shape_mismatch(network: LycorisNetworkKohya, key: str, have: Tensor, want: Tensor) -> str:
    """Explain a shape mismatch in recipe terms where only the rank (or DoRA's axis)
    differs."""
    per_output = have.dim() == want.dim() >= 2 and have.shape[1] == 1 and want.shape[0] == 1
    if key.endswith(".dora_scale") and per_output:
        return (
            f"has its DoRA magnitude {key} per output row {list(have.shape)} (lycoris' "
            f"default, wd_on_output); meebs trains it per input column {list(want.shape)}, "
            "so a training cannot start from this file"
        )
    same_rank = have.dim() != want.dim() or have.shape[0] == want.shape[0]
    if not key.endswith(_RANK_SUFFIXES) or same_rank or have.shape[1:] != want.shape[1:]:
        return f"has {key} of shape {list(have.shape)}, this network needs {list(want.shape)}"
    module_name = key.split(".")[0]
    shape = next(lora.shape for lora in network.loras if lora.lora_name == module_name)
    dim = "conv dim" if any(size != 1 for size in shape[2:]) else "dim"
    return (
        f"was trained with {dim} {have.shape[0]}, the recipe says {dim} {want.shape[0]} "
        f"({module_name})"
    )
