"""Fetching a pinned base model from a fake hub on 127.0.0.1, and the pins file itself.

The fake hub answers what huggingface_hub's `hf_hub_download(..., local_dir=...)` asks
(huggingface_hub 2.4, `file_download.py`): `HEAD /{repo}/resolve/{revision}/{file}` for the
metadata (`X-Repo-Commit`, `ETag`, `Content-Length`), then `GET` on the same URL,
with `Range: bytes=N-` when it resumes a download that broke off. Everything is local
and each test is bounded: hub timeouts are cut to 2 s and the backoff sleeps are removed.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from huggingface_hub import constants as hf_constants
from huggingface_hub import file_download as hf_file_download
from safetensors.torch import save_file

from meebs.cli import main
from meebs.errors import ModelError
from meebs.files import hash_cache
from meebs.models.fetch import PINS_FILE, fetch_model, read_local_file_pins, read_pins

REPO = Path(__file__).resolve().parent.parent
DEMO = str(REPO / "recipes" / "demo.yaml")
HUB_REPO = "meeb-org/meeb-base"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
FILENAME = "meeb-base.safetensors"
PAYLOAD = os.urandom(100_000)
# huggingface_hub hands on what it received in chunks of DOWNLOAD_CHUNK_SIZE (10 MB); the
# tests use 8 KiB, so a connection cut after CUT bytes resumes at exactly CUT.
CHUNK = 8192
CUT = 5 * CHUNK


@dataclass
class FakeHub:
    """What the hub serves and what it was asked. `mode` picks a failure to emulate:

    ok: the file; short: a complete response 1000 bytes shorter than the HEAD said;
    cut: the first GET stops after CUT bytes and closes the connection, and so does every
    resumed (Range) GET, before sending anything; cut_once: the first GET stops after CUT
    bytes, a resumed GET gets the rest.
    """

    url: str = ""
    content: bytes = PAYLOAD
    mode: str = "ok"
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    gets: int = 0

    def count(self, method: str) -> int:
        return sum(1 for request in self.requests if request[0] == method)


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _resolve(self) -> bool:
            self.close_connection = True
            hub.requests.append((self.command, self.path, self.headers.get("Range")))
            if self.path != f"/{HUB_REPO}/resolve/{COMMIT}/{FILENAME}":
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.send_header("Connection", "close")
                self.end_headers()
                return False
            return True

        def _headers(self, status: int, length: int, extra: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(hub.content).hexdigest()}"')
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.send_header("Connection", "close")
            for name, value in (extra or {}).items():
                self.send_header(name, value)
            self.end_headers()

        def do_HEAD(self) -> None:
            if self._resolve():
                self._headers(200, len(hub.content))

        def do_GET(self) -> None:
            if not self._resolve():
                return
            hub.gets += 1
            body = hub.content
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            start = int(match.group(1)) if match else 0
            if hub.mode == "short":
                body = body[:-1000]
                self._headers(200, len(body))
                self.wfile.write(body)
                return
            rest = body[start:]
            status = 206 if start else 200
            extra = {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"} if start else {}
            self._headers(status, len(rest), extra)
            if hub.mode == "cut" or (hub.mode == "cut_once" and hub.gets == 1):
                self.wfile.write(rest[:CUT] if hub.gets == 1 else b"")
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(rest)

    return Handler


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    """A fake hub on a free port of 127.0.0.1; huggingface_hub is pointed at it."""
    state = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    _point_hub_at(monkeypatch, tmp_path, state.url)
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _point_hub_at(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, url: str) -> None:
    """HF_ENDPOINT plus the values huggingface_hub caches at import; fast, offline-proof."""
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(hf_constants, "ENDPOINT", url)
    monkeypatch.setattr(
        hf_constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        url + "/{repo_id}/resolve/{revision}/{filename}",
    )
    # The rest of sd-meebs runs offline: fetch_model must lift it for its call only.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hf_constants, "HF_HUB_ETAG_TIMEOUT", 2)
    monkeypatch.setattr(hf_constants, "HF_HUB_DOWNLOAD_TIMEOUT", 2)
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)
    monkeypatch.setenv("HF_TOKEN", "")
    # No second, patient round of HEAD retries (1+2+4+8+8 s of backoff) ...
    monkeypatch.setattr(hf_file_download, "_DEFAULT_RETRY_ON_EXCEPTIONS", ())
    # ... and no 1 s pause before each resumed GET.
    monkeypatch.setattr(hf_file_download, "time", types.SimpleNamespace(sleep=lambda _: None))
    monkeypatch.setenv("MEEBS_CACHE_DIR", str(tmp_path / "meebs-cache"))


def _pins(tmp_path: Path, content: bytes = PAYLOAD) -> Path:
    pins = tmp_path / "models.lock.yaml"
    entry = {
        "repo": HUB_REPO,
        "revision": COMMIT,
        "file": FILENAME,
        "size": len(content),
        "sha256": hashlib.sha256(content).hexdigest(),
    }
    pins.write_text(yaml.safe_dump({"meeb": entry}))
    return pins


def _leftovers(dest: Path) -> list[str]:
    """Files in dest, and partial downloads anywhere in it; not huggingface_hub's small
    bookkeeping in dest/.cache/huggingface/ (locks, metadata, .gitignore)."""
    return sorted(
        file.relative_to(dest).as_posix()
        for file in dest.rglob("*")
        if file.is_file()
        and (file.suffix == ".incomplete" or file.relative_to(dest).parts[0] != ".cache")
    )


def test_fetch_verifies_and_does_not_download_twice(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "models"
    path = fetch_model("meeb", dest, _pins(tmp_path))
    assert path == dest / FILENAME
    assert path.read_bytes() == PAYLOAD
    assert hub.count("HEAD") == 1 and hub.gets == 1
    assert hf_constants.HF_HUB_OFFLINE is True  # restored after the call

    hashed: list[Path] = []
    monkeypatch.setattr(hash_cache, "hash_file", lambda file: hashed.append(file) or "x")
    before = len(hub.requests)
    assert fetch_model("meeb", dest, _pins(tmp_path)) == path
    assert len(hub.requests) == before, "a verified file was requested again"
    assert hashed == [], "a verified, unchanged file was hashed again"


def test_cli_fetch_model_prints_path_and_sha256(
    hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "models"
    argv = ["fetch-model", "meeb", "--dest", str(dest), "--pins", str(_pins(tmp_path))]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert str(dest / FILENAME) in out
    assert f"sha256 {hashlib.sha256(PAYLOAD).hexdigest()}" in out
    assert main([argv[0], "nope", *argv[2:]]) == 2
    assert "no base model 'nope'" in capsys.readouterr().err


def test_wrong_hash_deletes_the_file(hub: FakeHub, tmp_path: Path) -> None:
    dest = tmp_path / "models"
    pins = _pins(tmp_path, content=bytes(len(PAYLOAD)))  # same size, other bytes
    expected = hashlib.sha256(bytes(len(PAYLOAD))).hexdigest()
    got = hashlib.sha256(PAYLOAD).hexdigest()
    with pytest.raises(ModelError, match=f"sha256 {got}, expected {expected}.*deleted.*Retry"):
        fetch_model("meeb", dest, pins)
    assert _leftovers(dest) == []
    # A file that was left at the pinned name (by hand, another tool) is not trusted either.
    (dest / FILENAME).write_bytes(PAYLOAD)
    with pytest.raises(ModelError, match="deleted"):
        fetch_model("meeb", dest, pins)
    assert _leftovers(dest) == [] and hub.gets == 2


@pytest.mark.parametrize("mode", ["short", "cut"])
def test_truncated_download_leaves_nothing(hub: FakeHub, tmp_path: Path, mode: str) -> None:
    hub.mode = mode
    dest = tmp_path / "models"
    started = time.monotonic()
    with pytest.raises(ModelError) as caught:
        fetch_model("meeb", dest, _pins(tmp_path))
    message = str(caught.value)
    assert hub.url in message and "nothing was kept" in message and "\n" not in message
    assert not (dest / FILENAME).exists()
    assert _leftovers(dest) == []
    if mode == "cut":  # it tried to resume where the data stopped, then gave up
        assert any(rng == f"bytes={CUT}-" for _, _, rng in hub.requests)
    assert time.monotonic() - started < 10


def test_broken_connection_is_resumed(hub: FakeHub, tmp_path: Path) -> None:
    hub.mode = "cut_once"
    path = fetch_model("meeb", tmp_path / "models", _pins(tmp_path))
    assert path.read_bytes() == PAYLOAD
    assert [rng for method, _, rng in hub.requests if method == "GET"] == [
        None,
        f"bytes={CUT}-",
    ]


def test_unreachable_server_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    _point_hub_at(monkeypatch, tmp_path, url)
    started = time.monotonic()
    with pytest.raises(ModelError) as caught:
        fetch_model("meeb", tmp_path / "models", _pins(tmp_path))
    message = str(caught.value)
    assert message.startswith(f"cannot reach {url} ")
    assert "HF_ENDPOINT" in message and "network" in message and "\n" not in message
    assert time.monotonic() - started < 10
    assert not (tmp_path / "models" / FILENAME).exists()


def test_training_refuses_a_base_model_that_is_not_its_pin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("MEEBS_CACHE_DIR", str(tmp_path / "meebs-cache"))
    import torch

    file = tmp_path / "base.safetensors"
    save_file({"weight": torch.zeros(4)}, file)
    out = tmp_path / "outputs"
    argv = ["train", DEMO, "model.builtin=null", f"model.path={file}", f"output.dir={out}"]
    # "0" * 64 reads as the YAML number 0: refused as a recipe type error (status 2).
    # "ab" * 32 is a well-formed pin that does not match: refused by the pin check.
    for pin in ("0" * 64, "ab" * 32):
        assert main([*argv, f"model.sha256={pin}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
        assert "model.sha256" in err or "the recipe pins" in err
    assert f"has sha256 {hashlib.sha256(file.read_bytes()).hexdigest()}" in err
    assert "the recipe pins " + "ab" * 32 in err
    assert not out.exists(), "a run folder was created before the pin was checked"


# The pins file of the repo


def test_repo_pins_are_well_formed() -> None:
    sd15 = read_pins(PINS_FILE)["sd15"]
    assert sd15.repo == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert sd15.file == "v1-5-pruned-emaonly.safetensors" and sd15.size == 4265146304
    assert sd15.sha256 == "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa"
    assert re.fullmatch(r"[0-9a-f]{40}|main", sd15.revision)


def test_shipped_offline_files_match_their_pins() -> None:
    pinned = read_local_file_pins(PINS_FILE)
    shipped = sorted(
        file.relative_to(REPO).as_posix()
        for file in [
            *(REPO / "meebs" / "configs" / "sd15").rglob("*"),
            REPO / "meebs" / "assets" / "bpe_simple_vocab_16e6.txt.gz",
        ]
        if file.is_file()
    )
    assert sorted(pinned) == shipped, "list every shipped SD 1.5 config in models.lock.yaml"
    for relative, digest in pinned.items():
        actual = hashlib.sha256((REPO / relative).read_bytes()).hexdigest()
        assert actual == digest, f"{relative} changed: update its sha256 in models.lock.yaml"


@pytest.mark.parametrize(
    ("entry", "complaint"),
    [
        ({"size": -1}, "size"),
        ({"sha256": "abc"}, "sha256"),
        ({"file": "../escape.safetensors"}, "file"),
        ({"repo": "no-owner"}, "repo"),
        ({"extra": 1}, "unknown"),
    ],
)
def test_bad_pins_are_named(tmp_path: Path, entry: dict[str, object], complaint: str) -> None:
    pins = _pins(tmp_path)
    data = yaml.safe_load(pins.read_text())
    data["meeb"].update(entry)
    pins.write_text(yaml.safe_dump(data))
    with pytest.raises(ModelError, match=complaint):
        fetch_model("meeb", tmp_path / "models", pins)
