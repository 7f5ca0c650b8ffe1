"""Base models: the frozen SD 1.x parts a LoHA trains against, loaded safely and hashed.

A base model comes from one of three places:

- a built-in (`tiny` for demos and tests, `sd15-random` for benchmarks), built from the
  configs shipped in `meebs/configs/` with seeded random weights;
- a single-file checkpoint in the original LDM layout (`.safetensors`; pickle files
  only when the recipe allows them), converted with diffusers' own key mapping but
  configured only from `meebs/configs/sd15/`, so nothing is ever fetched from a hub;
- a diffusers folder (`unet/`, `vae/`, `text_encoder/`, optional `tokenizer/`).

Every source is identified by a sha256 that a recipe can pin. The pin and the
architecture (SD 1.x only) are checked before any weights are read, so a wrong or unsafe
file fails in one line instead of after minutes of loading.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import diffusers.utils.logging
import torch
import transformers
import transformers.utils.logging
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from meebs.errors import ModelError
from meebs.files.hash_cache import cached_sha256
from meebs.models.tokenizer import MAX_LENGTH, clip_tokenizer

CONFIGS = Path(__file__).parent.parent / "configs"
SD15_CONFIGS = CONFIGS / "sd15"
TINY_CONFIGS = CONFIGS / "tiny"
SCHEDULER_CONFIG = SD15_CONFIGS / "scheduler" / "scheduler_config.json"
BUILTINS = ("tiny", "tiny-trained", "sd15-random")
TINY_TRAINED = Path(__file__).parent.parent / "assets" / "tiny-trained"
TINY_TRAINED_SHA256 = "c09d0c38452f6180f46fab7cab569382c3a8c9f750275caad76fce3251e3d140"
"""The folder sha256 of the committed `tiny-trained` weights (see its MODEL_CARD.md)."""
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin"})

# Key prefixes of the three SD 1.x parts in a single-file (LDM layout) checkpoint.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
# The first cross-attention key projection: its input width is the text context width,
# 768 for SD 1.x (CLIP ViT-L), 1024 for SD 2.x (OpenCLIP ViT-H).
CROSS_ATTENTION_KEY = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
CONV_IN_KEY = UNET_PREFIX + "input_blocks.0.0.weight"
SD1_CONTEXT_WIDTH = 768

# Weight file names in a diffusers folder, safetensors first, pickle fallback second.
FOLDER_WEIGHTS = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
}
# kohya's ss_sd_model_hash reads 64 KiB at offset 1 MiB.
_LEGACY_OFFSET = 0x100000
_LEGACY_LENGTH = 0x10000
_FIX = "point model.path at an SD 1.5 checkpoint"


@dataclass
class BaseModel:
    """The frozen SD 1.x parts and what identifies them in manifests and adapter metadata.

    `sha256` is what a recipe pins; `legacy_hash` is kohya's `ss_sd_model_hash` (None for
    folders and built-ins, which kohya never hashes). The parts are switched to fp32,
    eval mode and requires_grad False here, so no loader can forget it.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    sha256: str
    name: str
    legacy_hash: str | None
    source: str

    def __post_init__(self) -> None:
        for part in (self.unet, self.vae, self.text_encoder):
            part.float().eval().requires_grad_(False)


def sha256_file(path: Path) -> str:
    """sha256 of a file, streamed in 1 MiB chunks so a 4 GB checkpoint never sits in memory.

    Remembered in the hash cache (`meebs.files.hash_cache`): an unchanged file is read once,
    not on every run; a changed size, mtime or inode hashes it again.
    """
    return cached_sha256(path)


def kohya_model_hash(path: Path) -> str:
    """kohya's `ss_sd_model_hash`: sha256 of 64 KiB at offset 1 MiB, first 8 hex digits."""
    with path.open("rb") as stream:
        stream.seek(_LEGACY_OFFSET)
        return hashlib.sha256(stream.read(_LEGACY_LENGTH)).hexdigest()[:8]


def noise_scheduler() -> DDPMScheduler:
    """The SD 1.5 training schedule: DDPM, 1000 steps, scaled_linear 0.00085..0.012, epsilon.

    Always this one, whatever scheduler a diffusers folder ships: that folder's scheduler
    is for sampling, and SD 1.x was trained with this schedule.
    """
    return DDPMScheduler.from_config(_read_json(SCHEDULER_CONFIG))


