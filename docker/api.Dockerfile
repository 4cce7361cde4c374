# syntax=docker/dockerfile:1.7
# API image: the Python (3.11.7) and Debian (12) of CI, with exactly the packages CI tests
# (constraints-ci.txt). Also used for the one-shot `migrate` service and the `cpu` profile worker.
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# The lock that scripts/bootstrap installs CI with: the same torch build CI tests (PyPI's, which
# carries CUDA libraries and runs on CPU too), pinned together with torchvision. A separate layer,
# so code changes do not reinstall torch.
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
    HOME=/home/must \
    XDG_CACHE_HOME=/home/must/.cache \
    HF_HOME=/home/must/.cache/huggingface \
    TORCH_HOME=/home/must/.cache/torch
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=5 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]
CMD ["uvicorn", "api.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000", "--http", "api.server:TimedH11Protocol"]
