"""The TensorBoard sidecar against a real demo run: its HTTP API, then (with chromium) a
screenshot of the page.

The sidecar is started exactly as `python entrypoint.py tensorboard` starts it (the same
`sidecar_command`), only as a subprocess on a free 127.0.0.1 port, and always stopped.
Set MEEBS_TENSORBOARD_SCREENSHOTS=/some/folder to keep tensorboard_{scalars,images}.png.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from meebs import cli
from meebs.recipe.loading import load_recipe
from meebs.training.train import train
from meebs.use import tensorboard as tb

pytestmark = pytest.mark.slow  # trains, or starts processes: `make test-fast` skips it

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "recipes" / "demo.yaml"
# 1 epoch: 6 images x 10 repeats + as many reg partners = 120 samples, at batch 4: 30 steps.
STEPS = 30
START_TIMEOUT_S = 90  # generous: CI machines have 2 cores, often busy with other tests
STOP_TIMEOUT_S = 10
CHROMIUM_TIMEOUT_S = 120
SCALAR_TAGS = {"loss/step", "loss/average", "loss/epoch", "lr/unet", "lr/text_encoder"}
IMAGE_TAGS = {"samples/00", "samples/01"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(base: str, path: str, **query: str) -> bytes:
    url = base + path + ("?" + urllib.parse.urlencode(query) if query else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def get_json(base: str, path: str, **query: str):
    return json.loads(get(base, path, **query))


@pytest.fixture(scope="module")
def demo_logs(tmp_path_factory) -> Path:
    """outputs/ of one short demo run: 30 steps, one sample per prompt."""
    out = tmp_path_factory.mktemp("outputs")
    recipe = load_recipe(
        DEMO,
        [
            "model.builtin=tiny",  # the random base: these tests need no learning
            "train.epochs=1",
            "train.batch_size=4",
            "sample.steps=2",
            f"output.dir={out}",
        ],
    )
    result = train(recipe, Console(quiet=True))
    assert result.steps == STEPS
    return out


@pytest.fixture(scope="module")
def sidecar(demo_logs, tmp_path_factory) -> Iterator[tuple[str, str]]:
    """(base URL, run name) of a TensorBoard serving demo_logs; stopped afterwards."""
    port = free_port()
    log = tmp_path_factory.mktemp("sidecar") / "tensorboard.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            tb.sidecar_command(demo_logs, "127.0.0.1", port),
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        run = wait_for_run(process, base, log)
        yield base, run
    finally:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)


def wait_for_run(process: subprocess.Popen, base: str, log: Path) -> str:
    """Poll until TensorBoard answers and has loaded the whole run (bounded)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    last = "no answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"tensorboard exited with {process.returncode}:\n{log.read_text()}")
        try:
            runs = get_json(base, "/data/runs")
            tags = get_json(base, "/data/plugin/scalars/tags")
            images = get_json(base, "/data/plugin/images/tags")
            # The sample images are the last events of the run: once they are there,
            # everything written before them has been loaded too.
            if len(runs) == 1 and set(images.get(runs[0], {})) >= IMAGE_TAGS:
                return runs[0]
            last = f"runs {runs}, scalar tags {tags}, image tags {images}"
        except (OSError, ValueError) as exc:  # not listening yet / still starting
            last = repr(exc)
        time.sleep(0.5)
    pytest.fail(f"tensorboard not ready after {START_TIMEOUT_S} s ({last}):\n{log.read_text()}")


def test_cli_execs_the_sidecar_command(monkeypatch):
    """`entrypoint.py tensorboard`: 127.0.0.1:6006 on outputs/ unless told; never --bind_all."""
    calls = []
    monkeypatch.setattr(tb.os, "execv", lambda path, argv: calls.append(argv))
    assert cli.main(["tensorboard"]) == 0
    assert cli.main(["tensorboard", "--host", "0.0.0.0", "--port", "6006"]) == 0
    local, container = calls
    assert local == tb.sidecar_command("outputs", "127.0.0.1", 6006)
    assert container == tb.sidecar_command("outputs", "0.0.0.0", 6006)
    assert [a for a, b in zip(local, container, strict=True) if a != b] == ["127.0.0.1"]
    assert local[1:3] == ["-m", "tensorboard.main"]
    assert "--bind_all" not in local and "--reload_interval" in local


