#!/usr/bin/env bash
# Set up everything pytest-isolate needs on a fresh Debian or Ubuntu machine, then run
# the example suite.  Safe to run again.  Needs root (or sudo) for packages and daemons.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

echo "==> system packages"
$SUDO apt-get update -q
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
  python3 python3-venv python3-dev ca-certificates procps util-linux \
  mmdebstrap debootstrap arch-test uidmap qemu-user-static binfmt-support \
  schroot lxc docker.io \
  qemu-system-x86 qemu-system-arm qemu-utils ipxe-qemu seabios \
  libvirt-daemon-system libvirt-clients libvirt-dev pkg-config \
  busybox-static cpio e2fsprogs

echo "==> services (binfmt, docker, libvirt)"
$SUDO scripts/services.sh

echo "==> an unprivileged user for the rootless tests"
if ! id pytest-isolate-user >/dev/null 2>&1; then
  $SUDO useradd --create-home --shell /bin/sh pytest-isolate-user
fi
if ! grep -q '^pytest-isolate-user:' /etc/subuid; then
  $SUDO usermod --add-subuids 200000-265535 --add-subgids 200000-265535 pytest-isolate-user
fi

echo "==> virtualenv (.venv, from the system's python3)"
if [ ! -x .venv/bin/python ]; then /usr/bin/python3 -m venv .venv; fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[dev,docker,libvirt]'

if [ "${ISOLATE_SKIP_EXAMPLES:-0}" != 1 ]; then
  echo "==> example suite (skip with ISOLATE_SKIP_EXAMPLES=1)"
  (cd examples/demo && ../../.venv/bin/pytest --isolate-strict -p no:cacheprovider)
fi