def build_tiny(seed: int = 0) -> BaseModel:
    """The tiny SD 1.5-shaped model (REFERENCE section 11) for demos and tests; ~0.1 s.

    Its sha256 hashes the weights themselves, so it is pinned and recorded like any file.
    """
    unet, vae, text_encoder = _seeded_parts(TINY_CONFIGS, seed)
    parts = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    return _builtin("tiny", parts, state_dict_sha256(parts))


def load_tiny_trained() -> BaseModel:
    """The tiny base trained to draw people, shapes and made-up creatures by
    `make pretrain-tiny`; committed as fp16 safetensors and pinned like any base."""
    model = _load_folder(TINY_TRAINED, TINY_TRAINED_SHA256, allow_pickle=False)
    model.name, model.source = "tiny-trained", "builtin:tiny-trained"
    return model


def build_sd15_random(seed: int = 0) -> BaseModel:
    """The real SD 1.5 architecture with seeded random weights, for tests and benchmarks.

    Weights get the libraries' default initialisation, done once (9-15 s on 2 cores, mostly
    the UNet's 860M parameters). Hashing ~1B weights would add seconds, so its sha256
    hashes what determines them instead: the shipped configs, the seed and the versions of
    torch, diffusers and transformers (see `_recipe_sha256`).
    """
    unet, vae, text_encoder = _seeded_parts(SD15_CONFIGS, seed)
    parts = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    return _builtin("sd15-random", parts, _recipe_sha256("sd15-random", seed, SD15_CONFIGS))


def _builtin(name: str, parts: dict[str, torch.nn.Module], sha256: str) -> BaseModel:
    return BaseModel(
        **parts,
        tokenizer=clip_tokenizer(),
        noise_scheduler=noise_scheduler(),
        sha256=sha256,
        name=name,
        legacy_hash=None,
        source=f"builtin:{name}",
    )


def load_base_model(
    *, builtin: str | None, path: Path | None, sha256: str | None, allow_pickle: bool
) -> BaseModel:
    """Load the base model a recipe names: exactly one of `builtin` or `path`.

    `sha256`, when given, must match (see `folder_sha256` for what a folder's hash is).
    """
    if (builtin is None) == (path is None):
        raise ModelError("set exactly one of model.builtin and model.path in the recipe")
    if builtin is not None:
        model = _load_builtin(builtin)
        _check_pin(model.source, model.sha256, sha256)
        return model
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelError(f"base model {path} does not exist: check model.path in the recipe")
    if path.is_dir():
        return _load_folder(path, sha256, allow_pickle)
    return _load_file(path, sha256, allow_pickle)


def describe_base(model: BaseModel) -> str:
    """One line for the training plan: what the base is, where from, and its identity."""
    count = sum(
        parameter.numel()
        for part in (model.unet, model.text_encoder, model.vae)
        for parameter in part.parameters()
    )
    kohya = f", kohya hash {model.legacy_hash}" if model.legacy_hash else ""
    return (
        f"base model {model.name} from {model.source}: sha256 {model.sha256[:12]}…{kohya}, "
        f"{count / 1e6:.1f}M frozen fp32 parameters"
    )


def state_dict_sha256(parts: dict[str, nn.Module]) -> str:
    """sha256 over every tensor of the parts, in a fixed order that does not depend on dicts.

    For each part in the given order and each state-dict key sorted: the line
    `part.key dtype shape`, then the tensor's raw bytes.
    """
    digest = hashlib.sha256()
    for part_name, module in parts.items():
        state = module.state_dict()
        for key in sorted(state):
            tensor = state[key].detach().cpu().contiguous()
            digest.update(f"{part_name}.{key} {tensor.dtype} {list(tensor.shape)}\n".encode())
            digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def folder_sha256(folder: Path, files: list[Path]) -> str:
    """A diffusers folder's sha256: the sha256 of a `sha256sum`-style manifest.

    One line `<sha256 of file>  <path relative to folder>` per file that loading reads
    (each part's config.json and weights, every tokenizer file), sorted by relative path.
    Other files (fp16 variants, the sampling scheduler, a root checkpoint) do not count.
    """
    lines = sorted((file.relative_to(folder).as_posix(), sha256_file(file)) for file in files)
    manifest = "".join(f"{digest}  {relative}\n" for relative, digest in lines)
    return hashlib.sha256(manifest.encode()).hexdigest()


def _load_builtin(name: str) -> BaseModel:
    if name == "tiny":
        return build_tiny()
    if name == "tiny-trained":
        return load_tiny_trained()
    if name == "sd15-random":
        return build_sd15_random()
    raise ModelError(f"unknown model.builtin {name!r}: use one of {', '.join(BUILTINS)}")


