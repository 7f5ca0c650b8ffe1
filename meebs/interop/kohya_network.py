"""The network of a kohya_ss config: its LoRA_type as `network.algo`, with the ranks
and the network args the GUI passes for that type (kohya_gui/lora_gui.py).

`LoRA_type` Standard trains no k x k convs, whatever `conv_dim` says; a key the GUI does
not pass for the type at hand changes nothing and is listed as unused. Refused, in one
line saying why, are the LoRA types meebs has no algorithm for (BOFT, DyLoRA, LoRA-FA) and
other layers (a LyCORIS preset other than full, block-wise dims or LRs, train_norm).
Regularisers meebs has no key for (dropouts, max-norm, multires/adaptive/input-perturbation
noise) are listed in the notes: the network and the data are the same, the recipe trains
without them.
"""

from __future__ import annotations

from meebs.errors import MeebsError
from meebs.interop.kohya_keys import (
    LORA_TYPES,
    STANDARD,
    to_bool,
    to_float,
    to_int,
    value_text,
)
from meebs.interop.kohya_reader import KohyaReader
from meebs.recipe.options import SCALAR_ALGOS  # the GUI passes use_scalar to others too

MAX_DIM = 1024  # network.dim's and conv_dim's largest value

CONV_KEYS = {
    "conv_dim": ("network.conv_dim", to_int),
    "conv_alpha": ("network.conv_alpha", to_float),
}
RANK_KEYS = {
    "network_dim": ("network.dim", to_int),
    "network_alpha": ("network.alpha", to_float),
}
# The GUI's old spelling (common_gui.update_my_data turns it into LyCORIS/LoCon).
LORA_TYPE_ALIASES = {"LoCon": "LyCORIS/LoCon"}
_DYLORA = "DyLoRA trains every rank up to network_dim at once, which no meebs algorithm does"
REFUSED_TYPES = {
    "LyCORIS/BOFT": "BOFT (butterfly OFT) has no meebs algorithm; LyCORIS/Diag-OFT is the nearest",
    "LyCORIS/DyLoRA": f"{_DYLORA}; use LyCORIS/LoCon at one rank",
    "Kohya DyLoRA": f"{_DYLORA}; use Kohya LoCon at one rank",
    "LoRA-FA": "LoRA-FA freezes the down matrices, which no meebs algorithm does; use Standard",
    "Flux1": "a FLUX.1 network; meebs trains SD 1.x",
}
# kohya's block-wise dims, alphas and learning rates (networks.lora only).
BLOCK_KEYS = (
    "down_lr_weight",
    "mid_lr_weight",
    "up_lr_weight",
    "block_lr_zero_threshold",
    "block_dims",
    "block_alphas",
    "conv_block_dims",
    "conv_block_alphas",
    "conv_dims",  # older GUIs' names of the last two
    "conv_alphas",
)
_LYCORIS = ("LyCORIS_preset", "rank_dropout", "module_dropout", "train_norm")
_LOCON = (
    *_LYCORIS,
    "conv_dim",
    "conv_alpha",
    "bypass_mode",
    "dora_wd",
    "use_tucker",
    "use_cp",
    "use_scalar",
    "rank_dropout_scale",
)
# The network args lora_gui.py passes for each LoRA_type (kohya_gui/lora_gui.py,
# train_model); a key the GUI does not pass for the type at hand changes nothing.
GUI_NETWORK_ARGS: dict[str, tuple[str, ...]] = {
    "locon": _LOCON,
    "loha": _LOCON,
    "lokr": (
        *_LYCORIS,
        "conv_dim",
        "conv_alpha",
        "bypass_mode",
        "dora_wd",
        "factor",
        "use_cp",
        "use_scalar",
        "decompose_both",
        "rank_dropout_scale",
    ),
    "glora": (*_LYCORIS, "conv_dim", "conv_alpha", "rank_dropout_scale"),
    "ia3": ("LyCORIS_preset", "conv_dim", "conv_alpha", "train_on_input"),
    "diag-oft": (
        *_LYCORIS,
        "conv_dim",
        "conv_alpha",
        "use_tucker",
        "use_scalar",
        "rank_dropout_scale",
        "constrain",
        "rescaled",
    ),
    "full": (*_LYCORIS, "use_tucker", "use_scalar", "rank_dropout_scale"),
    "lora": ("conv_dim", "conv_alpha", "rank_dropout", "module_dropout", *BLOCK_KEYS),
    STANDARD: ("rank_dropout", "module_dropout", *BLOCK_KEYS),
}
# Every network key of the GUI; those of other types are listed as unused.
NETWORK_ARG_KEYS = sorted({key for keys in GUI_NETWORK_ARGS.values() for key in keys} | {"unit"})
# SD 1.5's layer widths (UNet, text encoder; 1x1 convs count as Linear in LyCORIS), for
# where LyCORIS' LoKr switches a factor to a full matrix (dim >= half its larger side).
SD15_LINEAR_WIDTHS = (320, 640, 768, 960, 1280, 1920, 2560, 3072, 5120, 10240)
SD15_CONV_WIDTHS = (4, 320, 640, 960, 1280, 1920, 2560)

