# radio: endless MusicGen stations for Icecast.
#
#   docker build -t radio .                                  # the daemon (CPU)
#   docker build -t radio-icecast --target icecast .          # a matching icecast2
#   docker run --rm -e RADIO_SOURCE_PASSWORD=... -v hf-cache:/cache radio --icecast HOST:8000
#
# GPU: build FROM a CUDA runtime image instead, e.g.
#   docker build --build-arg BASE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 -t radio:cuda .
# and run with --gpus all. The torch wheel on PyPI for this pin includes CUDA support.
# For a smaller CPU-only image, point TORCH_INDEX_URL at PyTorch's CPU wheel index.

ARG BASE=python:3.11-slim-bookworm

FROM debian:bookworm-slim AS icecast
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends icecast2 \
    && rm -rf /var/lib/apt/lists/* && mkdir -p /var/log/icecast2 && chown icecast2 /var/log/icecast2
COPY icecast.xml /etc/icecast2/icecast.xml
# Passwords in icecast.xml are placeholders: mount your own icecast.xml over /etc/icecast2/icecast.xml.
# Listen on all interfaces of the container; run as icecast2 directly (no <changeowner> needed).
RUN sed -i -e 's|<bind-address>127.0.0.1</bind-address>|<bind-address>0.0.0.0</bind-address>|' \
        -e '/<changeowner>/,/<\/changeowner>/d' /etc/icecast2/icecast.xml
EXPOSE 8000
USER icecast2
CMD ["icecast2", "-c", "/etc/icecast2/icecast.xml"]

FROM ${BASE} AS radio
ARG TORCH_INDEX_URL=""
# g++: PyTorch's compiler builds the CPU decode step's layer (engine.compile), and PyTorch's extension builder
# radio's CPU kernels (engine.kernels), at load; both are cached in /cache.
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ffmpeg libshout-dev pkg-config gcc g++ python3-venv python3-dev icecast2 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    TORCH_EXTENSIONS_DIR=/cache/torch_extensions \
    PYTHONUNBUFFERED=1
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0
COPY pyproject.toml README.md icecast.xml ./
COPY radio ./radio
RUN pip install --no-cache-dir . && useradd --system --create-home radio && mkdir -p /cache && chown radio /cache
COPY stations /stations
VOLUME ["/cache"]
USER radio
# Refuse to start on invalid stations (exit 2) before loading any model.
ENTRYPOINT ["sh", "-c", "radio check /stations && exec radio run --stations /stations \"$@\"", "radio"]
# Default: the Icecast of the compose file; `--local-icecast` runs a private one inside the container instead.
CMD ["--icecast", "icecast:8000"]