def _check_pin(source: Path | str, actual: str, pin: str | None) -> None:
    if pin is not None and pin.strip().lower() != actual:
        raise ModelError(
            f"base model {source} has sha256 {actual}, the recipe pins {pin}: use the pinned "
            "file, or update model.sha256 if the new base model is intended"
        )


def _refuse_pickle(path: Path) -> None:
    raise ModelError(
        f"refusing to load pickle file {path}: pickle can run code. Convert it to "
        ".safetensors, or set model.allow_pickle: true if you trust it"
    )


def _not_sd1(path: Path, what: str) -> ModelError:
    return ModelError(f"{path} is {what}; meebs trains SD 1.x adapters only: {_FIX}")


def _unreadable(path: Path, why: str) -> ModelError:
    return ModelError(f"{path} is not a Stable Diffusion checkpoint we can read ({why}): {_FIX}")


# Single-file checkpoints


def _load_file(path: Path, pin: str | None, allow_pickle: bool) -> BaseModel:
    suffix = path.suffix.lower()
    is_pickle = suffix in PICKLE_SUFFIXES
    if not is_pickle and suffix != ".safetensors":
        raise _unreadable(path, "expected .safetensors or a diffusers folder")
    if is_pickle and not allow_pickle:
        _refuse_pickle(path)
    digest = sha256_file(path)
    _check_pin(path, digest, pin)
    if is_pickle:
        state = _read_pickle(path)
        check_sd1_layout(path, {key: tuple(value.shape) for key, value in state.items()})
    else:
        check_sd1_layout(path, _safetensors_shapes(path))
        state = _read_safetensors(path)
    unet, vae, text_encoder = parts_from_ldm(state, SD15_CONFIGS, path)
    return BaseModel(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        noise_scheduler=noise_scheduler(),
        sha256=digest,
        name=path.stem,
        legacy_hash=kohya_model_hash(path),
        source=str(path),
    )


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the header only: no weights are read."""
    try:
        with safe_open(path, framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise _unreadable(path, f"bad safetensors header: {_first_line(err)}") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of the three SD parts; EMA copies and other extras are never read."""
    prefixes = (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)
    with safe_open(path, framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefixes)}  # noqa: SIM118


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Unpickle a checkpoint the user trusts (allow_pickle) and keep its tensors."""
    try:
        checkpoint: Any = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # unpickling a user file can fail in many ways
        raise _unreadable(path, f"cannot unpickle it: {_first_line(err)}") from None
    while isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise _unreadable(path, "it holds no state dict")
    return {key: value for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}


def check_sd1_layout(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse anything but a complete SD 1.x checkpoint, naming what it is instead."""

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in shapes)

    context = shapes.get(CROSS_ATTENTION_KEY)
    if has("conditioner.embedders."):
        raise _not_sd1(path, "an SDXL checkpoint")
    if has("cond_stage_model.model.") or (context is not None and context[-1] == 1024):
        raise _not_sd1(path, "an SD 2.x checkpoint (OpenCLIP text encoder, 1024-wide context)")
    if context is None or context[-1] != SD1_CONTEXT_WIDTH:
        raise _unreadable(
            path,
            f"no SD 1.x UNet: {CROSS_ATTENTION_KEY} is missing or not {SD1_CONTEXT_WIDTH} wide",
        )
    for prefix, part in ((TEXT_PREFIX + "text_model.", "CLIP text encoder"), (VAE_PREFIX, "VAE")):
        if not has(prefix):
            raise ModelError(
                f"{path} has no {part} weights ({prefix}*): use a full SD 1.x checkpoint, "
                "not a UNet-only file"
            )
    conv_in = shapes.get(CONV_IN_KEY)
    if conv_in is not None and conv_in[1] != 4:
        raise _not_sd1(
            path, f"an SD 1.x inpainting or edit model ({conv_in[1]} UNet input channels, not 4)"
        )


def parts_from_ldm(
    state: dict[str, torch.Tensor], config_dir: Path, path: Path
) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """Build the three parts from the shipped configs and an LDM-layout state dict.

    The modules are created without initialising weights (the checkpoint replaces them),
    the keys are converted with diffusers' single-file mapping, and loading is strict: a
    missing or unexpected key is an error, never a silently random weight.
    """
    with init_empty_weights():
        unet, vae, text_encoder = _parts_from_configs(config_dir)
    _load_strict(unet, lambda: convert_ldm_unet_checkpoint(state, dict(unet.config)), path, "UNet")
    _load_strict(vae, lambda: convert_ldm_vae_checkpoint(state, dict(vae.config)), path, "VAE")
    _load_strict(text_encoder, lambda: _ldm_text_state(state), path, "text encoder")
    return unet, vae, text_encoder


