# Cerebral-artery segmentation container: Grand Challenge and SHINY-ICARUS conventions
# (process.py states the contract). Build and check it as challenge participants do:
#   test/run_local_test.sh                   (builds, runs on test/sample, compares)
#   docker run --rm --gpus all --network none -v IN:/input:ro -v OUT:/output vessel-seg
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VESSEL_SEG_CACHE=/tmp/vessel-seg-cache

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /opt/app

# The base image's CUDA torch stays: a constraint pins it while pip installs the other pinned
# requirements (requirements.txt's torch line is the CPU build the test suite runs on).
COPY requirements.txt /tmp/requirements.txt
RUN python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" \
        > /tmp/constraints.txt \
    && grep -v '^torch==' /tmp/requirements.txt > /tmp/requirements-image.txt \
    && pip install --no-cache-dir -c /tmp/constraints.txt -r /tmp/requirements-image.txt \
    && python -c "import cc3d, openvino, safetensors, SimpleITK, torch, tqdm" \
    && rm /tmp/requirements.txt /tmp/requirements-image.txt /tmp/constraints.txt

# A non-root user with a numeric id (challenge platforms run containers without root).
RUN groupadd --gid 1001 segmenter \
    && useradd --create-home --shell /usr/sbin/nologin --uid 1001 --gid 1001 segmenter

# The application (test/run_local_test.sh copies exactly these COPY lines when Docker is absent).
COPY model/ model/
COPY inference/ inference/
COPY postprocess/ postprocess/
COPY weights/ weights/
COPY process.py process.py

# Convert the shipped folds to OpenVINO models now, so a CPU run starts without conversions.
RUN python -m inference.openvino_backend weights --if-present \
    && python -m compileall -q model inference postprocess process.py

USER 1001:1001
ENTRYPOINT ["python", "process.py"]
