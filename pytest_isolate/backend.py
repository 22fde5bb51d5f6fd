"""What a third-party backend imports: the one public surface for backend authors.

A backend is a :class:`Backend` subclass returned by a ``pytest_isolate_backends``
hook implementation (see ``hookspecs.py``; the built-in backends register the same
way, and a plugin that answers with a built-in name replaces it)::

    from contextlib import ExitStack
    from pytest_isolate.backend import Backend, Entry, EnvSpec, Launch, hookimpl

    class PodBackend(Backend):
        name = "pod"

        def check(self, spec: EnvSpec) -> None: ...
        def provision(self, spec: EnvSpec) -> Entry: ...
        def launch(self, stack: ExitStack, spec: EnvSpec, image: Entry) -> Launch: ...

    @hookimpl
    def pytest_isolate_backends():
        return {"pod": PodBackend}   # or "my_plugin.pod:PodBackend", imported when used

``launch()`` starts the agent and pushes the undo of everything it made onto the
ExitStack.  ``Backend.start`` (the template) reaps once, unwinds the stack if the launch
fails, else hands it to the :class:`Instance`, whose ``stop()`` unwinds it -- also when
the handshake (``ready()``, overridden where a backend's differs) fails.  A backend may
override ``start()`` instead and build its :class:`Instance` itself.

Everything here keeps its name and meaning across releases; the modules it comes from
(``backends/base.py``, ``channel.py``, ...) are internal and may move.  Then run the
conformance suite (``tests/conformance``) against an environment of the new backend.
"""

from __future__ import annotations

import pluggy

from pytest_isolate.agent.wire import BOOTSTRAP
from pytest_isolate.backends.base import (
    SITE,
    Backend,
    Instance,
    Launch,
    Mount,
    RootfsBackend,
    RunContext,
    Transport,
    agent_command,
    agent_settings,
    handshake_or_stop,
    need_tool,
    standard_mounts,
)
from pytest_isolate.cache import Cache, Entry
from pytest_isolate.channel import AgentProcess, Connection
from pytest_isolate.config import Option
from pytest_isolate.errors import AgentLost, BackendUnavailable, IsolateError, ProvisionError
from pytest_isolate.hookspecs import BackendRef
from pytest_isolate.images.envvars import environment_variables
from pytest_isolate.setup_host import HostNeeds, Package
from pytest_isolate.spec import EnvSpec

#: Marks a hook implementation (``pytest_isolate_backends``); the same as ``pytest.hookimpl``.
hookimpl = pluggy.HookimplMarker("pytest")

__all__ = [
    "BOOTSTRAP",
    "SITE",
    "AgentLost",
    "AgentProcess",
    "Backend",
    "BackendRef",
    "BackendUnavailable",
    "Cache",
    "Connection",
    "Entry",
    "EnvSpec",
    "HostNeeds",
    "Instance",
    "IsolateError",
    "Launch",
    "Mount",
    "Option",
    "Package",
    "ProvisionError",
    "RootfsBackend",
    "RunContext",
    "Transport",
    "agent_command",
    "agent_settings",
    "environment_variables",
    "handshake_or_stop",
    "hookimpl",
    "need_tool",
    "standard_mounts",
]
