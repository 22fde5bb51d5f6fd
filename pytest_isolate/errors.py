"""One exception hierarchy for everything pytest-isolate raises."""

from __future__ import annotations


class IsolateError(Exception):
    """Base of every pytest-isolate error."""


class ConfigError(IsolateError):
    """A bad setting; the message names the key, the value, where it came from and the fix.

    The plugin turns it into a ``pytest.UsageError`` before any environment is built.
    """


class BackendUnavailable(IsolateError):
    """A backend's prerequisites are missing on this host.

    Tests that need it skip with this message, or fail under ``--isolate-strict``.
    """

    def __init__(self, backend: str, reason: str, fix: str = "") -> None:
        self.backend = backend
        self.reason = reason
        self.fix = fix
        super().__init__(f"backend {backend!r} is unavailable: {reason}" + (f"; {fix}" if fix else ""))


class NoHostLeft(BackendUnavailable):
    """Every pool host that serves an environment's backend and architecture failed its
    health check or died in this run; ``dead`` maps each host's name to why."""

    def __init__(self, env: str, backend: str, arch: str, dead: dict[str, str]) -> None:
        self.env = env
        self.dead = dead
        hosts = "; ".join(f"host {name!r}: {why}" for name, why in dead.items())
        super().__init__(backend, f"no host of the pool is left for environment {env!r} "
                         f"({backend}, {arch}): {hosts}",
                         "start those engines, or add a host serving it under "
                         "[tool.pytest-isolate.hosts.NAME]")


class ProvisionError(IsolateError):
    """Building an environment failed; carries the builder's log tail."""

    def __init__(self, message: str, log_tail: str = "", log_path: str = "") -> None:
        self.log_tail = log_tail
        self.log_path = log_path
        text = message
        if log_path:
            text += f"\nfull log: {log_path}"
        if log_tail:
            text += "\n--- log tail ---\n" + log_tail
        super().__init__(text)


class AgentError(IsolateError):
    """The agent inside an environment failed, died, or broke the protocol."""


class AgentLost(AgentError):
    """The agent's stream ended or became unreadable; the instance is gone."""


class AgentTimeout(AgentError):
    """The agent did not answer in time."""


class RemoteError(IsolateError):
    """An operation inside the environment raised; carries its remote traceback."""

    def __init__(self, type_name: str, message: str, remote_traceback: str = "") -> None:
        self.type_name = type_name
        self.remote_traceback = remote_traceback
        super().__init__(f"{type_name}: {message}")
