#!/usr/bin/env bash
# Start what the backends need: binfmt for foreign architectures, the Docker engine and
# libvirtd (with /dev/kvm masked where the CPU shows no vmx/svm).  Uses systemd where it
# runs; starts the daemons directly where it does not (containers, CI runners).  Safe to
# run again.  Run as root.  This is `pytest-isolate setup` without the package installs.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
exec "$repo/.venv/bin/pytest-isolate" setup --pyproject "$repo/pyproject.toml" \
  --no-packages --backends all --arches arm64,armhf
