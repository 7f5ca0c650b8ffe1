# sd-meebs: the CUDA training appliance.
#
#   docker compose build                      (or: make image)
#   docker compose run --rm trainer plan recipes/demo.yaml
#
# The image holds the CUDA runtime, Python 3.11, the locked Python dependencies and the
# meebs package. It holds no data, no base models, no outputs and no secrets: data/,
# recipes/ and outputs/ are bind-mounted, models/ and the cache are named volumes (see
# compose.yaml).
#
# Base image tag: nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04 (CUDA 12.8, cuDNN 9).
# The digest below was copied from public sources (several independent public GitHub
# Dockerfiles and scripts pin this tag to it; one of them notes it is the linux/amd64
# manifest) and was NOT verified here: the machine that wrote this file cannot pull
# images. Check it once on a machine with Docker before relying on it:
#   docker buildx imagetools inspect nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
# and replace it with the digest you pulled and tested if they differ.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04@sha256:59e0e4376a0f16d10b03d3a14344b80a866a1674cb4948cb318291387ac05010

ENV DEBIAN_FRONTEND=noninteractive

# Python 3.11 from Ubuntu 22.04's own archive (universe: python3.11 3.11.0-1~22.04.x),
# not the deadsnakes PPA: no third-party apt source or signing key in the build. It is an
# early 3.11 patch release; the project needs >=3.11 (pyproject.toml), and the CUDA lock
# (requirements/cuda.lock) is resolved for CPython 3.11 on x86_64 Linux.
#
# DL3008 (pin apt versions) is disabled on purpose: the base image is pinned by digest, the
# Python dependencies are pinned by hash in requirements/cuda.lock, and Ubuntu removes
# superseded package versions from its archive, so an apt pin would break the build at the
# next security update without making it more reproducible.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates \
        python3.11 \
        python3.11-venv \
    && rm -rf /var/lib/apt/lists/*

# The virtualenv is root-owned: the runtime user cannot change the installed packages.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN python3.11 -m venv /opt/venv

WORKDIR /app

# Every dependency (torch with CUDA, xformers, bitsandbytes, ...) comes from the hashed
# lock: --require-hashes refuses any file whose sha256 is not in it, --no-deps refuses
# anything the lock does not list.
COPY requirements/cuda.lock requirements/cuda.lock
RUN pip install --no-cache-dir --require-hashes --no-deps -r requirements/cuda.lock

# Non-root runtime user. UID and GID are build arguments so that files written to the
# bind-mounted outputs/ belong to the host user who runs compose:
#   docker compose build --build-arg UID="$(id -u)" --build-arg GID="$(id -g)"
# (compose.yaml passes UID/GID from the environment, default 1000 for both).
# Note: this RUN uses the default /bin/sh (dash) on purpose: bash ignores an inherited UID
# variable (its own $UID is read-only and would expand to 0 here).
ARG UID=1000
ARG GID=1000
RUN if [ "${UID}" = 0 ] || [ "${GID}" = 0 ]; then echo "UID/GID 0 would run as root" >&2; exit 1; fi \
    && groupadd --gid "${GID}" --non-unique meebs \
    && useradd --uid "${UID}" --gid "${GID}" --non-unique --create-home --shell /bin/bash meebs \
    && mkdir -p /app/data /app/outputs /app/models /home/meebs/.cache/huggingface \
    && chown meebs:meebs /app/outputs /app/models /home/meebs/.cache /home/meebs/.cache/huggingface

# Only the code: data and outputs come as volumes. Root-owned, read-only for the user.
COPY meebs/ meebs/
COPY entrypoint.py entrypoint.py
COPY recipes/ recipes/
RUN python -m compileall -q meebs entrypoint.py

# Offline at run time: base models come from the models volume (fetch-model), never from
# the Hub during training. HF_HOME lives in the cache volume, next to the latent cache.
ENV HF_HUB_OFFLINE=1 \
    HF_HOME=/home/meebs/.cache/huggingface

# Numeric, so that a runtime (Kubernetes runAsNonRoot, rootless Docker) can tell it is
# not root without reading /etc/passwd; it is the meebs user created above.
USER ${UID}:${GID}

ENTRYPOINT ["python", "/app/entrypoint.py"]
CMD ["--help"]