# Regularisers and noise extras meebs has no key for: the network and the data stay the
# same, the recipe trains without them (a note lists those that are set).
REGULARISERS = (
    "network_dropout",
    "rank_dropout",
    "module_dropout",
    "scale_weight_norms",
    "adaptive_noise_scale",
    "ip_noise_gamma",
    "ip_noise_gamma_random_strength",
    "noise_offset_random_strength",
    "color_aug",
    "random_crop",
    "caption_dropout_every_n_epochs",
)


def _lora_type(importer: KohyaReader) -> str:
    lora_type = importer.take("LoRA_type")
    if lora_type is None:
        return STANDARD  # the GUI's default (open_configuration)
    if isinstance(lora_type, str):
        lora_type = LORA_TYPE_ALIASES.get(lora_type, lora_type)
        if lora_type in REFUSED_TYPES:
            raise MeebsError(f"kohya_ss key LoRA_type: {lora_type}: {REFUSED_TYPES[lora_type]}")
    if lora_type != STANDARD and (not isinstance(lora_type, str) or lora_type not in LORA_TYPES):
        allowed = ", ".join([*LORA_TYPES, STANDARD])
        raise MeebsError(
            f"kohya_ss key LoRA_type: {value_text(lora_type)} is not supported; "
            f"use one of {allowed}"
        )
    return lora_type


def import_network(importer: KohyaReader) -> None:
    lora_type = _lora_type(importer)
    algo = "lora" if lora_type == STANDARD else LORA_TYPES[lora_type]
    importer.put("network.algo", algo)
    passed = GUI_NETWORK_ARGS[STANDARD if lora_type == STANDARD else algo]
    own = (*passed, *CONV_KEYS) if lora_type == STANDARD else passed  # Standard: noted below
    unused = importer.set_values(key for key in NETWORK_ARG_KEYS if key not in own)
    if unused:
        importer.notes.append(
            f"not used by LoRA_type {lora_type} (lora_gui.py does not pass them): "
            + ", ".join(unused)
        )
    if lora_type == STANDARD:
        importer.simple(RANK_KEYS)
        importer.put("network.conv_dim", 0)
        ignored = [f"{k}={value_text(importer.take(k))}" for k in CONV_KEYS if k in importer.config]
        if ignored:
            importer.notes.append(
                f"LoRA_type Standard trains no k x k convs: ignored {', '.join(ignored)}"
            )
    elif algo == "lora":
        importer.simple(RANK_KEYS)
        importer.simple(CONV_KEYS)
    elif algo in ("ia3", "full"):  # no ranks: a vector per layer, or the whole weight
        ranks = importer.set_values(
            key for key in (*RANK_KEYS, *CONV_KEYS) if key in passed or key in RANK_KEYS
        )
        if ranks:
            importer.notes.append(f"{lora_type} has no ranks: ignored {', '.join(ranks)}")
    else:
        _lycoris_ranks(importer, lora_type, algo)
    if algo == "lora" or lora_type == STANDARD:
        _refuse_block_keys(importer)
    else:
        _lycoris_args(importer, lora_type, algo)


