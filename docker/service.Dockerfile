# syntax=docker/dockerfile:1
# S3Diff inference service image (CUDA). Build from the repository root:
#   docker build -f docker/service.Dockerfile -t s3diff-serve:latest .
# Merged weights are not baked in: mount them at /weights (see docker-compose.yml).

# The nvidia/cuda "base" flavour carries the CUDA runtime (libcudart) and the NVIDIA container
# toolkit settings; the heavy libraries (cuBLAS, cuDNN) come with torch's CUDA wheel from PyPI,
# so the larger "runtime" flavour would only ship them twice.
ARG CUDA_BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

FROM ${CUDA_BASE_IMAGE} AS builder
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
# A venv, because Ubuntu's system Python refuses pip installs (PEP 668), and it copies cleanly.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# PyPI's Linux x86_64 torch wheel is the CUDA build; point TORCH_INDEX_URL at
# https://download.pytorch.org/whl/cpu for a small CPU-only image.
ARG TORCH_INDEX_URL=https://pypi.org/simple
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==2.13.0"
WORKDIR /src
COPY pyproject.toml README.md ./
# The versions the test suite was green with (torch is installed above, CUDA build).
COPY requirements/lock.txt ./requirements/lock.txt
COPY model ./model
COPY service ./service
COPY training ./training
COPY cli ./cli
COPY evaluation ./evaluation
RUN pip install -c requirements/lock.txt .

FROM ${CUDA_BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# gcc + Python headers: torch.compile's Triton kernels build a small C launcher at warm-up
# (the compiled fast path, S3DIFF_COMPILE=auto); without them the service runs eager.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 gcc libc6-dev python3-dev \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 s3diff \
    && mkdir -p /weights \
    && chown s3diff:s3diff /weights
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/weights/.cache/huggingface \
    S3DIFF_WEIGHTS=/weights/merged \
    S3DIFF_HOST=0.0.0.0 \
    S3DIFF_PORT=8000
USER 10001:10001
WORKDIR /home/s3diff
VOLUME ["/weights"]
EXPOSE 8000
# Ready only once the weights are loaded and warmed up; first start can take minutes.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('S3DIFF_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["s3diff"]
CMD ["serve"]
