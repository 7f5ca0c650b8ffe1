"""The container appliance, read as files: compose.yaml, Dockerfile, .dockerignore.

No Docker here: these tests only parse the files (PyYAML). ci/check_container.sh runs the
real tools (hadolint, `docker compose config`).
"""

import fnmatch
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "sd-meebs:local"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or not line:
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    return instructions


def instructions_named(name: str) -> list[str]:
    return [rest for keyword, rest in dockerfile_instructions() if keyword == name]


def mounts(service: dict) -> dict[str, tuple[str, str]]:
    """Container path -> (source, mode) from the short volume syntax."""
    result = {}
    for volume in service.get("volumes", []):
        parts = volume.split(":")
        source, target = parts[0], parts[1]
        mode = parts[2] if len(parts) > 2 else "rw"
        result[target] = (source, mode)
    return result


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


# ---- compose.yaml ------------------------------------------------------------------------


def test_compose_v2_file_without_version_key_and_profiles(compose, services):
    assert "version" not in compose
    assert set(services) == {"trainer", "tensorboard"}
    for name, service in services.items():
        assert "profiles" not in service, f"{name}: profiles would hide it from `run`"


def test_both_services_use_the_same_locally_built_image(services):
    assert services["trainer"]["image"] == IMAGE
    assert services["tensorboard"]["image"] == IMAGE
    build = services["trainer"]["build"]
    assert build["context"] == "."
    assert build.get("dockerfile", "Dockerfile") == "Dockerfile"
    assert build["args"] == {"UID": "${UID:-1000}", "GID": "${GID:-1000}"}


def test_services_run_as_the_build_users_uid_gid(services):
    for service in services.values():
        assert service["user"] == "${UID:-1000}:${GID:-1000}"