def _refuse_block_keys(importer: KohyaReader) -> None:
    for key in BLOCK_KEYS:
        value = importer.take(key)
        if value is not None:
            raise MeebsError(
                f"kohya_ss key {key}: {value_text(value)}: block-wise dims, alphas and "
                "learning rates train other layers, or at other rates, than meebs can; clear it"
            )


def _lycoris_ranks(importer: KohyaReader, lora_type: str, algo: str) -> None:
    """network_dim/alpha and conv_dim/alpha as lycoris.kohya reads them: a conv_dim or
    conv_alpha of 0 or "" means network_dim or network_alpha (`or network_dim`)."""
    dim = importer.take("network_dim")
    alpha = importer.take("network_alpha")
    dim = 4 if dim is None else to_int("network_dim", dim)  # lycoris' default
    alpha = 1.0 if alpha is None else to_float("network_alpha", alpha)
    conv_dim, conv_alpha = (importer.take(key) for key in CONV_KEYS)
    conv_dim = to_int("conv_dim", conv_dim) if conv_dim is not None else 0
    conv_alpha = to_float("conv_alpha", conv_alpha) if conv_alpha is not None else 0.0
    if not conv_dim or not conv_alpha:
        importer.notes.append(
            f"conv_dim/conv_alpha 0 or empty: lycoris reads them as network_dim {value_text(dim)}/"
            f"network_alpha {value_text(alpha)}, and so does the recipe"
        )
    conv_dim, conv_alpha = conv_dim or dim, conv_alpha or alpha
    if algo == "lokr" and max(dim, conv_dim) > MAX_DIM:
        dim, conv_dim = _lokr_full(importer, dim, conv_dim)
    elif max(dim, conv_dim) > MAX_DIM:
        key = "network_dim" if dim > MAX_DIM else "conv_dim"
        raise MeebsError(
            f"kohya_ss key {key}: {value_text(max(dim, conv_dim))} is above meebs' {MAX_DIM} for "
            f"{lora_type}; use a rank of at most {MAX_DIM}"
        )
    if dim:
        importer.put("network.dim", dim)
        importer.put("network.alpha", alpha)
    if conv_dim:
        importer.put("network.conv_dim", conv_dim)
        importer.put("network.conv_alpha", conv_alpha)


def _lokr_full(importer: KohyaReader, dim: int, conv_dim: int) -> tuple[int, int]:
    """LoKr's dims above meebs' 1024: lycoris trains a Kronecker factor as a full matrix
    (scale 1) where the dim is at least half its larger side. Where that holds for every
    SD 1.5 layer, the recipe says full_matrix (both dims) or the dim at 1024 (the same
    full matrices); else the config mixes full and low-rank factors meebs cannot express."""
    factor = importer.config.get("factor", -1)
    factor = -1 if factor in (None, "") else to_int("factor", factor)
    widest = {
        "network_dim": max(_factorization(w, factor)[1] for w in SD15_LINEAR_WIDTHS),
        "conv_dim": max(_factorization(w, factor)[1] for w in SD15_CONV_WIDTHS),
    }
    dims = {"network_dim": dim, "conv_dim": conv_dim}
    for key, value in dims.items():
        if value > MAX_DIM and widest[key] > 2 * MAX_DIM:
            raise MeebsError(
                f"kohya_ss key {key}: {value_text(value)} with factor {value_text(factor)}: "
                "lycoris mixes full and low-rank LoKr factors there, and meebs' ranks go up "
                f"to {MAX_DIM}; use at most {MAX_DIM}, or factor -1"
            )
    if all(2 * value >= widest[key] for key, value in dims.items()):
        importer.put("network.full_matrix", True)
        importer.notes.append(
            f"network_dim {value_text(dim)}, conv_dim {value_text(conv_dim)} with LoKr "
            f"factor {value_text(factor)}: lycoris "
            "trains every SD 1.5 layer's Kronecker factors as full matrices (scale 1, the "
            "alphas unused); the recipe says network.full_matrix: true"
        )
        return 0, 0
    clipped = {key: min(value, MAX_DIM) for key, value in dims.items()}
    above = ", ".join(f"{k} {value_text(v)}" for k, v in dims.items() if v > MAX_DIM)
    importer.notes.append(
        f"LoKr {above}: above "
        f"meebs' {MAX_DIM}, but every SD 1.5 layer's factor is a full matrix at {MAX_DIM} "
        "already (scale 1); the recipe uses that"
    )
    return clipped["network_dim"], clipped["conv_dim"]


