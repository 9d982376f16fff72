# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target proxy -t joulegate .                      slim: no torch
#   docker build --target model-server -t joulegate-model-server .  CUDA PyTorch base
ARG PYTHON_IMAGE=python:3.11-slim
ARG TORCH_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

FROM ${PYTHON_IMAGE} AS proxy
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY model_server ./model_server
# The proxy's own dependencies only (aiohttp, PyYAML, prometheus-client, nvidia-ml-py, uvloop).
RUN pip install --no-cache-dir '.[fast]' && rm -rf /root/.cache
# NVML comes from the host driver through the NVIDIA container toolkit.
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=utility JOULEGATE_DATA_DIR=/data
# The SQLite ledger (and budget state) lives here: mount a volume to keep it.
RUN mkdir -p /data && chown 65534:65534 /data
VOLUME /data
USER 65534:65534
EXPOSE 8080
ENTRYPOINT ["joulegate"]
CMD ["serve", "--listen", "0.0.0.0:8080", "--upstream", "http://model-server:8000", "--meter", "auto"]

FROM ${TORCH_IMAGE} AS model-server
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY model_server ./model_server
# torch comes with the base image; the extra adds transformers and diffusers.
RUN pip install --no-cache-dir '.[model-server]' && rm -rf /root/.cache
ENV HF_HOME=/models/hf
EXPOSE 8000
ENTRYPOINT ["joulegate-model-server"]
CMD ["--listen", "0.0.0.0:8000"]