def test_trainer_reserves_every_nvidia_gpu(services):
    devices = services["trainer"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


def test_trainer_mounts_data_and_recipes_read_only_outputs_writable(services):
    trainer = mounts(services["trainer"])
    assert trainer["/app/data"] == ("./data", "ro")
    assert trainer["/app/recipes"] == ("./recipes", "ro")
    assert trainer["/app/outputs"] == ("./outputs", "rw")
    assert trainer["/app/models"] == ("models", "rw")
    assert trainer["/home/meebs/.cache"] == ("cache", "rw")


def test_named_volumes_are_declared(compose):
    assert set(compose["volumes"]) == {"models", "cache"}


def test_trainer_settings(services):
    trainer = services["trainer"]
    assert trainer["shm_size"] == "8gb"
    assert trainer["environment"]["HF_HUB_OFFLINE"] == "1"
    assert "ports" not in trainer


def test_tensorboard_serves_outputs_read_only_on_localhost_only(services):
    tensorboard = services["tensorboard"]
    assert tensorboard["command"] == ["tensorboard", "--host", "0.0.0.0", "--port", "6006"]
    assert tensorboard["ports"] == ["127.0.0.1:6006:6006"]
    assert mounts(tensorboard) == {"/app/outputs": ("./outputs", "ro")}
    assert tensorboard["restart"] == "unless-stopped"
    assert "deploy" not in tensorboard


def test_tensorboard_healthcheck_fetches_the_page_with_python(services):
    test = services["tensorboard"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    assert "urllib.request" in test[3]
    assert "http://127.0.0.1:6006/" in test[3]


# ---- Dockerfile --------------------------------------------------------------------------


def test_base_image_is_a_cuda_runtime_pinned_by_digest():
    (base,) = instructions_named("FROM")
    assert re.fullmatch(
        r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu2[24]\.04@sha256:[0-9a-f]{64}", base
    ), base


def test_uid_and_gid_are_build_args_and_the_last_user_is_not_root():
    args = dict(arg.split("=", 1) for arg in instructions_named("ARG") if "=" in arg)
    assert args["UID"] == "1000"
    assert args["GID"] == "1000"
    user = instructions_named("USER")[-1]
    resolved = user.replace("${UID}", args["UID"]).replace("${GID}", args["GID"])
    assert resolved.split(":")[0] not in {"root", "0"}, user


def test_entrypoint_runs_entrypoint_py_with_help_by_default():
    (entrypoint,) = instructions_named("ENTRYPOINT")
    assert json.loads(entrypoint) == ["python", "/app/entrypoint.py"]
    (cmd,) = instructions_named("CMD")
    assert json.loads(cmd) == ["--help"]
    assert instructions_named("WORKDIR")[-1] == "/app"


def test_dependencies_come_from_the_hashed_lock():
    pip = [run for run in instructions_named("RUN") if "pip install" in run]
    assert pip, "no pip install in the Dockerfile"
    for run in pip:
        assert "--require-hashes" in run
        assert "--no-deps" in run
        assert "-r requirements/cuda.lock" in run


def test_environment_is_offline_and_unbuffered():
    env = " ".join(instructions_named("ENV"))
    assert "HF_HUB_OFFLINE=1" in env
    assert "PYTHONUNBUFFERED=1" in env
    assert "HF_HOME=/home/meebs/.cache/" in env


def test_image_copies_only_code_lock_and_recipes():
    sources = set()
    for copy in instructions_named("COPY"):
        *srcs, _dest = copy.split()
        sources.update(s.rstrip("/") for s in srcs if not s.startswith("--"))
    assert sources == {"requirements/cuda.lock", "meebs", "entrypoint.py", "recipes"}


# ---- .dockerignore -----------------------------------------------------------------------


def test_dockerignore_excludes_data_outputs_and_venv():
    patterns = {p.strip("/") for p in dockerignore_patterns()}
    assert {"data", "outputs", ".venv", ".git"} <= patterns
    assert any(p.endswith("*.safetensors") for p in patterns)


def docker_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker matches it (moby's patternmatcher): from the
    context root, `*` within one path segment, `**` across any number of them; a pattern
    also excludes everything under a folder it matches."""
    parts = []
    for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/")):
        parts.append(
            {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
        )
    return re.compile("".join(parts) + "(?:/.*)?")


def dockerignored(path: str) -> bool:
    """Whether `path` stays out of the build context: the last matching pattern decides,
    and a `!pattern` brings a path back in."""
    ignored = False
    for pattern in dockerignore_patterns():
        negate = pattern.startswith("!")
        if docker_pattern(pattern.lstrip("!")).fullmatch(path):
            ignored = not negate
    return ignored


def test_dockerignore_matches_like_docker():
    assert dockerignored("data/x.png") and dockerignored("a/b/c.safetensors")
    assert dockerignored(".venv/bin/python") and not dockerignored("meebs/cli.py")
    assert not dockerignored("meebs/assets/tiny-trained/unet/diffusion_pytorch_model.safetensors")


def test_every_file_the_dockerfile_copies_is_in_the_build_context():
    """The files git tracks under each COPY source reach the image: e.g. the tiny-trained
    weights (safetensors, excluded everywhere else) and the model pins."""
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for copy in instructions_named("COPY"):
        for source in copy.split()[:-1]:
            inside = [f for f in tracked if f == source or f.startswith(source.rstrip("/") + "/")]
            assert inside, f"COPY {source}: nothing git tracks there"
            left_out = [f for f in inside if dockerignored(f)]
            assert not left_out, f"COPY {source}, but .dockerignore leaves out {left_out[:3]}"


def test_dockerignore_keeps_what_the_dockerfile_copies():
    patterns = [p.rstrip("/") for p in dockerignore_patterns() if not p.startswith("!")]
    for copy in instructions_named("COPY"):
        for source in copy.split()[:-1]:
            path = source.rstrip("/")
            parents = [str(parent) for parent in Path(path).parents if str(parent) != "."]
            for candidate in [path, *parents]:
                hits = [p for p in patterns if fnmatch.fnmatch(candidate, p)]
                assert not hits, f"{path} is excluded by {hits}"
