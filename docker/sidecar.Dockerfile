# Sidecar image: the project without torch (base dependencies only); `phoenix sync` pushes complete
# checkpoints from the shared volume to the Hub.
#
#   docker build -f docker/sidecar.Dockerfile -t phoenix-sidecar:local .
#
# Build context: the repository root; .dockerignore lets only pyproject.toml and the packages in.

# Any Debian/Ubuntu image with python3 >= 3.11 works (tomllib reads pyproject.toml below).
ARG BASE_IMAGE=python:3.11.15-slim-bookworm
FROM ${BASE_IMAGE}

# Same user as the trainer image, so both can read and write the shared NANOCHAT_BASE_DIR.
ARG PHOENIX_UID=1000
ARG PHOENIX_GID=1000
# A PyPI mirror (scripts/docker_e2e.sh serves a local one). Build args are visible in `docker history`:
# never put credentials in it.
ARG PIP_INDEX_URL

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/phoenix \
    PATH=/opt/phoenix/bin:$PATH \
    HOME=/home/phoenix

RUN groupadd --non-unique --gid "${PHOENIX_GID}" phoenix \
 && useradd --non-unique --uid "${PHOENIX_UID}" --gid "${PHOENIX_GID}" --create-home \
      --home-dir /home/phoenix --shell /bin/bash phoenix

# A venv keeps pip off the distro's Python (PEP 668) on bases like Debian's own.
RUN python3 -m venv "${VIRTUAL_ENV}"

WORKDIR /opt/phoenix-src
# Dependencies are read from pyproject.toml alone, before any source is copied: a code change reuses
# this layer. No extras: the sidecar must stay torch-free.
COPY pyproject.toml ./
RUN python -c "import tomllib; \
print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
 && pip install --no-cache-dir -r requirements.txt

COPY trainer ./trainer
COPY entrypoint ./entrypoint
RUN pip install --no-cache-dir --no-deps .

USER ${PHOENIX_UID}:${PHOENIX_GID}
WORKDIR /home/phoenix
# `phoenix sync` answers SIGTERM with a final push before it exits.
STOPSIGNAL SIGTERM
CMD ["phoenix", "sync"]