def _ldm_text_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LDM `cond_stage_model.transformer.text_model.*` keys as transformers 5 names them.

    transformers 5's CLIPTextModel has no `text_model.` level, and `position_ids` is a
    constant buffer some checkpoints carry but the model does not save.
    """
    converted = convert_ldm_clip_checkpoint(state)
    return {
        key.removeprefix("text_model."): value
        for key, value in converted.items()
        if not key.endswith("position_ids")
    }


def _load_strict(
    module: nn.Module, convert: Callable[[], dict[str, torch.Tensor]], path: Path, part: str
) -> None:
    """Convert and assign weights; any key or shape mismatch becomes a one-line ModelError."""
    try:
        result = module.load_state_dict(convert(), strict=False, assign=True)
    except (KeyError, IndexError, RuntimeError) as err:
        reason = _first_line(err)
        raise ModelError(f"{path}: its {part} weights do not fit SD 1.5 ({reason})") from None
    if result.missing_keys or result.unexpected_keys:
        raise ModelError(
            f"{path}: its {part} weights do not match SD 1.5 "
            f"({_sample(result.missing_keys)} missing, {_sample(result.unexpected_keys)} "
            "unexpected): use an unmodified SD 1.x checkpoint"
        )


def _sample(keys: Collection[str]) -> str:
    ordered = sorted(keys)
    return f"{len(ordered)} (e.g. {ordered[0]})" if ordered else "0"


# Diffusers folders


def _load_folder(folder: Path, pin: str | None, allow_pickle: bool) -> BaseModel:
    check_folder_architecture(folder)
    weights = {
        part: _weight_files(folder / part, names, allow_pickle)
        for part, names in FOLDER_WEIGHTS.items()
    }
    digest = folder_sha256(folder, _folder_files(folder, weights))
    _check_pin(folder, digest, pin)
    unet = _from_pretrained(UNet2DConditionModel, folder, "unet", weights["unet"])
    vae = _from_pretrained(AutoencoderKL, folder, "vae", weights["vae"])
    text_encoder = _from_pretrained(CLIPTextModel, folder, "text_encoder", weights["text_encoder"])
    return BaseModel(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_folder_tokenizer(folder),
        noise_scheduler=noise_scheduler(),
        sha256=digest,
        name=folder.name,
        legacy_hash=None,
        source=str(folder),
    )


def check_folder_architecture(folder: Path) -> None:
    """Tell SD 1.x from SD 2.x / SDXL by the configs alone, before any weights.

    SD 1.x-shaped means: a 4-channel UNet2DConditionModel whose cross-attention width is
    the hidden size of a CLIP text encoder, and not SD 2.x's 1024 or SDXL's 2048. Real SD
    1.5 has 768; the tiny built-in saved as a folder (32) passes too.
    """
    if (folder / "text_encoder_2").is_dir():
        raise _not_sd1(folder, "an SDXL model folder (it has text_encoder_2/)")
    unet = _folder_config(folder, "unet")
    context = unet.get("cross_attention_dim")
    if context == 2048:
        raise _not_sd1(folder, "an SDXL model folder (2048-wide cross-attention)")
    if context == 1024:
        raise _not_sd1(folder, "an SD 2.x model folder (1024-wide cross-attention)")
    text = _folder_config(folder, "text_encoder")
    if (
        unet.get("_class_name") != "UNet2DConditionModel"
        or text.get("model_type") != "clip_text_model"
        or context != text.get("hidden_size")
    ):
        raise _unreadable(folder, "its unet/ and text_encoder/ configs are not SD 1.x")
    if unet.get("in_channels", 4) != 4:
        raise _not_sd1(
            folder, f"an SD 1.x inpainting or edit model ({unet['in_channels']} channels)"
        )


def _folder_config(folder: Path, part: str) -> dict[str, Any]:
    config_file = folder / part / "config.json"
    if not config_file.is_file():
        raise _unreadable(folder, f"no {part}/config.json")
    return _read_json(config_file)


def _weight_files(part_dir: Path, names: tuple[str, str], allow_pickle: bool) -> list[Path]:
    """The weight files `from_pretrained` will read for one part: safetensors, else pickle.

    A sharded checkpoint is its index plus the shards it lists.
    """
    for name in names:
        for candidate in (part_dir / name, part_dir / f"{name}.index.json"):
            if not candidate.is_file():
                continue
            if name.endswith(".bin") and not allow_pickle:
                _refuse_pickle(candidate)
            if candidate.name.endswith(".index.json"):
                shards = sorted(set(_read_json(candidate).get("weight_map", {}).values()))
                return [candidate, *(part_dir / shard for shard in shards)]
            return [candidate]
    raise ModelError(f"{part_dir} has no {names[0]}: is the diffusers folder complete?")


def _folder_files(folder: Path, weights: dict[str, list[Path]]) -> list[Path]:
    """Every file loading reads: each part's config.json and weights, all tokenizer files."""
    files = [folder / part / "config.json" for part in weights]
    files += [file for part_files in weights.values() for file in part_files]
    tokenizer_dir = folder / "tokenizer"
    if tokenizer_dir.is_dir():
        files += [file for file in tokenizer_dir.iterdir() if file.is_file()]
    return files


