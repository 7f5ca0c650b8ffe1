"""Downloading a pinned base model: the only step of sd-meebs that uses the network.

`meebs/configs/models.lock.yaml` (shipped with the package) names each base model: the
Hugging Face repo, the revision, the file, its size and its sha256. `fetch_model("sd15",
Path("models"))` downloads that file with huggingface_hub (progress bar; it retries and
resumes a connection that breaks off), then checks size and sha256. A file that does not
match its pin is deleted, so what is left in the destination folder is always a verified
file; one that is already there and verified is not downloaded again (its hash comes from
`meebs.files.hash_cache`).

`HF_ENDPOINT` picks a mirror, read when `fetch_model` is called. The rest of sd-meebs runs
with `HF_HUB_OFFLINE=1` (see `meebs.models.quiet`); offline mode is lifted for this
one download only and restored afterwards.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from meebs.errors import ModelError
from meebs.files.hash_cache import cached_sha256
from meebs.files.text_files import load_yaml, read_text

PINS_FILE = Path(__file__).resolve().parents[1] / "configs" / "models.lock.yaml"
LOCAL_FILES_KEY = "local_files"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PIN_KEYS = ("repo", "revision", "file", "size", "sha256")


@dataclass(frozen=True)
class ModelPin:
    """One base model of models.lock.yaml."""

    name: str
    repo: str
    revision: str
    file: str
    size: int
    sha256: str


def read_pins(pins_file: Path = PINS_FILE) -> dict[str, ModelPin]:
    """Every base model pinned in `pins_file`, checked field by field."""
    data = _read_yaml(pins_file)
    return {
        name: _pin(pins_file, name, entry)
        for name, entry in data.items()
        if name != LOCAL_FILES_KEY
    }


def read_local_file_pins(pins_file: Path = PINS_FILE) -> dict[str, str]:
    """`local_files:`: repo-relative path -> sha256 of the configs shipped for offline loading."""
    section = _read_yaml(pins_file).get(LOCAL_FILES_KEY) or {}
    if not isinstance(section, dict) or not all(
        isinstance(key, str) and isinstance(value, str) and _SHA256.fullmatch(value)
        for key, value in section.items()
    ):
        raise ModelError(f"{pins_file}: {LOCAL_FILES_KEY} must map file paths to sha256 digests")
    return dict(section)


def fetch_model(
    name: str,
    dest_dir: Path,
    pins_file: Path = PINS_FILE,
    *,
    notify: Callable[[str], None] | None = None,
) -> Path:
    """Download the pinned base model `name` into `dest_dir` and verify it; return its path.

    Nothing is downloaded when `dest_dir` already holds the file with the pinned size and
    sha256. A file that does not match after downloading is deleted, with any partial
    download, and a `ModelError` says what was expected and what came. `notify` receives
    one-line progress notes (default: none).
    """
    pins = read_pins(pins_file)
    if name not in pins:
        known = ", ".join(sorted(pins)) or "none"
        raise ModelError(f"no base model {name!r} in {pins_file}: pinned are {known}")
    pin = pins[name]
    dest_dir = Path(dest_dir).expanduser()
    target = dest_dir / pin.file
    force = False
    if target.is_file():
        if _mismatch(target, pin) is None:
            return target
        force = True  # a stale or corrupt file at the pinned name: replace it
        if notify is not None:
            notify(f"{target} does not match the pin {name} in {pins_file}: downloading it again")
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ModelError(f"cannot create {dest_dir}: {err.strerror or err}") from None
    downloaded = _download(pin, dest_dir, force)
    problem = _mismatch(downloaded, pin)
    if problem is not None:
        _discard(dest_dir, pin)
        raise ModelError(
            f"the downloaded {pin.file} ({pin.repo}@{pin.revision}) has {problem}: deleted it. "
            f"Retry `fetch-model {name}`; if it fails again, the server does not serve the "
            f"pinned file (check HF_ENDPOINT and {pins_file.name})"
        )
    return downloaded


def _mismatch(path: Path, pin: ModelPin) -> str | None:
    """None when `path` is the pinned file, else what differs (expected vs got)."""
    size = path.stat().st_size
    if size != pin.size:
        return f"{size} bytes, expected {pin.size}"
    digest = cached_sha256(path)
    if digest != pin.sha256:
        return f"sha256 {digest}, expected {pin.sha256}"
    return None


def _download(pin: ModelPin, dest_dir: Path, force: bool) -> Path:
    from huggingface_hub import constants, hf_hub_download

    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    try:
        with _online(constants):
            result = hf_hub_download(
                pin.repo,
                pin.file,
                revision=pin.revision,
                local_dir=dest_dir,
                endpoint=endpoint,
                force_download=force,
            )
    except Exception as err:  # the hub client raises many types; each becomes one line
        _discard_partial(dest_dir, pin)
        raise ModelError(_explain(err, pin, endpoint)) from None
    return Path(result)


@contextlib.contextmanager
def _online(constants: Any) -> Iterator[None]:
    """Lift huggingface_hub's offline mode (HF_HUB_OFFLINE, read at import) for one call.

    huggingface_hub checks `constants.HF_HUB_OFFLINE` (via `is_offline_mode()`) before
    every request, so flipping the constant is enough, whatever the environment says.
    """
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _explain(err: BaseException, pin: ModelPin, endpoint: str) -> str:
    """One line for a failed download, naming the endpoint and what to check."""
    import httpx2
    from huggingface_hub.errors import (
        FileMetadataError,
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"{pin.repo}@{pin.revision}/{pin.file}"
    check = "check the network connection, or set HF_ENDPOINT to a reachable Hugging Face mirror"
    for cause in _chain(err):
        reason = _first_line(cause)
        if isinstance(cause, GatedRepoError):
            return f"{endpoint}: {pin.repo} is gated: accept its terms on the hub and log in"
        if isinstance(cause, RepositoryNotFoundError):
            return f"{endpoint} has no repo {pin.repo}: check the pin or HF_ENDPOINT"
        if isinstance(cause, RevisionNotFoundError):
            return f"{endpoint}: {pin.repo} has no revision {pin.revision}: check the pin"
        if isinstance(cause, RemoteEntryNotFoundError):
            return f"{endpoint} has no {what}: check the pin or HF_ENDPOINT"
        if isinstance(cause, HfHubHTTPError):
            status = cause.response.status_code if cause.response is not None else "?"
            return f"{endpoint} answered HTTP {status} for {what}: retry later, or {check}"
        if isinstance(cause, FileMetadataError):
            return (
                f"{endpoint} does not answer like a Hugging Face hub ({reason}): check HF_ENDPOINT"
            )
        if isinstance(cause, (httpx2.ConnectError, httpx2.ConnectTimeout, OfflineModeIsEnabled)):
            return f"cannot reach {endpoint} to download {what} ({reason}): {check}"
        if isinstance(cause, httpx2.HTTPError):
            return (
                f"the download of {what} from {endpoint} broke off ({reason}); nothing was "
                f"kept: retry, and if it keeps failing, {check}"
            )
    return (
        f"downloading {what} from {endpoint} failed ({_first_line(err)}); nothing was kept: "
        f"retry, and if it keeps failing, {check}"
    )


def _chain(err: BaseException) -> Iterator[BaseException]:
    """The exception and its causes, outermost first (each at most once)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _discard(dest_dir: Path, pin: ModelPin) -> None:
    """Delete a downloaded file that failed verification, its hub metadata and partials."""
    (dest_dir / pin.file).unlink(missing_ok=True)
    metadata = dest_dir / ".cache" / "huggingface" / "download" / f"{pin.file}.metadata"
    metadata.unlink(missing_ok=True)
    _discard_partial(dest_dir, pin)


