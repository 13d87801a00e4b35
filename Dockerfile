# tcpproxy container image.
#
#   docker build -t tcpproxy .
#   docker run --read-only --cap-drop ALL -p 8008:8008 -p 127.0.0.1:9901:9901 \
#       -v "$PWD/config:/etc/tcpproxy:ro" tcpproxy
#
# The admin port is published on the host's loopback only. Its reload and rollout control
# endpoints need an admin token (they are off without one, as the admin server listens on
# every interface of the container): put one in a file and pass it, say
#       -v "$PWD/admin-token:/run/secrets/tcpproxy-admin-token:ro" \
#       -e TCPPROXY_ADMIN_TOKEN_FILE=/run/secrets/tcpproxy-admin-token
#
# The base is a build argument so the image can be rebuilt on any slim Python >= 3.11
# (for example a mirrored python:3.12-slim-bookworm, or a distro image with python3-venv).
# Both stages must use the same base: the virtualenv's interpreter is a symlink into it.
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python3 -m venv /opt/tcpproxy
# Dependencies get their own layer, keyed on pyproject.toml alone: editing the package's
# code reuses it instead of downloading every wheel again.
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && /opt/tcpproxy/bin/pip install --no-cache-dir -r /tmp/requirements.txt
COPY README.md ./
COPY tcpproxy/ tcpproxy/
# Not editable and no deps: only the package itself lands in this layer, pre-compiled, so a
# read-only root filesystem never needs to write __pycache__.
RUN /opt/tcpproxy/bin/pip install --no-cache-dir --no-deps . \
    && /opt/tcpproxy/bin/python -m compileall -q /opt/tcpproxy/lib

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="tcpproxy" \
      org.opencontainers.image.description="TCP proxy that shifts traffic between service versions by hot-reloaded weights" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/tcpproxy /opt/tcpproxy
# The admin server listens on all interfaces in a container so probes and Prometheus can
# reach it (publish it on 127.0.0.1 only, as above; in Kubernetes a NetworkPolicy keeps the
# cluster off it, see deploy/k8s/base); the route config lives in a directory (mount a ConfigMap or a host directory
# there, never a single file: the reloader watches the directory for atomic swaps).
ENV PATH=/opt/tcpproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TCPPROXY_CONFIG=/etc/tcpproxy/tcpproxy.yaml \
    TCPPROXY_ADMIN=0.0.0.0:9901
# Numeric, so Kubernetes can enforce runAsNonRoot without reading /etc/passwd.
USER 10001:10001
EXPOSE 8008 9901
STOPSIGNAL SIGTERM
# No curl in a slim image: ask /livez with the interpreter already there, on the admin port
# that TCPPROXY_ADMIN names.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('TCPPROXY_ADMIN', '0.0.0.0:9901').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/livez', timeout=2)"]
ENTRYPOINT ["tcpproxy"]
CMD ["run", "--config", "/etc/tcpproxy/tcpproxy.yaml"]
