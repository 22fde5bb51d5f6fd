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


def system_variables() -> dict[str, str]:
    """PATH, HOME and LANG as root's login on the environment's Debian has them: where a
    backend starts the agent with an empty environment (``env -i``, an image's ENV, a VM's
    /init).  The shipped agent's launcher sets the same for the chroot backend; PATH's one
    home is agent.wire.DEFAULT_PATH, since the agent can import nothing of the host's."""
    from pytest_isolate.agent.wire import DEFAULT_PATH

    return {"PATH": DEFAULT_PATH, "HOME": "/root", "LANG": "C.UTF-8"}


def environment_variables(spec: EnvSpec, pycache: bool = False,
                          system: bool = False) -> dict[str, str]:
    """The environment inside: no host variables but those the spec passes (after
    system_variables() when `system`: where nothing else sets PATH, HOME and LANG)."""
    env = system_variables() if system else {}
    env.update(BASE_ENV)
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
