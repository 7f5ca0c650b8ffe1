"""What in a kohya_ss config cannot mean the same training in meebs: it stops the
import in one line saying why (see docs/recipes.md).

A config of another model family (v2, SDXL, FLUX, SD3) or of another kind of training
(DreamBooth, fine-tune or textual inversion: no network, they train the model or a token)
is refused as it is read. So are keys that change the training: other inputs (a separate
VAE, masked loss), another loss (loss_type, debiased estimation, v-pred-like loss, a
timestep range, weighted captions) and another LR schedule (a scheduler class by name,
LoRA+ ratios), whether set as GUI keys or as sd-scripts flags in additional_parameters.
Refusals of a network meebs cannot train are in kohya_network.
"""

from __future__ import annotations

import re
from typing import Any

from meebs.errors import MeebsError
from meebs.interop.kohya_keys import to_bool, to_float, to_int, to_str, value_text
from meebs.interop.kohya_reader import OFF, KohyaReader

# Model families other than SD 1.x: flag -> its name.
OTHER_MODELS = {
    "v2": "SD 2.x",
    "v_parameterization": "v-prediction",
    "sdxl": "SDXL",
    "sdxl_checkbox": "SDXL",
    "flux1_checkbox": "FLUX.1",
    "sd3_checkbox": "SD3",
}
# Configs of the GUI's other tabs: what gives one away, and what it trains.
KIND_KEYS = {
    "textual-inversion": "token_string, num_vectors_per_token",
    "fine-tune": "train_dir/image_folder and no LoRA_type or network_dim",
    "DreamBooth": "no LoRA_type or network_dim",
}
KIND_TRAINS = {
    "textual-inversion": "new token embeddings",
    "fine-tune": "the whole model at full-model learning rates",
    "DreamBooth": "the whole model at full-model learning rates",
}


def other_kind(config: dict[str, Any]) -> str | None:
    """The GUI tab a config that is not a LoRA one comes from, or None for a LoRA one."""
    if "token_string" in config or "num_vectors_per_token" in config:
        return "textual-inversion"
    if any(key in config for key in ("LoRA_type", "network_dim", "network_alpha")):
        return None  # old LoRA configs have no LoRA_type: the GUI reads them as Standard
    if any(key in config for key in ("train_dir", "image_folder", "dataset_repeats")):
        return "fine-tune"
    return "DreamBooth"


def refuse_other_trainings(importer: KohyaReader) -> None:
    """Stop on a key whose value cannot mean the same training in meebs (module doc)."""
    keys = ["min_timestep", "max_timestep", "loss_type", "v_pred_like_loss"]
    keys += [*_TRUE_REFUSALS, *_SET_REFUSALS]
    for key in keys:
        value = importer.take(key)
        if value is None:
            continue
        reason = _changes_training(key, value)
        if reason is not None:
            raise MeebsError(f"kohya_ss key {key}: {value_text(value)}: {reason}")
    extra = importer.take("additional_parameters")
    if extra is not None:
        text = to_str("additional_parameters", extra)
        for flag in re.findall(r"(?:^|\s)--([A-Za-z0-9_]+)", text):
            if flag in _REFUSED_FLAGS:
                raise MeebsError(
                    f"kohya_ss key additional_parameters: --{flag}: "
                    f"{_REFUSED_FLAGS[flag].split('; ')[0]}; "
                    "remove it"
                )
        importer.notes.append(
            f"additional_parameters {value_text(text)}: sd-scripts command-line flags are "
            "not read; check that none of them changes the training"
        )


def _changes_training(key: str, value: Any) -> str | None:
    """Why `key` set to `value` cannot mean the same training in meebs, or None."""
    if key in ("min_timestep", "max_timestep"):
        bound = to_int(key, value)
        default = 0 if key == "min_timestep" else 1000
        if bound in (0, default):  # the GUI passes 0 as "not set"
            return None
        return "meebs samples every timestep 0-999; set min_timestep 0 and max_timestep 1000"
    if key == "loss_type":
        if value == "l2":
            return None
        return "meebs trains the l2 (MSE) loss; set loss_type l2"
    if key in ("masked_loss", "debiased_estimation_loss", "weighted_captions"):
        return None if not to_bool(key, value) else _TRUE_REFUSALS[key]
    if key == "v_pred_like_loss":
        if not to_float(key, value):
            return None
        return "adds a v-prediction-like loss term meebs has no key for; set it to 0"
    reason = _SET_REFUSALS.get(key)
    if reason is None or value in OFF or (key.startswith("loraplus") and not to_float(key, value)):
        return None
    return reason


_TRUE_REFUSALS = {
    "masked_loss": "weights the loss by each image's mask, which meebs has no key for; "
    "set it false",
    "debiased_estimation_loss": "reweights the loss per timestep, which meebs has no key "
    "for (min_snr_gamma is the one it has); set it false",
    "weighted_captions": "reads (word:1.2) weights in captions, which meebs does not; set it false",
}
_SET_REFUSALS = {
    "vae": "meebs encodes the images with the base model's own VAE; clear vae "
    "(or bake that VAE into the checkpoint)",
    "lr_scheduler_type": "a scheduler class by name, which meebs has no key for; clear it and "
    "pick lr_scheduler",
    "lr_scheduler_args": "scheduler arguments meebs has no key for; clear them",
    "loraplus_lr_ratio": "LoRA+ trains the up matrices at another LR, which meebs does not; "
    "set it to 0",
    "loraplus_unet_lr_ratio": "LoRA+ trains the up matrices at another LR, which meebs does "
    "not; set it to 0",
    "loraplus_text_encoder_lr_ratio": "LoRA+ trains the up matrices at another LR, which meebs "
    "does not; set it to 0",
}
# sd-scripts flags in additional_parameters that change the training the same way.
_REFUSED_FLAGS = {
    "lr_scheduler_type": _SET_REFUSALS["lr_scheduler_type"],
    "lr_scheduler_args": _SET_REFUSALS["lr_scheduler_args"],
    "network_module": "another network module than the GUI's LoRA_type",
    "network_args": "network args beside the GUI's, which meebs cannot read",
    "loss_type": "another loss than l2 (MSE)",
    "masked_loss": _TRUE_REFUSALS["masked_loss"],
    "debiased_estimation_loss": _TRUE_REFUSALS["debiased_estimation_loss"],
    "weighted_captions": _TRUE_REFUSALS["weighted_captions"],
    "vae": _SET_REFUSALS["vae"],
}
