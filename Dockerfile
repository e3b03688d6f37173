# Cerebral-artery segmentation container: Grand Challenge and SHINY-ICARUS conventions
# (process.py states the contract). Build and check it as challenge participants do:
#   test/run_local_test.sh                   (builds, runs on test/sample, compares)
#   docker run --rm --gpus all --network none -v IN:/input:ro -v OUT:/output vessel-seg
# torch comes from requirements.txt, the same pin the test suite runs: PyPI's Linux torch wheel
# carries its CUDA and cuDNN libraries, and `--gpus all` brings the driver, so the base needs
# no CUDA of its own and the shipped and tested torch are the same version.
FROM python:3.11-slim-bookworm AS runtime

# VESSEL_SEG_CACHE: OpenVINO models converted at run time (e.g. for weights in /opt/ml/model);
# an empty /tmp is fine, and an unwritable one only means converting in memory each run.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VESSEL_SEG_CACHE=/tmp/vessel-seg-cache

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /opt/app

COPY requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt \
    && python -c "import cc3d, openvino, safetensors, SimpleITK, torch, tqdm" \
    && rm /tmp/requirements.txt

# int8 models of the folds, calibrated on phantoms by NNCF (python -m train.int8): this stage
# holds the calibration code and nncf; only the models it writes reach the image.
FROM runtime AS int8
COPY requirements-int8.txt /tmp/requirements-int8.txt
RUN pip install --no-cache-dir -r /tmp/requirements-int8.txt
COPY model/ model/
COPY inference/ inference/
COPY phantoms/ phantoms/
COPY metrics/ metrics/
COPY train/ train/
COPY weights/ weights/
RUN python -m train.int8 weights --output /opt/int8 --if-present

FROM runtime
# A non-root user with a numeric id (challenge platforms run containers without root).
RUN groupadd --gid 1001 segmenter \
    && useradd --create-home --shell /usr/sbin/nologin --uid 1001 --gid 1001 segmenter

# The application (test/run_local_test.sh copies exactly these COPY lines when Docker is absent;
# the int8 models it makes as the int8 stage does).
COPY model/ model/
COPY inference/ inference/
COPY postprocess/ postprocess/
COPY weights/ weights/
COPY process.py process.py
COPY --from=int8 /opt/int8/ weights/openvino/

# Convert the shipped folds to OpenVINO models now, so a CPU run starts without conversions.
RUN python -m inference.openvino_backend weights --if-present \
    && python -m compileall -q model inference postprocess process.py

USER 1001:1001
ENTRYPOINT ["python", "process.py"]
