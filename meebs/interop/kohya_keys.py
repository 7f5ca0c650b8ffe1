"""What the kohya_ss config import and export share: the keys that map one to one, the
LoRA types and save precisions on both sides, reading the GUI's values, kohya's
`optimizer_args` string both ways, and the result.

Older GUIs wrote numbers and booleans as strings ("2", "1e-4", "True"): the readers here
accept them, and a value that cannot be converted stops with one line naming the key and
the fix.
"""

from __future__ import annotations

import ast
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meebs.errors import MeebsError

# LoRA_type <-> network.algo. "lora" with k x k convs is kohya's own LoCon (networks.lora
# with conv_dim); "Standard" LoRA leaves those convs alone. The LyCORIS types are the
# algorithms the GUI's lora_gui.py passes as `algo=` to lycoris.kohya.
LORA_TYPES = {
    "LyCORIS/LoHa": "loha",
    "LyCORIS/LoCon": "locon",
    "Kohya LoCon": "lora",
    "LyCORIS/LoKr": "lokr",
    "LyCORIS/GLoRA": "glora",
    "LyCORIS/iA3": "ia3",
    "LyCORIS/Diag-OFT": "diag-oft",
    "LyCORIS/Native Fine-Tuning": "full",
}
STANDARD = "Standard"
# kohya's save_precision "float" is fp32.
SAVE_PRECISIONS = {"float": "fp32", "fp16": "fp16", "bf16": "bf16"}


@dataclass(frozen=True)
class Converted:
    """The result of a conversion: the text to print and what the user must know."""

    text: str
    notes: tuple[str, ...]  # one line each, for stderr
    # recipe keys the config left empty (a preset): the text has them blank, with a
    # comment, and `plan`/`train` stop until they are filled in
    fill_in: tuple[str, ...] = ()


# --------------------------------------------------------------------------- values


def value_text(value: Any, limit: int = 80) -> str:
    """`value` as the config writes it (a string repr'd) for a one-line message: cut to
    `limit` characters, since a config may hold a megabyte where a number belongs."""
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def value_error(key: str, value: Any, wanted: str) -> MeebsError:
    return MeebsError(
        f"kohya_ss key {key}: expected {wanted}, got {value_text(value)}; fix it in the config"
    )


def to_int(key: str, value: Any) -> int:
    """An integer, also from the strings and integral floats older GUIs wrote."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, bool):
        with contextlib.suppress(TypeError, ValueError):
            number = float(value)
            if number.is_integer():
                return int(number)
    raise value_error(key, value, "an integer")


def to_float(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise value_error(key, value, "a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise value_error(key, value, "a number") from None


def to_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if value in (0, 1):
        return bool(value)
    raise value_error(key, value, "true or false")


def to_str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise value_error(key, value, "a string")
    return value


# Keys that map one to one: kohya key -> (recipe key, converter). An empty string or
# null means "not set" in the GUI, so the recipe keeps its default.
SIMPLE: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "train_data_dir": ("data.train_dir", to_str),
    "reg_data_dir": ("data.reg_dir", to_str),
    "enable_bucket": ("data.enable_bucket", to_bool),
    "min_bucket_reso": ("data.min_bucket_reso", to_int),
    "max_bucket_reso": ("data.max_bucket_reso", to_int),
    "bucket_reso_steps": ("data.bucket_reso_steps", to_int),
    "flip_aug": ("data.flip_aug", to_bool),
    "shuffle_caption": ("data.shuffle_caption", to_bool),
    "keep_tokens": ("data.keep_tokens", to_int),
    "caption_dropout_rate": ("data.caption_dropout_rate", to_float),
    "cache_latents": ("data.cache_latents", to_bool),
    "max_data_loader_n_workers": ("data.num_workers", to_int),
    "output_dir": ("output.dir", to_str),
    "output_name": ("output.name", to_str),
    "logging_dir": ("output.logging_dir", to_str),
    "training_comment": ("output.comment", to_str),
    "network_weights": ("network.weights", to_str),
    "network_dim": ("network.dim", to_int),
    "network_alpha": ("network.alpha", to_float),
    "train_batch_size": ("train.batch_size", to_int),
    "gradient_accumulation_steps": ("train.gradient_accumulation_steps", to_int),
    "gradient_checkpointing": ("train.gradient_checkpointing", to_bool),
    "mixed_precision": ("train.mixed_precision", to_str),
    "learning_rate": ("train.learning_rate", to_float),
    "lr_scheduler": ("train.lr_scheduler", to_str),
    "lr_scheduler_power": ("train.lr_scheduler_power", to_float),
    "optimizer": ("train.optimizer", to_str),
    "max_token_length": ("train.max_token_length", to_int),
    "no_token_padding": ("train.no_token_padding", to_bool),
    "prior_loss_weight": ("train.prior_loss_weight", to_float),
    "max_grad_norm": ("train.max_grad_norm", to_float),
    "num_cpu_threads_per_process": ("train.threads", to_int),
    "sample_every_n_epochs": ("sample.every_n_epochs", to_int),
}


# --------------------------------------------------------------------------- optimizer_args


def parse_optimizer_args(text: str) -> dict[str, Any]:
    """kohya's `optimizer_args` "weight_decay=0.01 betas=0.9,0.99" as a mapping."""
    args: dict[str, Any] = {}
    # the GUI drops every '"' before splitting (lora_gui.py: `.replace('"', "").split()`),
    # so presets write '"weight_decay=0.1" "betas=0.9,0.99"'
    for item in text.replace('"', "").split():
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise value_error(
                "optimizer_args", text, 'space-separated name=value pairs, e.g. "a=1 b=2"'
            )
        parsed = [_literal(part) for part in value.split(",")]
        args[name] = parsed if len(parsed) > 1 else parsed[0]
    return args


# No optimizer argument is longer; Python's parser runs out of memory on a few thousand
# nested '-' or '(' (MemoryError, RecursionError), and ast.literal_eval accepts {[]: 1}
# only to raise TypeError.
MAX_LITERAL = 100


def _literal(text: str) -> Any:
    """A Python literal as kohya reads it (ast.literal_eval), else the text itself. The
    recipe check refuses what a recipe cannot hold (a set, bytes, NaN)."""
    if len(text) > MAX_LITERAL:
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError):
        return text


def format_optimizer_args(args: dict[str, Any]) -> str:
    def value(item: Any) -> str:
        return ",".join(map(str, item)) if isinstance(item, list) else str(item)

    return " ".join(f"{name}={value(item)}" for name, item in args.items())
