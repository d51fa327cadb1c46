# S3Diff training image: the same package as the service image plus the `train` extra.
# Build from the repository root:
#   docker build -f docker/train.Dockerfile -t s3diff-train:latest .
# /workspace mirrors the repository layout that training/configs/*.yaml expect (their relative
# paths resolve against the config's folder, so ../../ is /workspace): mount the base weights at
# /workspace/weights, datasets at /workspace/datasets, and get checkpoints in /workspace/runs.
#   docker run --gpus all -v ... s3diff-train:latest train --config training/configs/paper.yaml
# Several GPUs: --entrypoint accelerate ... launch -m s3diff_serve.cli.main train --config ...

# See service.Dockerfile for the base image, docker/wheels/ and TORCH_INDEX_URL.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

FROM ${BASE_IMAGE} AS builder
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
ARG TORCH_INDEX_URL=https://pypi.org/simple
COPY docker/wheels/ /tmp/wheels/
RUN pip install --find-links /tmp/wheels --index-url "${TORCH_INDEX_URL}" "torch==2.13.0"
WORKDIR /src
# Serving's locked set first (the same layer as the service image's, so a host that builds both
# builds it once), then what the `train` extra adds, hashes checked; then the project alone.
COPY requirements/serve.txt ./requirements/serve.txt
RUN pip install --require-hashes -r requirements/serve.txt
COPY requirements/train.txt ./requirements/train.txt
RUN pip install --require-hashes -r requirements/train.txt
COPY pyproject.toml README.md ./
COPY model ./model
COPY service ./service
COPY training ./training
COPY cli ./cli
COPY evaluation ./evaluation
RUN pip install --no-deps "./[train]"

FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 s3diff \
    && mkdir -p /workspace/weights /workspace/datasets /workspace/runs \
    && chown -R s3diff:s3diff /workspace
COPY --chown=10001:10001 training/configs /workspace/training/configs
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/workspace/weights/.cache/huggingface
USER 10001:10001
WORKDIR /workspace
VOLUME ["/workspace/weights", "/workspace/datasets", "/workspace/runs"]
ENTRYPOINT ["s3diff"]
CMD ["train", "--help"]
