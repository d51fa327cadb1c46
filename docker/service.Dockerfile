# S3Diff inference service image. Build from the repository root:
#   docker build -f docker/service.Dockerfile -t s3diff-serve:latest .
# With no weights it serves the built-in demo model; mount merged weights at /weights and set
# S3DIFF_WEIGHTS=/weights/merged for the real one (docker-compose.yml, profiles cpu and gpu).
# docs/deploy.md: the base image choice, a CPU-only build, and measured build times and sizes.

# The nvidia/cuda "base" flavour: Ubuntu plus the CUDA runtime and the NVIDIA_* variables the
# NVIDIA container toolkit reads to mount the driver. The heavy libraries (cuBLAS, cuDNN) come
# with torch's CUDA wheel, so the larger "runtime" flavour would only ship them twice.
# Any Debian/Ubuntu image with python3 works (BASE_IMAGE=debian:bookworm-slim for a CPU image).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

FROM ${BASE_IMAGE} AS builder
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
# A venv, because Ubuntu's system Python refuses pip installs (PEP 668), and it copies cleanly.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, pinned (the locks leave it out): PyPI's Linux x86_64 wheel is the CUDA build.
# Wheels dropped into docker/wheels/ win over the index (a local build of the same release, e.g.
# the CPU wheel: 2.13.0+cpu), and TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu gives a
# CPU-only image from the network.
ARG TORCH_INDEX_URL=https://pypi.org/simple
COPY docker/wheels/ /tmp/wheels/
RUN pip install --find-links /tmp/wheels --index-url "${TORCH_INDEX_URL}" "torch==2.13.0"
WORKDIR /src
# What serving needs and nothing else, at the versions of requirements/lock.txt, hashes checked
# (scripts/lock.sh writes both files). The project itself then goes in without resolving again:
# hash-checking mode cannot verify a source folder.
COPY requirements/serve.txt ./requirements/serve.txt
RUN pip install --require-hashes -r requirements/serve.txt
COPY pyproject.toml README.md ./
COPY model ./model
COPY service ./service
COPY training ./training
COPY cli ./cli
COPY evaluation ./evaluation
RUN pip install --no-deps .

FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# A C/C++ compiler and the Python headers: torch.compile builds its kernels at warm-up (Triton's
# launcher on CUDA, Inductor's C++ on the CPU); without them the service runs eager.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 g++ libc6-dev python3-dev \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/venv /opt/venv
# /weights and /cache/compile belong to the service user, so named volumes mounted there do too.
RUN useradd --create-home --uid 10001 s3diff \
    && mkdir -p /weights /cache/compile \
    && chown s3diff:s3diff /weights /cache/compile
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/weights/.cache/huggingface \
    S3DIFF_HOST=0.0.0.0 \
    S3DIFF_PORT=8000
USER 10001:10001
WORKDIR /home/s3diff
VOLUME ["/weights"]
EXPOSE 8000
# Ready only once the weights are loaded and warmed up; the first start of real weights takes minutes.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('S3DIFF_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["s3diff"]
CMD ["serve"]
