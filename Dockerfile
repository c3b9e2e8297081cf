# Worker image for Dataflow (--sdk_container_image) and Flink (--environment_type DOCKER, or EXTERNAL with
# `docker run IMAGE --worker_pool`): Beam's Python SDK harness with this project installed. The base image's Python
# and Beam are the lock's (requirements.lock), which the launching machine must also have (DEPLOY.md; the launcher
# refuses a remote job otherwise); `bash .ci/relock` rewrites both here. Its entrypoint (/opt/apache/beam/boot) is
# kept, it is what the runners start.
#
#   CPU: docker build -t IMAGE .
#   GPU: docker build --build-arg EXTRA_PIP='tensorflow[and-cuda]' -t IMAGE-gpu .
#        (TensorFlow with CUDA and cuDNN from pip; the NVIDIA driver comes from the worker VM: on Dataflow
#        `install-nvidia-driver` in --dataflow_service_options)
FROM apache/beam_python3.11_sdk:2.78.0

ARG EXTRA_PIP=""
WORKDIR /opt/gpt2-beam
# The locked versions first, a layer of their own that a source change does not rebuild; no pip cache. Beam is
# named here too, beside the base image's tag, so that the two visibly agree (tests/test_deploy.py checks both).
COPY requirements.lock ./
RUN pip install --no-cache-dir -r requirements.lock ${EXTRA_PIP} "apache-beam[gcp]==2.78.0"
COPY setup.py requirements.txt MANIFEST.in README.md ./
COPY lmgraph lmgraph
COPY pipeline pipeline
COPY transforms transforms
# The project itself, installed (not editable) without dependencies: the lock above is the whole of them.
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import lmgraph.loader, transforms.job, pipeline.run"
