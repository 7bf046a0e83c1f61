# Image for k8s/. The service runs against external Redis and Postgres there (URLs from a Secret);
# TLS material and the principals file are mounted read-only (docs/SECURITY.md). No secret is
# baked into the image. Build: docker build -t REGISTRY/inventory-svc:0.1.0 .
#
# The base is pinned to a patch release (both stages); where builds must be reproducible, pin its
# digest too: FROM python:3.11.11-slim-bookworm@sha256:<digest>.

# --- build: a wheel with the compiled protos; the source tree and build tools stay here ---------
FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --disable-pip-version-check --no-deps --wheel-dir /wheels .

# --- runtime --------------------------------------------------------------------------------------
FROM python:3.11.11-slim-bookworm
# NUMBA_CACHE_DIR: the routing kernels are compiled into this directory at build time (below).
# INVENTORY_HEALTH_PORT: the plaintext, health-only gRPC listener the HEALTHCHECK and the kubelet
# probes use (the main port may require TLS and client certificates, which probes cannot do).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NUMBA_CACHE_DIR=/opt/numba-cache \
    INVENTORY_HEALTH_PORT=50052
COPY --from=build /wheels /wheels
# with the optional `tracing` extra, so INVENTORY_TRACING=otlp works in the image (docs/OPERATIONS.md)
RUN pip install --no-cache-dir "$(ls /wheels/*.whl)[tracing]" \
    && rm -rf /wheels \
    && groupadd --system --gid 10001 inventory \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin inventory \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/inventory
# Compile the routing kernels into numba's cache now, so a pod loads them in about a second
# instead of compiling for about a minute (meanwhile it serves inventory calls, with the
# RoutingService NOT_SERVING). numba keys its cache by the directory of the source it compiled, so
# the cache must be built for the installed package the service imports: the warm-up runs from /,
# where no `routing` source tree is, and --require-installed fails the build otherwise
# (tests/test_routing_cache.py runs this same command against a non-editable install). The
# installed package stays root-owned and read-only to the service; only the cache directory
# belongs to it, because numba uses a cache directory only if it can write there. With a read-only
# root filesystem (k8s/deployment.yaml) an init container copies this directory into a writable
# emptyDir and NUMBA_CACHE_DIR points there (the cache's layout inside it is relative).
# numba keys the cache by CPU model too: nodes with another CPU than the build host compile anew
# at start (NUMBA_CPU_NAME=generic at build and run time trades a little speed for portability).
WORKDIR /
RUN python -m routing.warm --require-installed \
    && chown -R 10001:10001 /opt/numba-cache
# The embedded stores (no URLs given, e.g. `docker run` alone) keep their data under here.
WORKDIR /var/lib/inventory
USER 10001:10001
EXPOSE 50051 50052 9100
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os,sys,grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; c=grpc.insecure_channel('127.0.0.1:'+os.environ.get('INVENTORY_HEALTH_PORT','50052')); sys.exit(g.HealthStub(c).Check(h.HealthCheckRequest(), timeout=4).status != h.HealthCheckResponse.SERVING)"]
ENTRYPOINT ["inventory-svc"]
CMD ["serve"]
