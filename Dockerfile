# GPU image: the pinned stack (requirements.txt) plus flash-attn, drprune installed editable.
# docker build -t drprune . && docker run --gpus all -it drprune drprune --help
FROM nvidia/cuda:12.6.3-cudnn-devel-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.11 python3.11-dev python3.11-venv git build-essential ninja-build && \
    rm -rf /var/lib/apt/lists/* && \
    python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /workspace/drprune
COPY requirements.txt setup.py pyproject.toml README.md ./
COPY drprune/__init__.py drprune/__init__.py
RUN pip install --upgrade pip wheel packaging && pip install -r requirements.txt
# flash-attn compiles against the installed torch; MAX_JOBS bounds the build's memory.
RUN MAX_JOBS=8 pip install --no-build-isolation "flash-attn>=2.5"
COPY . .
RUN pip install --no-deps -e ".[gpu,dev]"
CMD ["drprune", "--help"]
