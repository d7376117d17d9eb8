# hetero-moe server. Build: docker build -t hetero-moe .
# Run:   docker run --gpus all -p 127.0.0.1:8000:8000 -v /path/to/model:/model:ro hetero-moe
#        (add --rules NAME or --api-key KEY after the image name to change the defaults below)
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HETERO_MOE_CACHE=/cache \
    PYTHONUNBUFFERED=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY hetero_moe hetero_moe
COPY kernels kernels
COPY rules rules
COPY configs configs
# On Linux x86-64, torch from PyPI is a CUDA build.
RUN pip install --no-cache-dir .

VOLUME ["/model", "/cache"]
EXPOSE 8000
# Inside the container the server must listen on all interfaces for the port mapping to reach it;
# publish it on the host's loopback (-p 127.0.0.1:8000:8000) unless you mean to share it.
ENTRYPOINT ["hetero-moe", "serve", "--host", "0.0.0.0", "--port", "8000", "--model", "/model"]
CMD ["--rules", "deepseek-v3.yaml"]
