"""pytest-isolate: run pytest tests inside chroots, containers and virtual machines."""

from __future__ import annotations

from pytest_isolate.environment import Environment, ExecResult
from pytest_isolate.errors import (
    AgentError,
    BackendUnavailable,
    ConfigError,
    IsolateError,
    ProvisionError,
)
from pytest_isolate.spec import EnvSpec

__all__ = [
    "AgentError",
    "BackendUnavailable",
    "ConfigError",
    "EnvSpec",
    "Environment",
    "ExecResult",
    "IsolateError",
    "ProvisionError",
]
__version__ = "0.1.0"