def _from_pretrained(cls: Any, folder: Path, part: str, weights: list[Path]) -> Any:
    """`from_pretrained` offline on the files already hashed, then a strict key check."""
    try:
        with _without_progress_bars():
            module, info = cls.from_pretrained(
                folder / part,
                local_files_only=True,
                use_safetensors=".safetensors" in weights[0].name,
                output_loading_info=True,
            )
    except (OSError, ValueError, RuntimeError) as err:
        reason = _first_line(err)
        raise ModelError(
            f"cannot load {folder / part} ({reason}): is the folder complete?"
        ) from None
    bad = sorted(
        f"{kind.removesuffix('_keys')} {key}"
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
        for key in info.get(kind) or ()
    )
    if bad:
        raise ModelError(
            f"{folder / part} does not match its config ({len(bad)} bad keys, e.g. {bad[0]}): "
            "re-download it"
        )
    return module


@contextlib.contextmanager
def _without_progress_bars() -> Iterator[None]:
    """Silence the libraries' own tqdm bars ("Loading weights: 0%|...") while a part loads:
    they draw into our rich output and cut its lines. The setting is global to each
    library, so whatever it was is restored afterwards."""
    libraries = (transformers.utils.logging, diffusers.utils.logging)
    enabled = [library.is_progress_bar_enabled() for library in libraries]
    for library in libraries:
        library.disable_progress_bar()
    try:
        yield
    finally:
        for library, was_enabled in zip(libraries, enabled, strict=True):
            if was_enabled:
                library.enable_progress_bar()


def _folder_tokenizer(folder: Path) -> CLIPTokenizer:
    """The folder's own tokenizer when it has one (it may carry added tokens), else ours."""
    tokenizer_dir = folder / "tokenizer"
    if not tokenizer_dir.is_dir():
        return clip_tokenizer()
    try:
        return CLIPTokenizer.from_pretrained(
            tokenizer_dir, local_files_only=True, model_max_length=MAX_LENGTH
        )
    except (OSError, ValueError) as err:
        reason = _first_line(err)
        raise ModelError(f"cannot load {tokenizer_dir} ({reason}): delete it to use ours") from None


# Built-ins and configs


def _seeded_parts(
    config_dir: Path, seed: int
) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """Build the parts with default initialisation from `seed`, leaving the caller's RNG alone."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _parts_from_configs(config_dir)


def _parts_from_configs(
    config_dir: Path,
) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    unet = UNet2DConditionModel.from_config(_read_json(config_dir / "unet" / "config.json"))
    vae = AutoencoderKL.from_config(_read_json(config_dir / "vae" / "config.json"))
    text_config = CLIPTextConfig.from_dict(_read_json(config_dir / "text_encoder" / "config.json"))
    return unet, vae, CLIPTextModel(text_config)


def _recipe_sha256(name: str, seed: int, config_dir: Path) -> str:
    """sha256 of canonical JSON naming everything that fixes a built-in's random weights.

    That is: the built-in's name, the seed, every shipped config file (parsed, keys
    sorted) and the torch, diffusers and transformers versions, whose initialisers draw
    the weights.
    """
    identity = {
        "builtin": name,
        "seed": seed,
        "configs": {
            file.relative_to(config_dir).as_posix(): _read_json(file)
            for file in sorted(config_dir.rglob("*.json"))
        },
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        },
    }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _first_line(err: BaseException) -> str:
    """Library errors can span many lines; a ModelError message is one."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(
            f"cannot read {path} ({_first_line(err)}): is the model folder complete?"
        ) from None
