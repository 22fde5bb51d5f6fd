#!/usr/bin/env bash
# The project's own tests: unit, conformance (every backend) and integration, strict.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/pytest --isolate-strict "$@"
