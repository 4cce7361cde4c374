# syntax=docker/dockerfile:1.7
# API image: slim Python 3.11, CPU-only torch (the API runs /classify on CPU unless given a GPU).
# Also used for the one-shot `migrate` service and the `cpu` profile worker.
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# torch/torchvision pinned together from the CPU wheel index so pip never pulls a CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu \
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
ENV MUST_DATA_DIR=/data
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=5 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]
CMD ["uvicorn", "api.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]
