"""manifest.json: everything needed to rerun a run, and to explain why a rerun differs.

A run writes its manifest when it starts (status `running`) and again when it stops
(`finished`, `interrupted`, or `failed` with the reason in `failure`). It holds the
resolved recipe, the data (every file's sha256 and caption), the base model's hash, the
code and package versions, the hardware, the determinism settings, and the sha256 of
every network file written. Times live here and only here: the network files themselves
carry no clock.

Paths in the data manifest are relative to the data folders (`train/10_meeb/x.png`),
so two clones of the project in different places describe the same data the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import time
import typing
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch

from meebs import __version__
from meebs.data.folders import DatasetScan
from meebs.errors import MeebsError, quoted
from meebs.files.atomic_write import write_text_atomic
from meebs.files.hash_cache import cached_sha256
from meebs.files.text_files import JsonLimitError, load_json, read_text
from meebs.recipe.schema import Recipe

FORMAT = 1
MANIFEST_NAME = "manifest.json"
KIND = "sd-meebs run manifest"
# The image's digest is only known outside the container: the Makefile passes it in.
IMAGE_DIGEST_ENV = "MEEBS_IMAGE_DIGEST"
# Fields a rerun is expected to change; everything else is compared.
VOLATILE = ("started_at", "finished_at", "duration_s", "perf", "segments", "run_id", "status")


# --------------------------------------------------------------------------- inputs


def data_manifest(scan: DatasetScan, image_sha256: dict[Path, str]) -> dict[str, Any]:
    """Each image as `{train|reg}/{folder}/{file}` with its sha256, caption and repeats."""
    files = [
        {
            "path": f"{'reg' if subset.is_reg else 'train'}/{subset.folder.name}/{image.path.name}",
            "sha256": image_sha256[image.path],
            "caption": image.caption,
            "repeats": subset.repeats,
        }
        for subset in scan.train + scan.reg
        for image in subset.images
    ]
    # validation images are inputs too: held out of a training folder, or validation.folder's
    train_folders = {subset.folder for subset in scan.train}
    files += [
        {
            "path": f"{'train' if image.path.parent in train_folders else 'val'}/"
            f"{image.subset}/{image.path.name}",
            "sha256": image_sha256.get(image.path) or cached_sha256(image.path),
            "caption": image.caption,
            "repeats": 0,
            "validation": True,
        }
        for image in scan.held_out
    ]
    canonical = json.dumps(files, sort_keys=True, separators=(",", ":"))
    return {"files": files, "sha256": hashlib.sha256(canonical.encode()).hexdigest()}


def code_version() -> dict[str, Any]:
    """The package version, and the git commit with a dirty flag when run from a checkout."""
    root = Path(__file__).resolve().parents[2]
    version: dict[str, Any] = {"package": __version__, "git_commit": None, "git_dirty": None}
    if not (root / ".git").exists():
        return version
    try:
        commit = _git(root, "rev-parse", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no", "--", "meebs")
    except (OSError, subprocess.CalledProcessError):
        return version
    version.update(git_commit=commit, git_dirty=bool(dirty))
    return version


def _git(root: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=10
    )
    return result.stdout.strip()


def packages() -> dict[str, str]:
    """Every installed distribution and its version, sorted by name."""
    found = {}
    for dist in importlib_metadata.distributions():
        name = dist.metadata.get("Name")
        if name:  # PEP 503 names: lycoris_lora and lycoris-lora are one package
            found[re.sub(r"[-_.]+", "-", name).lower()] = dist.version
    return dict(sorted(found.items()))


def hardware(device: torch.device) -> dict[str, Any]:
    """The machine facts that change the bits: CPU model and instruction set, threads,
    and on a GPU its name and the CUDA/cuDNN/driver versions."""
    cpu = _cpu_info()
    facts: dict[str, Any] = {
        "machine": platform.machine(),
        "cpu_vendor": cpu.get("vendor_id", ""),
        "cpu_model": cpu.get("model name", platform.processor()),
        "cpu_family_model": f"{cpu.get('cpu family', '?')}.{cpu.get('model', '?')}",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": device.type,
        "gpu": None,
        "cuda": None,
        "cudnn": None,
        "driver": None,
    }
    if device.type == "cuda":
        facts.update(
            gpu=torch.cuda.get_device_name(device),
            cuda=torch.version.cuda,
            cudnn=str(torch.backends.cudnn.version()),
            driver=_nvidia_driver(),
        )
    return facts


def _cpu_info() -> dict[str, str]:
    """The first processor's fields from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info = {}
    for line in text.split("\n\n")[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def hardware_class(facts: dict[str, Any]) -> str:
    """What "a machine of the same kind" means: same processor (GPU, or CPU model and
    instruction set) and the same thread count. Runs on machines of one class are
    expected to match bit for bit; across classes small differences are normal."""
    if facts["device"] == "cuda":
        parts = ["cuda", facts["gpu"], f"cu{facts['cuda']}"]
    else:
        parts = [
            facts["machine"],
            facts["cpu_model"],
            f"f{facts['cpu_family_model'].replace('.', 'm')}",
            facts["cpu_capability"],
            f"{facts['threads']}t",
        ]
    return re.sub(r"[^a-z0-9._]+", "-", "-".join(str(p) for p in parts).lower()).strip("-")


def environment() -> dict[str, Any]:
    return {
        "code": code_version(),
        "image_digest": os.environ.get(IMAGE_DIGEST_ENV) or None,
        "python": platform.python_version(),
        "packages": packages(),
    }


# --------------------------------------------------------------------------- reading


def manifest_path(run: Path) -> Path:
    """A run folder's manifest, or the file itself when given a manifest/results file."""
    return run / MANIFEST_NAME if run.is_dir() else run


def read_manifest(run: Path) -> dict[str, Any]:
    """Load and check a manifest; every way it can be unusable is one line."""
    path = manifest_path(run)
    if not run.exists():
        raise MeebsError(f"{run}: no such run folder or manifest file")
    if run.is_dir() and not path.is_file():
        raise MeebsError(
            f"{run}: not a run (no {MANIFEST_NAME}); give a folder under outputs/<name>/"
        )
    try:
        data = load_json(read_text(path, "run manifest"))
    except json.JSONDecodeError as exc:
        raise MeebsError(
            f"{path}: not valid JSON at line {exc.lineno} (truncated or edited?); "
            "restore it from git or rerun the recipe"
        ) from None
    except JsonLimitError as exc:
        raise MeebsError(f"{path}: not a manifest sd-meebs wrote ({exc})") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise MeebsError(f"{path}: not an sd-meebs run manifest")
    version = data.get("format")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise MeebsError(f"{path}: manifest format {quoted(version)} is not one sd-meebs writes")
    if version > FORMAT:
        raise MeebsError(
            f"{path}: manifest format {version} is newer than this sd-meebs reads "
            f"({FORMAT}); update sd-meebs"
        )
    missing = [key for key in REQUIRED if key not in data]
    if missing:
        raise MeebsError(f"{path}: incomplete manifest, missing {', '.join(missing)}")
    _check_fields(path, data)
    return data


REQUIRED = (
    "recipe",
    "recipe_sha256",
    "data",
    "base_model",
    "code",
    "python",
    "packages",
    "hardware",
    "hardware_class",
    "determinism",
    "outputs",
    "status",
)


STATUSES = ("running", "finished", "interrupted", "failed")
# What `reproduce`, `compare`, `record` and `train --resume` read, by the JSON type it must
# have (a trailing "?": it may be absent): a manifest edited by hand fails here, in one
# line, not as a KeyError or TypeError wherever a field is first used.
_OBJECTS = "recipe recipe_source? data base_model hardware determinism packages code outputs"
_STRINGS = "status hardware_class python data.sha256 base_model.sha256 run_id?"
FIELDS = {
    dict: _OBJECTS,
    str: _STRINGS,
    list: "data.files recipe_source.overrides?",
    int: "hardware.threads steps?",
}
_TYPE_NAMES = {dict: "an object", str: "a string", list: "a list", int: "an integer"}
# hardware_class() writes these characters only, and `record` makes it a file name.
_HARDWARE_CLASS = re.compile(r"[a-z0-9][a-z0-9._-]{0,199}")
_DATA_FILE = {"path": str, "sha256": str, "caption": str, "repeats": int}
_ABSENT = object()


def _check_fields(path: Path, data: dict[str, Any]) -> None:
    """The types in FIELDS, the status, and the names that become file paths."""

    def fail(key: str, wanted: str, value: Any) -> typing.NoReturn:
        raise MeebsError(
            f"{path}: {key} must be {wanted}, not {quoted(value, 60)}; "
            "restore the manifest from git or rerun the recipe"
        )

    for kind, keys in FIELDS.items():
        for spec in keys.split():
            value = _field(data, spec.rstrip("?"))
            absent_ok = value is _ABSENT and spec.endswith("?")
            if not absent_ok and (not isinstance(value, kind) or isinstance(value, bool)):
                fail(spec.rstrip("?"), _TYPE_NAMES[kind], value)
    source = data.get("recipe_source", {})
    if not isinstance(source.get("file"), (str, type(None))):
        fail("recipe_source.file", "a file name or null", source["file"])
    if not all(isinstance(item, str) for item in source.get("overrides", [])):
        fail("recipe_source.overrides", "a list of section.key=value", source["overrides"])
    if data["status"] not in STATUSES:
        fail("status", f"one of {', '.join(STATUSES)}", data["status"])
    if not _HARDWARE_CLASS.fullmatch(data["hardware_class"]):
        fail("hardware_class", "a class such as x86_64-amd-2t", data["hardware_class"])
    for item in data["data"]["files"]:
        fields = [item.get(key) for key in _DATA_FILE] if isinstance(item, dict) else [None]
        if not all(type(v) is t for v, t in zip(fields, _DATA_FILE.values(), strict=False)):
            fail("data.files", "a list of {path, sha256, caption, repeats}", item)
    for name, sha in data["outputs"].items():
        if Path(name).name != name or name in ("", ".", "..") or not isinstance(sha, str):
            fail("outputs", "file names with their sha256", {name: sha})


def _field(data: dict[str, Any], key: str) -> Any:
    value: Any = data
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _ABSENT
        value = value[part]
    return value


def recipe_name(manifest: dict[str, Any]) -> str:
    """The recipe's short name (`demo`, `1.3`): its file's stem, else the output name."""
    source = manifest.get("recipe_source", {}).get("file")
    name = Path(source).stem if source else _field(manifest, "recipe.output.name")
    usable = isinstance(name, str) and name.isprintable() and Path(name).name == name
    if not usable or name in ("", ".", "..") or len(str(name).encode()) > 200:  # folder name
        raise MeebsError(
            "run manifest: neither recipe_source.file nor recipe.output.name gives a name "
            "to file the result under; restore the manifest from git"
        )
    return name


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class RecipeOrigin:
    """Which file and command-line overrides a recipe was resolved from, so `reproduce`
    can tell whether that file still says the same thing."""

    file: str | None = None
    overrides: tuple[str, ...] = ()


def new_manifest(
    *,
    run_id: str,
    command: str,
    recipe: Recipe,
    origin: RecipeOrigin | None,
    data: dict[str, Any],
    base_model: dict[str, Any],
    device: torch.device,
    determinism: dict[str, Any],
    planned_steps: int,
) -> dict[str, Any]:
    """The manifest of a run that is about to start (status `running`)."""
    origin = origin or RecipeOrigin()
    facts = hardware(device)
    return {
        "kind": KIND,
        "format": FORMAT,
        "run_id": run_id,
        "status": "running",
        "command": command,
        "recipe": recipe.to_dict(),
        "recipe_sha256": recipe.sha256(),
        "recipe_source": {"file": origin.file, "overrides": list(origin.overrides)},
        "data": data,
        "base_model": base_model,
        **environment(),
        "hardware": facts,
        "hardware_class": hardware_class(facts),
        "determinism": determinism,
        "planned_steps": planned_steps,
        "steps": 0,
        "epoch_losses": [],
        "outputs": {},
        "samples": {},
        "started_at": utc_now(),
        "finished_at": None,
        "duration_s": 0.0,
        "segments": [],
    }


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    write_text_atomic(
        run_dir / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    )
