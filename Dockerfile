# syntax=docker/dockerfile:1
# valmi-sidecar container image.
#
#   docker build -t valmi-sidecar:0.1.0 .
#   docker run --read-only -v valmi-data:/var/lib/valmi-sidecar \
#     -e VALMI_API_KEY_FILE=/run/secrets/valmi-api-key ... valmi-sidecar:0.1.0
#
# The sidecar listens on 127.0.0.1:8787 by default: containers that share a network
# namespace (a Kubernetes pod, compose's network_mode: "service:...") reach it there.
# To serve other containers, set VALMI_SIDECAR_LISTEN=0.0.0.0:8787 and an ingest token
# (VALMI_SIDECAR_INGEST_TOKEN_FILE); the sidecar refuses a non-loopback address without one.
# The ops listener (GET /metrics, /healthz, /readyz only: no events, status or operator
# routes) is on 0.0.0.0:9787, for probes and scraping from outside the container; set
# VALMI_SIDECAR_OPS_LISTEN to move it, or to "" to turn it off.

# ---- build: the project's wheel, then a virtual environment holding it and its dependencies
# The base image by digest (the multi-platform index of python:3.11-slim-bookworm,
# Python 3.11.16, built 2026-08-25): a rebuild gets the same bytes. README, "Container
# image", says how to take the next one.
FROM python:3.11-slim-bookworm@sha256:0bee7276f83efd4a1ee05bbbf4281d95ed28e079220a9457f25a93e3f1e3c31b AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# Every file pip fetches is checked against a hash in requirements/ (`make lock` writes
# them from pyproject.toml): the build backend, then the dependencies, in a layer of their
# own that a change to the source does not rebuild. The runtime environment is made
# without pip, and the build stage's pip installs into it: nothing but the sidecar and its
# dependencies ends up there. Every dependency ships a binary wheel for CPython 3.11 on
# Linux, so no compiler is needed in either stage.
COPY requirements/build.txt requirements/image.txt ./requirements/
RUN pip install --no-cache-dir --require-hashes -r requirements/build.txt \
    && python -m venv --without-pip /opt/valmi-sidecar \
    && pip --python /opt/valmi-sidecar/bin/python install --no-cache-dir --require-hashes \
       -r requirements/image.txt

# The wheel is built by hatchling, the locked one (no build isolation: nothing unpinned is
# fetched); its dependencies are already installed.
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels . \
    && pip --python /opt/valmi-sidecar/bin/python install --no-cache-dir --no-deps \
       /wheels/valmi_sidecar-*.whl

# ---- runtime: a slim Python, the environment from the build stage, a fixed non-root user
FROM python:3.11-slim-bookworm@sha256:0bee7276f83efd4a1ee05bbbf4281d95ed28e079220a9457f25a93e3f1e3c31b AS runtime

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="valmi-sidecar" \
      org.opencontainers.image.description="Local buffering agent for the Valmi metering API: durable SQLite queue, forwarding with rate limits, backoff and stable idempotency keys" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="https://docs.valmi.io"

# A fixed UID/GID, so that volume ownership and Kubernetes' runAsUser can name it.
RUN groupadd --system --gid 10001 valmi \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin valmi \
    && install -d -m 0700 -o 10001 -g 10001 /var/lib/valmi-sidecar

COPY --from=build /opt/valmi-sidecar /opt/valmi-sidecar

# The sidecar writes nowhere but its data directory, so the root filesystem can be
# read-only: no bytecode files (PYTHONDONTWRITEBYTECODE), and SQLite's temporary files
# (SQLITE_TMPDIR) go to the data volume instead of /tmp. Logs are JSON lines on stderr.
ENV PATH="/opt/valmi-sidecar/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1 \
    VALMI_SIDECAR_DATA_DIR=/var/lib/valmi-sidecar \
    SQLITE_TMPDIR=/var/lib/valmi-sidecar \
    VALMI_SIDECAR_LOG_FORMAT=json \
    VALMI_SIDECAR_OPS_LISTEN=0.0.0.0:9787

VOLUME ["/var/lib/valmi-sidecar"]
WORKDIR /var/lib/valmi-sidecar
USER 10001:10001
EXPOSE 8787 9787

# Alive, not ready: a full queue must not get the container restarted (Swarm and autoheal
# restart unhealthy containers). The command asks the ops listener, else the local API, as
# the environment says (0.0.0.0 and :: on loopback), imports nothing of the service, and
# exits 1 with the reason on one line when the sidecar does not answer 200.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["valmi-sidecar", "healthcheck", "--live"]

# Exec form: the sidecar is PID 1 and gets SIGTERM itself; it stops intake, finishes
# requests in flight, flushes for final_flush_s (10 s) and exits 0, within Docker's and
# Kubernetes' default 30 s grace. It starts no child processes, so it needs no init.
STOPSIGNAL SIGTERM
ENTRYPOINT ["valmi-sidecar"]
CMD ["run"]
