# syntax=docker/dockerfile:1.7
# GPU worker image: CUDA runtime base + Python 3.11 + CUDA torch. One container per GPU
# (`docker compose up --scale worker=N`), each running one Celery process with concurrency 1.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ARG DEBIAN_FRONTEND=noninteractive
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Ubuntu 22.04 ships Python 3.10; the project needs 3.11 (deadsnakes). The PPA publishes only its
# latest builds, so apt versions cannot be pinned here; the CUDA base tag is pinned instead.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
# CUDA 12.8 wheels of torch/torchvision, pinned together.
RUN pip install --index-url https://download.pytorch.org/whl/cu128 \
        torch==2.9.1 torchvision==0.24.1

COPY pyproject.toml README.md ./
COPY must_core ./must_core
COPY api ./api
COPY worker ./worker
COPY migrations ./migrations
COPY alembic.ini ./
# hadolint ignore=DL3013
RUN pip install '.[service]' \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin must \
    && mkdir -p /data && chown must:must /data

USER 10001:10001
ENV MUST_DATA_DIR=/data \
    MUST_WORKER__DEVICE=cuda
# CUDA is initialised only in the task's child process (prefork), never in the parent.
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "celery -A worker.app inspect ping -d celery@$HOSTNAME --timeout 10 >/dev/null"]
CMD ["celery", "-A", "worker.app", "worker", "-Q", "gpu", "--pool=prefork", "--concurrency=1", \
     "--max-tasks-per-child=1", "-n", "celery@%h", "-l", "INFO"]
