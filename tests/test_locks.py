"""The hashed lock files in requirements/: complete, consistent with the .in files, and a
CUDA torch that the pinned xformers was really built for. Reads files only (no network)."""

import re
from pathlib import Path

import pytest

REQ = Path(__file__).resolve().parent.parent / "requirements"
LOCK_SH = REQ.parent / "ci" / "lock.sh"
LOCKS = ("cpu", "dev", "cuda")

# The torch build and CUDA version each xformers wheel (PyPI, manylinux_2_28_x86_64) was
# compiled for, read from xformers/cpp_lib.json inside the wheel. Its METADATA is not enough:
# 0.0.35 says only "torch>=2.10". ci/lock.sh re-reads the pinned wheel on every `make lock`.
XFORMERS_BUILT_FOR = {
    "0.0.34": ("2.10.0", "12.8"),
    "0.0.35": ("2.10.0", "12.8"),
}
CUDA_PACKAGE = re.compile(r"^(nvidia-.*|triton|cuda-.*)$")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def logical_lines(path: Path) -> list[str]:
    """Lines with continuations joined, comments and blank lines dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = (re.sub(r"(^|\s)#.*", "", line).strip() for line in text.splitlines())
    return [line for line in lines if line]


def lock(name: str) -> dict[str, tuple[str, list[str]]]:
    """{normalized name: (version, [sha256, ...])}."""
    out = {}
    for line in logical_lines(REQ / f"{name}.lock"):
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)\s", line + " ")
        assert m, f"{name}.lock: not an exact pin: {line[:80]}"
        out[norm(m[1])] = (m[2], re.findall(r"--hash=sha256:([0-9a-f]{64})\b", line))
    return out


def in_pins(name: str) -> dict[str, str]:
    """Top-level pins of an .in file, following -r includes."""
    pins = {}
    for line in logical_lines(REQ / f"{name}.in"):
        if line.startswith("-r "):
            pins.update(in_pins(line.split()[1].removesuffix(".in")))
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        assert m, f"{name}.in: not an exact pin: {line}"
        pins[norm(m[1])] = m[2]
    return pins


@pytest.mark.parametrize("name", LOCKS)
def test_every_requirement_is_pinned_and_hashed(name):
    lines = logical_lines(REQ / f"{name}.lock")
    assert len(lines) > 20
    for line in lines:
        assert not line.startswith("-"), f"{name}.lock: option line {line!r}"
        assert re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*==\S+ ", line), line[:80]
        assert re.search(r"--hash=sha256:[0-9a-f]{64}\b", line), f"{name}.lock: no hash: {line}"
        assert ";" not in line.split("--hash")[0], f"{name}.lock: environment marker: {line}"


@pytest.mark.parametrize("name", LOCKS)
def test_in_pins_appear_in_the_lock(name):
    locked = lock(name)
    for package, version in in_pins(name).items():
        assert package in locked, f"{name}.lock lacks {package}"
        assert locked[package][0] == version, f"{name}.lock: {package} {locked[package][0]}"


@pytest.mark.parametrize("name", LOCKS)
def test_header_names_tool_command_index_and_cutoff(name):
    script = LOCK_SH.read_text()
    uv = re.search(r"^UV_VERSION=(\S+)$", script, re.M)[1]
    cutoff = re.search(r"^EXCLUDE_NEWER=(\S+)$", script, re.M)[1]
    header = (REQ / f"{name}.lock").read_text().split("\n\n")[0]
    assert f"uv {uv}" in header
    assert f"uv pip compile requirements/{name}.in " in header
    assert "--generate-hashes" in header
    assert "--index-url https://pypi.org/simple" in header
    assert f"--exclude-newer {cutoff}" in header


def test_cpu_lock_has_the_cpu_torch_and_no_cuda_packages():
    for name in ("cpu", "dev"):
        locked = lock(name)
        assert locked["torch"][0] == "2.13.0+cpu"
        assert len(locked["torch"][1]) == 1, "exactly the one CPU wheel"
        assert not [p for p in locked if CUDA_PACKAGE.match(p)], f"{name}.lock"
        for dep in ("filelock", "typing-extensions", "sympy", "networkx", "jinja2", "fsspec"):
            assert dep in locked, f"{name}.lock lacks torch's dependency {dep}"
    assert "https://download.pytorch.org/whl/cpu" in (REQ / "cpu.lock").read_text()


def test_dev_lock_is_cpu_lock_plus_test_tools():
    cpu, dev = lock("cpu"), lock("dev")
    for package, pin in cpu.items():
        assert dev.get(package) == pin, package
    assert {"pytest", "ruff"} <= set(dev) - set(cpu)


def test_cuda_lock_torch_matches_the_xformers_build():
    cuda = lock("cuda")
    assert "xformers" in cuda
    assert "bitsandbytes" in cuda
    xformers = cuda["xformers"][0]
    assert xformers in XFORMERS_BUILT_FOR, f"xformers {xformers}: add its cpp_lib.json build"
    torch_built, cuda_built = XFORMERS_BUILT_FOR[xformers]
    assert cuda["torch"][0] == torch_built == "2.10.0"
    # PyPI's torch is the CUDA build: its CUDA runtime is the one xformers was built with.
    assert cuda["nvidia-cuda-runtime-cu12"][0].startswith(cuda_built + ".")
    # cuda.in records the same build next to the xformers pin.
    cuda_in = (REQ / "cuda.in").read_text().splitlines()
    line = next(ln for ln in cuda_in if ln.startswith("xformers=="))
    assert f"built for torch {torch_built}+cu{cuda_built.replace('.', '')}" in line


def test_cpu_and_cuda_share_every_runtime_pin_but_torch():
    cpu, cuda = in_pins("cpu"), in_pins("cuda")
    assert cpu.pop("torch") == "2.13.0+cpu"
    assert cuda.pop("torch") == "2.10.0"
    assert cuda.pop("xformers")
    assert cpu == cuda
    shared = set(lock("cpu")) & set(lock("cuda")) - {"torch"}
    assert {p: lock("cpu")[p][0] for p in shared} == {p: lock("cuda")[p][0] for p in shared}
