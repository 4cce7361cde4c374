# syntax=docker/dockerfile:1.7
# GPU worker image: the Python (3.11.7) and Debian (12) of CI, with exactly the packages CI tests
# (constraints-ci.txt). PyPI's torch wheel brings its own CUDA runtime, cuDNN and NCCL as pip
# packages, so no CUDA base image is needed: the host provides only the NVIDIA driver (new enough
# for the CUDA version of that torch build, see docs/service.md) through the container toolkit.
# Compose runs one container per GPU (services worker-gpu0, worker-gpu1, ...), each running one
# Celery process with concurrency 1.
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# NVIDIA_VISIBLE_DEVICES is deliberately unset: the GPUs a container sees come only from its
# compose device reservation (device_ids), never from an image-wide "all".

WORKDIR /app
# The lock that scripts/bootstrap installs CI with: torch and torchvision pinned together, plus the
# CUDA packages that torch build needs. A separate layer, so code changes do not reinstall torch.
COPY constraints-ci.txt ./
# hadolint ignore=DL3013
RUN pip install -c constraints-ci.txt torch torchvision

COPY pyproject.toml README.md ./
COPY must_core ./must_core
COPY api ./api
COPY worker ./worker
COPY migrations ./migrations
COPY alembic.ini ./
# hadolint ignore=DL3013
RUN pip install -c constraints-ci.txt '.[service]' \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin must \
    && mkdir -p /data /home/must/.cache && chown must:must /data /home/must/.cache

USER 10001:10001
# Downloaded base weights land under /home/must/.cache (open_clip uses ~/.cache/clip), which compose
# backs with the `model-weights` volume; the folder exists and is ours so the volume is writable.
ENV MUST_DATA_DIR=/data \
    MUST_WORKER__DEVICE=cuda \
    HOME=/home/must \
    XDG_CACHE_HOME=/home/must/.cache \
    HF_HOME=/home/must/.cache/huggingface \
    TORCH_HOME=/home/must/.cache/torch
# CUDA is initialised only in the task's child process (prefork), never in the parent.
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "celery -A worker.app inspect ping -d celery@$HOSTNAME --timeout 10 >/dev/null"]
CMD ["celery", "-A", "worker.app", "worker", "-Q", "gpu", "--pool=prefork", "--concurrency=1", \
     "--max-tasks-per-child=1", "-n", "celery@%h", "-l", "INFO"]
