"""The environment variables inside an environment: none of the host's but those asked for.

Below the backends (every backend, the root filesystem's setup commands and the
dependency layer's installer run with them), so images/ needs nothing from backends/.
"""

from __future__ import annotations

import os

from pytest_isolate.spec import EnvSpec

#: Default environment variables inside (no host variables leak in).
BASE_ENV = {
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
    "PYTHONUNBUFFERED": "1",
}

#: Host variables pytest itself reads (they decide whether assertion diffs are truncated):
#: passed in so that a report reads the same inside as outside.
FIDELITY_ENV = ("CI", "BUILD_NUMBER")
#: Where a backend that can share a host directory keeps the environment's bytecode.
PYCACHE = "/.isolate/pycache"


def environment_variables(spec: EnvSpec, pycache: bool = False) -> dict[str, str]:
    """The environment inside: no host variables but those the spec passes."""
    env = dict(BASE_ENV)
    for name in FIDELITY_ENV:
        if name in os.environ:
            env[name] = os.environ[name]
    if pycache:
        del env["PYTHONDONTWRITEBYTECODE"]
        env["PYTHONPYCACHEPREFIX"] = PYCACHE
    for name in spec.pass_env:
        if name in os.environ:
            env[name] = os.environ[name]
    if spec.layer is not None:  # the project's virtual environment: its tools come first
        from pytest_isolate.agent.wire import DEFAULT_PATH
        from pytest_isolate.images.deps import VENV

        env["VIRTUAL_ENV"] = VENV
        env["PATH"] = f"{VENV}/bin:{DEFAULT_PATH}"
    return env
