# Trainer image: the project with its [train] extra on a CUDA PyTorch base. Its entrypoint, `phoenix run`,
# restores the newest checkpoint from the Hub, then resumes training under torchrun.
#
#   docker build -f docker/trainer.Dockerfile -t phoenix-trainer:cuda .
#
# Build context: the repository root; .dockerignore lets only pyproject.toml and the packages in.

# Any Debian/Ubuntu image with python3 >= 3.11 (tomllib reads pyproject.toml below) works. This default
# brings a CUDA torch matching the dev/CI torch (2.13.0). Blackwell GPUs (B200, RTX 50xx) need the
# pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime variant instead (host driver >= 580).
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime
FROM ${BASE_IMAGE}

# The runtime user. 1000:1000 is the first login user on most hosts, so a NANOCHAT_BASE_DIR they own is
# writable from inside; the /dev/nvidia* nodes that the NVIDIA runtime adds are mode 0666, so a non-root
# user keeps GPU access. Build with --build-arg PHOENIX_UID=$(id -u) to match another owner.
ARG PHOENIX_UID=1000
ARG PHOENIX_GID=1000
# Read only when the base has no torch (compose.cpu.yaml, scripts/docker_e2e.sh): PyPI's Linux torch is the
# multi-GB CUDA build, the CPU one comes from PyTorch's own index.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# A PyPI mirror (scripts/docker_e2e.sh serves a local one). Build args are visible in `docker history`:
# never put credentials in it.
ARG PIP_INDEX_URL

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/phoenix \
    PATH=/opt/phoenix/bin:$PATH \
    HOME=/home/phoenix

# --non-unique: some bases already have a UID 1000 (Ubuntu 24.04's "ubuntu"); sharing it is harmless.
RUN groupadd --non-unique --gid "${PHOENIX_GID}" phoenix \
 && useradd --non-unique --uid "${PHOENIX_UID}" --gid "${PHOENIX_GID}" --create-home \
      --home-dir /home/phoenix --shell /bin/bash phoenix

# A venv keeps pip off the distro's Python (PEP 668); --system-site-packages lets it see the base's torch.
RUN python3 -m venv --system-site-packages "${VIRTUAL_ENV}"

# Depends on nothing from the repository, so no code or dependency change ever reinstalls torch.
# DL3013: the pin is in TORCH_SPEC (torch==2.13.0), which hadolint cannot see through.
# hadolint ignore=DL3013
RUN python -c "import torch" 2>/dev/null \
 || pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

WORKDIR /opt/phoenix-src
# Dependencies are read from pyproject.toml alone, before any source is copied: a code change reuses
# this layer, and the base's torch already satisfies the [train] extra's torch requirement.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['train']))" > requirements.txt \
 && pip install --no-cache-dir -r requirements.txt

COPY trainer ./trainer
COPY entrypoint ./entrypoint
RUN pip install --no-cache-dir --no-deps .

USER ${PHOENIX_UID}:${PHOENIX_GID}
WORKDIR /home/phoenix
# `phoenix run` forwards SIGTERM to torchrun; the trainer then writes an emergency checkpoint and exits.
STOPSIGNAL SIGTERM
# Fresh heartbeat = healthy. The start period covers a restore from the Hub, tokenizer training and the
# first compiled steps of a d26 run; `unhealthy` is a signal for monitoring, Docker restarts nothing for it.
HEALTHCHECK --interval=60s --timeout=30s --start-period=30m --retries=3 CMD ["phoenix", "health"]
ENTRYPOINT ["phoenix", "run"]
