# syntax=docker/dockerfile:1
# S3Diff training image: the same package as the service image plus the `train` extra.
# Build from the repository root:
#   docker build -f docker/train.Dockerfile -t s3diff-train:latest .
# Mount datasets at /data, base weights at /weights and write checkpoints to /runs.

# See service.Dockerfile for why the "base" CUDA flavour is enough beside torch's CUDA wheel.
ARG CUDA_BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

FROM ${CUDA_BASE_IMAGE} AS builder
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
ARG TORCH_INDEX_URL=https://pypi.org/simple
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==2.13.0"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY service ./service
COPY training ./training
COPY cli ./cli
RUN pip install "./[train]"

FROM ${CUDA_BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 s3diff \
    && mkdir -p /data /weights /runs \
    && chown s3diff:s3diff /data /weights /runs
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/weights/.cache/huggingface
USER 10001:10001
WORKDIR /runs
VOLUME ["/data", "/weights", "/runs"]
ENTRYPOINT ["s3diff"]
CMD ["--help"]
