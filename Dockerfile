# Worker image for Dataflow (--sdk_container_image) and Flink (--environment_type DOCKER, or EXTERNAL with
# `docker run IMAGE --worker_pool`): Beam's Python SDK harness with this project installed. The base image's Python
# and Beam versions must be those of the machine that launches the job (here Python 3.11, Beam 2.77.0); its
# entrypoint (/opt/apache/beam/boot) is kept, it is what the runners start.
#
#   CPU: docker build -t IMAGE .
#   GPU: docker build --build-arg EXTRA_PIP='tensorflow[and-cuda]' -t IMAGE-gpu .
#        (TensorFlow with CUDA and cuDNN from pip; the NVIDIA driver comes from the worker VM: on Dataflow
#        `install-nvidia-driver` in --dataflow_service_options)
FROM apache/beam_python3.11_sdk:2.77.0

ARG EXTRA_PIP=""
WORKDIR /opt/gpt2-beam
COPY setup.py requirements.txt MANIFEST.in README.md ./
COPY lmgraph lmgraph
COPY pipeline pipeline
COPY transforms transforms
# Installed (not editable), no pip cache; Beam pinned to the base image's own version, so that resolving the
# project's requirements cannot replace the Beam the harness was built with.
RUN pip install --no-cache-dir . ${EXTRA_PIP} "apache-beam[gcp]==2.77.0" \
    && python -c "import lmgraph.loader, transforms.job, pipeline.run"