def test_http_api_lists_the_run_its_scalars_and_samples(demo_logs, sidecar):
    base, run = sidecar
    run_dirs = [p.parent.parent for p in demo_logs.glob("meebs_demo/*/logs/events.out.tfevents.*")]
    assert len(run_dirs) == 1
    assert run == f"meebs_demo/{run_dirs[0].name}/logs"
    assert get_json(base, "/data/runs") == [run]

    scalar_tags = set(get_json(base, "/data/plugin/scalars/tags")[run])
    assert scalar_tags >= SCALAR_TAGS
    loss = get_json(base, "/data/plugin/scalars/scalars", run=run, tag="loss/step")
    assert [step for _, step, _ in loss] == list(range(1, STEPS + 1))
    assert all(value > 0 for _, _, value in loss)
    epochs = get_json(base, "/data/plugin/scalars/scalars", run=run, tag="loss/epoch")
    assert len(epochs) == 1

    image_tags = get_json(base, "/data/plugin/images/tags")[run]
    assert set(image_tags) >= IMAGE_TAGS
    assert image_tags["samples/00"]["samples"] == 1
    images = get_json(base, "/data/plugin/images/images", run=run, tag="samples/00", sample="0")
    assert [image["step"] for image in images] == [30]  # at the global step, like the scalars
    png = get(base, "/data/plugin/images/individualImage?" + images[0]["query"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert png_size(png) == (64, 64)


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def headless(browser: str, profile: Path, size: tuple[int, int], *args: str) -> str:
    """Run headless chromium on a page (bounded); its stdout."""
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={size[0]},{size[1]}",
        "--virtual-time-budget=15000",
        *args,
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S, check=False
    )
    assert done.returncode == 0, f"{command}: exit {done.returncode}\n{done.stderr[-3000:]}"
    return done.stdout


# forceSVG: TensorBoard draws the time-series charts as SVG instead of WebGL in a worker,
# so every chart is drawn when the screenshot is taken (with WebGL some stay empty) and
# the drawn lines can be counted in the DOM.
PAGES = {"scalars": "?forceSVG=true#timeseries", "images": "#images"}


@pytest.mark.parametrize(
    ("page", "size"),
    [("scalars", (1280, 1600)), ("images", (1280, 900))],  # scalars: the loss and lr cards
)
def test_screenshot(sidecar, tmp_path, page, size):
    """The time-series page (loss and lr charts) and the images page (samples) render."""
    browser = chromium()
    if browser is None and os.environ.get("MEEBS_REQUIRE_CHROMIUM"):  # CI installs it
        pytest.fail("chromium not installed, and MEEBS_REQUIRE_CHROMIUM is set")
    if browser is None:
        pytest.skip("chromium not installed: screenshot part skipped; the HTTP part ran")
    base, _ = sidecar
    url = f"{base}/{PAGES[page]}"
    shot = tmp_path / f"tensorboard_{page}.png"
    headless(browser, tmp_path / "profile", size, f"--screenshot={shot}", url)
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and png_size(data) == size
    # A blank or error page compresses to a few kB; charts, text and images do not.
    assert len(data) > 30_000, (url, len(data))
    keep = os.environ.get("MEEBS_TENSORBOARD_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, Path(keep) / shot.name)

    if page == "scalars":  # (the images page is Polymer: its shadow DOM is not dumped)
        dom = headless(browser, tmp_path / "profile", size, "--dump-dom", url)
        charts = dom.split('class="container line-chart"')[1:]
        assert len(charts) == len(SCALAR_TAGS)
        # Every series with more than one point is a drawn path "M x,y L x,y ...".
        curves = [chart for chart in charts if re.search(r'<path d="M[^"]*L', chart)]
        assert len(curves) >= len(SCALAR_TAGS) - 1  # (loss/epoch has a single point)