def _factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """lycoris.functional.general.factorization: `dimension` as m x n (m <= n), m the
    divisor closest to `factor` (-1: as balanced as possible)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def _lycoris_args(importer: KohyaReader, lora_type: str, algo: str) -> None:
    """The GUI's network args for a lycoris.kohya type (GUI_NETWORK_ARGS)."""
    passed = GUI_NETWORK_ARGS[algo]
    preset = importer.take("LyCORIS_preset")
    if preset not in (None, "full"):
        raise MeebsError(
            f"kohya_ss key LyCORIS_preset: {value_text(preset)}: meebs trains lycoris' full "
            "preset (every UNet and text-encoder layer); another preset trains other layers; "
            "set it to full"
        )
    norm = importer.take("train_norm")
    if "train_norm" in passed and norm is not None and to_bool("train_norm", norm):
        raise MeebsError(
            "kohya_ss key train_norm: true trains the norm layers too, which meebs does not; "
            "set it false"
        )
    flags = {"dora_wd": "network.dora_wd", "use_scalar": "network.use_scalar"}
    flags |= {"decompose_both": "network.decompose_both", "rescaled": "network.rescaled"}
    for key, recipe_key in flags.items():
        value = importer.take(key)
        if key not in passed or value is None or not to_bool(key, value):
            continue
        if key == "use_scalar" and algo not in SCALAR_ALGOS:
            importer.notes.append(f"use_scalar true: lycoris ignores it for {lora_type}")
        elif key == "decompose_both" and importer.get("network.full_matrix"):
            importer.notes.append(
                "decompose_both true: no effect at full matrices (lycoris), so not in the recipe"
            )
        else:
            importer.put(recipe_key, True)
    if algo in ("locon", "loha", "lokr"):
        # LoHa/LoCon pass use_tucker (older GUIs use_cp), LoKr use_cp; lycoris ORs them
        tucker = [key for key in ("use_tucker", "use_cp") if key in passed]
        if any(to_bool(k, importer.take(k)) for k in tucker if importer.take(k) is not None):
            importer.put("network.use_tucker", True)
    else:
        for key in ("use_tucker", "use_cp"):
            importer.take(key)
    if algo == "lokr":
        _import_factor(importer)
    if algo == "diag-oft":
        constrain = importer.take("constrain")
        if constrain is not None and to_float("constrain", constrain):
            importer.put("network.constraint", to_float("constrain", constrain))
    bypass = importer.take("bypass_mode")
    if "bypass_mode" in passed and bypass is not None and to_bool("bypass_mode", bypass):
        importer.notes.append(
            "bypass_mode true: computes the same delta beside the frozen weight instead of "
            "merged into it; meebs applies it its own way (the same network)"
        )
    on_input = importer.take("train_on_input")
    if algo == "ia3" and on_input is not None:
        importer.notes.append(
            f"train_on_input {value_text(on_input)}: lycoris' kohya entry point does not read "
            "it (lycoris-lora 4.1.3), so iA3 trains its usual vectors, as in the GUI"
        )
    importer.take("rank_dropout_scale")  # scales rank_dropout only (a regulariser, below)


def _import_factor(importer: KohyaReader) -> None:
    """LoKr's factor as lycoris reads it: any negative one is -1 (as balanced as the shape
    allows), 0 splits like 1 (lycoris' factorization)."""
    factor = importer.take("factor")
    if factor is None:
        return
    factor = to_int("factor", factor)
    if factor < -1 or factor == 0:
        same = -1 if factor < 0 else 1
        importer.notes.append(
            f"factor {value_text(factor)}: lycoris splits the shapes as with factor {same}, "
            "and so does the recipe"
        )
        factor = same
    if factor != -1:
        importer.put("network.factor", factor)


def note_regularisers(importer: KohyaReader) -> None:
    active = importer.set_values(REGULARISERS)
    if active:
        importer.notes.append(
            "regularisers meebs has no key for (the network and data are the same, the "
            f"recipe trains without them): {', '.join(active)}"
        )
