#!/usr/bin/env bash
# Set up everything pytest-isolate needs on a fresh Debian or Ubuntu machine, then run
# the example suite.  Safe to run again.  Needs root (or sudo) for packages and daemons.
#
# The machine itself is prepared by `pytest-isolate setup`, which ships in the package
# (users run it the same way: docs/ci/); this script only bootstraps Python and this
# repository's .venv around it, so every CI run of ours proves that command.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

echo "==> python3, venv, what building the [all] extra (libvirt-python) needs, and sshd"
# openssh-server: the remote-engine tests (tests/integration/test_docker_ssh.py) start
# an sshd of their own on 127.0.0.1 (its own config and keys, never the system service);
# docker-registry, apache2-utils (htpasswd -B): the pull tests (tests/integration/
# test_registry.py) start a registry of their own on 127.0.0.1 with htpasswd auth;
# musl-tools, busybox-static, make: the same tests build a musl-based image (a CPython
# built against musl from the host's Debian source, with busybox: musl_support.py)
need=""
for pkg in python3 python3-venv python3-dev ca-certificates procps gcc pkg-config libvirt-dev \
           openssh-server openssh-client docker-registry apache2-utils \
           musl-tools busybox-static make; do
  dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null | grep -q '^ii' || need="$need $pkg"
done
if [ -n "$need" ]; then
  $SUDO apt-get update -q
  # shellcheck disable=SC2086  # one word per package
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $need
fi
# installing docker-registry starts its system service (port 5000); the tests never use it
if command -v systemctl >/dev/null && systemctl is-active -q docker-registry 2>/dev/null; then
  $SUDO systemctl disable --now docker-registry
fi

echo "==> virtualenv (.venv, from the system's python3)"
if [ ! -x .venv/bin/python ]; then /usr/bin/python3 -m venv .venv; fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[dev,all]'

echo "==> an unprivileged user for the rootless tests"
if ! id pytest-isolate-user >/dev/null 2>&1; then
  $SUDO useradd --create-home --shell /bin/sh pytest-isolate-user
fi

echo "==> the machine: pytest-isolate setup (system packages, binfmt, docker, libvirt, subuids)"
$SUDO .venv/bin/pytest-isolate setup --pyproject pyproject.toml \
  --backends all --arches arm64,armhf --user pytest-isolate-user

if [ "${ISOLATE_SKIP_EXAMPLES:-0}" != 1 ]; then
  echo "==> example suite (skip with ISOLATE_SKIP_EXAMPLES=1)"
  (cd examples/demo && ../../.venv/bin/pytest --isolate-strict -p no:cacheprovider)
fi
