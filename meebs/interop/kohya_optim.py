"""The training schedule and optimizer of a kohya_ss config, read as the GUI reads them.

* `seed` 0 or "" means a random seed in kohya; a recipe always has a fixed one;
* `lr_warmup` is a percentage of all steps, unless `lr_warmup_steps` is set;
* `lr_scheduler_num_cycles` "" means one cycle per epoch;
* a zero text-encoder LR trains the UNet only (and the reverse); both zero means both
  use `learning_rate`;
* no `optimizer` means AdamW (AdamW8bit with the old `use_8bit_adam`).
"""

from __future__ import annotations

from typing import Any

from meebs.errors import MeebsError
from meebs.files.text_files import shown
from meebs.interop.kohya_keys import (
    parse_optimizer_args,
    to_bool,
    to_float,
    to_int,
    to_str,
    value_text,
)
from meebs.interop.kohya_reader import OFF, KohyaReader, recipe_choices
from meebs.recipe.schema import OPTIMIZERS, Recipe


def import_schedule(importer: KohyaReader) -> None:
    epochs = None
    for key in ("epoch", "max_train_epochs"):  # max_train_epochs wins when set
        value = importer.take(key)
        if value is not None and to_int(key, value) > 0:
            epochs = to_int(key, value)
    if epochs is not None:
        importer.put("train.epochs", epochs)
    steps = importer.take("max_train_steps")
    seed = importer.take("seed")
    if seed is None or to_int("seed", seed) == 0:
        importer.notes.append(
            f"seed: kohya_ss draws a random one; the recipe keeps train.seed {Recipe().train.seed}"
        )
    else:
        importer.put("train.seed", to_int("seed", seed))
    _import_learning_rates(importer)
    _import_scheduler(importer)
    percent = importer.take("lr_warmup")
    warmup_steps = importer.take("lr_warmup_steps")
    if warmup_steps is not None and to_int("lr_warmup_steps", warmup_steps) > 0:
        if steps is None or to_int("max_train_steps", steps) <= 0:
            raise MeebsError(
                "kohya_ss key lr_warmup_steps: meebs needs warmup as a fraction of all steps; "
                "set lr_warmup (percent) instead, or max_train_steps"
            )
        fraction = to_int("lr_warmup_steps", warmup_steps) / to_int("max_train_steps", steps)
        importer.put("train.lr_warmup", round(fraction, 12))
    elif percent is not None:
        importer.put("train.lr_warmup", round(to_float("lr_warmup", percent) / 100, 12))
    if importer.config.get("lr_scheduler") == "adafactor" and importer.get("train.lr_warmup"):
        importer.notes.append(
            "lr_warmup: sd-scripts' adafactor scheduler has no warmup; the recipe has none"
        )
        importer.put("train.lr_warmup", 0.0)
    warmup = importer.get("train.lr_warmup", 0)
    if importer.get("train.lr_scheduler") == "constant" and warmup > 0:
        raise MeebsError(
            "kohya_ss keys lr_scheduler constant and lr_warmup: sd-scripts refuses a warmup with "
            "the constant scheduler; set lr_warmup to 0 or lr_scheduler to constant_with_warmup"
        )
    if steps is not None and to_int("max_train_steps", steps) > 0:
        importer.notes.append(
            f"max_train_steps {shown(steps)}: meebs trains whole epochs; "
            "set train.epochs so that `plan` shows about that many steps"
        )
    cycles = importer.take("lr_scheduler_num_cycles")
    if cycles is None:
        cycles = epochs  # the GUI's "" means one cycle per epoch
    if cycles is not None:
        importer.put("train.lr_scheduler_num_cycles", to_int("lr_scheduler_num_cycles", cycles))
    gamma = importer.take("min_snr_gamma")
    if gamma is not None and to_float("min_snr_gamma", gamma) > 0:
        importer.put("train.min_snr_gamma", to_float("min_snr_gamma", gamma))


def _import_scheduler(importer: KohyaReader) -> None:
    """kohya's `adafactor` scheduler only reports the LR Adafactor sets itself (sd-scripts'
    AdafactorSchedule): with relative_step Adafactor keeps its own schedule, else its LR
    is constant. So it is `constant` here, and only with the Adafactor optimizer."""
    scheduler = importer.take("lr_scheduler")
    if scheduler is None:
        return
    scheduler = to_str("lr_scheduler", scheduler)
    if scheduler == "adafactor":
        if _optimizer_name(importer.config) != "Adafactor":
            raise MeebsError(
                "kohya_ss key lr_scheduler: 'adafactor' works with optimizer Adafactor only "
                "(sd-scripts stops otherwise); pick another lr_scheduler"
            )
        importer.notes.append(
            "lr_scheduler adafactor became constant: it only reports the LR Adafactor sets "
            "itself (with relative_step, Adafactor's own schedule; else a constant LR)"
        )
        scheduler = "constant"
    allowed = recipe_choices("train.lr_scheduler")
    if scheduler not in allowed:
        raise MeebsError(
            f"kohya_ss key lr_scheduler: {value_text(scheduler)} is not supported; "
            f"use one of {', '.join(allowed)}"
        )
    importer.put("train.lr_scheduler", scheduler)


def _optimizer_name(config: dict[str, Any]) -> Any:
    """The optimizer as the GUI reads the config: none given means AdamW, or AdamW8bit with
    the old `use_8bit_adam` (common_gui.update_my_data); kohya's names are case-blind."""
    name = config.get("optimizer")
    if name is None:
        old = config.get("use_8bit_adam")
        return "AdamW8bit" if old not in OFF and to_bool("use_8bit_adam", old) else "AdamW"
    if isinstance(name, str):
        canonical = {known.lower(): known for known in OPTIMIZERS}
        return canonical.get(name.lower(), name)
    return name


def import_optimizer(importer: KohyaReader) -> None:
    given = importer.take("optimizer")
    importer.take("use_8bit_adam")
    name = _optimizer_name(importer.config)
    if given is None and "optimizer" not in importer.config:
        importer.notes.append(
            f"optimizer: none in the config; the GUI reads that as {name} (use_8bit_adam)"
        )
    if name not in OPTIMIZERS:
        raise MeebsError(
            f"kohya_ss key optimizer: {value_text(name)} is not supported; "
            f"use one of {', '.join(OPTIMIZERS)}"
        )
    importer.put("train.optimizer", name)
    args = importer.take("optimizer_args")
    if args is not None:
        importer.put("train.optimizer_args", parse_optimizer_args(to_str("optimizer_args", args)))


def _import_learning_rates(importer: KohyaReader) -> None:
    """Both zero: both use learning_rate (recipe default); one zero: train the other only."""
    te, unet = (importer.take(key) for key in ("text_encoder_lr", "unet_lr"))
    te_lr = 0.0 if te is None else to_float("text_encoder_lr", te)
    unet_lr = 0.0 if unet is None else to_float("unet_lr", unet)
    if te_lr or unet_lr:
        importer.put("train.text_encoder_lr", te_lr)
        importer.put("train.unet_lr", unet_lr)