def _discard_partial(dest_dir: Path, pin: ModelPin) -> None:
    """Delete any partial download huggingface_hub left for this file.

    huggingface_hub 2.x already removes its `{hash}.{etag}.{id}.incomplete` file when a
    download fails; this is a safety net, so it never fails itself.
    """
    with contextlib.suppress(Exception):
        from huggingface_hub._local_folder import get_local_download_paths

        paths = get_local_download_paths(local_dir=dest_dir, filename=pin.file)
        pattern = paths.incomplete_path("*")  # {hash of the file name}.*.incomplete
        for partial in pattern.parent.glob(pattern.name):
            partial.unlink(missing_ok=True)


def _pin(pins_file: Path, name: Any, entry: Any) -> ModelPin:
    where = f"{pins_file}: {name}"
    if not isinstance(name, str) or not isinstance(entry, dict):
        raise ModelError(f"{where}: expected a mapping with {', '.join(_PIN_KEYS)}")
    missing = [key for key in _PIN_KEYS if key not in entry]
    unknown = sorted(str(key) for key in entry if key not in _PIN_KEYS)
    if missing or unknown:
        raise ModelError(f"{where}: missing {missing or 'nothing'}, unknown {unknown or 'none'}")
    repo, revision, file = entry["repo"], entry["revision"], entry["file"]
    if not isinstance(repo, str) or repo.count("/") != 1:
        raise ModelError(f"{where}.repo: expected owner/name, got {repo!r}")
    if not isinstance(revision, str) or not revision:
        raise ModelError(f"{where}.revision: expected a commit hash or branch name")
    parts = PurePosixPath(file).parts if isinstance(file, str) else ()
    if not parts or PurePosixPath(file).is_absolute() or ".." in parts or "\\" in file:
        raise ModelError(f"{where}.file: expected a file name inside the repo, got {file!r}")
    size = entry["size"]
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ModelError(f"{where}.size: expected a positive number of bytes, got {size!r}")
    digest = entry["sha256"]
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise ModelError(f"{where}.sha256: expected 64 lowercase hex digits, got {digest!r}")
    return ModelPin(name, repo, revision, file, size, digest)


def _read_yaml(pins_file: Path) -> dict[Any, Any]:
    try:
        data = load_yaml(read_text(Path(pins_file), "pins file", ModelError))
    except yaml.YAMLError as err:
        raise ModelError(f"{pins_file} is not valid YAML ({_first_line(err)})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{pins_file}: expected a mapping of model names to pins")
    return data


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
