"""kohya-style `ss_*` and ModelSpec metadata for a saved network file.

AUTOMATIC1111, ComfyUI and civitai read these keys; all values are strings. Our own
extras (the resolved recipe, what fell back to what) go under `meebs_*`, never into new
tensor names. No wall-clock value is written unless SOURCE_DATE_EPOCH is set (the
reproducible-builds convention), so two identical runs give identical bytes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime

from meebs import __version__
from meebs.data.folders import DatasetScan
from meebs.network.build import LycorisNetworkKohya, NetworkSpec, build_network
from meebs.plan.steps import Plan
from meebs.recipe.schema import Recipe


@dataclass(frozen=True)
class RunFacts:
    """What the run actually used, after falling back from what the recipe asked for."""

    base_name: str
    base_sha256: str
    base_legacy_hash: str | None
    mixed_precision: str
    optimizer: str
    attention: str
    fallbacks: tuple[str, ...]


def source_date_epoch() -> str | None:
    value = os.environ.get("SOURCE_DATE_EPOCH")
    return value if value and value.isdigit() else None


def network_spec(recipe: Recipe) -> NetworkSpec:
    """The recipe's network section as the build's NetworkSpec: every key they share has
    the same name (`weights` is the trainer's, `dropout` the build's alone)."""
    shared = {field.name for field in fields(NetworkSpec)}
    values = asdict(recipe.network)
    return NetworkSpec(**{name: value for name, value in values.items() if name in shared})


def recipe_network(recipe: Recipe, unet, text_encoder) -> LycorisNetworkKohya:
    """The recipe's LyCORIS network on these modules; a part whose learning rate is 0
    gets no modules."""
    return build_network(
        unet,
        text_encoder,
        network_spec(recipe),
        train_unet=recipe.unet_lr > 0,
        train_text_encoder=recipe.text_encoder_lr > 0,
    )


# the epoch validation recommends, in the final file of a validated run (train writes it,
# plan sizes it)
RECOMMENDED_EPOCH_KEY = "meebs_recommended_epoch"


def _num(value: float) -> str:
    """kohya writes numbers with str(); keep integers free of a trailing .0."""
    return str(int(value)) if float(value).is_integer() else str(value)


def build_metadata(
    recipe: Recipe, scan: DatasetScan, plan: Plan, facts: RunFacts, *, epoch: int, step: int
) -> dict[str, str]:
    train, data, out = recipe.train, recipe.data, recipe.output
    width, height = data.resolution
    meta = {
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(recipe.network.dim),
        "ss_network_alpha": _num(recipe.network.alpha),
        "ss_network_args": json.dumps(network_spec(recipe).to_network_args(), sort_keys=True),
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_output_name": out.name,
        "ss_training_comment": out.comment,
        "ss_seed": str(train.seed),
        "ss_learning_rate": str(train.learning_rate),
        "ss_unet_lr": str(recipe.unet_lr),
        "ss_text_encoder_lr": str(recipe.text_encoder_lr),
        "ss_lr_scheduler": train.lr_scheduler,
        "ss_lr_warmup_steps": str(plan.warmup_steps),
        "ss_optimizer": facts.optimizer,
        "ss_mixed_precision": facts.mixed_precision,
        "ss_save_precision": out.save_precision,
        "ss_clip_skip": str(train.clip_skip),
        "ss_noise_offset": str(train.noise_offset),
        "ss_min_snr_gamma": str(train.min_snr_gamma),
        "ss_max_token_length": str(train.max_token_length),
        "ss_num_train_images": str(plan.train_samples),
        "ss_num_reg_images": str(scan.reg_samples_with_repeats),
        "ss_num_batches_per_epoch": str(plan.batches_per_epoch),
        "ss_num_epochs": str(plan.epochs),
        "ss_epoch": str(epoch),
        "ss_steps": str(step),
        "ss_max_train_steps": str(plan.total_steps),
        "ss_batch_size_per_device": str(train.batch_size),
        "ss_total_batch_size": str(train.batch_size * train.gradient_accumulation_steps),
        "ss_gradient_accumulation_steps": str(train.gradient_accumulation_steps),
        "ss_gradient_checkpointing": str(train.gradient_checkpointing),
        "ss_max_grad_norm": str(train.max_grad_norm),
        "ss_resolution": f"({width}, {height})",
        "ss_enable_bucket": str(data.enable_bucket),
        "ss_min_bucket_reso": str(data.min_bucket_reso),
        "ss_max_bucket_reso": str(data.max_bucket_reso),
        "ss_cache_latents": str(data.cache_latents),
        "ss_prior_loss_weight": str(train.prior_loss_weight),
        "ss_caption_dropout_rate": str(data.caption_dropout_rate),
        "ss_shuffle_caption": str(data.shuffle_caption),
        "ss_keep_tokens": str(data.keep_tokens),
        "ss_flip_aug": str(data.flip_aug),
        "ss_dataset_dirs": json.dumps(scan.dataset_dirs(), sort_keys=True),
        "ss_reg_dataset_dirs": json.dumps(scan.reg_dataset_dirs(), sort_keys=True),
        "ss_tag_frequency": json.dumps(scan.tag_frequency(), sort_keys=True),
        "ss_sd_model_name": facts.base_name,
        "ss_new_sd_model_hash": facts.base_sha256,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": out.name if epoch == plan.epochs else f"{out.name}-{epoch:06d}",
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.prediction_type": "epsilon",
        "modelspec.encoder_layer": str(train.clip_skip),
        "meebs_version": __version__,
        "meebs_recipe": recipe.canonical_json(),
        "meebs_recipe_sha256": recipe.sha256(),
        "meebs_attention": facts.attention,
        "meebs_fallbacks": json.dumps(list(facts.fallbacks)),
    }
    if facts.base_legacy_hash:
        meta["ss_sd_model_hash"] = facts.base_legacy_hash
    if out.comment:
        meta["modelspec.description"] = out.comment
    epoch_time = source_date_epoch()
    if epoch_time is not None:
        meta["ss_training_started_at"] = epoch_time
        meta["ss_training_finished_at"] = epoch_time
        meta["modelspec.date"] = datetime.fromtimestamp(int(epoch_time), UTC).date().isoformat()
    return meta
