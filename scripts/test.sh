#!/usr/bin/env bash
# The project's own tests: unit, conformance (every backend) and integration, strict.
# Runs as root (lxc and schroot need it; the rootless path is tested by dropping to the
# unprivileged user that setup.sh creates), re-running itself through sudo otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  exec sudo --preserve-env=PATH "$0" "$@"
fi
exec .venv/bin/pytest --isolate-strict "$@"
