"""Recipes: the YAML file that says everything about one training run.

This module holds the recipe's sections and keys: each key's type, default, allowed range
and one line of documentation (`knob`). Reading a recipe file is `meebs.recipe.loading`,
checking it `meebs.recipe.checks`, listing and comparing its keys `meebs.recipe.keys`.

The resolved recipe is frozen and has a canonical hash, so a run can name exactly what
it was asked to do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

# torch.manual_seed takes seeds below 2**64, a CUDA generator below 2**63: a larger one
# passed every check and stopped the run with a traceback (found by fuzzing, issue 19).
MAX_SEED = 2**63 - 1
WHERE_KEYS = ("dir", "logging_dir")  # output.* keys that never change what is trained
# Keys added after runs were recorded: left out of the canonical recipe while at their
# default, so a recorded run's recipe hash and file bytes stay what they were.
LATER_KEYS = {
    "network": (
        "dora_wd",
        "factor",
        "decompose_both",
        "full_matrix",
        "use_scalar",
        "constraint",
        "rescaled",
    )
}
# LyCORIS algorithms (lycoris-lora's names) that A1111 and ComfyUI load; "lora" and
# "locon" are the same module. DoRA is `dora_wd: true` on lora/locon/loha/lokr.
ALGOS = ("loha", "locon", "lora", "lokr", "glora", "diag-oft", "full", "ia3")
# Optimizers by kohya sd-scripts' names, so a kohya_ss config's choice reads the same here.
OPTIMIZERS = (
    "AdamW",
    "AdamW8bit",
    "PagedAdamW8bit",
    "Lion",
    "Lion8bit",
    "PagedLion8bit",
    "SGDNesterov",
    "SGDNesterov8bit",
    "Adafactor",
    "DAdaptation",
    "DAdaptAdam",
    "DAdaptAdaGrad",
    "DAdaptAdan",
    "DAdaptLion",
    "DAdaptSGD",
    "Prodigy",
)
SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "polynomial",
    "cosine",
    "cosine_with_restarts",
)


def knob(default: Any, doc: str, lo: float | None = None, hi: float | None = None) -> Any:
    """A recipe key with its default, one line of documentation and an inclusive range."""
    meta = {"lo": lo, "hi": hi, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class ModelSection:
    """The base model: a built-in test model, a diffusers folder or a single file."""

    builtin: Literal["tiny", "tiny-trained", "sd15-random"] | None = knob(
        None,
        "built-in model: tiny (random; tests), tiny-trained (the demos) or sd15-random "
        "(full size, random weights)",
    )
    path: str | None = knob(None, "SD 1.5 diffusers folder or single-file .safetensors")
    sha256: str | None = knob(None, "pin: the run stops if the base model's sha256 differs")
    allow_pickle: bool = knob(False, "allow pickle files (.ckpt/.bin): they can run code")


@dataclass(frozen=True)
class DataSection:
    """Images, captions and how they become training tensors."""

    train_dir: str = knob("", "folder of `{repeats}_{subject} {class}` subfolders")
    reg_dir: str | None = knob(None, "regularization folder, same convention (kohya reg_data_dir)")
    caption_extension: str = knob(".txt", "caption file extension next to each image")
    resolution: list[int] = knob([512, 512], "max training resolution [width, height]")
    enable_bucket: bool = knob(False, "aspect-ratio bucketing")
    min_bucket_reso: int = knob(256, "smallest bucket side", lo=64)
    max_bucket_reso: int = knob(1024, "largest bucket side", lo=64)
    bucket_reso_steps: int = knob(64, "bucket sides are multiples of this", lo=8)
    background: Literal["white", "black", "alternate"] = knob(
        "white", "background that transparent images are flattened onto"
    )
    flip_aug: bool = knob(False, "random horizontal flips")
    shuffle_caption: bool = knob(False, "shuffle comma-separated caption tags")
    keep_tokens: int = knob(0, "leading caption tags kept in place when shuffling", lo=0)
    caption_dropout_rate: float = knob(0.0, "probability of an empty caption", lo=0.0, hi=1.0)
    cache_latents: bool = knob(True, "encode every image once with the VAE, before training")
    cache_latents_to_disk: bool = knob(
        True, "keep cached latents on disk ($MEEBS_CACHE_DIR/latents) for later runs"
    )
    num_workers: int = knob(0, "data-loader worker processes", lo=0, hi=64)


@dataclass(frozen=True)
class OutputSection:
    """Where files go and which ones are written."""

    dir: str = knob("outputs", "runs are written to {dir}/{name}/{run id}/")
    name: str = knob("", "output name: file stem of every network file")
    logging_dir: str | None = knob(None, "TensorBoard folder (default: {run}/logs)")
    comment: str = knob("", "training comment stored in the file (ss_training_comment)")
    save_every_n_epochs: int = knob(1, "write {name}-{epoch:06d}.safetensors every N epochs", lo=1)
    keep_last_n_epochs: int | None = knob(None, "keep only the last N epoch files", lo=1)
    save_precision: Literal["fp16", "bf16", "fp32"] = knob("fp16", "dtype of saved tensors")


@dataclass(frozen=True)
class NetworkSection:
    """The LyCORIS network that is trained."""

    algo: Literal[ALGOS] = knob("loha", "network type (LyCORIS algorithm)")  # type: ignore[valid-type]
    dim: int = knob(4, "rank of Linear and 1x1 conv layers (network_dim)", lo=1, hi=1024)
    alpha: float = knob(1.0, "scale = alpha / dim (network_alpha)", lo=0.0)
    conv_dim: int = knob(4, "rank of 3x3 convs; 0 skips them", lo=0, hi=1024)
    conv_alpha: float = knob(1.0, "scale of 3x3 convs = conv_alpha / conv_dim", lo=0.0)
    use_tucker: bool = knob(False, "Tucker decomposition for 3x3 convs")
    dora_wd: bool = knob(False, "DoRA weight decomposition (lora, locon, loha, lokr)")
    factor: int = knob(-1, "LoKr Kronecker factor (-1: as balanced as the shape allows)", lo=-1)
    decompose_both: bool = knob(False, "LoKr: low-rank decompose both Kronecker factors")
    full_matrix: bool = knob(False, "LoKr: train full matrices, no low-rank factors")
    use_scalar: bool = knob(False, "train a scalar on the delta instead of a zero init")
    constraint: float = knob(0.0, "OFT: norm constraint (kohya_ss constrain; 0 = none)", lo=0.0)
    rescaled: bool = knob(False, "OFT: train a rescale of the output")
    weights: str | None = knob(None, "start from this network file (kohya network_weights)")


@dataclass(frozen=True)
class TrainSection:
    """The optimisation: steps, learning rates, loss and the machine."""

    seed: int = knob(42, "seed of every random source", lo=0, hi=MAX_SEED)
    epochs: int = knob(1, "passes over the training images (with their reg partners)", lo=1)
    batch_size: int = knob(1, "images per step per device", lo=1, hi=256)
    gradient_accumulation_steps: int = knob(1, "micro-batches per optimizer step", lo=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = knob("no", "autocast precision (GPU)")
    learning_rate: float = knob(1e-4, "default learning rate", lo=0.0)
    unet_lr: float | None = knob(None, "UNet LR (default learning_rate; 0 = don't train)", lo=0.0)
    text_encoder_lr: float | None = knob(
        None, "text-encoder LR (default learning_rate; 0 = don't train)", lo=0.0
    )
    lr_scheduler: Literal[SCHEDULERS] = knob("constant", "learning-rate schedule")  # type: ignore[valid-type]
    lr_warmup: float = knob(0.0, "warmup as a fraction of all steps", lo=0.0, hi=1.0)
    lr_scheduler_num_cycles: int = knob(1, "cycles of cosine_with_restarts", lo=1)
    lr_scheduler_power: float = knob(1.0, "power of the polynomial schedule", lo=0.0)
    optimizer: Literal[OPTIMIZERS] = knob("AdamW", "optimizer (kohya's names)")  # type: ignore[valid-type]
    optimizer_args: dict[str, Any] = knob({}, "extra optimizer keyword arguments")
    max_token_length: Literal[75, 150, 225] = knob(75, "caption tokens (chunks of 75)")
    no_token_padding: bool = knob(False, "pad captions to the longest in the batch only")
    clip_skip: int = knob(1, "use the n-th last text-encoder layer (1 = last)", lo=1, hi=12)
    noise_offset: float = knob(0.0, "noise += offset * randn(B, C, 1, 1)", lo=0.0, hi=1.0)
    min_snr_gamma: float | None = knob(None, "min-SNR loss weighting gamma (5 is common)", lo=0.0)
    prior_loss_weight: float = knob(1.0, "loss weight of regularization images", lo=0.0)
    max_grad_norm: float = knob(1.0, "gradient clipping norm (0 = off)", lo=0.0)
    attention: Literal["sdpa", "xformers"] = knob("sdpa", "attention backend")
    gradient_checkpointing: bool = knob(False, "trade compute for memory")
    loha_layer: Literal["factored", "fast", "low-memory", "lycoris"] = knob(
        "factored",
        "LoHA training layer, the same function each: factored never builds a full-size "
        "weight (where it pays), low-memory saves RAM/VRAM, lycoris = stock",
    )
    threads: int = knob(2, "CPU threads (part of the result: it changes the bits)", lo=1)
    log_every_n_steps: int = knob(
        10, "read losses back and log them every N steps (each read waits for the GPU)", lo=1
    )
    deterministic: bool = knob(
        True, "deterministic kernels, TF32 off (off: faster on GPU, bits may differ)"
    )


@dataclass(frozen=True)
class SampleSection:
    """Sample images generated during training."""

    every_n_epochs: int = knob(0, "generate samples every N epochs (0 = never)", lo=0)
    prompts: list[str] = knob([], "prompts; kohya flags --n --w --h --d --s --l allowed")
    prompt_file: str | None = knob(None, "kohya prompt file, one prompt per line")
    sampler: str = knob("Euler a", "AUTOMATIC1111 sampler name")
    steps: int = knob(20, "sampling steps", lo=1, hi=1000)
    cfg: float = knob(7.0, "classifier-free guidance scale", lo=0.0)
    seed: int = knob(1234, "seed of the first prompt (+1 per prompt)", lo=0, hi=MAX_SEED)
    negative: str = knob("", "default negative prompt")


@dataclass(frozen=True)
class ValidationSection:
    """Held-out images scored during training, to pick the epoch that learned most."""

    enabled: bool = knob(False, "score held-out images and class drift; recommend an epoch")
    fraction: float = knob(
        0.1, "share of each training folder held out (at least 1 image per folder)", lo=0.0, hi=1.0
    )
    seed: int = knob(
        0, "seed of the held-out split (its own: changing it changes only the split)", lo=0
    )
    folder: str | None = knob(
        None, "validation folder in kohya layout, used instead of holding out `fraction`"
    )
    every_n_epochs: int = knob(
        1, "evaluate every N epochs (and at epoch 0 and every saved epoch)", lo=1
    )
    timesteps: int = knob(
        8, "noise levels per image, spread evenly over the schedule", lo=3, hi=1000
    )
    class_images: int = knob(8, "reg images scored for class drift (a fixed subset)", lo=1)
    drift_tolerance: float = knob(
        0.05,
        "largest class drift allowed for the recommendation, as a share of the base loss",
        lo=0.0,
    )


@dataclass(frozen=True)
class Recipe:
    """A fully resolved, validated recipe."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    output: OutputSection = field(default_factory=OutputSection)
    network: NetworkSection = field(default_factory=NetworkSection)
    train: TrainSection = field(default_factory=TrainSection)
    sample: SampleSection = field(default_factory=SampleSection)
    validation: ValidationSection = field(default_factory=ValidationSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def canonical_json(self) -> str:
        """The recipe as compact sorted JSON, without the keys that only say *where* files
        go (the same recipe written to another folder is the same training, and gives the
        same bytes) and without LATER_KEYS at their defaults."""
        data = self.to_dict()
        for key in WHERE_KEYS:
            del data["output"][key]
        for section, keys in LATER_KEYS.items():
            default = type(getattr(self, section))()
            for key in keys:
                if data[section][key] == getattr(default, key):
                    del data[section][key]
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    @property
    def unet_lr(self) -> float:
        lr = self.train.unet_lr
        return self.train.learning_rate if lr is None else lr

    @property
    def text_encoder_lr(self) -> float:
        lr = self.train.text_encoder_lr
        return self.train.learning_rate if lr is None else lr

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
