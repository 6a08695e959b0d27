# Stoker in a container: `stoker up` with the REAPI endpoint on :1985, /healthz /readyz
# /statusz on :8080 and Prometheus /metrics on :9090.
#
#   docker build -t stoker .
#   docker run -d -p 1985:1985 -p 8080:8080 -p 9090:9090 -v stoker-data:/var/lib/stoker stoker
#
# BASE_IMAGE must be Debian bookworm or a derivative: the virtualenv built in the first stage
# runs on the second stage's /usr/bin/python3 (3.11). Behind a TLS-intercepting proxy, pass
# its CA bundle to pip with --build-arg PIP_CERT=PATH (a path that the build can read); for a
# package index of your own, --build-arg PIP_INDEX=URL (pip's default index otherwise).
#
# Stoker runs as root in the container, on purpose: actions then run under uids of their own
# (executor.yaml's action_uids, 60000-60999 by default; no two running actions share one)
# that can neither write through their hardlinked inputs into the cache nor reach the data
# directory.
# Run as one unprivileged user, Stoker would have to run actions as that same user, and any
# action could change a cached blob. Root here needs only CAP_SETUID, CAP_SETGID, CAP_CHOWN,
# CAP_FOWNER, CAP_DAC_OVERRIDE and CAP_KILL, all in Docker's default set: drop the rest (the
# manifests in deploy/ do).
ARG BASE_IMAGE=debian:bookworm-slim

# ---- build: the virtualenv with Stoker and its native core ------------------------------
FROM ${BASE_IMAGE} AS build
ARG PIP_CERT=
# Not PIP_INDEX_URL: pip would read that variable even when empty and take "" for the index.
ARG PIP_INDEX=
ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN apt-get update -q \
 && apt-get install -q -y --no-install-recommends \
        gcc libc6-dev libssl-dev libseccomp-dev python3-dev python3-venv \
 && rm -rf /var/lib/apt/lists/*

# Dependencies and build requirements first, from pyproject.toml alone, so that editing the
# sources does not download them again.
COPY pyproject.toml /src/
RUN python3 -m venv /opt/stoker \
 && python3 -c 'import tomllib; p = tomllib.load(open("/src/pyproject.toml", "rb")); \
print("\n".join(p["project"]["dependencies"] + p["build-system"]["requires"]))' \
        > /tmp/requirements.txt \
 && /opt/stoker/bin/pip install -q ${PIP_INDEX:+--index-url "$PIP_INDEX"} -r /tmp/requirements.txt

COPY setup.py /src/
COPY native /src/native
COPY engine /src/engine
# The core must compile here: refuse an image that would fall back to pure Python.
RUN cd /src \
 && /opt/stoker/bin/pip install -q ${PIP_INDEX:+--index-url "$PIP_INDEX"} --no-build-isolation . \
 && /opt/stoker/bin/pip uninstall -q -y cython \
 && /opt/stoker/bin/stoker version \
 && /opt/stoker/bin/stoker version | grep -qx 'digest implementation: native'

# ---- runtime ----------------------------------------------------------------------------
FROM ${BASE_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
# tini is PID 1: it forwards SIGTERM to Stoker and reaps the orphans that actions leave
# behind. bubblewrap: for isolation type `sandbox` (it needs user namespaces to work).
# slirp4netns: the network of actions that ask for one (actions_may_request_network), where
# the container may make network namespaces.
# Stoker's spawn helper (engine/_spawn) switches an action to its slot uid and gid. These need
# no passwd or group entry, and must not have one: an id in the range that belonged to a user
# with a shell or a home, or to a group, would give actions its files. The build fails if the
# base image has such an entry.
# /var/lib/stoker is 0711: action uids may pass through it to their exec roots, but neither
# list nor write it (this mode is what a fresh named volume copies from the image).
RUN apt-get update -q \
 && apt-get install -q -y --no-install-recommends \
        python3 libssl3 libseccomp2 ca-certificates tini bubblewrap slirp4netns \
 && rm -rf /var/lib/apt/lists/* \
 && ! { getent passwd; getent group; } \
        | awk -F: '$3 >= 60000 && $3 <= 60999 { print; found = 1 } END { exit !found }' \
 && install -d -m 0711 /var/lib/stoker \
 && install -d -m 0755 /etc/stoker

COPY --from=build /opt/stoker /opt/stoker
COPY deploy/executor.yaml /etc/stoker/executor.yaml
ENV PATH=/opt/stoker/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1

# No USER: Stoker runs as root (see the top of this file); actions never do.
WORKDIR /var/lib/stoker
VOLUME /var/lib/stoker
# REAPI, health, metrics.
EXPOSE 1985 8080 9090
# No curl in the image: Python asks. urlopen raises on any status but 2xx.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
# SIGTERM drains: running actions get executor.drain_grace (25 s) to finish.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "stoker"]
CMD ["up", "--config", "/etc/stoker/executor.yaml"]
